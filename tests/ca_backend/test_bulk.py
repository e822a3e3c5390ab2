"""Bulk and single reads over libca against a real softIoc."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import numpy as np
import pytest

import beampipe_ca
from beampipe_ca import CaTimeoutError, Reading
from beampipe_ca._libca import context

from .conftest import BANK_SIZE


def test_bulk_get_scalars_of_every_type(ioc):
    names = [ioc.pv(s) for s in ("ao", "long", "enum", "bool", "str")]
    got = beampipe_ca.bulk_get(names, timeout=10)
    assert got == {
        ioc.pv("ao"): 1.5,
        ioc.pv("long"): 42,
        ioc.pv("enum"): 1,
        ioc.pv("bool"): 1,
        ioc.pv("str"): "hello",
    }
    assert isinstance(got[ioc.pv("long")], int)


def test_bulk_get_waveforms_are_numpy_copies(ioc):
    from epics import caput

    data = np.linspace(0, 1, 1000)
    caput(ioc.pv("wf_double"), data, wait=True)
    caput(ioc.pv("wf_short"), [1, -2, 3], wait=True)
    caput(ioc.pv("wf_string"), ["a", "bc"], wait=True)
    names = [ioc.pv("wf_double"), ioc.pv("wf_short"), ioc.pv("wf_string"), ioc.pv("ao")]
    got = beampipe_ca.bulk_get(names, timeout=10)  # arrays, a string array and a scalar at once
    wf = got[ioc.pv("wf_double")]
    assert isinstance(wf, np.ndarray)
    assert wf.dtype == np.float64
    np.testing.assert_array_equal(wf, data)
    short = got[ioc.pv("wf_short")]
    assert short.dtype == np.int16
    np.testing.assert_array_equal(short, [1, -2, 3])  # only NORD elements
    assert got[ioc.pv("wf_string")] == ["a", "bc"]
    assert got[ioc.pv("ao")] == 1.5
    # Our own copies, not views of libca's receive buffers: later reads neither change
    # them nor share memory with them, and they can be written to.
    again = [beampipe_ca.bulk_get(names[:2], timeout=10) for _ in range(5)]
    np.testing.assert_array_equal(wf, data)
    np.testing.assert_array_equal(short, [1, -2, 3])
    assert not np.shares_memory(wf, again[-1][ioc.pv("wf_double")])
    assert not np.shares_memory(wf, short)
    assert wf.flags.writeable
    wf[:] = -1.0
    np.testing.assert_array_equal(beampipe_ca.bulk_get(names[:1], timeout=10)[names[0]], data)


def test_bulk_read_of_every_numeric_waveform_type(ioc):
    """Each native array type on the array path, as readings with alarm and time stamp."""
    from epics import caput

    values = {
        "wf_double": (np.array([0.5, -1.25]), np.float64),
        "wf_float": (np.array([1.5, 2.5, 3.5]), np.float32),
        "wf_short": (np.array([7, -8]), np.int16),
        "wf_long": (np.array([1 << 20, -5, 6, 7]), np.int32),
        "wf_char": (np.array([104, 105, 0]), np.uint8),
        "wf_enum": (np.array([2, 1]), np.uint16),
    }
    before = time.time()
    for suffix, (data, _dtype) in values.items():
        caput(ioc.pv(suffix), data, wait=True)
    got = beampipe_ca.bulk_read([ioc.pv(s) for s in values], timeout=10)
    for suffix, (data, dtype) in values.items():
        r = got[ioc.pv(suffix)]
        assert isinstance(r, Reading), suffix
        assert isinstance(r.value, np.ndarray) and r.value.dtype == dtype, suffix
        np.testing.assert_array_equal(r.value, data.astype(dtype), err_msg=suffix)
        assert before - 1 <= r.timestamp <= time.time() + 1, suffix
        assert r.severity == 0, suffix


def test_never_written_waveform_is_an_empty_array(ioc):
    got = beampipe_ca.bulk_get([ioc.pv("wf_empty"), ioc.pv("ao")], timeout=10)
    empty = got[ioc.pv("wf_empty")]
    assert isinstance(empty, np.ndarray) and empty.dtype == np.float64
    assert empty.size == 0  # NORD = 0: nothing, not NELM zeros


def test_array_replies_after_the_timeout_are_dropped(bank_ioc):
    """Arrays not in by the deadline fail alone; their late replies find no batch to land in."""
    names = [bank_ioc.pv(f"w{i}") for i in range(BANK_SIZE)]
    assert not beampipe_ca.connect(names, timeout=10)
    ctx = context()
    # A caller descheduled right after issuing (both CPUs busy) finds every reply in: try
    # again, a bounded number of times, until the timeout path is taken.
    for _attempt in range(20):
        ok, failed = ctx.read_time_now(names, 1e-5, readings=False)
        assert len(ok) + len(failed) == BANK_SIZE
        if failed:
            break
        time.sleep(0.05)
    assert failed, "all 200 waveforms answered within 10 us, 20 times: no timeout path taken"
    for name, why in failed.items():
        assert why == f"{name}: no reply (timed out after 1e-05 s)"
    time.sleep(0.5)  # the late replies arrive meanwhile
    assert not ctx._array_gets  # the given-up batch is gone; its late replies were dropped
    ok, failed = ctx.read_time_now(names, 10, readings=False)
    assert not failed and len(ok) == BANK_SIZE


def test_bulk_read_has_alarm_time_and_ctrl(ioc):
    name = ioc.pv("ao")
    before = time.time()
    from epics import caput

    caput(name, 85.0, wait=True)  # above HIGH: MINOR alarm
    try:
        r = beampipe_ca.bulk_read([name], timeout=10, ctrl=True)[name]
        assert isinstance(r, Reading)
        assert r.value == 85.0
        assert r.severity == 1
        assert before - 1 <= r.timestamp <= time.time() + 1
        assert r.ctrl is not None
        assert r.ctrl["units"] == "mm"
        assert r.ctrl["precision"] == 3
        assert r.ctrl["upper_ctrl_limit"] == 100
        assert r.ctrl["upper_disp_limit"] == 50
        assert r.ctrl["upper_alarm_limit"] == 90
    finally:
        caput(name, 1.5, wait=True)
    enum = beampipe_ca.bulk_read([ioc.pv("enum")], timeout=10, ctrl=True)[ioc.pv("enum")]
    assert enum is not None and enum.ctrl is not None
    assert enum.ctrl["enums"] == ("Low", "Medium", "High")


def test_reads_are_fresh_not_cached(ioc):
    name = ioc.pv("counter")
    first = beampipe_ca.caget(name, timeout=10)
    time.sleep(0.35)
    second = beampipe_ca.caget(name, timeout=10)
    assert second.value >= first.value + 2
    assert second.timestamp > first.timestamp


def test_failed_pv_is_none_with_reason_never_a_failed_batch(ioc, caplog):
    missing = ioc.pv("does_not_exist")
    with caplog.at_level(logging.WARNING, logger="beampipe_ca"):
        got = beampipe_ca.bulk_get([ioc.pv("long"), missing], timeout=1.0)
    assert got == {ioc.pv("long"): 42, missing: None}
    assert f"{missing}: not connected within 1 s" in caplog.text


def test_single_get_of_unknown_pv_names_it(ioc):
    missing = ioc.pv("nope")
    t0 = time.monotonic()
    with pytest.raises(CaTimeoutError, match=f"{missing}: not connected within 0.5 s"):
        beampipe_ca.caget(missing, timeout=0.5)
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize(
    ("args", "exc"),
    [
        (("PV:A",), TypeError),  # one string, not a list
        ((["ok", ""],), ValueError),
        ((["ok", 3],), ValueError),
        ((["ok"], 0), ValueError),
        ((["ok"], -1.0), ValueError),
        ((["ok"], True), ValueError),
    ],
)
def test_input_is_validated(args, exc):
    with pytest.raises(exc):
        beampipe_ca.bulk_get(*args)


def test_bulk_get_of_a_bank_is_one_batch(bank_ioc):
    names = [bank_ioc.pv(f"s{i}") for i in range(BANK_SIZE)]
    assert beampipe_ca.connect(names, timeout=20) == []
    reads = context()
    before = reads.batches_issued
    got = beampipe_ca.bulk_get(names, timeout=10)
    assert reads.batches_issued == before + 1
    assert got == {n: float(i) for i, n in enumerate(names)}


def test_concurrent_threads_coalesce(bank_ioc):
    names = [bank_ioc.pv(f"s{i}") for i in range(BANK_SIZE)]
    assert beampipe_ca.connect(names, timeout=20) == []
    reads = context()
    results: dict[str, float] = {}
    barrier = threading.Barrier(8)

    def worker(chunk: list[str]) -> None:
        barrier.wait()
        for name in chunk:
            results[name] = beampipe_ca.caget(name, timeout=10).value

    before = reads.batches_issued
    threads = [threading.Thread(target=worker, args=(names[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {n: float(i) for i, n in enumerate(names)}
    # 200 single reads from 8 threads: fewer wire batches than reads.
    assert reads.batches_issued - before < BANK_SIZE


def test_threads_and_a_coroutine_waiting_on_the_same_new_channels(bank_ioc):
    """One waiter per wait, not per channel: each wakes once its own set is up, and leaves
    nothing registered on the channels, whether they connected or it timed out."""
    ctx = context()
    fresh = [ctx.channel(bank_ioc.pv(f"s{i}.DESC")) for i in range(40)]
    missing = ctx.channel(bank_ioc.pv("no_such_record"))
    down: dict[str, list[str]] = {}

    def wait(who: str, chans: list) -> None:
        down[who] = [c.name for c in ctx.wait_connected(chans, 2.0)]

    async def wait_async() -> list[str]:
        return [c.name for c in await ctx.wait_connected_async(fresh[::2], 10.0)]

    threads = [
        threading.Thread(target=wait, args=("all", [*fresh, missing])),
        threading.Thread(target=wait, args=("half", fresh[1::2])),
    ]
    for t in threads:
        t.start()
    assert asyncio.run(wait_async()) == []
    for t in threads:
        t.join(10)
    assert down == {"all": [missing.name], "half": []}
    assert all(c.up for c in fresh) and not missing.up
    assert [c._waiters for c in [*fresh, missing]] == [[]] * (len(fresh) + 1)
    # Already up: no wait at all.
    t0 = time.monotonic()
    assert ctx.wait_connected(fresh, 5.0) == []
    assert time.monotonic() - t0 < 0.5


async def test_gather_of_single_async_reads_is_one_batch(bank_ioc):
    names = [bank_ioc.pv(f"s{i}") for i in range(BANK_SIZE)]
    assert await beampipe_ca.connect_async(names, timeout=20) == []
    reads = context()
    before = reads.batches_issued
    got = await asyncio.gather(*(beampipe_ca.caget_async(n, timeout=10) for n in names))
    assert [r.value for r in got] == [float(i) for i in range(BANK_SIZE)]
    assert reads.batches_issued == before + 1


async def test_bulk_get_async(ioc):
    got = await beampipe_ca.bulk_get_async([ioc.pv("long"), ioc.pv("str")], timeout=10)
    assert got == {ioc.pv("long"): 42, ioc.pv("str"): "hello"}
    readings = await beampipe_ca.bulk_read_async([ioc.pv("ao")], timeout=10, ctrl=True)
    r = readings[ioc.pv("ao")]
    assert r is not None and r.ctrl is not None and r.ctrl["units"] == "mm"


async def test_async_unknown_pv_is_none(ioc, caplog):
    missing = ioc.pv("missing_async")
    with caplog.at_level(logging.WARNING, logger="beampipe_ca"):
        got = await beampipe_ca.bulk_get_async([missing, ioc.pv("long")], timeout=0.5)
    assert got == {missing: None, ioc.pv("long"): 42}
    assert missing in caplog.text
    with pytest.raises(CaTimeoutError, match=missing):
        await beampipe_ca.caget_async(missing, timeout=0.3)


def test_one_libca_and_one_context_shared_with_pyepics():
    import epics.ca
    from epicscorelibs import path

    ctx = context()
    assert epics.ca.libca._name == path.get_lib("ca")
    assert ctx.ctx == epics.ca.initial_context


def test_one_bulk_call_across_two_iocs(ioc, bank_ioc):
    names = [ioc.pv("long"), bank_ioc.pv("s3"), ioc.pv("wf_short"), ioc.pv("str")]
    got = beampipe_ca.bulk_get(names, timeout=10)
    assert list(got) == names  # the caller's order, whatever the wire order was
    assert got[ioc.pv("long")] == 42
    assert got[bank_ioc.pv("s3")] == 3.0
    assert isinstance(got[ioc.pv("wf_short")], np.ndarray)
    assert got[ioc.pv("str")] == "hello"


def test_concurrent_bulk_reads_from_threads_all_correct(bank_ioc, ioc):
    """Sync bulk reads share ca_pend_io (context-wide): many threads at once must not mix up."""
    scalars = [bank_ioc.pv(f"s{i}") for i in range(BANK_SIZE)]
    mixed = [ioc.pv("long"), ioc.pv("str"), ioc.pv("wf_short"), *scalars[:10]]
    assert beampipe_ca.connect(scalars + mixed, timeout=20) == []
    expected = {n: float(i) for i, n in enumerate(scalars)}
    errors: list[str] = []

    def worker(k: int) -> None:
        for _ in range(20):
            names = scalars if k % 2 else mixed
            got = beampipe_ca.bulk_get(names, timeout=10)
            for name in names:
                if name in expected and got[name] != expected[name]:
                    errors.append(f"{name}: {got[name]!r}")
            if k % 2 == 0 and (got[ioc.pv("long")], got[ioc.pv("str")]) != (42, "hello"):
                errors.append(f"mixed batch: {got[ioc.pv('long')]!r}, {got[ioc.pv('str')]!r}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]


def test_ctrl_metadata_of_strings_and_arrays(ioc):
    names = [ioc.pv("str"), ioc.pv("wf_double"), ioc.pv("long")]
    got = beampipe_ca.bulk_read(names, timeout=10, ctrl=True)
    text, wave, long = (got[n] for n in names)
    assert text is not None and text.value == "hello" and text.ctrl is not None
    assert "severity" in text.ctrl  # strings have no DBR_CTRL: the time form stands in
    assert wave is not None and isinstance(wave.value, np.ndarray) and wave.ctrl is not None
    assert "upper_disp_limit" in wave.ctrl
    assert long is not None and long.value == 42 and long.ctrl is not None
    assert "precision" not in long.ctrl  # integers carry no precision
