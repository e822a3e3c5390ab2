"""beampipe-ca against the Channel Access clients a user would pick instead, on one softIoc.

Run: ``.venv/bin/python benchmarks/ca_bench.py`` (about a minute).

Every row is a fresh wire operation (no monitor caches): ``PV.get(use_monitor=False)``,
``caget_many``, aioca ``caget``, caproto's threading client ``read``; a bare libca
batch (``ca_array_get`` x N + one ``ca_pend_io``, no Python per reply) is the floor.
Every read is checked for a value before it is timed.  Connect rows use PV names no
client in the process has seen before (``record.FIELD`` names, one field per repetition).
Prints medians, and ratios as "peer time / beampipe time" (above 1: beampipe is faster).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from beampipe.testing import Ioc, pin_epics_to_loopback

pin_epics_to_loopback()

import numpy as np  # noqa: E402

import beampipe_ca  # noqa: E402  (points pyepics at epicscorelibs' libca)

#: When this process created its first CA channel: libca starts its UDP side (search,
#: disconnect-governor and repeater-registration timers) then, for the reconnect row.
FIRST_CHANNEL = 0.0

N_SCALARS = 300
N_WF = 100
WF_LEN = 1000
# Fields of an ao record, each a new CA channel name per record: fresh names for connect rows.
FIELDS = [
    "VAL", "DESC", "EGU", "HOPR", "LOPR", "PREC", "HIHI", "LOLO", "HIGH", "LOW",
    "DRVH", "DRVL", "MDEL", "ADEL", "OROC", "EOFF", "ESLO", "AOFF", "ASLO", "DISV",
    "SCAN", "PINI", "NAME", "RVAL", "ORAW", "SEVR", "STAT", "UDF", "TPRO", "PHAS",
]  # fmt: skip
# More ao fields, for the "what paces libca's search" table.
PACING_FIELDS = [
    "DTYP", "DISA", "DISS", "SDIS", "PRIO", "ACKS", "ACKT", "LCNT", "PACT", "PUTF", "RPRO",
    "HHSV", "LLSV", "HSV", "LSV", "HYST", "LALM", "ALST", "MLST",
]  # fmt: skip
# ao fields no other row opens, one fresh name per record: the search-tick table.
TICK_FIELDS = ["OVAL"]
NUMERIC_FIELDS = ["HOPR", "LOPR", "HIHI", "LOLO", "HIGH", "LOW", "DRVH", "DRVL", "MDEL", "ADEL"]

#: Rounds (each layer in turn) of the ophyd Device(200) connect/read rows.
DEVICE_ROUNDS = 15

rows: list[tuple[str, str, float]] = []  # (row, client, median seconds)


def race(
    clients: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]], reps: int, rounds: int = 3
) -> dict[str, float]:
    """Median time per client: each client runs reps/rounds calls back to back, in turns.

    Back to back, so each client is timed in its steady state (threads awake, caches
    warm; a client is not charged for the previous client's leftover background work);
    in rounds, each starting with the next client, so a burst of load from other jobs on
    this shared machine lands on every client rather than on whichever ran at that
    moment, and no client always runs right after the same other one.
    """
    for fn, check in clients.values():
        check(fn())  # warm-up, and proof that it returns values
    times: dict[str, list[float]] = {name: [] for name in clients}
    order = list(clients.items())
    for k in range(rounds):
        # Each round starts with the next client: whoever follows a client that leaves
        # garbage or busy threads behind (caproto's, aioca's) is not always the same one.
        for name, (fn, check) in order[k % len(order) :] + order[: k % len(order)]:
            gc.collect()  # the previous client's garbage is collected on its own time
            check(fn())  # settle into this client before timing it
            for _ in range(max(1, reps // rounds)):
                t0 = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t0)
                check(out)
    return {name: statistics.median(t) for name, t in times.items()}


def record(row: str, client: str, seconds: float) -> None:
    rows.append((row, client, seconds))
    print(f"  {row:<34} {client:<30} {seconds * 1e3:9.3f} ms", flush=True)


def all_values(out: Any) -> None:
    values = list(out.values()) if isinstance(out, dict) else list(out)
    missing = sum(v is None for v in values)
    if missing:
        raise SystemExit(f"benchmark invalid: {missing} of {len(values)} reads returned no value")


def one_value(out: Any) -> None:
    if out is None:
        raise SystemExit("benchmark invalid: a read returned no value")


# -- bare libca floor ------------------------------------------------------------------
class LibcaFloor:
    """N ca_array_get into preallocated DBR_TIME buffers, one ca_pend_io: no per-reply Python."""

    def __init__(self, names: list[str]) -> None:
        from epicscorelibs.ca import dbr

        from beampipe_ca._libca import context

        self.ctx = context()
        self.lib = self.ctx.lib
        self.lib.ca_array_get.argtypes = [
            ctypes.c_long,
            ctypes.c_ulong,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self.lib.ca_pend_io.argtypes = [ctypes.c_double]
        chans = self.ctx.channels(names)
        assert not self.ctx.wait_connected(chans, 10)
        self.jobs = []
        for chan in chans:
            struct = dbr.DbrCodeToType[chan.native + 14]
            if chan.count > 1:
                buf = ctypes.create_string_buffer(ctypes.sizeof(struct) + 8 * chan.count)
            else:
                buf = struct()
            self.jobs.append((chan.native + 14, chan.count, chan.chid, buf, struct))

    def read(self) -> list[Any]:
        self.ctx.attach()
        get = self.lib.ca_array_get
        for dbrcode, count, chid, buf, _s in self.jobs:
            get(dbrcode, count, chid, ctypes.byref(buf))
        if self.lib.ca_pend_io(5.0) != 1:
            return [None]
        out = []
        for _d, count, _c, buf, struct in self.jobs:
            if count > 1:
                # The cheapest copy out of a ctypes buffer into numpy (no .ctypes.data).
                off = struct.raw_value.offset
                out.append(np.frombuffer(buf, np.float64, count, off).copy())
            else:
                out.append(buf.raw_value[0])
        return out


# -- the rows --------------------------------------------------------------------------------
def reads(ioc: Ioc, loop: asyncio.AbstractEventLoop) -> None:
    import epics
    from caproto.threading.client import Context as CaprotoContext

    scalars = [ioc.pv(f"s{i}") for i in range(100)]
    waves = [ioc.pv(f"w{i}") for i in range(N_WF)]
    data = np.arange(WF_LEN, dtype=float)
    for name in waves:
        epics.caput(name, data, wait=True)
    caproto_ctx = CaprotoContext()

    def run(coro: Any) -> Any:
        return loop.run_until_complete(coro)

    run(_attach())
    for row, names, reps in (
        ("single fresh get", scalars[:1], 300),
        ("bulk 100 scalars", scalars, 64),
        (f"bulk {N_WF} waveforms x {WF_LEN} doubles", waves, 64),
    ):
        _read_row(row, names, reps, caproto_ctx, run)
    caproto_ctx.disconnect()


def _read_row(
    row: str, names: list[str], reps: int, caproto_ctx: Any, run: Callable[[Any], Any]
) -> None:
    import aioca
    import epics

    assert not beampipe_ca.connect(names, timeout=10)
    floor = LibcaFloor(names)
    pvs = [epics.PV(n, auto_monitor=False) for n in names]
    assert all(pv.wait_for_connection(10) for pv in pvs)
    cpvs = caproto_ctx.get_pvs(*names)
    for cpv in cpvs:
        cpv.wait_for_connection(timeout=10)
    run(aioca.connect(names, timeout=10))
    clients: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]]
    if len(names) == 1:
        name, pv, cpv = names[0], pvs[0], cpvs[0]
        clients = {
            "beampipe_ca.caget": (lambda: beampipe_ca.caget(name).value, one_value),
            "libca floor (pend_io)": (floor.read, all_values),
            "pyepics PV.get(use_monitor=F)": (lambda: pv.get(use_monitor=False), one_value),
            "aioca caget": (lambda: run(aioca.caget(name)), one_value),
            "caproto threading read": (lambda: cpv.read().data, one_value),
        }
    else:
        clients = {
            "beampipe_ca.bulk_get": (lambda: beampipe_ca.bulk_get(names), all_values),
            "libca floor (pend_io)": (floor.read, all_values),
            "pyepics caget_many": (lambda: epics.caget_many(names), all_values),
            "aioca caget(list)": (lambda: run(aioca.caget(names)), all_values),
            "caproto threading Batch": (lambda: _caproto_batch(cpvs), all_values),
        }
    # 8 rounds, each starting with the next client (see race): with 3 rounds of 13 in a
    # fixed order, beampipe right after caproto's Batch, the waveform row's ratio to the
    # floor moved 0.8-1.6x from run to run
    for client, seconds in race(clients, reps, rounds=8).items():
        record(row, client, seconds)


async def _attach() -> None:
    from beampipe_ca._libca import context

    context().attach()  # aioca adopts the shared context in the loop's thread


def _caproto_batch(cpvs: list[Any]) -> list[Any]:
    from caproto.threading.client import Batch

    out: list[Any] = [None] * len(cpvs)
    left = [len(cpvs)]
    import threading

    done = threading.Event()

    def make_cb(i: int) -> Callable[[Any], None]:
        def cb(resp: Any) -> None:
            out[i] = resp.data
            left[0] -= 1
            if left[0] == 0:
                done.set()

        return cb

    with Batch() as b:
        for i, pv in enumerate(cpvs):
            b.read(pv, make_cb(i))
    if not done.wait(5):
        return [None]
    return out


def connects(ioc: Ioc, loop: asyncio.AbstractEventLoop) -> None:
    import aioca
    import epics
    from caproto.threading.client import Context as CaprotoContext

    fields = iter(FIELDS)

    def fresh(n: int = 100) -> list[str]:
        field = next(fields)
        return [ioc.pv(f"s{i}.{field}") for i in range(n)]

    def timed(fn: Callable[[list[str]], bool], reps: int) -> float:
        times = []
        for _ in range(reps):
            names = fresh()
            t0 = time.perf_counter()
            ok = fn(names)
            times.append(time.perf_counter() - t0)
            if not ok:
                raise SystemExit("benchmark invalid: a connect did not complete")
        return statistics.median(times)

    row = "connect 100 never-seen PVs"
    record(row, "beampipe_ca.connect", timed(lambda n: not beampipe_ca.connect(n, 10), 5))

    def pyepics_connect(names: list[str]) -> bool:
        pvs = [epics.PV(n, auto_monitor=False) for n in names]
        return all(pv.wait_for_connection(10) for pv in pvs)

    record(row, "pyepics PV + wait_for_connection", timed(pyepics_connect, 5))

    def aioca_connect(names: list[str]) -> bool:
        return all(loop.run_until_complete(aioca.connect(names, timeout=10)))

    record(row, "aioca connect(list)", timed(aioca_connect, 5))
    ctx = CaprotoContext()

    def caproto_connect(names: list[str]) -> bool:
        pvs = ctx.get_pvs(*names)
        for pv in pvs:
            pv.wait_for_connection(timeout=10)
        return all(pv.connected for pv in pvs)

    record(row, "caproto threading get_pvs", timed(caproto_connect, 5))
    ctx.disconnect()

    # What paces libca: connect time against the number of new channels ...
    pacing = iter(PACING_FIELDS)
    print("  libca search pacing (beampipe_ca.connect of N new PVs, 3 repetitions each):")
    for n in (1, 10, 30, 100, 300):
        times = []
        for _ in range(3):
            field = next(pacing)
            names = [ioc.pv(f"s{i}.{field}") for i in range(n)]
            t0 = time.perf_counter()
            if beampipe_ca.connect(names, 10):
                raise SystemExit("benchmark invalid: a connect did not complete")
            times.append(1e3 * (time.perf_counter() - t0))
        print(f"    N = {n:3d}: " + ", ".join(f"{t:5.1f}" for t in times) + " ms")
    # ... and against the pause since the previous connect: libca's search timer is a
    # free-running clock (period = its round-trip estimate, floored at 32 ms), so a new
    # channel waits for the next tick, whatever the pause.
    names_left = iter(ioc.pv(f"s{i}.{field}") for field in TICK_FIELDS for i in range(N_SCALARS))
    print(
        "  libca search tick (connect 1 new PV after a pause since the last connect, median of 5):"
    )
    for pause_ms in (0, 8, 16, 24, 31, 40, 64):
        times = []
        for _ in range(5):
            name = next(names_left)
            time.sleep(pause_ms / 1e3)
            t0 = time.perf_counter()
            if beampipe_ca.connect([name], 10):
                raise SystemExit("benchmark invalid: a connect did not complete")
            times.append(1e3 * (time.perf_counter() - t0))
        print(f"    pause {pause_ms:2d} ms: {statistics.median(times):5.1f} ms")


def reconnect(ioc: Ioc) -> None:
    """What paces a reconnect after an IOC restart: libca's disconnect governor, a 10 s clock."""
    from beampipe_ca._libca import context

    ctx = context()
    chan = ctx.channel(ioc.pv("s0"))
    if ctx.wait_connected([chan], 10):
        raise SystemExit("benchmark invalid: s0 did not connect")
    ioc.restart()
    t_up = time.monotonic()
    if ctx.wait_connected([chan], 30):
        raise SystemExit("benchmark invalid: s0 did not reconnect within 30 s")
    took = time.monotonic() - t_up
    age = time.monotonic() - FIRST_CHANNEL
    print(
        f"  IOC restart: reconnected {took:.2f} s after the IOC was back, {age:.2f} s after this "
        f"process's first CA channel ({age % 10:.2f} s past a multiple of libca's 10 s "
        "disconnect-governor period)"
    )


def ophyd_devices(ioc: Ioc) -> None:
    import beampipe

    beampipe.import_ophyd()
    import ophyd
    from ophyd import Component as Cpt
    from ophyd import Device, EpicsSignalRO

    # Each destroy clears the Device's channels, so a field used again is still a fresh
    # connect (new search, new metadata).  15 rounds per layer: each connect carries libca's
    # search-tick phase (0-32 ms) and now and then a second search round (~150-200 ms), in
    # both layers alike; with 7 the medians moved by a third from run to run.
    fields = itertools.cycle(FIELDS[20:27])
    failures = {"pyepics": 0, "beampipe-ca": 0}

    def one(layer: str, field: str | None = None) -> tuple[float, float]:
        field = field or next(fields)
        attrs = {f"s{i}": Cpt(EpicsSignalRO, f"s{100 + i}.{field}") for i in range(200)}
        t0 = time.perf_counter()
        dev = type("Bank", (Device,), attrs)(ioc.prefix, name="bank")
        try:
            dev.wait_for_connection(timeout=10)
        except TimeoutError:
            failures[layer] += 1
            return float("nan"), float("nan")
        t1 = time.perf_counter()
        reading = dev.read()
        t2 = time.perf_counter()
        all_values({k: v["value"] for k, v in reading.items()})
        if len(reading) != 200:
            raise SystemExit(f"benchmark invalid: Device read {len(reading)} of 200 signals")
        dev.destroy()
        return t1 - t0, t2 - t1

    results: dict[str, list[tuple[float, float]]] = {"pyepics": [], "beampipe-ca": []}
    for _ in range(DEVICE_ROUNDS):
        for layer in ("pyepics", "beampipe-ca"):
            if layer == "pyepics":
                beampipe.reset()
                ophyd.set_cl("pyepics")
            else:
                beampipe.use("beampipe-ca", ophyd_async=False)
            results[layer].append(one(layer))
    beampipe.reset()
    for layer, label in (("beampipe-ca", "beampipe-ca layer"), ("pyepics", "ophyd pyepics layer")):
        con = statistics.median(c for c, _r in results[layer])
        rd = statistics.median(r for _c, r in results[layer])
        record("ophyd Device(200) connect", label, con)
        record("ophyd Device(200) read", label, rd)
    # Reliability: the same Device built and connected again and again (each destroy clears
    # its channels, so each connect is a new libca search and metadata batch).
    beampipe.use("beampipe-ca", ophyd_async=False)
    reps = 100
    times = [one("beampipe-ca", FIELDS[27])[0] for _ in range(reps)]
    beampipe.reset()
    print(
        f"  ophyd Device(200) connect, beampipe-ca, {reps} repetitions: "
        f"{failures['beampipe-ca']} failures, median {1e3 * statistics.median(times):.1f} ms, "
        f"max {1e3 * max(times):.1f} ms"
    )
    if failures["pyepics"]:
        print(f"  ophyd Device(200) connect: {failures['pyepics']} failures on the pyepics layer")


def ophyd_async_devices(ioc: Ioc, loop: asyncio.AbstractEventLoop) -> None:
    from ophyd_async.core import DeviceVector, SignalR, StandardReadable
    from ophyd_async.epics.core._aioca import CaSignalBackend as AiocaBackend

    from beampipe_ca import CaSignalBackend

    class Bank(StandardReadable):
        def __init__(self, backend: type, field: str) -> None:
            with self.add_children_as_readables():
                self.s = DeviceVector(
                    {
                        i: SignalR(backend(float, pv, pv))
                        for i in range(200)
                        for pv in [f"{ioc.prefix}s{100 + i}.{field}"]
                    }
                )
            super().__init__(name="bank")

    fields = iter(NUMERIC_FIELDS)
    connects: dict[str, list[float]] = {"beampipe": [], "aioca": []}
    reads: dict[str, list[float]] = {"beampipe": [], "aioca": []}
    backends = {"beampipe": CaSignalBackend, "aioca": AiocaBackend}

    async def one_round() -> None:
        devices = {}
        for label, backend in backends.items():
            dev = devices[label] = Bank(backend, next(fields))
            t0 = time.perf_counter()
            await dev.connect(timeout=10)
            connects[label].append(time.perf_counter() - t0)
        # Reads interleaved, so both see the same load on this shared machine, in ABBA
        # order, so neither always runs right after the other's leftovers.
        order = list(devices.items())
        for i in range(16):
            for label, dev in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                reading = await dev.read()
                reads[label].append(time.perf_counter() - t0)
                all_values({k: v["value"] for k, v in reading.items()})

    for _ in range(3):
        loop.run_until_complete(one_round())
    for label, name in (("beampipe", "beampipe CaSignalBackend"), ("aioca", "ophyd-async aioca")):
        record("ophyd-async Device(200) connect", name, statistics.median(connects[label]))
        record("ophyd-async Device(200) read", name, statistics.median(reads[label]))


# ao fields no other client here opens: never-seen names for ophyd-epicsrs' connect rows.
EPICSRS_FIELDS = {
    "connect": ["OMSL", "DOL", "OIF", "IVOA", "OUT"],
    "device": ["RBV", "ORBV", "TSE"],
    "async": ["IVOV", "PVAL"],  # doubles: read as float
}


def epicsrs(ioc: Ioc) -> None:
    """ophyd-epicsrs on the same IOC, from its own venv (it pins ophyd 1.6): benchmarks/peers."""
    from peers import epicsrs as peer

    python = peer.ensure_venv()
    if isinstance(python, str):
        print(f"  ophyd-epicsrs skipped: {python}")
        return

    def fresh(field: str, n: int) -> list[str]:
        return [ioc.pv(f"s{i}.{field}") for i in range(n)]

    spec = {
        "single_get": {"names": [ioc.pv("s0")], "repeats": 300},
        "bulk_scalars": {"names": [ioc.pv(f"s{i}") for i in range(100)], "repeats": 60},
        "bulk_waveforms": {"names": [ioc.pv(f"w{i}") for i in range(N_WF)], "repeats": 40},
        "connect_new": {"name_sets": [fresh(f, 100) for f in EPICSRS_FIELDS["connect"]]},
        "ophyd_device_connect_read": {
            "name_sets": [fresh(f, 200) for f in EPICSRS_FIELDS["device"]],
            "timeout": 5,
        },
        "ophyd_async_device": {
            "name_sets": [fresh(f, 200) for f in EPICSRS_FIELDS["async"]],
            "reads": 15,
            "datatype": "float",
        },
    }
    out = peer.measure(spec)
    for row, reason in out["errors"].items():
        print(f"  ophyd-epicsrs {row}: not measured: {reason}")
    label = "ophyd-epicsrs (own venv)"
    names = {
        "single_get": "single fresh get",
        "bulk_scalars": "bulk 100 scalars",
        "bulk_waveforms": f"bulk {N_WF} waveforms x {WF_LEN} doubles",
        "connect_new": "connect 100 never-seen PVs",
    }
    got = out["rows"]
    for key, row in names.items():
        if key in got:
            record(row, label, statistics.median(got[key]["seconds"]))
    if "ophyd_device_connect_read" in got:
        dev = got["ophyd_device_connect_read"]
        record("ophyd Device(200) connect", label, statistics.median(dev["seconds"]))
        record("ophyd Device(200) read", label, statistics.median(dev["read_seconds"]))
        print(f"  ophyd-epicsrs Device(200) connect failures: {dev['failures']}/{dev['attempts']}")
    if "ophyd_async_device" in got:
        dev = got["ophyd_async_device"]
        record("ophyd-async Device(200) connect", label, statistics.median(dev["seconds"]))
        record("ophyd-async Device(200) read", label, statistics.median(dev["read_seconds"]))


def summary() -> None:
    print("\nratios (peer median / beampipe median; >1 means beampipe is faster):")
    by_row: dict[str, dict[str, float]] = {}
    for row, client, sec in rows:
        by_row.setdefault(row, {})[client] = sec
    for row, clients in by_row.items():
        ours = next(v for k, v in clients.items() if "beampipe" in k)
        parts = [f"{k} {v / ours:.2f}x" for k, v in clients.items() if "beampipe" not in k]
        print(f"  {row:<34} " + "; ".join(parts))

    def get(row: str, client_prefix: str) -> float:
        return next(v for k, v in by_row[row].items() if k.startswith(client_prefix))

    print("\ntargets from issue 3:")
    checks = [
        ("bulk 100 scalars >= 30x faster than aioca",
         get("bulk 100 scalars", "aioca") / get("bulk 100 scalars", "beampipe"), 30.0, True),
        ("bulk 100 scalars within 1.5x of the libca floor",
         get("bulk 100 scalars", "beampipe") / get("bulk 100 scalars", "libca floor"), 1.5, False),
        ("100 waveforms no slower than the libca floor",
         get(f"bulk {N_WF} waveforms x {WF_LEN} doubles", "beampipe")
         / get(f"bulk {N_WF} waveforms x {WF_LEN} doubles", "libca floor"), 1.0, False),
        ("ophyd Device(200) connect >= 5x faster than pyepics layer",
         get("ophyd Device(200) connect", "ophyd pyepics")
         / get("ophyd Device(200) connect", "beampipe"), 5.0, True),
        ("ophyd-async 200-signal read >= 3x faster than aioca",
         get("ophyd-async Device(200) read", "ophyd-async aioca")
         / get("ophyd-async Device(200) read", "beampipe"), 3.0, True),
    ]  # fmt: skip
    for text, value, target, higher_is_better in checks:
        ok = value >= target if higher_is_better else value <= target
        print(f"  [{'met' if ok else 'MISSED'}] {text}: {value:.2f}x")


def main() -> int:
    lines = [
        f'record(ao, "$(P)s{i}") {{ field(VAL, "{i}") field(PREC, "2") field(EGU, "V") }}'
        for i in range(N_SCALARS)
    ]
    lines += [
        f'record(waveform, "$(P)w{i}") {{ field(FTVL, "DOUBLE") field(NELM, "{WF_LEN}") }}'
        for i in range(N_WF)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        db.write_text("\n".join(lines) + "\n")
        with Ioc(db) as ioc:
            print(
                f"softIoc pid {ioc.pid}, {N_SCALARS} ao + {N_WF} waveforms; "
                f"python {sys.version.split()[0]}, {os.cpu_count()} cpus"
            )
            loop = asyncio.new_event_loop()
            global FIRST_CHANNEL
            from beampipe_ca._libca import context

            FIRST_CHANNEL = time.monotonic()
            context().channel(ioc.pv("s0"))  # the first channel: the reconnect row's clock
            try:
                reads(ioc, loop)
                connects(ioc, loop)
                ophyd_devices(ioc)
                ophyd_async_devices(ioc, loop)
                epicsrs(ioc)
                reconnect(ioc)
            finally:
                import aioca

                aioca.purge_channel_caches()
                loop.close()
    summary()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
