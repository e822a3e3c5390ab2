"""The demo's CA step: the same scan on beampipe-ca, and its figures next to the pyepics layer's."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import beampipe

#: Fields of the demo's two records: a set of "never seen" PV names for each connect figure.
_FIELDS = ("VAL", "DESC", "EGU", "PREC", "HOPR", "LOPR", "HIHI", "LOLO", "HIGH", "LOW")
_FIELDS_B = ("SEVR", "STAT", "NAME", "MDEL", "ADEL", "SCAN", "PINI", "PHAS", "TPRO", "UDF")


def _device(prefix: str, fields: tuple[str, ...]) -> Any:
    from ophyd import Component as Cpt
    from ophyd import Device, EpicsSignalRO

    attrs = {
        f"{rec}_{f.lower()}": Cpt(EpicsSignalRO, f"{rec}.{f}")
        for rec in ("mot", "det")
        for f in fields
    }
    return type("DemoPVs", (Device,), attrs)(prefix, name="demo")


def _connect_ms(prefix: str, fields: tuple[str, ...]) -> float:
    dev = _device(prefix, fields)
    t0 = time.perf_counter()
    dev.wait_for_connection(timeout=10)
    elapsed = time.perf_counter() - t0
    values = dev.get()
    if any(v is None for v in values):
        raise SystemExit("demo failed: a demo PV returned no value")
    dev.destroy()
    return 1e3 * elapsed


def _median_ms(fn: Any, reps: int = 50) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def step(ctx: Any) -> None:
    """Run the scan again on beampipe-ca and print its connect/read figures beside pyepics'."""
    import beampipe_ca

    ophyd = beampipe.import_ophyd()
    from bluesky.plans import scan
    from ophyd import EpicsSignal, EpicsSignalRO

    prefix = ctx.ioc.prefix
    mot_pv, det_pv = ctx.ioc.pv("mot"), ctx.ioc.pv("det")
    n_pvs = 2 * len(_FIELDS)

    # The pyepics layer first (what the core scan used), then beampipe-ca.
    beampipe.reset()
    ophyd.set_cl("pyepics")
    py_connect = _connect_ms(prefix, _FIELDS)
    py_mot = EpicsSignalRO(mot_pv, name="mot")
    py_det = EpicsSignalRO(det_pv, name="det")
    py_mot.wait_for_connection(timeout=10)
    py_det.wait_for_connection(timeout=10)
    py_read = _median_ms(lambda: (py_mot.get(use_monitor=False), py_det.get(use_monitor=False)))
    # The pyepics layer clears the shared chid on release: done with it before ours start.
    py_mot.destroy()
    py_det.destroy()

    beampipe.use("beampipe-ca")
    bp_connect = _connect_ms(prefix, _FIELDS_B)
    bp_read = _median_ms(lambda: beampipe_ca.bulk_get([mot_pv, det_pv]))
    ctx.report("ca", f"ophyd connect of {n_pvs} new PVs: pyepics layer {py_connect:.1f} ms, "
               f"beampipe-ca {bp_connect:.1f} ms")  # fmt: skip
    ctx.report("ca", f"fresh read of mot+det: pyepics 2 x PV.get {py_read:.3f} ms, "
               f"beampipe_ca.bulk_get {bp_read:.3f} ms ({py_read / bp_read:.1f}x)")  # fmt: skip

    # The core's scan, now on the beampipe-ca layer.
    mot = EpicsSignal(mot_pv, name="mot")
    det = EpicsSignalRO(det_pv, name="det")
    mot.wait_for_connection(timeout=10)
    det.wait_for_connection(timeout=10)
    rows: list[tuple[float, float]] = []

    def collect(name: str, doc: dict[str, Any]) -> None:
        if name == "event":
            rows.append((doc["data"]["mot"], doc["data"]["det"]))

    t0 = time.perf_counter()
    ctx.run_engine(scan([det], mot, -3, 5, 9), collect)
    peak = max(rows, key=lambda r: r[1])
    ctx.report("ca", f"scan on {ophyd.cl.name}: 9 points in {time.perf_counter() - t0:.2f} s, "
               f"peak det = {peak[1]:.1f} at mot = {peak[0]:.2f}")  # fmt: skip
    if abs(peak[0] - 1.0) > 1e-6:
        raise SystemExit("demo failed: beampipe-ca scan does not find the peak at mot = 1")

    # ophyd-async on beampipe-ca: one batched read of both signals.
    async def async_read() -> tuple[float, float]:
        sig_mot = beampipe_ca.ca_signal_r(float, mot_pv, name="mot")
        sig_det = beampipe_ca.ca_signal_r(float, det_pv, name="det")
        await asyncio.gather(sig_mot.connect(timeout=10), sig_det.connect(timeout=10))
        m, d = await asyncio.gather(sig_mot.get_value(), sig_det.get_value())
        return m, d

    m, d = asyncio.run(async_read())
    ctx.report("ca", f"ophyd-async on beampipe-ca: mot = {m:.2f}, det = {d:.2f}")
    mot.destroy()
    det.destroy()
    beampipe.reset()
    ctx.results["ca"] = {
        "connect_ms": {"pyepics": py_connect, "beampipe-ca": bp_connect},
        "read_ms": {"pyepics": py_read, "beampipe-ca": bp_read},
    }
