"""ophyd on the beampipe-ca control layer, against a real IOC."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import beampipe

from .conftest import BANK_SIZE


@pytest.fixture
def cl():
    beampipe.use("beampipe-ca", ophyd_async=False)
    import ophyd

    assert ophyd.cl.name == "beampipe-ca"
    yield ophyd.cl
    beampipe.reset()


def test_layer_exports_what_ophyd_needs():
    from beampipe_ca import _ophyd_shim

    for attr in beampipe.CONTROL_LAYER_EXPORTS:
        assert hasattr(_ophyd_shim, attr), attr
    assert _ophyd_shim.name == "beampipe-ca"


def test_epics_signal_read_put_and_metadata(cl, ioc):
    from ophyd import EpicsSignal, EpicsSignalRO

    sig = EpicsSignal(ioc.pv("ao"), name="ao")
    ro = EpicsSignalRO(ioc.pv("str"), name="s")
    sig.wait_for_connection(timeout=10)
    ro.wait_for_connection(timeout=10)
    assert sig.get() == 1.5
    assert ro.get() == "hello"
    desc = sig.describe()["ao"]
    assert desc["units"] == "mm"
    assert desc["precision"] == 3
    assert sig.limits == (-100.0, 100.0)
    try:
        sig.put(7.25, wait=True)
        assert sig.get(use_monitor=False) == 7.25
        reading = sig.read()["ao"]
        assert reading["value"] == 7.25
    finally:
        sig.put(1.5, wait=True)
    assert sig.cl.name == "beampipe-ca"
    sig.destroy()
    ro.destroy()


def test_enum_and_waveform(cl, ioc):
    from ophyd import EpicsSignal

    enum = EpicsSignal(ioc.pv("enum"), name="e", string=True)
    enum.wait_for_connection(timeout=10)
    assert enum.enum_strs == ("Low", "Medium", "High")
    assert enum.get() == "Medium"
    wf = EpicsSignal(ioc.pv("wf_long"), name="wf")
    wf.wait_for_connection(timeout=10)
    wf.put(np.array([5, 6, 7], dtype=np.int32), wait=True)
    np.testing.assert_array_equal(wf.get(use_monitor=False)[:3], [5, 6, 7])
    enum.destroy()
    wf.destroy()


def test_put_completion_waits_for_the_record(cl, ioc):
    from ophyd import EpicsSignal

    sig = EpicsSignal(ioc.pv("slow"), name="slow", put_complete=True)
    sig.wait_for_connection(timeout=10)
    t0 = time.monotonic()
    status = sig.set(3.0)
    assert not status.done
    status.wait(10)
    assert time.monotonic() - t0 >= 0.4  # calcout ODLY 0.5 s holds the put callback
    assert status.success
    sig.destroy()


def test_monitor_updates(cl, ioc):
    from ophyd import EpicsSignalRO

    sig = EpicsSignalRO(ioc.pv("counter"), name="c")
    sig.wait_for_connection(timeout=10)
    seen: list[float] = []
    got = threading.Event()

    def cb(value, **_kw):
        seen.append(value)
        if len(seen) >= 4:
            got.set()

    sig.subscribe(cb)
    assert got.wait(5)
    sig.clear_sub(cb)
    assert seen[1:] == sorted(seen[1:])
    assert seen[-1] > seen[1]
    sig.destroy()


def test_unknown_pv_times_out_naming_it(cl, ioc):
    from ophyd import EpicsSignalRO

    missing = ioc.pv("not_there")
    sig = EpicsSignalRO(missing, name="m")
    with pytest.raises(TimeoutError, match=missing):
        sig.wait_for_connection(timeout=0.5)
    sig.destroy()


def test_bad_put_type_raises(cl, ioc):
    from ophyd import EpicsSignal

    sig = EpicsSignal(ioc.pv("ao"), name="ao")
    sig.wait_for_connection(timeout=10)
    with pytest.raises((ValueError, TypeError)):
        sig.put("not a number", wait=True)
    assert sig.get(use_monitor=False) == 1.5
    sig.destroy()


def test_two_devices_on_one_pv_are_independent(cl, ioc):
    """pyepics #159 / ophyd #708: releasing one must not break the other."""
    from ophyd import EpicsSignalRO

    a = EpicsSignalRO(ioc.pv("counter"), name="a")
    b = EpicsSignalRO(ioc.pv("counter"), name="b")
    assert a._read_pv is not b._read_pv
    a.wait_for_connection(timeout=10)
    b.wait_for_connection(timeout=10)
    a.destroy()
    first = b.get(use_monitor=False)
    time.sleep(0.3)
    assert b.get(use_monitor=False) > first  # b's channel was not cleared with a's PV
    seen = threading.Event()
    b.subscribe(lambda **_kw: seen.set(), run=False)
    assert seen.wait(5)
    b.destroy()


def _bank_device(prefix: str, n: int):
    from ophyd import Component as Cpt
    from ophyd import Device, EpicsSignalRO

    attrs = {f"s{i}": Cpt(EpicsSignalRO, f"s{i}", kind="hinted") for i in range(n)}
    return type("Bank", (Device,), attrs)(prefix, name="bank")


def test_device_of_200_pvs_connects_with_batched_metadata(cl, bank_ioc):
    from beampipe_ca._libca import context
    from beampipe_ca._ophyd_shim import _batcher

    ctx = context()
    before, meta_before, hits_before = ctx.batches_issued, _batcher.batches, _batcher.prefetch_hits
    dev = _bank_device(bank_ioc.prefix, BANK_SIZE)
    dev.wait_for_connection(timeout=20)
    reading = dev.read()
    assert [reading[f"bank_s{i}"]["value"] for i in range(BANK_SIZE)] == [
        float(i) for i in range(BANK_SIZE)
    ]
    assert dev.s7.describe()["bank_s7"]["units"] == "V"
    # 200 PVs' time+ctrl metadata: a few wire batches, not 400 round trips.
    assert ctx.batches_issued - before < 40, ctx.batches_issued - before
    assert _batcher.batches - meta_before < 40
    # Every signal's metadata was read when libca reported the connection, before ophyd's
    # metadata thread asked for it (prefetch), and no PV was read twice.
    assert _batcher.prefetch_hits - hits_before == BANK_SIZE
    assert all(getattr(dev, f"s{i}")._read_pv._bp_md == "used" for i in range(BANK_SIZE))
    dev.destroy()


def test_the_metadata_thread_is_started_by_the_thread_making_pvs_not_libcas(
    cl, bank_ioc, monkeypatch
):
    """libca's receive thread never waits for a thread to start in a connection storm.

    ``Thread.start`` waits for the new thread to run; on libca's thread that
    wait stalled every connection callback behind it (up to 25 ms measured).
    """
    from beampipe_ca import _ophyd_shim

    batcher = _ophyd_shim._batcher
    starters: list[str] = []
    start = type(batcher)._start

    def recording_start(self: object) -> None:
        starters.append(threading.current_thread().name)
        start(self)  # type: ignore[arg-type]

    monkeypatch.setattr(type(batcher), "_start", recording_start)
    monkeypatch.setattr(_ophyd_shim, "_LINGER_S", 0.5)
    deadline = time.monotonic() + 2
    while batcher._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)  # a thread left from an earlier test goes first
    assert batcher._thread is None
    dev = _bank_device(bank_ioc.prefix, BANK_SIZE)
    dev.wait_for_connection(timeout=20)
    assert starters == [threading.current_thread().name]  # once, by the building thread
    thread = batcher._thread
    assert thread is not None and thread.is_alive()
    dev.destroy()
    thread.join(timeout=5)  # and it goes once nothing comes for _LINGER_S
    assert not thread.is_alive() and batcher._thread is None


def test_our_pyepics_cache_entry_is_the_one_pyepics_makes(cl):
    import epics.ca

    from beampipe_ca._ophyd_shim import _cache_item

    theirs = epics.ca._CacheItem(chid=1234, pvname="X:Y")
    ours = _cache_item(1234, "X:Y", epics.ca.current_context())
    assert type(ours) is type(theirs)
    assert sorted(vars(ours)) == sorted(vars(theirs))
    for name, value in vars(theirs).items():
        mine = vars(ours)[name]
        assert type(mine) is type(value), name
        if name == "_chid":
            assert mine.value == value.value
        elif name not in ("lock", "get_results"):
            assert mine == value, name
    assert ours.get_results["x"] == theirs.get_results["x"] == [None]


def test_a_key_failed_by_a_release_is_counted_once_when_its_reply_lands_too():
    from beampipe._batching import Failed, Ok
    from beampipe_ca._libca import _GetBatch

    done: list[dict[str, object]] = []
    batch = _GetBatch(["a", "b"], lambda results: done.append(dict(results)))
    batch.settle("a", Failed("a: channel released while being read"))
    batch.settle("a", Ok(1.0))  # the late reply
    assert not done  # "b" is still owed
    batch.settle("b", Ok(2.0))
    assert done == [{"a": Failed("a: channel released while being read"), "b": Ok(2.0)}]


def test_release_keeps_a_channel_another_pv_object_uses(cl, ioc):
    """pyepics shares one chid per name: releasing ours must not clear a user's epics.PV."""
    import epics
    from ophyd import EpicsSignalRO

    theirs = epics.PV(ioc.pv("counter"), auto_monitor=False)
    assert theirs.wait_for_connection(timeout=10)
    ours = EpicsSignalRO(ioc.pv("counter"), name="o")
    ours.wait_for_connection(timeout=10)
    ours.destroy()
    assert theirs.get(use_monitor=False, timeout=5) is not None
    assert theirs.connected
    theirs.disconnect()


def test_ophyd_control_layer_environment_variable(ioc):
    """``OPHYD_CONTROL_LAYER=beampipe-ca`` and a plain ``import ophyd`` is all a script needs."""
    import os
    import subprocess
    import sys

    script = (
        "import ophyd\n"
        "from ophyd import EpicsSignalRO\n"
        f"s = EpicsSignalRO({ioc.pv('long')!r}, name='s')\n"
        "s.wait_for_connection(timeout=10)\n"
        "print(ophyd.cl.name, s.get())\n"
    )
    env = {**os.environ, "OPHYD_CONTROL_LAYER": "beampipe-ca"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["beampipe-ca", "42"]


def test_pv_object_matches_epics_pv_attribute_for_attribute(cl, ioc):
    """BeampipeShimPV sets epics.PV's attributes itself: a pyepics upgrade that adds one shows."""
    import epics
    from ophyd import EpicsSignal

    name = ioc.pv("ao")
    stock = epics.PV(name, form="time", auto_monitor=False)
    assert stock.wait_for_connection(timeout=10)
    sig = EpicsSignal(name, name="ao")
    sig.wait_for_connection(timeout=10)
    ours = sig._read_pv
    missing = set(vars(stock)) - set(vars(ours))
    assert not missing, f"epics.PV sets attributes BeampipeShimPV does not: {sorted(missing)}"
    assert set(stock._args) == set(ours._args)
    for key in ("type", "typefull", "ftype", "count", "nelm", "host", "access", "read_access",
                "write_access"):  # fmt: skip
        assert ours._args[key] == stock._args[key], key
    assert ours.connected and ours.ftype == stock.ftype
    stock.disconnect()
    sig.destroy()


def test_pv_already_up_is_told_once_its_device_is_built(cl, ioc):
    """A name a bulk read connected: the ophyd PV hears of it when waited for (or soon after),
    not inside the signal's __init__, where its first monitor event would race with the
    subscriptions the Device makes next (an EpicsMotor's DMOV)."""
    from ophyd import EpicsSignalRO

    import beampipe_ca

    name = ioc.pv("long")
    assert beampipe_ca.bulk_get([name])[name] == 42
    sig = EpicsSignalRO(name, name="s", auto_monitor=True)
    assert sig._read_pv._bp_deferred  # held back...
    seen: list[float] = []
    sig.subscribe(lambda value, **_kw: seen.append(value))
    sig.wait_for_connection(timeout=10)  # ... and told here
    assert not sig._read_pv._bp_deferred
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen and seen[0] == 42  # the subscription saw the first value
    # Nobody waits: told by itself shortly after.
    lone = EpicsSignalRO(name, name="lone")
    deadline = time.monotonic() + 5
    while not lone._read_pv.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lone._read_pv.connected and not lone._read_pv._bp_deferred
    sig.destroy()
    lone.destroy()


def test_connection_news_overtaking_a_held_back_one_still_brings_access_rights(cl, ioc):
    """A channel already up at the PV object's birth, then a connection event from libca
    before the held-back news is told (the race a busy machine hit in ~1% of Device
    connects): the access rights that news carried must still reach ophyd, or the signal
    never becomes ready."""
    from ophyd import EpicsSignalRO

    import beampipe_ca

    name = ioc.pv("ao_int.LOPR")  # a name no other test opens through ophyd
    assert beampipe_ca.bulk_get([name])[name] is not None
    sig = EpicsSignalRO(name, name="s")
    pv = sig._read_pv
    assert pv._bp_deferred
    # libca's connection news, delivered to the entry's listener as libca's thread would
    # (its access-rights event having gone out before this PV object listened).
    pv._bp_entry.bp_listener(pv._bp_chan, True)
    assert not pv._bp_deferred
    sig.wait_for_connection(timeout=5)
    assert sig.connected and sig.read_access
    sig.destroy()


def test_last_release_clears_the_channel_unless_a_bulk_read_uses_it(cl, ioc):
    import epics
    from ophyd import EpicsSignalRO

    import beampipe_ca
    from beampipe_ca._libca import context

    ctx = context()
    unpinned = ctx._unpinned
    name = ioc.pv("ao_int.HOPR")  # a name no other test reads in bulk (that would pin it)
    a = EpicsSignalRO(name, name="a")
    b = EpicsSignalRO(name, name="b")
    a.wait_for_connection(timeout=10)
    b.wait_for_connection(timeout=10)
    chan = a._read_pv._bp_chan
    assert chan is b._read_pv._bp_chan and chan.holders == 2 and not chan.pinned
    a.destroy()
    assert ctx._channels.get(name) is chan and b.get(use_monitor=False) is not None
    b.destroy()  # the last one: channel and pyepics cache entry go
    assert name not in ctx._channels and chan.dead
    assert name not in epics.ca._cache[ctx.ctx]
    # A bulk read's channel stays through an ophyd PV object's release.
    assert beampipe_ca.bulk_get([name])[name] is not None
    kept = ctx._channels[name]
    c = EpicsSignalRO(name, name="c")
    c.wait_for_connection(timeout=10)
    assert c._read_pv._bp_chan is kept
    c.destroy()
    assert ctx._channels.get(name) is kept and not kept.dead
    assert beampipe_ca.bulk_get([name])[name] is not None
    # ... and a new PV object on it later works.
    d = EpicsSignalRO(name, name="d")
    d.wait_for_connection(timeout=10)
    assert d.get(use_monitor=False) is not None
    assert len(kept.listeners) == 1  # released entries took their listener with them
    d.destroy()
    assert ctx._unpinned == unpinned


@pytest.fixture
def get_waits(monkeypatch):
    """The ``wait`` argument of every pyepics ``ca.get_with_metadata`` call made from now on:
    False for a get put on the wire ahead of a batch, True for a get that waits on its own."""
    import epics

    waits: list[bool] = []
    real = epics.ca.get_with_metadata

    def counting(*args, **kwargs):
        waits.append(kwargs.get("wait", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(epics.ca, "get_with_metadata", counting)
    return waits


def test_device_read_is_one_wire_batch_with_the_same_values(cl, ioc, get_waits):
    """Device.read() asks for all of its non-monitored PVs at once, then ophyd's gets collect
    them: values as the one-by-one gets give them, and fresh (the counter moves on)."""
    from ophyd import Component as Cpt
    from ophyd import Device, EpicsSignal, EpicsSignalRO

    class Mixed(Device):
        ao = Cpt(EpicsSignal, "ao")
        long = Cpt(EpicsSignalRO, "long")
        text = Cpt(EpicsSignalRO, "str", string=True)
        enum = Cpt(EpicsSignal, "enum", string=True)
        wf = Cpt(EpicsSignalRO, "wf_long")
        empty = Cpt(EpicsSignalRO, "wf_empty")
        counter = Cpt(EpicsSignalRO, "counter")
        config = Cpt(EpicsSignalRO, "ao_int", kind="config")

    dev = Mixed(ioc.prefix, name="m")
    dev.wait_for_connection(timeout=10)
    one_by_one = {
        f"m_{name}": getattr(dev, name).get(use_monitor=False)
        for name in ("ao", "long", "text", "enum", "wf", "empty")
    }
    waits = get_waits
    waits.clear()
    first = dev.read()
    assert waits == [False] * 7  # seven requests put on the wire together, no get of its own
    for key, value in one_by_one.items():
        np.testing.assert_array_equal(first[key]["value"], value)
        assert type(first[key]["value"]) is type(value), key
    assert first["m_text"]["value"] == "hello" and first["m_enum"]["value"] == "Medium"
    assert len(first["m_empty"]["value"]) == 0
    waits.clear()
    assert dev.read_configuration()["m_config"]["value"] == 3
    time.sleep(0.3)
    second = dev.read()
    assert second["m_counter"]["value"] > first["m_counter"]["value"]  # a wire read, not a cache
    assert second["m_counter"]["timestamp"] > first["m_counter"]["timestamp"]
    # Nothing asked for by a read is left to serve a later get.
    assert all(w.item._read_pv._bp_ticket is None for w in dev.walk_signals())
    dev.destroy()


def test_exit_with_devices_still_alive_is_clean(ioc, tmp_path):
    """ophyd's finalizers release PVs at exit, possibly after pyepics' own atexit hook has
    destroyed the CA context: a Device nobody destroyed must not abort the interpreter."""
    import os
    import subprocess
    import sys

    script = tmp_path / "leave.py"
    script.write_text(
        "import weakref\n"
        "class Early: pass\n"
        "early = Early()\n"
        "weakref.finalize(early, lambda: None)  # finalizers' atexit hook before pyepics'\n"
        "import beampipe\n"
        "beampipe.use('beampipe-ca', ophyd_async=False)\n"
        "from ophyd import Component as Cpt, Device, EpicsSignalRO\n"
        "class D(Device):\n"
        "    a = Cpt(EpicsSignalRO, 'long')\n"
        "    b = Cpt(EpicsSignalRO, 'ao')\n"
        f"d = D({ioc.prefix!r}, name='d')\n"
        "d.wait_for_connection(timeout=10)\n"
        "print(d.a.get())\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], env=dict(os.environ), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["42"]
    assert "terminate called" not in out.stderr


def test_first_describe_is_one_wire_batch(cl, ioc, get_waits):
    """ophyd's describe() gets every signal that never had a value (bluesky's first read of a
    Device in a run): those gets leave together too, and a later describe gets nothing."""
    from ophyd import Component as Cpt
    from ophyd import Device, EpicsSignalRO

    class Few(Device):
        a = Cpt(EpicsSignalRO, "long")
        b = Cpt(EpicsSignalRO, "ao")
        c = Cpt(EpicsSignalRO, "wf_double")
        d = Cpt(EpicsSignalRO, "ao_int", kind="config")
        e = Cpt(EpicsSignalRO, "counter", auto_monitor=True)  # described from its monitor

    dev = Few(ioc.prefix, name="f")
    dev.wait_for_connection(timeout=10)
    waits = get_waits
    waits.clear()
    desc = dev.describe()
    assert waits == [False] * 3
    assert desc["f_a"]["dtype"] == "integer" and desc["f_c"]["dtype"] == "array"
    waits.clear()
    assert dev.describe_configuration()["f_d"]["dtype"] == "number"
    assert waits == [True]  # one signal: its own get, no batch
    waits.clear()
    assert dev.describe() == desc
    assert waits == []
    dev.destroy()


def test_device_read_from_a_thread_without_a_ca_context(cl, ioc):
    """A plan's thread may never have touched CA: the batched read attaches it to the shared
    context first (libca would otherwise make it a new one, where the gets never complete)."""
    from ophyd import Component as Cpt
    from ophyd import Device, EpicsSignalRO

    class Two(Device):
        a = Cpt(EpicsSignalRO, "long")
        b = Cpt(EpicsSignalRO, "ao")

    dev = Two(ioc.prefix, name="t")
    dev.wait_for_connection(timeout=10)
    out: dict[str, object] = {}

    def plan_thread() -> None:
        try:
            out["describe"] = dev.describe()
            out["read"] = dev.read()
        except Exception as exc:  # noqa: BLE001 - reported below
            out["error"] = exc

    worker = threading.Thread(target=plan_thread, name="fresh")
    worker.start()
    worker.join(30)
    assert "error" not in out, out.get("error")
    read = out["read"]
    assert isinstance(read, dict) and read["t_a"]["value"] == 42
    dev.destroy()
