"""Scalars read through a libca sync group (one callback per batch, not per PV), on a real IOC.

The path must give exactly what the per-PV callback path gives (the objects
aioca would hand ophyd-async), fail a PV alone when its reply never lands, and
cope with a server that answers a circuit's reads out of order.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time

import aioca
import numpy as np
import pytest
from epicscorelibs.ca import dbr
from ophyd_async.core import Array1D, DeviceVector, SignalR, StandardReadable

import beampipe_ca
from beampipe import Failed, Ok
from beampipe_ca import CaSignalBackend
from beampipe_ca._libca import _TIME_DTYPES, ECA_NORMAL, _AugScalar, context

from .conftest import BANK_SIZE

ECA_IOINPROGRESS = 347


class Mixed(StandardReadable):
    """One signal of each kind a Device reads: group members and callback reads together."""

    def __init__(self, pv, name: str = "mixed") -> None:
        with self.add_children_as_readables():
            self.ao = SignalR(CaSignalBackend(float, pv("ao"), pv("ao")))
            self.long = SignalR(CaSignalBackend(int, pv("long"), pv("long")))
            self.enum = SignalR(CaSignalBackend(str, pv("enum"), pv("enum")))
            self.flag = SignalR(CaSignalBackend(bool, pv("bool"), pv("bool")))
            self.text = SignalR(CaSignalBackend(str, pv("str"), pv("str")))
            self.prec = SignalR(CaSignalBackend(int, pv("ao.PREC"), pv("ao.PREC")))  # SHORT
            self.udf = SignalR(CaSignalBackend(int, pv("ao.UDF"), pv("ao.UDF")))  # CHAR
            self.wf = SignalR(CaSignalBackend(Array1D[np.int16], pv("wf_short"), pv("wf_short")))
        super().__init__(name=name)


class Bank(StandardReadable):
    def __init__(self, prefix: str, n: int) -> None:
        with self.add_children_as_readables():
            self.s = DeviceVector(
                {
                    i: SignalR(CaSignalBackend(float, f"{prefix}s{i}", f"{prefix}s{i}"))
                    for i in range(n)
                }
            )
        super().__init__(name="bank")


@pytest.fixture
def group_reads(monkeypatch):
    """Counts the reads put in sync groups; sync groups on (whatever the environment says)."""
    ctx = context()
    monkeypatch.setattr(ctx, "use_sync_groups", True)
    calls: list[int] = []
    real = ctx.sg_get_ready

    def counting(gid, dbrcode, count, chid, addr):  # (ready ctypes objects, see _issue)
        calls.append(chid.value)
        return real(gid, dbrcode, count, chid, addr)

    monkeypatch.setattr(ctx, "sg_get_ready", counting)
    return calls


def _readings(reading):
    return {
        k: (
            v["value"].tolist() if isinstance(v["value"], np.ndarray) else v["value"],
            v["alarm_severity"],
        )
        for k, v in reading.items()
    }


@pytest.mark.parametrize("native", [1, 2, 3, 4, 5, 6])
def test_fast_decoder_gives_what_epicscorelibs_gives(ioc, native):
    """Byte for byte the same reply, decoded both ways: same type, value and attributes."""
    ctx = context()
    chan = ctx.channel(ioc.pv("ao"))
    assert not ctx.wait_connected([chan], 5)
    dbrcode, theirs = dbr.type_to_dbr(chan, native, dbr.FORMAT_TIME)
    assert dbrcode == native + 14
    ours = _AugScalar(chan.name, dbrcode, native, 1)
    record = dbr.DbrCodeToType[dbrcode]()
    record.status, record.severity = 3, 2
    record.raw_stamp.secs, record.raw_stamp.nsec = 1_000_000_000, 123_456_789
    record.raw_value[0] = {1: -1234, 2: 0.1, 3: 2, 4: 200, 5: -(2**31), 6: 2.0 / 3.0}[native]
    raw = ctypes.addressof(record)
    expected = theirs(raw, dbrcode, 1)
    for got in (
        ours(raw, dbrcode, 1),  # from the reply's address (a callback's reply)
        # from a sync group's record array: the columns it decodes in one go
        ours.fields(
            *(
                np.frombuffer(bytes(record), _TIME_DTYPES[native])[0][field].item()
                for field in ("value", "status", "severity", "secs", "nsec")
            )
        ),
    ):
        assert type(got) is type(expected)
        assert got == expected
        assert vars(got) == vars(expected)


async def test_a_device_read_is_one_group_and_matches_the_callback_path(bank_ioc, group_reads):
    ctx = context()
    bank = Bank(bank_ioc.prefix, BANK_SIZE)
    await bank.connect(timeout=20)
    before = len(group_reads)
    via_group = await bank.read()
    assert len(group_reads) - before == BANK_SIZE
    ctx.use_sync_groups = False
    via_callbacks = await bank.read()
    assert len(group_reads) - before == BANK_SIZE  # none more
    assert _readings(via_group) == _readings(via_callbacks)
    assert [via_group[f"bank-s-{i}"]["value"] for i in range(BANK_SIZE)] == [
        float(i) for i in range(BANK_SIZE)
    ]


async def test_mixed_types_in_one_batch_equal_aiocas_reads(ioc, group_reads):
    device = Mixed(ioc.pv)
    await device.connect(timeout=10)
    reading = await device.read()
    assert len(group_reads) >= 6  # every scalar; the waveform took a callback
    assert reading["mixed-ao"]["value"] == 1.5
    assert reading["mixed-long"]["value"] == 42
    assert reading["mixed-enum"]["value"] == "Medium"
    assert reading["mixed-flag"]["value"] is True
    assert reading["mixed-text"]["value"] == "hello"
    assert reading["mixed-prec"]["value"] == 3
    for sig, pv in ((device.ao, "ao"), (device.prec, "ao.PREC"), (device.enum, "enum")):
        backend = sig._connector.backend
        ours = await backend._caget(backend.read_pv, dbr.FORMAT_TIME)
        theirs = await aioca.caget(
            ioc.pv(pv), datatype=backend.converter.read_dbr, format=dbr.FORMAT_TIME
        )
        assert type(ours) is type(theirs)
        assert ours == theirs
        assert {k: v for k, v in vars(ours).items() if k not in ("timestamp", "raw_stamp")} == {
            k: v for k, v in vars(theirs).items() if k not in ("timestamp", "raw_stamp")
        }


async def test_a_server_answering_out_of_order_is_waited_for(bank_ioc, group_reads, monkeypatch):
    """The sentinel's reply came first: the group is waited for on a thread of its own."""
    ctx = context()
    bank = Bank(bank_ioc.prefix, 20)
    await bank.connect(timeout=10)
    monkeypatch.setattr(ctx, "sg_test", lambda gid: ECA_IOINPROGRESS)
    waits: list[str] = []
    real_thread = threading.Thread

    def thread(*args, **kwargs):
        waits.append(kwargs.get("name", ""))
        return real_thread(*args, **kwargs)

    monkeypatch.setattr(threading, "Thread", thread)
    reading = await bank.read()
    assert waits == ["beampipe-ca-sg"]
    assert [reading[f"bank-s-{i}"]["value"] for i in range(20)] == [float(i) for i in range(20)]


async def test_a_reply_that_never_lands_fails_its_pv_alone(bank_ioc, group_reads, monkeypatch):
    ctx = context()
    names = [bank_ioc.pv(f"s{i}") for i in range(10)]
    chans = ctx.channels(names)
    assert not ctx.wait_connected(chans, 5)
    lost = chans[3].chid
    real = ctx.sg_get_ready

    def drop_one(gid, dbrcode, count, chid, addr):
        return ECA_NORMAL if chid.value == lost else real(gid, dbrcode, count, chid, addr)

    monkeypatch.setattr(ctx, "sg_get_ready", drop_one)
    results = await ctx.read_now_async(names, 5.0, ctx.io.plans["time"])
    assert results[names[3]] == Failed(f"{names[3]}: no reply (disconnected)")
    assert [results[n].value.value for i, n in enumerate(names) if i != 3] == [  # type: ignore[union-attr]
        float(i) for i in range(10) if i != 3
    ]


def test_a_read_given_up_on_deletes_its_group(bank_ioc, group_reads, monkeypatch):
    """No sentinel in time: the caller times out, and libca stops writing into the records."""
    ctx = context()
    names = [bank_ioc.pv(f"s{i}") for i in range(10)]
    assert not ctx.wait_connected(ctx.channels(names), 5)
    deleted: list[int] = []
    real_delete = ctx.sg_delete
    monkeypatch.setattr(ctx, "sg_delete", lambda gid: deleted.append(gid) or real_delete(gid))
    monkeypatch.setattr(ctx, "_finish_sg", lambda state: None)  # the sentinel is "lost"
    results = ctx.read_now(names, 0.3, ctx.io.plans["time"])
    assert all(results[n] == Failed(f"{n}: timed out after 0.3 s") for n in names)
    assert len(deleted) == 1
    monkeypatch.undo()
    again = ctx.read_now(names, 5.0, ctx.io.plans["time"])
    assert all(isinstance(again[n], Ok) for n in names)


async def test_concurrent_device_reads_each_get_their_own_values(bank_ioc, group_reads):
    bank = Bank(bank_ioc.prefix, 50)
    await bank.connect(timeout=10)
    readings = await asyncio.gather(*(bank.read() for _ in range(5)))
    for reading in readings:
        assert [reading[f"bank-s-{i}"]["value"] for i in range(50)] == [float(i) for i in range(50)]


def test_a_hung_ioc_does_not_hold_up_another_threads_bulk_read(ioc_factory, bank_ioc, tmp_path):
    """Thread A's bulk read waits out a hung IOC in ca_pend_io; thread B's, meanwhile, is
    answered at once by its own IOC (through a sync group of its own), not after A's."""
    db = tmp_path / "hung.db"
    db.write_text("".join(f'record(ao, "$(P)h{i}") {{ field(VAL, "{i}") }}\n' for i in range(5)))
    hung = ioc_factory(db)
    hung_names = [hung.pv(f"h{i}") for i in range(5)]
    names = [bank_ioc.pv(f"s{i}") for i in range(20)]
    assert beampipe_ca.bulk_get(hung_names + names, timeout=5.0) == {
        **{n: float(i) for i, n in enumerate(hung_names)},
        **{n: float(i) for i, n in enumerate(names)},
    }
    hung.freeze()  # the circuit stays up; no reply comes
    try:
        started = threading.Event()
        hung_result: dict[str, object] = {}

        def read_hung() -> None:
            started.set()
            hung_result.update(beampipe_ca.bulk_get(hung_names, timeout=3.0))

        a = threading.Thread(target=read_hung)
        a.start()
        assert started.wait(5)
        time.sleep(0.3)  # A is in ca_pend_io now
        t0 = time.monotonic()
        got = beampipe_ca.bulk_get(names, timeout=2.0)
        took = time.monotonic() - t0
        a.join(10)
        assert got == {n: float(i) for i, n in enumerate(names)}
        assert took < 1.5, f"waited {took:.2f} s behind the hung read"
        assert hung_result == dict.fromkeys(hung_names)  # A's read failed, PV by PV
    finally:
        hung.thaw()


@pytest.mark.parametrize("native", [1, 2, 4, 5, 6])
@pytest.mark.parametrize("cast", [None, int, bool])
def test_reading_decoder_gives_what_ophyd_async_makes_of_aiocas_value(ioc, native, cast):
    """The ophyd-async reading made where the group is decoded, against ophyd-async's own."""
    from types import SimpleNamespace

    from ophyd_async.epics.core._aioca import CaBoolConverter, CaConverter, CaIntConverter
    from ophyd_async.epics.core._aioca import CaSignalBackend as AiocaBackend

    from beampipe_ca._libca import _OaReading

    ctx = context()
    chan = ctx.channel(ioc.pv("ao"))
    assert not ctx.wait_connected([chan], 5)
    dbrcode, theirs = dbr.type_to_dbr(chan, native, dbr.FORMAT_TIME)
    converter = {
        None: CaConverter(float if native in (2, 6) else int, native),
        int: CaIntConverter(int, native),
        bool: CaBoolConverter(),
    }[cast]
    ours = _OaReading(chan.name, dbrcode, cast)
    for severity in (0, 2, 3):  # INVALID (3) reads as -1
        record = dbr.DbrCodeToType[dbrcode]()
        record.status, record.severity = 3, severity
        record.raw_stamp.secs, record.raw_stamp.nsec = 1_000_000_000, 123_456_789
        record.raw_value[0] = {1: -1234, 2: 0.1, 4: 200, 5: -(2**31), 6: 2.0 / 3.0}[native]
        raw = ctypes.addressof(record)
        expected = AiocaBackend._make_reading(
            SimpleNamespace(converter=converter), theirs(raw, dbrcode, 1)
        )
        columns = np.frombuffer(bytes(record), _TIME_DTYPES[native])[0]
        for got in (
            ours(raw, dbrcode, 1),  # a callback's reply
            ours.fields(
                *(columns[f].item() for f in ("value", "status", "severity", "secs", "nsec"))
            ),
        ):
            assert got == expected
            assert type(got["value"]) is type(expected["value"])


class Numbers(StandardReadable):
    """Number signals of every converter the reading path serves, and two it leaves alone."""

    def __init__(self, backend: type, pv, name: str = "numbers") -> None:
        with self.add_children_as_readables():
            self.ao = SignalR(backend(float, pv("ao"), pv("ao")))
            self.ao_int = SignalR(backend(int, pv("ao_int"), pv("ao_int")))  # CaIntConverter
            self.long = SignalR(backend(int, pv("long"), pv("long")))
            self.prec = SignalR(backend(int, pv("ao.PREC"), pv("ao.PREC")))  # SHORT
            self.udf = SignalR(backend(bool, pv("ao.UDF"), pv("ao.UDF")))  # CHAR as bool
            self.enum = SignalR(backend(str, pv("enum"), pv("enum")))
            self.text = SignalR(backend(str, pv("str"), pv("str")))
        super().__init__(name=name)


async def test_device_readings_equal_ophyd_asyncs_own_backend(ioc, group_reads):
    from ophyd_async.epics.core._aioca import CaSignalBackend as AiocaBackend

    ours, theirs = Numbers(CaSignalBackend, ioc.pv), Numbers(AiocaBackend, ioc.pv)
    await ours.connect(timeout=10)
    await theirs.connect(timeout=10)
    fast = {
        sig.name
        for sig in (ours.ao, ours.ao_int, ours.long, ours.prec, ours.udf, ours.enum, ours.text)
        if sig._connector.backend._bp_reading is not None
    }
    assert fast == {"numbers-ao", "numbers-ao_int", "numbers-long", "numbers-prec", "numbers-udf"}
    got, expected = await ours.read(), await theirs.read()
    assert len(group_reads) >= 5
    assert got == expected
    assert {k: type(v["value"]) for k, v in got.items()} == {
        k: type(v["value"]) for k, v in expected.items()
    }
