"""The ophyd control layer: EpicsSignal("pva://...") against QSRV, installed by beampipe.use."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

import beampipe
from beampipe_pva import _ophyd


@pytest.fixture
def ophyd() -> Iterator[Any]:
    module = beampipe.import_ophyd()
    beampipe.use("beampipe-pva", ophyd_async=False)
    try:
        yield module
    finally:
        _ophyd.shutdown()  # ophyd's dispatcher threads end with the layer
        beampipe.reset()


def test_layer_is_installed(ophyd: Any) -> None:
    assert "beampipe-pva" in ophyd.cl.name
    pv = ophyd.cl.get_pv("pva://BPX:never:served")
    try:
        assert isinstance(pv, _ophyd.PvaPV)
        assert pv.wire_name == "BPX:never:served"
    finally:
        _ophyd.release_pvs(pv)


def test_read_write_and_metadata(ophyd: Any, ioc: Any) -> None:
    sig = ophyd.EpicsSignal(f"pva://{ioc.pv('ao')}", name="ao")
    sig.wait_for_connection(timeout=5)
    assert sig.get() == pytest.approx(1.5)
    assert sig.metadata["units"] == "mm"
    assert sig.precision == 3
    assert sig.limits == (-10.0, 10.0)
    key = sig.describe()["ao"]
    assert key["source"] == f"PV:pva://{ioc.pv('ao')}"
    assert key["units"] == "mm"
    sig.put(3.25, wait=True)
    assert sig.get() == pytest.approx(3.25)
    assert _ophyd.caget(f"pva://{ioc.pv('ao')}") == pytest.approx(3.25)
    sig.destroy()


def test_alarm_projected_onto_ca_keys(ophyd: Any, ioc: Any) -> None:
    from ophyd.utils.epics_pvs import AlarmSeverity, AlarmStatus

    sig = ophyd.EpicsSignalRO(f"pva://{ioc.pv('alarmed')}", name="alarmed")
    sig.wait_for_connection(timeout=5)
    assert sig.get() == pytest.approx(5.0)
    assert sig.alarm_severity == AlarmSeverity.MAJOR
    assert sig.alarm_status == AlarmStatus.HIHI
    sig.destroy()


def test_enum_by_string(ophyd: Any, ioc: Any) -> None:
    sig = ophyd.EpicsSignal(f"pva://{ioc.pv('enum')}", name="enum", string=True)
    sig.wait_for_connection(timeout=5)
    assert sig.get() == "On"
    assert sig.enum_strs == ("Off", "On", "Fault")
    sig.put("Fault", wait=True)
    assert sig.get() == "Fault"
    sig.destroy()


def test_monitor_callbacks(ophyd: Any, ioc: Any) -> None:
    sig = ophyd.EpicsSignal(f"pva://{ioc.pv('ao')}", name="ao", auto_monitor=True)
    sig.wait_for_connection(timeout=5)
    got = threading.Event()
    seen: list[float] = []

    def on_value(value: float, **kwargs: Any) -> None:
        seen.append(value)
        if value == pytest.approx(-7.5):
            got.set()

    sig.subscribe(on_value)
    sig.put(-7.5, wait=True)
    assert got.wait(5), seen
    sig.destroy()


def test_unknown_pv_times_out_naming_it(ophyd: Any, ioc: Any) -> None:
    name = f"pva://{ioc.pv('nothing_here')}"
    sig = ophyd.EpicsSignalRO(name, name="nothing")
    with pytest.raises(TimeoutError, match="nothing_here"):
        sig.wait_for_connection(timeout=0.5)
    sig.destroy()


def test_ca_names_are_refused(ophyd: Any) -> None:
    with pytest.raises(ValueError, match="ca:// names belong to the CA layer"):
        _ophyd.get_pv("ca://X:y")


def test_bluesky_count_over_pva(ophyd: Any, ioc: Any) -> None:
    from bluesky import RunEngine
    from bluesky.plans import count

    det = ophyd.EpicsSignalRO(f"pva://{ioc.pv('alarmed')}", name="det")
    mot = ophyd.EpicsSignal(f"pva://{ioc.pv('ao')}", name="mot")
    det.wait_for_connection(timeout=5)
    mot.wait_for_connection(timeout=5)
    mot.put(2.5, wait=True)
    rows: list[dict[str, Any]] = []
    run_engine = RunEngine({}, call_returns_result=False)
    run_engine(
        count([det, mot], num=3), lambda name, doc: rows.append(doc) if name == "event" else None
    )
    assert len(rows) == 3
    assert all(r["data"]["det"] == pytest.approx(5.0) for r in rows)
    assert all(r["data"]["mot"] == pytest.approx(2.5) for r in rows)
    det.destroy()
    mot.destroy()


def test_disconnect_and_reconnect_are_reported(ophyd: Any, ioc: Any) -> None:
    import time

    sig = ophyd.EpicsSignal(f"pva://{ioc.pv('ao')}", name="ao", auto_monitor=True)
    sig.wait_for_connection(timeout=5)
    states: list[bool] = []
    sig.subscribe(lambda **kw: states.append(bool(kw["connected"])), event_type="meta", run=False)
    ioc.stop()
    deadline = time.monotonic() + 10
    while sig.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sig.connected
    ioc.start()
    deadline = time.monotonic() + 20
    while not sig.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sig.connected
    assert sig.get(use_monitor=False) == pytest.approx(1.5)
    assert False in states and states[-1] is True
    sig.destroy()
