"""The README's first command: an embedded IOC, a bluesky scan over it, and an account of the run.

Plugins extend it through the ``beampipe.demo`` entry-point group: each entry
is a callable ``step(ctx: DemoContext) -> None`` run in name order after the
core scan, so the one command grows into the whole path (IOC -> batched CA/PVA
reads -> frames over SHM -> zocalo bridge -> results back in the plan).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .testing import Ioc, pin_epics_to_loopback

DEMO_GROUP = "beampipe.demo"
DEMO_DB = Path(__file__).with_name("demo.db")


@dataclass
class DemoContext:
    """What demo steps share: the running IOC, the RunEngine and a place to report."""

    ioc: Ioc
    run_engine: Any
    results: dict[str, Any] = field(default_factory=dict)

    def report(self, section: str, line: str) -> None:
        print(f"  [{section}] {line}", flush=True)


def _core_scan(ctx: DemoContext) -> None:
    from bluesky.plans import scan
    from ophyd import EpicsSignal, EpicsSignalRO

    mot = EpicsSignal(ctx.ioc.pv("mot"), name="mot")
    det = EpicsSignalRO(ctx.ioc.pv("det"), name="det")
    t0 = time.perf_counter()
    mot.wait_for_connection(timeout=10)
    det.wait_for_connection(timeout=10)
    ctx.report("core", f"connected 2 PVs in {1e3 * (time.perf_counter() - t0):.1f} ms")
    rows: list[tuple[float, float]] = []

    def collect(name: str, doc: dict[str, Any]) -> None:
        if name == "event":
            rows.append((doc["data"]["mot"], doc["data"]["det"]))

    t0 = time.perf_counter()
    (uid,) = ctx.run_engine(scan([det], mot, -3, 5, 9), collect)
    elapsed = time.perf_counter() - t0
    ctx.report("core", f"scan {uid[:8]}: 9 points in {elapsed:.2f} s")
    for m, d in rows:
        ctx.report("core", f"    mot = {m:6.2f} mm   det = {d:8.2f} cts")
    peak = max(rows, key=lambda r: r[1])
    ctx.report("core", f"peak det = {peak[1]:.1f} at mot = {peak[0]:.2f} (expected 1.00)")
    if abs(peak[0] - 1.0) > 1e-6:
        raise SystemExit("demo failed: the detector peak is not where the IOC puts it")
    ctx.results["scan_uid"] = uid
    # Drop the channels before the IOC goes, or libca reports the circuit it loses.
    mot.destroy()
    det.destroy()


def _close_channel_access() -> None:
    """Close libca's context while the IOC is still up, so it has no circuit to mourn."""
    ca = sys.modules.get("epics.ca")
    if ca is not None:
        ca.finalize_libca()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", help="run only the demo step of this name (ca, pva, shm or zocalo)"
    )
    args = parser.parse_args(argv)
    pin_epics_to_loopback()
    from bluesky import RunEngine

    steps = sorted(importlib.metadata.entry_points(group=DEMO_GROUP), key=lambda ep: ep.name)
    print("beampipe demo: embedded IOC -> bluesky scan" + "".join(f" -> {s.name}" for s in steps))
    with Ioc(DEMO_DB) as ioc:
        print(f"  [ioc] softIoc pid {ioc.pid} serving {ioc.prefix}* over CA and PVA on loopback")
        ctx = DemoContext(ioc=ioc, run_engine=RunEngine({}, call_returns_result=False))
        _core_scan(ctx)
        for ep in steps:
            if args.only and args.only not in (ep.name, ep.name.partition("-")[2]):
                continue
            print(f"- {ep.name} ({ep.dist.name if ep.dist else '?'})", flush=True)
            ep.load()(ctx)
        _close_channel_access()
    print("beampipe demo: done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
