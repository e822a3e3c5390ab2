"""The ophyd-async backend against a real IOC: every datatype, batching, and the opt-in switch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated as A

import numpy as np
import pytest
from ophyd_async.core import (
    Array1D,
    DeviceVector,
    NotConnectedError,
    SignalR,
    SignalRW,
    StandardReadable,
    StrictEnum,
    SubsetEnum,
    init_devices,
)
from ophyd_async.epics.core import EpicsDevice, PvSuffix

import beampipe
from beampipe_ca import (
    CaSignalBackend,
    ca_signal_r,
    ca_signal_rw,
    ca_signal_rw_rbv,
    ca_signal_w,
    ca_signal_x,
)
from beampipe_ca._libca import context

from .conftest import BANK_SIZE


class Level(StrictEnum):
    LOW = "Low"
    MEDIUM = "Medium"
    HIGH = "High"


class LevelSubset(SubsetEnum):
    LOW = "Low"
    HIGH = "High"


async def _connected(signal, timeout=10.0):
    await signal.connect(timeout=timeout)
    return signal


def test_backend_meets_the_core_contract():
    assert beampipe.missing_backend_methods(CaSignalBackend) == []
    assert CaSignalBackend.protocol == "ca"


@pytest.mark.parametrize(
    ("suffix", "datatype", "expected"),
    [
        ("ao", float, 1.5),
        ("ao_int", int, 3),  # float record with PREC 0 may be read as int
        ("long", int, 42),
        ("str", str, "hello"),
        ("bool", bool, True),
        ("enum", Level, Level.MEDIUM),
        ("enum", str, "Medium"),
        ("enum", LevelSubset, "Medium"),
    ],
)
async def test_scalar_datatypes(ioc, suffix, datatype, expected):
    sig = await _connected(ca_signal_r(datatype, ioc.pv(suffix), name="sig"))
    value = await sig.get_value()
    assert value == expected
    assert type(value) is type(expected)
    reading = (await sig.read())["sig"]
    assert reading["value"] == expected
    assert reading["alarm_severity"] == 0


@pytest.mark.parametrize(
    ("suffix", "datatype", "dtype", "data"),
    [
        ("wf_double", Array1D[np.float64], np.float64, [1.5, -2.5, 3.0]),
        ("wf_float", Array1D[np.float32], np.float32, [0.5, 1.5]),
        ("wf_short", Array1D[np.int16], np.int16, [1, -2, 300]),
        ("wf_long", Array1D[np.int32], np.int32, [70000, -5]),
        ("wf_char", Array1D[np.uint8], np.uint8, [1, 2, 255]),
    ],
)
async def test_array_datatypes(ioc, suffix, datatype, dtype, data):
    sig = await _connected(ca_signal_rw(datatype, ioc.pv(suffix), name="sig"))
    await sig.set(np.array(data, dtype=dtype))
    value = await sig.get_value()
    assert isinstance(value, np.ndarray)
    assert value.dtype == dtype
    np.testing.assert_array_equal(value, np.array(data, dtype=dtype))


async def test_sequence_str_and_long_string(ioc):
    seq = await _connected(ca_signal_rw(Sequence[str], ioc.pv("wf_string"), name="seq"))
    await seq.set(["alpha", "beta"])
    assert list(await seq.get_value()) == ["alpha", "beta"]
    long = await _connected(ca_signal_rw(str, ioc.pv("wf_char"), name="long"))
    await long.set("a long string in a char waveform")
    assert await long.get_value() == "a long string in a char waveform"


async def test_put_and_readback_with_metadata(ioc):
    sig = await _connected(ca_signal_rw(float, ioc.pv("ao"), name="ao"))
    try:
        await sig.set(12.25)
        assert await sig.get_value() == 12.25
        desc = (await sig.describe())["ao"]
        assert desc["units"] == "mm"
        assert desc["precision"] == 3
        assert desc["limits"]["control"] == {"low": -100.0, "high": 100.0}
        assert desc["source"] == f"ca://{ioc.pv('ao')}"
    finally:
        await sig.set(1.5)


async def test_enum_put_and_bad_choice(ioc):
    sig = await _connected(ca_signal_rw(Level, ioc.pv("enum"), name="enum"))
    try:
        await sig.set(Level.HIGH)
        assert await sig.get_value() == Level.HIGH
    finally:
        await sig.set(Level.MEDIUM)


async def test_type_mismatch_at_connect_names_the_pv(ioc):
    sig = ca_signal_r(int, ioc.pv("ao"), name="sig")  # PREC 3: not an int
    with pytest.raises(TypeError, match=f"{ioc.pv('ao')} with inferred datatype float"):
        await sig.connect(timeout=5)
    sig2 = ca_signal_r(Array1D[np.float64], ioc.pv("str"), name="sig2")
    with pytest.raises(TypeError, match=ioc.pv("str")):
        await sig2.connect(timeout=5)

    class Wrong(StrictEnum):
        A = "A"

    sig3 = ca_signal_r(Wrong, ioc.pv("enum"), name="sig3")
    with pytest.raises(TypeError, match="Low"):
        await sig3.connect(timeout=5)


async def test_unknown_pv_fails_connect_naming_it(ioc):
    missing = ioc.pv("no_such_pv")
    sig = ca_signal_r(float, missing, name="sig")
    with pytest.raises(NotConnectedError, match=missing):
        await sig.connect(timeout=0.5)


async def test_bad_put_type_raises(ioc):
    sig = await _connected(ca_signal_rw(float, ioc.pv("ao"), name="ao"))
    with pytest.raises(TypeError, match=f"ca://{ioc.pv('ao')}: cannot put 'not a number'"):
        await sig.set("not a number")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="to a int signal"):
        await (await _connected(ca_signal_rw(int, ioc.pv("long"), name="l"))).set(1.5)
    assert await sig.get_value() == 1.5


async def test_monitor_delivers_updates(ioc):
    import asyncio

    sig = await _connected(ca_signal_r(float, ioc.pv("counter"), name="c"))
    seen: list[float] = []
    got = asyncio.Event()

    def cb(reading):
        seen.append(reading["c"]["value"])
        if len(seen) >= 3:
            got.set()

    sig.subscribe_reading(cb)
    try:
        await asyncio.wait_for(got.wait(), 5)
    finally:
        sig.clear_sub(cb)
    assert seen == sorted(seen) and seen[-1] > seen[0]


async def test_factories(ioc):
    rbv = ca_signal_rw_rbv(float, ioc.pv("ao"), read_suffix="_int", name="rbv")
    await rbv.connect(timeout=5)
    assert rbv.source == f"ca://{ioc.pv('ao_int')}"
    w = await _connected(ca_signal_w(int, ioc.pv("long"), name="w"))
    await w.set(7)
    assert (await ca_signal_r(int, ioc.pv("long"), name="r").connect(timeout=5)) is None
    assert await _read(ioc.pv("long"), int) == 7
    await w.set(42)
    x = await _connected(ca_signal_x(ioc.pv("long"), name="x"))
    await x.trigger()
    with pytest.raises(ValueError, match="pva://"):
        ca_signal_r(float, "pva://X")
    with pytest.raises(ValueError, match="non-empty"):
        ca_signal_r(float, "")


async def _read(pv, datatype):
    sig = await _connected(ca_signal_r(datatype, pv, name="tmp"))
    return await sig.get_value()


class Bank(StandardReadable):
    def __init__(self, prefix: str, n: int, name: str = "") -> None:
        with self.add_children_as_readables():
            self.s = DeviceVector({i: ca_signal_r(float, f"{prefix}s{i}") for i in range(n)})
        super().__init__(name=name)


async def test_device_connect_and_read_of_200_signals_is_batched(bank_ioc):
    ctx = context()
    before = ctx.batches_issued
    async with init_devices(mock=False, connect=True, timeout=20):
        bank = Bank(bank_ioc.prefix, BANK_SIZE)
    connect_batches = ctx.batches_issued - before
    assert connect_batches < 20, connect_batches  # not one per signal
    before = ctx.batches_issued
    reading = await bank.read()
    assert ctx.batches_issued - before == 1
    assert [reading[f"bank-s-{i}"]["value"] for i in range(BANK_SIZE)] == [
        float(i) for i in range(BANK_SIZE)
    ]


async def test_use_makes_ophyd_async_epics_signals_use_it(ioc):
    from ophyd_async.epics.core import epics_signal_r, epics_signal_rw

    beampipe.use("beampipe-ca", ophyd=False)
    try:
        sig = epics_signal_r(float, ioc.pv("ao"), name="sig")
        assert isinstance(sig._connector.backend, CaSignalBackend)
        sig2 = epics_signal_rw(float, f"ca://{ioc.pv('ao')}", name="sig2")
        assert isinstance(sig2._connector.backend, CaSignalBackend)
        await sig.connect(timeout=5)
        assert await sig.get_value() == 1.5
    finally:
        beampipe.reset()
    sig3 = epics_signal_r(float, ioc.pv("ao"), name="sig3")
    assert not isinstance(sig3._connector.backend, CaSignalBackend)


class Thing(EpicsDevice):
    value: A[SignalRW[float], PvSuffix("ao")]
    label: A[SignalR[str], PvSuffix("str")]


async def test_use_makes_epics_device_use_it(ioc):
    beampipe.use("beampipe-ca", ophyd=False)
    try:
        thing = Thing(ioc.prefix, name="thing")
        await thing.connect(timeout=10)
        assert isinstance(thing.value._connector.backend, CaSignalBackend)
        assert await thing.value.get_value() == 1.5
        assert await thing.label.get_value() == "hello"
    finally:
        beampipe.reset()
