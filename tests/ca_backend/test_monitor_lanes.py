"""Monitor delivery on the ophyd layer: a slow callback stalls only its own Device, in order."""

from __future__ import annotations

import threading
import time

import beampipe

GATE_LIMIT = 10.0  # a blocked callback never waits longer than this (bounded test)


def _layer(name: str):
    if name == "beampipe-ca":
        beampipe.use("beampipe-ca", ophyd_async=False)
    else:
        beampipe.reset()
    import ophyd

    if name == "pyepics":
        ophyd.set_cl("pyepics")
    assert ophyd.cl.name == name
    return ophyd


def _counter_updates_while_blocked(
    ophyd, ioc, suffix: str = "", destroy: bool = True
) -> tuple[int, list[float]]:
    """Block a callback of one signal; count another signal's monitor updates meanwhile."""
    # Read-only, written through another signal: only monitor events reach the callbacks.
    # The writer spells the PV ".VAL" so pyepics' PV cache does not hand both one object.
    slow_sig = ophyd.EpicsSignalRO(ioc.pv(f"lane_slow{suffix}"), name="slow")
    writer = ophyd.EpicsSignal(ioc.pv(f"lane_slow{suffix}.VAL"), name="writer")
    fast_sig = ophyd.EpicsSignalRO(ioc.pv(f"lane_tick{suffix}"), name="fast")
    slow_sig.wait_for_connection(timeout=10)
    writer.wait_for_connection(timeout=10)
    fast_sig.wait_for_connection(timeout=10)
    gate, entered = threading.Event(), threading.Event()
    slow_seen: list[float] = []
    fast_seen: list[float] = []

    def slow_cb(value, **_kw):
        slow_seen.append(value)
        if value == 1.5:
            entered.set()
            gate.wait(GATE_LIMIT)  # a deliberately slow user callback

    slow_sig.subscribe(slow_cb, run=False)
    fast_cid = fast_sig.subscribe(lambda value, **_kw: fast_seen.append(value), run=False)
    try:
        writer.put(1.5, wait=True)
        assert entered.wait(5), "the slow callback never ran"
        assert threading.current_thread() is threading.main_thread()
        for v in (2.5, 3.5):  # queued behind the blocked callback of the same signal
            writer.put(v, wait=True)
        before = len(fast_seen)
        time.sleep(0.8)  # the counter record updates every 0.1 s
        during = len(fast_seen) - before
    finally:
        gate.set()
    deadline = time.monotonic() + 5
    while slow_seen[-1:] != [3.5] and time.monotonic() < deadline:
        time.sleep(0.01)
    if destroy:
        for sig in (slow_sig, writer, fast_sig):
            sig.destroy()
    else:
        slow_sig.clear_sub(slow_cb)
        fast_sig.unsubscribe(fast_cid)
    return during, slow_seen


def test_slow_callback_does_not_stall_other_pvs(ioc):
    ophyd = _layer("beampipe-ca")
    try:
        during, slow_seen = _counter_updates_while_blocked(ophyd, ioc)
    finally:
        beampipe.reset()
    assert during >= 4, f"only {during} counter updates while another PV's callback blocked"
    # The blocked signal's own later updates were kept and delivered in order afterwards.
    assert slow_seen[-3:] == [1.5, 2.5, 3.5]


def test_the_pyepics_layer_stalls_there(ioc):
    """The same scenario on ophyd's pyepics layer: its one monitor thread stalls everything.

    Shows the test above measures what it claims (it would fail on the old dispatch).
    Records of its own and signals left undestroyed: the pyepics layer shares pyepics'
    cached PV objects process-wide, and releasing a shared one breaks its other users
    (ophyd #708, the problem beampipe-ca's own ``release_pvs`` avoids).
    """
    ophyd = _layer("pyepics")
    try:
        during, slow_seen = _counter_updates_while_blocked(ophyd, ioc, suffix="2", destroy=False)
    finally:
        beampipe.reset()
    assert during == 0
    assert slow_seen[-3:] == [1.5, 2.5, 3.5]


def test_one_device_keeps_its_order_across_pvs(ioc):
    """Within a Device, events of all its PVs are delivered in arrival order, slow or not.

    ``b``'s update arrives while ``a``'s callback is blocked; it must wait for it
    (the barrier EpicsMotor needs between RBV and DMOV), while a signal of
    another Device keeps flowing.
    """
    ophyd = _layer("beampipe-ca")
    from ophyd import Component as Cpt
    from ophyd import Device, EpicsSignal, EpicsSignalRO

    class Pair(Device):
        a = Cpt(EpicsSignalRO, "lane_a")
        b = Cpt(EpicsSignalRO, "lane_b")

    pair = Pair(ioc.prefix, name="pair")
    write_a = EpicsSignal(ioc.pv("lane_a.VAL"), name="write_a")
    write_b = EpicsSignal(ioc.pv("lane_b.VAL"), name="write_b")
    other = EpicsSignalRO(ioc.pv("lane_tick"), name="other")
    try:
        for obj in (pair, write_a, write_b, other):
            obj.wait_for_connection(timeout=10)
        order: list[tuple[str, float]] = []
        other_seen: list[float] = []
        gate, entered = threading.Event(), threading.Event()

        def on_a(value, **_kw):
            order.append(("a", value))
            if value == 11.0:
                entered.set()
                gate.wait(GATE_LIMIT)

        pair.a.subscribe(on_a, run=False)
        pair.b.subscribe(lambda value, **_kw: order.append(("b", value)), run=False)
        other.subscribe(lambda value, **_kw: other_seen.append(value), run=False)
        try:
            write_a.put(11.0, wait=True)
            assert entered.wait(5)
            write_b.put(21, wait=True)
            write_a.put(12.0, wait=True)
            write_b.put(22, wait=True)
            n_other = len(other_seen)
            time.sleep(0.5)
            assert len(other_seen) - n_other >= 2, "another Device's monitor stalled"
            assert ("b", 21) not in order, "b overtook a's earlier, still running callback"
        finally:
            gate.set()
        deadline = time.monotonic() + 5
        while order[-1:] != [("b", 22)] and time.monotonic() < deadline:
            time.sleep(0.01)
        tail = order[order.index(("a", 11.0)) :]
        assert tail == [("a", 11.0), ("b", 21), ("a", 12.0), ("b", 22)]
        assert ophyd.cl.get_dispatcher().get_thread_context("monitor") is not None
    finally:
        for obj in (pair, write_a, write_b, other):
            obj.destroy()
        beampipe.reset()


def test_callback_errors_are_logged_not_fatal(ioc, caplog):
    _layer("beampipe-ca")
    from ophyd import EpicsSignal, EpicsSignalRO

    sig = EpicsSignalRO(ioc.pv("lane_slow"), name="x")
    writer = EpicsSignal(ioc.pv("lane_slow.VAL"), name="writer")
    try:
        sig.wait_for_connection(timeout=10)
        writer.wait_for_connection(timeout=10)
        seen = threading.Event()

        def bad(**_kw):
            raise RuntimeError("boom in a user callback")

        sig.subscribe(bad, run=False)
        sig.subscribe(lambda value, **_kw: value == 4.25 and seen.set(), run=False)
        writer.put(4.25, wait=True)
        assert seen.wait(5)  # the failing subscriber did not stop the next one
    finally:
        sig.destroy()
        writer.destroy()
        beampipe.reset()


def test_lanes_unit_order_and_isolation():
    """The lane pool itself: per-key order under load, and a blocked key isolates."""
    from beampipe_ca._monitors import MonitorLanes

    lanes = MonitorLanes()
    gate = threading.Event()
    got: dict[str, list[int]] = {"a": [], "b": []}
    done = threading.Event()

    def record(key: str, i: int) -> None:
        if key == "a" and i == 0:
            gate.wait(GATE_LIMIT)
        got[key].append(i)
        if key == "a" and i == 999:
            done.set()

    a, b = object(), object()
    for i in range(1000):
        lanes.post(a, record, ("a", i), {})
        lanes.post(b, record, ("b", i), {})
    deadline = time.monotonic() + 5
    while len(got["b"]) < 1000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got["b"] == list(range(1000))  # b ran to the end while a was blocked
    assert got["a"] == []
    gate.set()
    assert done.wait(5)
    assert got["a"] == list(range(1000))


def test_two_lanes_posted_to_one_idle_worker_each_get_a_worker():
    """An idle worker already woken for one lane is not counted for the next.

    Seen in the full suite: a blocked Device's event and another Device's came
    together while one worker idled; both posts counted that worker, so the
    second lane waited behind the blocked one (0 events in 0.5 s).
    """
    import sys

    from beampipe_ca._monitors import MonitorLanes

    lanes = MonitorLanes()
    gate, other_ran = threading.Event(), threading.Event()
    first, blocked, other = object(), object(), object()  # lane keys (ids: kept alive)
    lanes.post(first, lambda: None, (), {})  # one worker, which then idles
    deadline = time.monotonic() + 5
    while lanes._idle != 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert lanes._idle == 1
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)  # the woken worker can not run between the two posts
    try:
        lanes.post(blocked, gate.wait, (GATE_LIMIT,), {})
        lanes.post(other, other_ran.set, (), {})
    finally:
        sys.setswitchinterval(interval)
    try:
        assert other_ran.wait(2), "the second lane waited behind the blocked one"
    finally:
        gate.set()


def test_destroy_ends_the_monitor_subscription(ioc):
    """Releasing a monitored PV clears its libca subscription (not only its callbacks).

    It used to stay alive: its events then hit the released PV object ("Expected CA
    context is unset", an error pytest reports here) and, once the object was
    collected, libca called a freed ctypes callback (a segfault at a later gc).
    """
    _layer("beampipe-ca")
    from ophyd import EpicsSignalRO

    sig = EpicsSignalRO(ioc.pv("lane_tick"), name="tick")
    try:
        sig.wait_for_connection(timeout=10)
        got = threading.Event()
        sig.subscribe(lambda **_kw: got.set(), run=False)
        assert got.wait(5)
        pv = sig._read_pv
        assert pv._monref is not None
        sig.destroy()
        assert pv._monref is None
        time.sleep(0.3)  # three ticks of the record: none may reach the released PV
    finally:
        beampipe.reset()
