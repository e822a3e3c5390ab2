"""beampipe-pva against p4p and ophyd-async's own PVA backend: one command, one run, one server.

    .venv/bin/python benchmarks/pva_bench.py [--quick]

Every peer reads the same QSRV (a pvxslibs softIoc started here) in the same
run; every timed read is a fresh GET (no monitor caches), and every read is
checked to have returned a value before anything is timed.  Medians over
repeats; ratios are "peer time / beampipe time" (higher = beampipe faster).
The machine is shared, so trust ratios more than absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

N_SCALARS = 100
N_WAVEFORMS = 100
WAVEFORM_LEN = 1000
N_CONNECT = 100
N_DEVICE = 200
POOL = 5000  # scalar records: enough fresh names for every connect repeat of every peer


def _db() -> str:
    lines = [
        f'record(ao, "$(P)s{i}") {{ field(VAL, "{i}") field(EGU, "mm") field(PREC, "3") '
        'field(PINI, "YES") }'
        for i in range(POOL)
    ]
    lines += [
        f'record(waveform, "$(P)w{i}") {{ field(FTVL, "DOUBLE") field(NELM, "{WAVEFORM_LEN}") }}'
        for i in range(N_WAVEFORMS)
    ]
    return "\n".join(lines) + "\n"


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interleaved_ms(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median ms of each function, timed in alternating rounds (rotating order) so that load
    changes on the shared machine hit every peer alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for i in range(repeats):
        for k in keys[i % len(keys) :] + keys[: i % len(keys)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def wait_native(names: list[str], timeout: float = 10.0) -> None:
    """Every name on the native read path (the first two reads of a PV go through p4p)."""
    import beampipe_pva

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        beampipe_pva.bulk_get(names)  # a PV's second read starts its native channel
        if all(beampipe_pva.native_state(n) == "ready" for n in names):
            return
        time.sleep(0.01)
    states = {beampipe_pva.native_state(n) for n in names}
    raise SystemExit(f"benchmark aborted: native path not ready for all PVs: {states}")


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float, float | None]] = []

    def add(self, row: str, peer: str, ms: float, ours: float | None = None) -> None:
        self.rows.append((row, peer, ms, None if ours is None else ms / ours))
        ratio = "" if ours is None else f"  x{ms / ours:5.2f}"
        print(f"  {row:<34} {peer:<30} {ms:9.3f} ms{ratio}", flush=True)


def p4p_raw_get(ctx: Any, names: list[str], timeout: float = 5.0) -> list[Any]:
    """The plain p4p.client.raw pattern: issue every get, wait for all, drop the operations."""
    done = threading.Event()
    out: dict[str, Any] = {}
    lock = threading.Lock()

    def make(name: str) -> Callable[[Any], None]:
        def cb(value: Any) -> None:
            with lock:
                out[name] = value
                if len(out) == len(names):
                    done.set()

        return cb

    ops = [ctx.get(name, make(name)) for name in names]
    if not done.wait(timeout):
        raise TimeoutError(f"p4p raw: {len(names) - len(out)} of {len(names)} gets unanswered")
    for op in ops:
        op.close()
    return [out[n] for n in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    args = parser.parse_args(argv)
    reps = 8 if args.quick else 30

    from beampipe.testing import Ioc, pin_epics_to_loopback

    pin_epics_to_loopback()
    from p4p.client import raw
    from p4p.client.thread import Context

    import beampipe_pva

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        db.write_text(_db())
        with Ioc(db, startup_timeout=60) as ioc:
            print(
                f"QSRV softIoc pid {ioc.pid}, {POOL} ao + {N_WAVEFORMS} waveforms; {reps} repeats"
            )
            table = Table()
            scalars = [ioc.pv(f"s{i}") for i in range(N_SCALARS)]
            waves = [ioc.pv(f"w{i}") for i in range(N_WAVEFORMS)]
            fresh = iter(ioc.pv(f"s{i}") for i in range(N_SCALARS, POOL))
            ctx = Context("pva", nt=False)
            rctx = raw.Context("pva", nt=False, useenv=True)
            try:
                _check(beampipe_pva.bulk_get(scalars + waves), scalars + waves)
                _check(dict(zip(scalars, ctx.get(scalars), strict=True)), scalars)
                valued = ctx.get(scalars, request=[VALUE_ONLY] * len(scalars))
                _check(dict(zip(scalars, valued, strict=True)), scalars)
                _check(dict(zip(waves, p4p_raw_get(rctx, waves), strict=True)), waves)
                _bench_reads(table, reps, scalars, waves, ctx, rctx)
                _bench_connect(table, reps, fresh, Context, beampipe_pva)
                asyncio.run(_bench_ophyd_async(table, max(5, reps // 3), fresh, scalars))
                _bench_epicsrs(table, reps, scalars, waves, fresh)
            finally:
                ctx.close()
                rctx.close()
                beampipe_pva.close_context()
    _bench_ndarray(table, reps)
    _summary(table)
    return 0


#: The pvRequest bulk_get's native path INITs its GET with: the server sends only ``value``.
VALUE_ONLY = "field(value)"


def _check(values: dict[str, Any], names: list[str]) -> None:
    missing = [n for n in names if values.get(n) is None]
    if missing:
        raise SystemExit(
            f"benchmark aborted: {len(missing)} reads returned nothing, e.g. {missing[0]}"
        )


def _bench_reads(
    table: Table, reps: int, scalars: list[str], waves: list[str], ctx: Any, rctx: Any
) -> None:
    import beampipe_pva
    from beampipe import Coalescer, Ok

    wait_native(scalars + waves)
    # The same plugin with its native path off (every read a p4p get): the "before".
    p4p_io = beampipe_pva.PvaGetIO(native=False)
    p4p_only: Coalescer[str, Any] = Coalescer(p4p_io, max_batch=2000, name="bench-p4p")

    def via_p4p(names: list[str]) -> None:
        out = p4p_only.get_many("value", names, 5.0)
        if not all(isinstance(o, Ok) for o in out.values()):
            raise SystemExit("benchmark aborted: a p4p-path read failed")

    def ours(names: list[str]) -> None:
        values = beampipe_pva.bulk_get(names)
        if any(v is None for v in values.values()):
            raise SystemExit("benchmark aborted: a read returned nothing")

    one = scalars[0]
    t = interleaved_ms({"ours": lambda: ours([one]), "p4p": lambda: ctx.get(one)}, reps * 3)
    table.add("single get", "beampipe bulk_get([1])", t["ours"])
    table.add("single get", "p4p Context.get", t["p4p"], t["ours"])

    for label, names in (
        (f"bulk get {N_SCALARS} scalars", scalars),
        (f"bulk get {N_WAVEFORMS} wf x {WAVEFORM_LEN} dbl", waves),
    ):
        t = interleaved_ms(
            {
                "ours": lambda n=names: ours(n),
                "list": lambda n=names: ctx.get(n),
                "list-value": lambda n=names: ctx.get(n, request=[VALUE_ONLY] * len(n)),
                "raw": lambda n=names: p4p_raw_get(rctx, n),
                "p4p-path": lambda n=names: via_p4p(n),
                "ours-raw": lambda n=names: beampipe_pva.bulk_get_raw(n),
            },
            reps,
        )
        table.add(label, "beampipe bulk_get", t["ours"])
        table.add(label, "p4p Context.get(list)", t["list"], t["ours"])
        # like for like: bulk_get's native GET asks for field(value) too
        table.add(label, "p4p get(list, field(value))", t["list-value"], t["ours"])
        table.add(label, "p4p.client.raw", t["raw"], t["ours"])
        table.add(label, "beampipe, native path off", t["p4p-path"], t["ours"])
        table.add(label, "beampipe bulk_get_raw (p4p Values)", t["ours-raw"], t["ours"])
    p4p_io.close()


def _bench_connect(table: Table, reps: int, fresh: Any, context_cls: Any, bp: Any) -> None:
    """Search + connect + first get of PVs this process has never asked for."""
    label = f"connect {N_CONNECT} new PVs + get"
    n = max(3, reps // 4)

    def ours() -> None:
        names = [next(fresh) for _ in range(N_CONNECT)]
        bp.close_context()
        _check(bp.bulk_get(names), names)

    def p4p() -> None:
        names = [next(fresh) for _ in range(N_CONNECT)]
        with context_cls("pva", nt=False) as c:
            c.get(names)

    t_ours = median_ms(ours, n, warmup=1)
    table.add(label, "beampipe bulk_get (new ctx)", t_ours)
    table.add(label, "p4p Context.get(list) (new ctx)", median_ms(p4p, n, warmup=1), t_ours)


async def _bench_ophyd_async(table: Table, reps: int, fresh: Any, scalars: list[str]) -> None:
    from ophyd_async.core import Device, SignalR
    from ophyd_async.epics.core._p4p import PvaSignalBackend as TheirBackend

    from beampipe_pva import PvaSignalBackend as OurBackend

    class Many(Device):
        def __init__(self, backend: type, names: list[str]) -> None:
            self.sigs = [SignalR(backend(float, n, n), name=f"s{i}") for i, n in enumerate(names)]
            super().__init__(name="many")

    async def timed(fn: Callable[[], Any], n: int) -> float:
        await fn()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await fn()
            out.append(time.perf_counter() - t0)
        return statistics.median(out) * 1e3

    async def connect_new(backend: type) -> None:
        names = [next(fresh) for _ in range(N_DEVICE)]
        dev = Many(backend, names)
        await asyncio.gather(*(s.connect(timeout=10) for s in dev.sigs))

    n = max(2, reps // 3)
    label = f"ophyd-async {N_DEVICE} signals: connect"
    ours = await timed(lambda: connect_new(OurBackend), n)
    table.add(label, "beampipe backend", ours)
    table.add(
        label,
        "ophyd-async PvaSignalBackend",
        await timed(lambda: connect_new(TheirBackend), n),
        ours,
    )

    names = [next(fresh) for _ in range(N_DEVICE)]
    devs = {b: Many(b, names) for b in (OurBackend, TheirBackend)}
    for dev in devs.values():
        await asyncio.gather(*(s.connect(timeout=10) for s in dev.sigs))

    async def read(backend: type) -> None:
        readings = await asyncio.gather(*(s.read() for s in devs[backend].sigs))
        assert all(r for r in readings)

    label = f"ophyd-async {N_DEVICE} signals: read"
    ours = await timed(lambda: read(OurBackend), reps)
    table.add(label, "beampipe backend", ours)
    table.add(
        label, "ophyd-async PvaSignalBackend", await timed(lambda: read(TheirBackend), reps), ours
    )


def _bench_epicsrs(
    table: Table, reps: int, scalars: list[str], waves: list[str], fresh: Any
) -> None:
    """ophyd-epicsrs on the same QSRV, from its own venv (it pins ophyd 1.6): benchmarks/peers."""
    from peers import epicsrs as peer

    python = peer.ensure_venv()
    if isinstance(python, str):
        print(f"  ophyd-epicsrs skipped: {python}")
        return
    spec = {
        "pva_single_get": {"names": scalars[:1], "repeats": reps * 3},
        "pva_bulk_scalars": {"names": scalars, "repeats": reps},
        "pva_bulk_waveforms": {"names": waves, "repeats": reps},
        "pva_connect_new": {
            "name_sets": [[next(fresh) for _ in range(N_CONNECT)] for _ in range(3)]
        },
        "pva_ophyd_async_device": {
            "name_sets": [[next(fresh) for _ in range(N_DEVICE)] for _ in range(2)],
            "reads": reps,
            "datatype": "float",
        },
    }
    out = peer.measure(spec)
    for row, reason in out["errors"].items():
        print(f"  ophyd-epicsrs {row}: not measured: {reason}")
    ours = {row: ms for row, _, ms, ratio in table.rows if ratio is None}
    label = "ophyd-epicsrs (own venv)"
    rows = {
        "pva_single_get": ("single get", "seconds"),
        "pva_bulk_scalars": (f"bulk get {N_SCALARS} scalars", "seconds"),
        "pva_bulk_waveforms": (f"bulk get {N_WAVEFORMS} wf x {WAVEFORM_LEN} dbl", "seconds"),
        "pva_connect_new": (f"connect {N_CONNECT} new PVs + get", "seconds"),
    }
    if "pva_ophyd_async_device" in out["rows"]:
        rows["pva_ophyd_async_device"] = (f"ophyd-async {N_DEVICE} signals: connect", "seconds")
    for key, (row, field) in rows.items():
        if key in out["rows"]:
            ms = statistics.median(out["rows"][key][field]) * 1e3
            table.add(row, label, ms, ours.get(row))
    if "pva_ophyd_async_device" in out["rows"]:
        row = f"ophyd-async {N_DEVICE} signals: read"
        ms = statistics.median(out["rows"]["pva_ophyd_async_device"]["read_seconds"]) * 1e3
        table.add(row, label, ms, ours.get(row))


def _bench_ndarray(table: Table, reps: int) -> None:
    """Decode of a 2048x2048 uint16 NTNDArray received from a p4p Server, vs memcpy of its bytes."""
    import secrets

    from p4p.nt import NTNDArray
    from p4p.server import Server
    from p4p.server.raw import SharedPV

    import beampipe_pva
    from beampipe import Ok

    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:2048, 0:2048]
    spot = 3000 * np.exp(-((x - 900.0) ** 2 + (y - 1100.0) ** 2) / (2 * 150.0**2))
    image = (spot + rng.poisson(20, (2048, 2048))).astype(np.uint16)
    name = f"BPBENCH{secrets.token_hex(3)}:image"
    pv = SharedPV(initial=NTNDArray().wrap(image, attrib={"ColorMode": 0}))
    server = Server(providers=[{name: pv}])
    try:
        outcome = beampipe_pva.bulk_get_raw([name], timeout=10)[name]
        if not isinstance(outcome, Ok):
            raise SystemExit(f"benchmark aborted: the image read failed: {outcome}")
        value = outcome.value
    finally:
        server.stop()
    frame = beampipe_pva.decode_ndarray(value, name)
    assert frame.shape == image.shape and np.array_equal(frame.data, image)
    dst = np.empty_like(image)
    n = reps * 3
    t_decode = median_ms(lambda: beampipe_pva.decode_ndarray(value, name), n)
    t_copy = median_ms(lambda: np.copyto(dst, image), n)
    t_decode_copy = median_ms(
        lambda: np.copyto(dst, beampipe_pva.decode_ndarray(value, name).data), n
    )
    label = "NTNDArray 2048x2048 u16 decode"
    table.add(label, f"beampipe decode ({1e3 / t_decode:,.0f} fr/s)", t_decode)
    table.add(label, f"memcpy same bytes ({1e3 / t_copy:,.0f} fr/s)", t_copy, t_decode)
    table.add(
        label, f"decode + copy out ({1e3 / t_decode_copy:,.0f} fr/s)", t_decode_copy, t_decode
    )
    # Compressed frames as NDPluginCodec sends them; the data is a smooth-ish detector-like
    # image so the codecs have something to do.  Reference: the uncompressed memcpy above.
    for codec in ("lz4", "bslz4", "blosc"):
        try:
            packed = _compress(codec, image)
        except ImportError:
            print(f"  ({codec} not installed: no row)")
            continue
        v = NTNDArray().wrap(image, attrib={"ColorMode": 0})
        v["value"] = ("ubyteValue", packed)
        v["codec.name"] = codec
        v["codec.parameters"] = 3  # NDUInt16
        v["compressedSize"] = packed.nbytes
        v["uncompressedSize"] = image.nbytes
        assert np.array_equal(beampipe_pva.decode_ndarray(v, name).data, image)
        t = median_ms(lambda v=v: beampipe_pva.decode_ndarray(v, name), reps)
        ratio = image.nbytes / packed.nbytes
        table.add(
            f"NTNDArray {codec} (x{ratio:.1f}) decode",
            f"beampipe decode ({1e3 / t:,.0f} fr/s)",
            t,
        )


def _compress(codec: str, image: np.ndarray) -> np.ndarray:
    data = np.ascontiguousarray(image)
    if codec == "lz4":
        import lz4.block

        return np.frombuffer(lz4.block.compress(data.tobytes(), store_size=False), np.uint8)
    if codec == "bslz4":
        import bitshuffle

        return bitshuffle.compress_lz4(data.reshape(-1)).view(np.uint8)
    import blosc

    return np.frombuffer(blosc.compress(data.tobytes(), typesize=data.itemsize), np.uint8)


def _summary(table: Table) -> None:
    print("\nratios (peer / beampipe; > 1 means beampipe is faster):")
    for row, peer, _ms, ratio in table.rows:
        if ratio is not None:
            print(f"  {row:<34} vs {peer:<30} x{ratio:.2f}")


if __name__ == "__main__":
    sys.exit(main())
