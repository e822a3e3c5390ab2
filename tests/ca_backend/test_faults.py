"""Faults against a real IOC: restart mid-test, unknown PVs, bad puts."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from ophyd_async.core import NotConnectedError

import beampipe
import beampipe_ca
from beampipe_ca import CaTimeoutError, ca_signal_r

from .conftest import TEST_DB

#: libca parks a lost circuit's channels on its disconnect governor, which releases them to
#: the search timer every 10 s (counted from the process's first channel): a restarted IOC is
#: reconnected 0 to 10 s after it is back, so allow well over that.
RECONNECT = 30.0


async def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_ioc_restart_monitors_resume_and_nothing_stale(ioc_factory):
    ioc = ioc_factory(TEST_DB)
    counter = ioc.pv("counter")

    # ophyd-async monitor on the batched backend
    sig = ca_signal_r(float, counter, name="c")
    await sig.connect(timeout=10)
    plain = ca_signal_r(float, counter, name="plain")  # no monitor: every read is a get
    await plain.connect(timeout=10)
    plain._connector.backend.read_timeout = 0.5
    async_seen: list[tuple[float, float]] = []
    sig.subscribe_reading(lambda r: async_seen.append((r["c"]["value"], r["c"]["timestamp"])))

    # ophyd monitor on the beampipe-ca control layer
    beampipe.use("beampipe-ca", ophyd_async=False)
    from ophyd import EpicsSignalRO

    osig = EpicsSignalRO(counter, name="oc")
    osig.wait_for_connection(timeout=10)
    sync_seen: list[tuple[float, float]] = []
    lock = threading.Lock()

    def on_value(value, timestamp, **_kw):
        with lock:
            sync_seen.append((value, timestamp))

    osig.subscribe(on_value)
    try:
        await _wait_for(lambda: len(async_seen) > 3 and len(sync_seen) > 3, 5, "first updates")
        before = beampipe_ca.bulk_read([counter], timeout=5)[counter]
        assert before is not None

        ioc.stop()
        t_down = time.time()
        await asyncio.sleep(0.5)
        # Down: a read fails naming the PV, and never hands back the last value...
        with pytest.raises(NotConnectedError, match=counter):
            await plain.get_value()
        # ...and a monitored signal's cached reading keeps its old time stamp.
        assert (await sig.read())["c"]["timestamp"] <= t_down
        assert beampipe_ca.bulk_get([counter], timeout=0.5) == {counter: None}
        with pytest.raises(CaTimeoutError, match=counter):
            beampipe_ca.caget(counter, timeout=0.5)
        n_async, n_sync = len(async_seen), len(sync_seen)

        ioc.start()
        t_up = time.time()
        await _wait_for(
            lambda: len(async_seen) > n_async + 3 and len(sync_seen) > n_sync + 3,
            RECONNECT,
            "monitors to resume after the restart",
        )
        # Every update after the restart is a new value with a new time stamp.
        for value, stamp in async_seen[n_async:]:
            assert stamp > t_down, (value, stamp, t_down)
        with lock:
            after_sync = sync_seen[n_sync:]
        for _value, stamp in after_sync:
            assert stamp > t_down
        # The counter started again from its database value.
        assert async_seen[-1][0] < before.value + (time.time() - t_down) * 10 + 5
        fresh = beampipe_ca.bulk_read([counter], timeout=5)[counter]
        assert fresh is not None and fresh.timestamp >= t_up - 1
        assert (await plain.read())["plain"]["timestamp"] >= t_up - 1
    finally:
        sig._connector.backend.set_callback(None)
        osig.destroy()
        beampipe.reset()


async def test_unknown_pv_clear_errors(ioc):
    missing = ioc.pv("no_such_record")
    with pytest.raises(CaTimeoutError, match=f"{missing}: not connected within 0.3 s"):
        await beampipe_ca.caget_async(missing, timeout=0.3)
    with pytest.raises(NotConnectedError, match=missing):
        await ca_signal_r(float, missing, name="m").connect(timeout=0.3)


async def test_bad_put_types_are_refused(ioc):
    import numpy as np
    from ophyd_async.core import Array1D

    from beampipe_ca import ca_signal_rw

    wf = ca_signal_rw(Array1D[np.int16], ioc.pv("wf_short"), name="wf")
    await wf.connect(timeout=5)
    await wf.set(np.array([4, 5], dtype=np.int16))
    with pytest.raises((TypeError, ValueError)):
        await wf.set(["a", "b"])  # type: ignore[arg-type]
    np.testing.assert_array_equal(await wf.get_value(), [4, 5])
    num = ca_signal_rw(float, ioc.pv("ao"), name="num")
    await num.connect(timeout=5)
    for bad in ("1.0", True, [1.0]):
        with pytest.raises(TypeError, match=ioc.pv("ao")):
            await num.set(bad)  # type: ignore[arg-type]
    assert await num.get_value() == 1.5
