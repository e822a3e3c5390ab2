"""The pure planner, driven by hand: no clock, no threads, no EPICS."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beampipe import Batch, Delivery, Failed, Ok, Planner


def ok_all(batch: Batch[str]) -> dict[str, Ok[str]]:
    return {k: Ok(f"value of {k}") for k in batch.keys}


def test_isolated_request_is_released_at_once() -> None:
    p: Planner[str, str] = Planner()
    t = p.request("read", "A", deadline=10)
    (batch,) = p.plan()
    assert batch.keys == ("A",)
    assert p.complete(batch.id, ok_all(batch)) == [Delivery(t, Ok("value of A"))]
    assert p.pending() == 0
    assert p.in_flight() == []


def test_requests_arriving_while_busy_leave_together() -> None:
    p: Planner[str, int] = Planner()
    p.request("read", "A", deadline=10)
    (first,) = p.plan()
    for key in "BCD":
        p.request("read", key, deadline=10)
    assert p.plan() == [], "route is busy: nothing more may leave"
    p.complete(first.id, {"A": Ok(1)})
    (second,) = p.plan()
    assert second.keys == ("B", "C", "D")


def test_routes_and_ops_batch_separately() -> None:
    p: Planner[str, int] = Planner()
    p.request("read", "A", deadline=10, route="ioc1")
    p.request("read", "B", deadline=10, route="ioc2")
    p.request("connect", "C", deadline=10, route="ioc1")
    p.request("read", "D", deadline=10, route="ioc1")
    batches = {(b.op, b.route): b.keys for b in p.plan()}
    assert batches == {
        ("read", "ioc1"): ("A", "D"),
        ("read", "ioc2"): ("B",),
        ("connect", "ioc1"): ("C",),
    }


def test_one_failed_key_does_not_fail_the_batch() -> None:
    p: Planner[str, int] = Planner()
    ta = p.request("read", "A", deadline=10)
    tb = p.request("read", "B", deadline=10)
    tc = p.request("read", "C", deadline=10)
    (batch,) = p.plan()
    out = p.complete(batch.id, {"A": Ok(1), "B": Failed("B: no such channel")})
    assert out[0] == Delivery(ta, Ok(1))
    assert out[1] == Delivery(tb, Failed("B: no such channel"))
    assert out[2].ticket == tc
    assert isinstance(out[2].outcome, Failed)
    assert "C" in out[2].outcome.reason


def test_duplicate_keys_share_one_wire_op_and_all_callers_get_it() -> None:
    p: Planner[str, int] = Planner()
    t1 = p.request("read", "A", deadline=10)
    t2 = p.request("read", "A", deadline=10)
    (batch,) = p.plan()
    assert batch.keys == ("A",)
    assert p.complete(batch.id, {"A": Ok(7)}) == [Delivery(t1, Ok(7)), Delivery(t2, Ok(7))]


def test_max_batch_splits_and_keeps_order() -> None:
    p: Planner[int, int] = Planner(max_batch=3, max_in_flight=10)
    for i in range(8):
        p.request("read", i, deadline=10)
    assert [b.keys for b in p.plan()] == [(0, 1, 2), (3, 4, 5), (6, 7)]


def test_max_in_flight_limits_batches_per_route() -> None:
    p: Planner[int, int] = Planner(max_batch=2, max_in_flight=2)
    for i in range(6):
        p.request("read", i, deadline=10)
    first = p.plan()
    assert [b.keys for b in first] == [(0, 1), (2, 3)]
    p.complete(first[0].id, {0: Ok(0), 1: Ok(1)})
    assert [b.keys for b in p.plan()] == [(4, 5)]


def test_expire_fails_pending_and_in_flight_requests_and_frees_the_route() -> None:
    p: Planner[str, int] = Planner()
    ta = p.request("read", "A", deadline=1.0)
    (stuck,) = p.plan()  # a server that never answers
    tb = p.request("read", "B", deadline=2.0)
    assert p.next_deadline() == 1.0
    assert p.expire(0.5) == []
    out = p.expire(1.0)
    assert out == [Delivery(ta, Failed("A: timed out"))]
    # The abandoned batch no longer blocks the route: B may leave now.
    (fresh,) = p.plan()
    assert fresh.keys == ("B",)
    assert p.complete(stuck.id, {"A": Ok(1)}) == [], "a late reply for nobody is dropped"
    assert p.complete(fresh.id, {"B": Ok(2)}) == [Delivery(tb, Ok(2))]


def test_cancel_pending_and_in_flight() -> None:
    p: Planner[str, int] = Planner()
    ta = p.request("read", "A", deadline=10)
    tb = p.request("read", "B", deadline=10)
    assert p.cancel(ta)
    assert not p.cancel(ta)
    (batch,) = p.plan()
    assert batch.keys == ("B",)
    assert p.cancel(tb)
    assert p.in_flight() == []
    assert p.complete(batch.id, {"B": Ok(1)}) == []


def test_fail_batch_fails_every_key_with_the_reason() -> None:
    p: Planner[str, int] = Planner()
    p.request("read", "A", deadline=10)
    p.request("read", "B", deadline=10)
    (batch,) = p.plan()
    out = p.fail_batch(batch.id, "socket closed")
    assert [d.outcome for d in out] == [Failed("A: socket closed"), Failed("B: socket closed")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_batch": 0}, "max_batch"), ({"max_in_flight": 0}, "max_in_flight")],
)
def test_bad_configuration_is_refused(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Planner(**kwargs)


def test_bad_requests_are_refused() -> None:
    p: Planner[object, int] = Planner()
    with pytest.raises(ValueError, match="op"):
        p.request("", "A", deadline=1)
    with pytest.raises(TypeError, match="hashable"):
        p.request("read", ["not", "hashable"], deadline=1)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["req", "plan", "done", "expire", "cancel"]), st.integers(0, 5)),
        max_size=60,
    )
)
def test_every_request_gets_exactly_one_delivery(script: list[tuple[str, int]]) -> None:
    """Whatever the interleaving, each ticket is delivered once, cancelled, or still open."""
    p: Planner[int, int] = Planner(max_batch=3, max_in_flight=2)
    now = 0.0
    issued: list[Batch[int]] = []
    delivered: dict[int, int] = {}
    cancelled: set[int] = set()
    tickets: list[int] = []
    for action, n in script:
        now += 0.1
        if action == "req":
            tickets.append(p.request("read", n, deadline=now + n * 0.2))
        elif action == "plan":
            issued += p.plan()
        elif action == "done" and issued:
            batch = issued.pop(n % len(issued))
            for d in p.complete(batch.id, {k: Ok(k) for k in batch.keys if k % 2 == 0}):
                delivered[d.ticket] = delivered.get(d.ticket, 0) + 1
        elif action == "expire":
            for d in p.expire(now):
                delivered[d.ticket] = delivered.get(d.ticket, 0) + 1
        elif action == "cancel" and tickets:
            t = tickets[n % len(tickets)]
            if p.cancel(t):
                cancelled.add(t)
    assert all(count == 1 for count in delivered.values())
    open_tickets = set(p.open_tickets())
    assert set(tickets) == set(delivered) | cancelled | open_tickets
    assert not (set(delivered) & cancelled)


def test_request_many_is_request_in_bulk() -> None:
    p: Planner[str, int] = Planner()
    placed = p.request_many("read", ["A", "B"], deadline=10, route=lambda k: k.lower())
    assert [k for _, k in placed] == ["A", "B"]
    assert {b.route: b.keys for b in p.plan()} == {"a": ("A",), "b": ("B",)}
    with pytest.raises(TypeError, match="hashable"):
        p.request_many("read", [["x"]], deadline=10, route=lambda k: None)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="op"):
        p.request_many("", ["A"], deadline=10, route=lambda k: None)


def test_batch_carries_the_latest_deadline_of_its_callers() -> None:
    p: Planner[str, int] = Planner(max_batch=2, max_in_flight=5)
    p.request("read", "A", deadline=3.0)
    p.request("read", "B", deadline=7.0)
    p.request("read", "C", deadline=9.0)  # spills into a second batch
    first, second = p.plan()
    assert (first.keys, first.deadline) == (("A", "B"), 7.0)
    assert (second.keys, second.deadline) == (("C",), 9.0)
