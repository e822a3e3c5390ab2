"""Measures ophyd-epicsrs from INSIDE benchmarks/.venv-epicsrs (it pins ophyd 1.6).

Started by :func:`peers.epicsrs.measure` as ``python -I epicsrs_worker.py``: reads
one JSON spec on stdin, writes JSON lines on stdout (``{"hello": ...}``, then per row
``{"start": row}`` and ``{"row": row, "result": ...}`` or ``{"row": row, "error": ...}``,
then ``{"done": true}``).  The protocol goes to a private copy of fd 1 and fd 1 itself
is pointed at stderr, so nothing the Rust client or ophyd prints can corrupt it.

Every row checks that its reads returned values (warm-up first, then each timed
result, outside the timed span) and uses a wire read on each repetition: see
docs/benchmark_peers.md for which epicsrs call each row makes and why it is fresh.
Standalone on purpose (stdlib + the venv's packages): it never imports beampipe.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any, TextIO

# ophyd's import runs set_cl(), which would start a pyepics dispatcher (8 idle threads,
# and pyepics is not even installed here); "dummy" is what ophyd-epicsrs recommends.
os.environ.setdefault("OPHYD_CONTROL_LAYER", "dummy")


class RowError(Exception):
    """A row could not be measured honestly; the message says why, the row name is added."""


class Ctx:
    """Spec-wide settings and the names this process has already opened, per protocol."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.timeout = float(spec.get("timeout", 10.0))
        self.repeats = int(spec.get("repeats", 20))
        self.row_budget = float(spec.get("row_budget", 18.0))
        self.deadline = time.monotonic() + float(spec.get("budget", 85.0))
        self.seen: dict[str, set[str]] = {"ca": set(), "pva": set()}

    def touch(self, protocol: str, names: list[str]) -> None:
        self.seen[protocol].update(names)

    def check_fresh(self, protocol: str, names: list[str]) -> None:
        """Connect rows must open channels this process never had: the point of the row."""
        used = [n for n in names if n in self.seen[protocol]]
        if used:
            raise RowError(
                f"{len(used)} of {len(names)} names were already opened by this worker "
                f"(e.g. {used[0]!r}); connect rows need never-seen PV names"
            )
        if len(set(names)) != len(names):
            raise RowError("duplicate PV names within one repetition")


def reps(ctx: Ctx, row: dict[str, Any], start: float) -> Iterator[int]:
    """Repetition indices, cut short (never below one) when the row's time budget is spent."""
    n = int(row.get("repeats", ctx.repeats))
    for i in range(n):
        if i and time.monotonic() > min(start + ctx.row_budget, ctx.deadline):
            return
        yield i


def check_values(values: dict[str, Any], min_elements: int = 0) -> None:
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise RowError(
            f"{len(missing)} of {len(values)} reads returned no value (e.g. {missing[0]})"
        )
    if min_elements:
        short = [k for k, v in values.items() if len(v) < min_elements]
        if short:
            raise RowError(
                f"{len(short)} waveforms shorter than {min_elements} elements "
                f"(e.g. {short[0]}: {len(values[short[0]])})"
            )


def names_of(row: dict[str, Any]) -> list[str]:
    names = row.get("names")
    if not isinstance(names, list) or not names:
        raise RowError("spec needs a non-empty list 'names'")
    return [str(n) for n in names]


def sets_of(row: dict[str, Any]) -> list[list[str]]:
    sets = row.get("name_sets")
    if not isinstance(sets, list) or not sets or not all(isinstance(s, list) and s for s in sets):
        raise RowError("spec needs 'name_sets': a non-empty list of non-empty name lists")
    return [[str(n) for n in s] for s in sets]


# -- read rows ------------------------------------------------------------------------------
def timed_reads(
    ctx: Ctx, row: dict[str, Any], read: Callable[[], dict[str, Any]], min_elements: int
) -> dict[str, Any]:
    start = time.monotonic()
    check_values(read(), min_elements)  # warm-up: connects, fills the channel cache
    check_values(read(), min_elements)  # a second one: CA's first get may be the prefetch
    seconds = []
    for _ in reps(ctx, row, start):
        t0 = time.perf_counter()
        out = read()
        seconds.append(time.perf_counter() - t0)
        check_values(out, min_elements)
    return {"seconds": seconds}


def single_get(ctx: Ctx, row: dict[str, Any], protocol: str) -> dict[str, Any]:
    from ophyd_epicsrs import get_ca_context, get_pva_context

    name = names_of(row)[0]
    ctx.touch(protocol, [name])
    client = get_ca_context() if protocol == "ca" else get_pva_context()
    pv = client.create_pv(name)
    if not pv.wait_for_connection(ctx.timeout):
        raise RowError(f"{name} did not connect within {ctx.timeout} s")

    def read() -> dict[str, Any]:
        md = pv.get_with_metadata(timeout=ctx.timeout, form="time")
        return {name: None if md is None else md["value"]}

    result = timed_reads(ctx, row, read, 0)
    result["api"] = f"{'EpicsRsPV' if protocol == 'ca' else 'EpicsRsPvaPV'}.get_with_metadata"
    return result


def bulk_get(ctx: Ctx, row: dict[str, Any], protocol: str) -> dict[str, Any]:
    from ophyd_epicsrs import get_ca_context, get_pva_context

    names = names_of(row)
    ctx.touch(protocol, names)
    min_elements = int(row.get("min_elements", 0))
    if protocol == "ca":
        ca = get_ca_context()

        def read() -> dict[str, Any]:
            return dict(ca.bulk_get(names, timeout=ctx.timeout))

    else:
        pva = get_pva_context()

        def read() -> dict[str, Any]:
            # PVA bulk_get hands back lazy metadata wrappers: decoding the value is part
            # of a read (p4p's get returns decoded values), so it is inside the timed span.
            out = pva.bulk_get(names, timeout=ctx.timeout)
            return {k: None if md is None else md["value"] for k, md in out.items()}

    result = timed_reads(ctx, row, read, min_elements)
    result["api"] = f"{'EpicsRsContext' if protocol == 'ca' else 'EpicsRsPvaContext'}.bulk_get"
    result["n"] = len(names)
    return result


# -- connect rows ---------------------------------------------------------------------------
def connect_new(ctx: Ctx, row: dict[str, Any], protocol: str) -> dict[str, Any]:
    from ophyd_epicsrs import get_ca_context, get_pva_context

    sets = sets_of(row)
    row = {**row, "repeats": min(int(row.get("repeats", len(sets))), len(sets))}
    start = time.monotonic()
    seconds = []
    for i in reps(ctx, row, start):
        names = sets[i]
        ctx.check_fresh(protocol, names)
        ctx.touch(protocol, names)
        if protocol == "ca":
            ca = get_ca_context()
            t0 = time.perf_counter()
            pvs = [ca.create_pv(n) for n in names]
            state = ca.bulk_connect_and_prefetch(pvs, timeout=ctx.timeout)
            elapsed = time.perf_counter() - t0
            failed = [n for n in names if state.get(n) is None]
        else:
            # Not a loop of wait_for_connection: a PVA channel only searches once waited
            # on, so that pays one search round (~12 ms here) per PV in turn.
            pva = get_pva_context()

            async def connect_all(pvs: list[Any]) -> list[bool]:
                return list(await asyncio.gather(*(p.connect_async(ctx.timeout) for p in pvs)))

            loop = asyncio.new_event_loop()
            try:
                t0 = time.perf_counter()
                pvs = [pva.create_pv(n) for n in names]
                ok = loop.run_until_complete(connect_all(pvs))
                elapsed = time.perf_counter() - t0
            finally:
                loop.close()
            failed = [n for n, good in zip(names, ok, strict=True) if not good]
        if failed:
            raise RowError(f"{len(failed)} of {len(names)} PVs did not connect (e.g. {failed[0]})")
        seconds.append(elapsed)
        del pvs
    api = (
        "create_pv x N + EpicsRsContext.bulk_connect_and_prefetch"
        if protocol == "ca"
        else "create_pv x N + asyncio.gather(EpicsRsPvaPV.connect_async)"
    )
    return {"seconds": seconds, "api": api, "n": len(sets[0])}


def ophyd_device(ctx: Ctx, row: dict[str, Any], protocol: str) -> dict[str, Any]:
    from ophyd_epicsrs import use_epicsrs

    use_epicsrs()  # before any Signal exists: they bind ophyd.cl.get_pv at construction
    from ophyd import Component, Device, EpicsSignalRO

    sets = sets_of(row)
    row = {**row, "repeats": min(int(row.get("repeats", len(sets))), len(sets))}
    scheme = "pva://" if protocol == "pva" else ""
    start = time.monotonic()
    connect: list[float] = []
    read: list[float] = []
    failures = 0
    reasons: list[str] = []
    for i in reps(ctx, row, start):
        names = sets[i]
        ctx.check_fresh(protocol, names)
        ctx.touch(protocol, names)
        attrs = {f"s{k}": Component(EpicsSignalRO, scheme + n) for k, n in enumerate(names)}
        cls = type(f"Bank{i}", (Device,), attrs)
        t0 = time.perf_counter()
        dev = cls("", name="bank")
        try:
            dev.wait_for_connection(timeout=ctx.timeout)
        except TimeoutError:
            failures += 1
            down = [w.item.pvname for w in dev.walk_signals() if not w.item.connected]
            reasons.append(f"{len(down)} of {len(names)} not connected, e.g. {down[:3]}")
            dev.destroy()
            continue
        t1 = time.perf_counter()
        reading = dev.read()
        t2 = time.perf_counter()
        check_values({k: v["value"] for k, v in reading.items()})
        if len(reading) != len(names):
            raise RowError(f"Device read {len(reading)} of {len(names)} signals")
        connect.append(t1 - t0)
        read.append(t2 - t1)
        dev.destroy()
    if not connect:
        raise RowError(
            f"all {failures} Device connects timed out after {ctx.timeout} s: {reasons[0]}"
        )
    return {
        "seconds": connect,
        "read_seconds": read,
        "failures": failures,
        "failure_reasons": reasons,
        "attempts": failures + len(connect),
        "api": "ophyd 1.6 Device of EpicsSignalRO under use_epicsrs(): "
        "wait_for_connection, then Device.read()",
        "n": len(sets[0]),
    }


def ophyd_async_device(ctx: Ctx, row: dict[str, Any], protocol: str) -> dict[str, Any]:
    from ophyd_async.core import DeviceVector, StandardReadable
    from ophyd_epicsrs.ophyd_async import epicsrs_signal_r

    datatypes: dict[str, type] = {"float": float, "int": int, "str": str}
    datatype = datatypes[row.get("datatype", "float")]
    sets = sets_of(row)
    row = {**row, "repeats": min(int(row.get("repeats", len(sets))), len(sets))}
    n_reads = int(row.get("reads", 10))
    scheme = "pva://" if protocol == "pva" else ""

    class Bank(StandardReadable):
        def __init__(self, names: list[str]) -> None:
            with self.add_children_as_readables():
                self.s = DeviceVector(
                    {k: epicsrs_signal_r(datatype, scheme + n) for k, n in enumerate(names)}
                )
            super().__init__(name="bank")

    async def one(names: list[str]) -> tuple[float, list[float]]:
        dev = Bank(names)
        t0 = time.perf_counter()
        await dev.connect(timeout=ctx.timeout)
        connected = time.perf_counter() - t0
        reading = await dev.read()  # warm-up read, checked
        check_values({k: v["value"] for k, v in reading.items()})
        if len(reading) != len(names):
            raise RowError(f"Device read {len(reading)} of {len(names)} signals")
        times = []
        for _ in range(n_reads):
            r0 = time.perf_counter()
            reading = await dev.read()
            times.append(time.perf_counter() - r0)
            check_values({k: v["value"] for k, v in reading.items()})
        return connected, times

    loop = asyncio.new_event_loop()
    connect: list[float] = []
    read: list[float] = []
    try:
        start = time.monotonic()
        for i in reps(ctx, row, start):
            names = sets[i]
            ctx.check_fresh(protocol, names)
            ctx.touch(protocol, names)
            c, r = loop.run_until_complete(one(names))
            connect.append(c)
            read.extend(r)
    finally:
        loop.close()
    return {
        "seconds": connect,
        "read_seconds": read,
        "api": "ophyd-async StandardReadable of epicsrs_signal_r: connect, then read()",
        "n": len(sets[0]),
    }


ROWS: dict[str, Callable[[Ctx, dict[str, Any]], dict[str, Any]]] = {
    "single_get": lambda c, r: single_get(c, r, "ca"),
    "bulk_scalars": lambda c, r: bulk_get(c, r, "ca"),
    "bulk_waveforms": lambda c, r: bulk_get(c, r, "ca"),
    "connect_new": lambda c, r: connect_new(c, r, "ca"),
    "ophyd_device_connect_read": lambda c, r: ophyd_device(c, r, "ca"),
    "ophyd_async_device": lambda c, r: ophyd_async_device(c, r, "ca"),
    "pva_single_get": lambda c, r: single_get(c, r, "pva"),
    "pva_bulk_scalars": lambda c, r: bulk_get(c, r, "pva"),
    "pva_bulk_waveforms": lambda c, r: bulk_get(c, r, "pva"),
    "pva_connect_new": lambda c, r: connect_new(c, r, "pva"),
    "pva_ophyd_async_device": lambda c, r: ophyd_async_device(c, r, "pva"),
}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def main() -> int:
    proto: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (ours, ophyd's, Rust's) go to stderr, never into the protocol
    sys.stdout = sys.stderr

    def send(msg: dict[str, Any]) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    spec = json.load(sys.stdin)
    ctx = Ctx(spec)
    default_timeout = ctx.timeout
    send(
        {
            "hello": {
                "python": sys.version.split()[0],
                **{d: _version(d) for d in ("ophyd-epicsrs", "ophyd", "ophyd-async", "numpy")},
            }
        }
    )
    for name, row in spec["rows"].items():
        if time.monotonic() > ctx.deadline:
            send({"row": name, "error": "not run: the measure's time budget was spent"})
            continue
        fn = ROWS.get(name)
        if fn is None:
            send({"row": name, "error": f"unknown row; known: {sorted(ROWS)}"})
            continue
        send({"start": name})
        ctx.timeout = float(row.get("timeout", default_timeout))
        try:
            result = fn(ctx, row)
        except Exception as exc:  # noqa: BLE001 - reported to the parent with the row name
            send({"row": name, "error": f"{type(exc).__name__}: {exc}"})
        else:
            send({"row": name, "result": result})
    send({"done": True})
    proto.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
