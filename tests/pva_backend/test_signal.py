"""The ophyd-async backend on real servers: connect-time type checks, reads, puts, monitors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
from ophyd_async.core import (
    Array1D,
    Device,
    NotConnectedError,
    SignalR,
    SignalRW,
    StrictEnum,
    Table,
    init_devices,
)
from ophyd_async.epics.core import epics_signal_r, epics_signal_rw
from p4p.server.raw import SharedPV

import beampipe
import beampipe_pva
from beampipe_pva import PvaSignalBackend

from .conftest import IMAGE, TABLE_ROWS, TABLE_TYPE, PvaServer, require_codec


class OnOff(StrictEnum):
    OFF = "Off"
    ON = "On"
    FAULT = "Fault"


class Rows(Table):
    name: Sequence[str]
    x: Array1D[np.float64]
    count: Array1D[np.int32]


class WrongRows(Table):
    name: Sequence[str]
    y: Array1D[np.float64]


def rw(datatype: type, pv: str) -> SignalRW:
    return SignalRW(PvaSignalBackend(datatype, pv, pv), name="sig")


def ro(datatype: type, pv: str) -> SignalR:
    return SignalR(PvaSignalBackend(datatype, pv, pv), name="sig")


@pytest.fixture(autouse=True)
def _registry() -> Iterator[None]:
    yield
    beampipe.reset()


async def test_scalars_read_with_metadata(ioc) -> None:
    ao = rw(float, ioc.pv("ao"))
    await ao.connect(timeout=5)
    assert await ao.get_value() == pytest.approx(1.5)
    reading = (await ao.read())["sig"]
    assert reading["value"] == pytest.approx(1.5)
    assert reading["alarm_severity"] == 0
    assert reading["timestamp"] > 1e9
    key = (await ao.describe())["sig"]
    assert key["source"] == f"pva://{ioc.pv('ao')}"
    assert key["units"] == "mm"
    assert key["precision"] == 3
    assert key["limits"]["control"] == {"low": -10.0, "high": 10.0}
    assert key["limits"]["display"] == {"low": -20.0, "high": 20.0}

    alarmed = ro(float, ioc.pv("alarmed"))
    await alarmed.connect(timeout=5)
    assert (await alarmed.read())["sig"]["alarm_severity"] == 2

    long = ro(int, ioc.pv("long"))
    text = ro(str, ioc.pv("str"))
    enum = rw(OnOff, ioc.pv("enum"))
    await asyncio.gather(long.connect(timeout=5), text.connect(timeout=5), enum.connect(timeout=5))
    assert await long.get_value() == 42
    assert await text.get_value() == "hello"
    assert await enum.get_value() == OnOff.ON
    assert (await enum.describe())["sig"]["choices"] == ["Off", "On", "Fault"]


async def test_wrong_type_fails_at_connect_naming_pv_field_and_types(ioc) -> None:
    pv = ioc.pv("ao")
    sig = ro(str, pv)
    with pytest.raises(TypeError) as info:
        await sig.connect(timeout=5)
    text = str(info.value)
    assert f"pva://{pv}" in text
    assert "field 'value'" in text
    assert "float" in text and "str" in text


async def test_unknown_pv_fails_connect(ioc) -> None:
    sig = ro(float, ioc.pv("missing"))
    with pytest.raises(NotConnectedError, match="missing"):
        await sig.connect(timeout=0.5)


async def test_puts_including_enum_by_choice_and_arrays(ioc) -> None:
    ao = rw(float, ioc.pv("ao"))
    enum = rw(OnOff, ioc.pv("enum"))
    wf = rw(Array1D[np.float64], ioc.pv("wf"))
    await asyncio.gather(ao.connect(timeout=5), enum.connect(timeout=5), wf.connect(timeout=5))
    await ao.set(-2.5)
    assert await ao.get_value() == pytest.approx(-2.5)
    await enum.set(OnOff.FAULT)
    assert await enum.get_value() == OnOff.FAULT
    assert beampipe_pva.bulk_get([ioc.pv("enum")]) == {ioc.pv("enum"): "Fault"}
    data = np.linspace(0, 1, 50)
    await wf.set(data)
    np.testing.assert_allclose(await wf.get_value(), data)


async def test_monitor_delivers_updates(ioc) -> None:
    ao = rw(float, ioc.pv("ao"))
    await ao.connect(timeout=5)
    seen: list[float] = []
    got = asyncio.Event()

    def on_reading(reading: dict) -> None:
        seen.append(reading["sig"]["value"])
        if seen[-1] == pytest.approx(4.0):
            got.set()

    ao.subscribe_reading(on_reading)
    try:
        await ao.set(4.0)
        await asyncio.wait_for(got.wait(), 5)
    finally:
        ao.clear_sub(on_reading)
    assert seen[-1] == pytest.approx(4.0)


async def test_table_typed_from_annotations_and_put(pva_server: PvaServer) -> None:
    table = ro(Rows, pva_server.pv("table"))
    await table.connect(timeout=5)
    value = await table.get_value()
    assert isinstance(value, Rows)
    assert list(value.name) == ["a", "b", "c"]
    assert value.count.dtype == np.int32
    np.testing.assert_array_equal(value.x, [r["x"] for r in TABLE_ROWS])

    wrong = ro(WrongRows, pva_server.pv("table"))
    with pytest.raises(TypeError) as info:
        await wrong.connect(timeout=5)
    assert pva_server.pv("table") in str(info.value)
    assert "WrongRows" in str(info.value) and "'x'" in str(info.value)


async def test_table_put_to_a_writable_server() -> None:
    class Store:
        def put(self, pv: SharedPV, op) -> None:
            pv.post(op.value())
            op.done()

    from p4p.server import Server

    name = "BPT:" + __import__("secrets").token_hex(4) + ":table"
    shared = SharedPV(initial=TABLE_TYPE.wrap(TABLE_ROWS), handler=Store())
    server = Server(providers=[{name: shared}])
    try:
        sig = rw(Rows, name)
        await sig.connect(timeout=5)
        new = Rows(name=["z"], x=np.array([9.5]), count=np.array([7], dtype=np.int32))
        await sig.set(new)
        back = await sig.get_value()
        assert list(back.name) == ["z"] and back.x[0] == 9.5 and back.count[0] == 7
    finally:
        server.stop()
        await asyncio.sleep(0)


async def test_ndarray_signal_and_malformed_image(pva_server: PvaServer) -> None:
    image = ro(np.ndarray, pva_server.pv("image"))
    await image.connect(timeout=5)
    value = await image.get_value()
    assert value.shape == IMAGE.shape
    np.testing.assert_array_equal(value, IMAGE)
    require_codec("bslz4")
    compressed = ro(np.ndarray, pva_server.pv("image_bslz4"))
    await compressed.connect(timeout=5)
    np.testing.assert_array_equal(await compressed.get_value(), IMAGE)

    bad = ro(np.ndarray, pva_server.pv("badshape"))
    with pytest.raises(TypeError, match=r"dimensions \[50, 64\] need 3200 elements"):
        await bad.connect(timeout=5)


async def test_enum_from_p4p_server(pva_server: PvaServer) -> None:
    enum = ro(str, pva_server.pv("enum"))
    await enum.connect(timeout=5)
    assert await enum.get_value() == "High"


class Many(Device):
    def __init__(self, names: list[str]) -> None:
        for i, name in enumerate(names):
            setattr(self, f"s{i}", epics_signal_r(float, f"pva://{name}"))
        super().__init__(name="many")


async def test_registry_routes_pva_signals_and_device_connects_in_one_batch(ioc) -> None:
    beampipe.use("beampipe-pva")
    names = [ioc.pv(s) for s in ("ao", "alarmed")]
    sig = epics_signal_rw(float, f"pva://{ioc.pv('ao')}")
    assert isinstance(sig._connector.backend, PvaSignalBackend)
    co = beampipe_pva.coalescer()
    async with init_devices(mock=False):
        many = Many(names)
    before = co.batches_issued
    await many.connect(timeout=5, force_reconnect=True)
    assert co.batches_issued == before + 1
    values = await asyncio.gather(*(getattr(many, f"s{i}").get_value() for i in range(len(names))))
    assert values == [pytest.approx(1.5), pytest.approx(5.0)]


async def test_monitor_burst_ends_on_the_last_value(ioc) -> None:
    """A burst of updates must not leave the subscriber behind on a stale value."""
    ao = rw(float, ioc.pv("ao"))
    await ao.connect(timeout=5)
    last: list[float] = []
    done = asyncio.Event()

    def on_reading(reading: dict) -> None:
        last.append(reading["sig"]["value"])
        if last[-1] == pytest.approx(9.9):
            done.set()

    ao.subscribe_reading(on_reading)
    try:
        for i in range(100):  # fire-and-forget puts: a burst faster than one round trip each
            beampipe_pva.put_value(ioc.pv("ao"), i / 10, wait=False, complete=False)
        await asyncio.wait_for(done.wait(), 5)
    finally:
        ao.clear_sub(on_reading)
    assert last[-1] == pytest.approx(9.9)


async def test_reads_fail_while_server_down_and_recover(ioc) -> None:
    ao = ro(float, ioc.pv("ao"))
    await ao.connect(timeout=5)
    ao._connector.backend.read_timeout = 0.5
    ioc.stop()
    with pytest.raises(NotConnectedError, match=ioc.pv("ao")):
        await ao.get_value()
    ioc.start()
    value = None
    for _ in range(40):  # bounded: pvxs reconnects within a few search periods
        try:
            value = await ao.get_value()
            break
        except NotConnectedError:
            await asyncio.sleep(0.25)
    assert value == pytest.approx(1.5)
