"""The batching engine: a pure planner that turns many callers' requests into few wire batches.

It is sans-I/O in the spirit of caproto: it never reads a clock, starts a thread,
touches a socket or imports an EPICS library.  The caller feeds it requests,
the current time and the wire results, and gets back batches to issue and
outcomes to deliver.  That keeps every policy here testable with in-memory
fakes and lets CA, PVA and anything else share one implementation.

Policy in one paragraph: requests are grouped by ``(op, route)``, where
``route`` is whatever the plugin says shares one wire batch (a server, a
context, or ``None`` for "not known yet", e.g. a search).  A route may have at
most ``max_in_flight`` batches outstanding.  While a route is idle a request is
released at the next :meth:`Planner.plan` call, so an isolated request never
waits for company; requests that arrive while the route is busy accumulate and
leave together as soon as a slot frees ("natural batching").  Identical
``(op, key)`` requests pending together share one wire operation, which is
still a fresh read because it is issued after all of them were made.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

__all__ = [
    "Batch",
    "Delivery",
    "Failed",
    "Ok",
    "Outcome",
    "Planner",
    "Ticket",
]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Ok(Generic[V]):
    """A wire operation that returned a value."""

    value: V


@dataclass(frozen=True, slots=True)
class Failed:
    """A wire operation, or a wait for one, that produced no value; ``reason`` says why."""

    reason: str


Outcome = Ok[V] | Failed

Ticket = int
"""Identifies one caller's request; unique for the planner's lifetime."""


@dataclass(frozen=True, slots=True)
class Batch(Generic[K]):
    """One wire operation over many keys that the I/O layer must issue and then complete."""

    id: int
    op: str
    route: Hashable
    keys: tuple[K, ...]
    #: The latest deadline among the batch's callers: the I/O layer need not wait past it.
    deadline: float


class Delivery(NamedTuple, Generic[V]):
    """An outcome for one ticket, to hand back to the caller that holds it."""

    ticket: Ticket
    outcome: Outcome[V]


# Delivery(ticket, outcome) without the Python-level __new__ NamedTuple adds: one per read.
_delivery = tuple.__new__


@dataclass(slots=True)
class _Request(Generic[K]):
    ticket: Ticket
    op: str
    key: K
    route: Hashable
    deadline: float
    batch: int | None = None


@dataclass(slots=True)
class _InFlight(Generic[K]):
    batch: Batch[K]
    # key -> tickets still waiting for this key's result
    waiting: dict[K, list[Ticket]] = field(default_factory=dict)


class Planner(Generic[K, V]):
    """Coalesces requests into batches per ``(op, route)`` and routes results back per ticket.

    Not thread-safe on purpose: the I/O shell that owns it serialises access,
    which is cheaper than a lock per call and keeps this module free of I/O.
    """

    def __init__(self, *, max_batch: int = 1000, max_in_flight: int = 1) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._next_ticket = 0
        self._next_batch = 0
        self._requests: dict[Ticket, _Request[K]] = {}
        # (op, route) -> tickets not yet issued, in arrival order
        self._pending: dict[tuple[str, Hashable], list[Ticket]] = {}
        self._in_flight: dict[int, _InFlight[K]] = {}
        self._busy: dict[tuple[str, Hashable], int] = {}

    # -- requests in ---------------------------------------------------------
    def request(self, op: str, key: K, *, deadline: float, route: Hashable = None) -> Ticket:
        """Queue one caller's request; it leaves at the next :meth:`plan` its route allows."""
        if not isinstance(op, str) or not op:
            raise ValueError(f"op must be a non-empty string, got {op!r}")
        group_key = (op, route)
        try:
            hash(key)
            group = self._pending.get(group_key)  # hashes the route
        except TypeError as exc:
            raise TypeError(f"key and route must be hashable: {key!r}, {route!r}") from exc
        ticket = self._next_ticket
        self._next_ticket = ticket + 1
        self._requests[ticket] = _Request(ticket, op, key, route, deadline)
        if group is None:
            self._pending[group_key] = [ticket]
        else:
            group.append(ticket)
        return ticket

    def request_many(
        self, op: str, keys: Iterable[K], *, deadline: float, route: Callable[[K], Hashable]
    ) -> list[tuple[Ticket, K]]:
        """Queue many requests at once: what :meth:`request` does, without its per-call cost."""
        if not isinstance(op, str) or not op:
            raise ValueError(f"op must be a non-empty string, got {op!r}")
        out: list[tuple[Ticket, K]] = []
        requests, pending = self._requests, self._pending
        ticket = self._next_ticket
        try:
            for key in keys:
                hash(key)  # fail here, naming the key, not later inside plan()
                where = route(key)
                group = pending.get((op, where))
                if group is None:
                    group = pending[(op, where)] = []
                requests[ticket] = _Request(ticket, op, key, where, deadline)
                group.append(ticket)
                out.append((ticket, key))
                ticket += 1
        except TypeError as exc:
            raise TypeError(f"keys and routes must be hashable: {exc}") from exc
        finally:
            self._next_ticket = ticket
        return out

    def cancel(self, ticket: Ticket) -> bool:
        """Forget a request whose caller gave up; returns whether it was still open."""
        req = self._requests.pop(ticket, None)
        if req is None:
            return False
        if req.batch is None:
            self._pending[(req.op, req.route)].remove(ticket)
            if not self._pending[(req.op, req.route)]:
                del self._pending[(req.op, req.route)]
        else:
            self._drop_from_batch(req)
        return True

    # -- batches out ---------------------------------------------------------
    def plan(self) -> list[Batch[K]]:
        """Release every batch whose route has a free slot, largest-first within max_batch."""
        out: list[Batch[K]] = []
        for group in list(self._pending):
            while self._busy.get(group, 0) < self.max_in_flight and group in self._pending:
                out.append(self._release(group))
        return out

    def _release(self, group: tuple[str, Hashable]) -> Batch[K]:
        tickets = self._pending[group]
        waiting: dict[K, list[Ticket]] = {}
        taken = 0
        latest = float("-inf")
        batch_id, requests, max_batch = self._next_batch, self._requests, self.max_batch
        for ticket in tickets:
            req = requests[ticket]
            key = req.key
            shared = waiting.get(key)
            if shared is None:
                if len(waiting) == max_batch:
                    break
                waiting[key] = [ticket]
            else:
                shared.append(ticket)
            req.batch = batch_id
            if req.deadline > latest:
                latest = req.deadline
            taken += 1
        rest = tickets[taken:]
        if rest:
            self._pending[group] = rest
        else:
            del self._pending[group]
        batch = Batch(batch_id, group[0], group[1], tuple(waiting), latest)
        self._next_batch = batch_id + 1
        self._in_flight[batch_id] = _InFlight(batch, waiting)
        self._busy[group] = self._busy.get(group, 0) + 1
        return batch

    # -- results in, deliveries out -----------------------------------------
    def complete(self, batch_id: int, results: Mapping[K, Outcome[V]]) -> list[Delivery[V]]:
        """Hand back a batch's results; a key missing from ``results`` fails, alone."""
        flight = self._in_flight.pop(batch_id, None)
        if flight is None:
            # Abandoned (every caller timed out or cancelled) or completed twice.
            return []
        self._free_slot(flight.batch)
        out: list[Delivery[V]] = []
        requests, shared = self._requests, False
        for key, tickets in flight.waiting.items():
            outcome = results.get(key)
            if outcome is None:
                outcome = Failed(f"{key}: no result in the reply to batch {batch_id}")
            if len(tickets) > 1:
                shared = True
            for ticket in tickets:
                del requests[ticket]
                out.append(_delivery(Delivery, (ticket, outcome)))
        if shared:  # (keys are in the order of their first ticket: sorted unless shared)
            out.sort(key=lambda d: d.ticket)
        return out

    def fail_batch(self, batch_id: int, reason: str) -> list[Delivery[V]]:
        """Fail every request of a batch that could not be issued at all."""
        flight = self._in_flight.get(batch_id)
        if flight is None:
            return []
        return self.complete(batch_id, {k: Failed(f"{k}: {reason}") for k in flight.waiting})

    def expire(self, now: float) -> list[Delivery[V]]:
        """Fail every request whose deadline has passed, pending or in flight."""
        out: list[Delivery[V]] = []
        for ticket, req in list(self._requests.items()):
            if req.deadline <= now:
                self.cancel(ticket)
                out.append(Delivery(ticket, Failed(f"{req.key}: timed out")))
        return out

    def next_deadline(self) -> float | None:
        """The earliest deadline still open, so the I/O shell knows how long it may sleep."""
        return min((r.deadline for r in self._requests.values()), default=None)

    # -- introspection -------------------------------------------------------
    def pending(self) -> int:
        """Requests not yet released to the wire."""
        return sum(len(t) for t in self._pending.values())

    def in_flight(self) -> list[Batch[K]]:
        """Batches issued and not yet completed or abandoned."""
        return [f.batch for f in self._in_flight.values()]

    def open_tickets(self) -> Iterable[Ticket]:
        """Tickets that have not been delivered, cancelled or expired."""
        return self._requests.keys()

    # -- internals -----------------------------------------------------------
    def _drop_from_batch(self, req: _Request[K]) -> None:
        assert req.batch is not None
        flight = self._in_flight[req.batch]
        tickets = flight.waiting[req.key]
        tickets.remove(req.ticket)
        if not tickets:
            del flight.waiting[req.key]
        if not flight.waiting:
            # Nobody waits for this batch any more: free its slot so a hung
            # server cannot block the route; a late completion is ignored.
            del self._in_flight[req.batch]
            self._free_slot(flight.batch)

    def _free_slot(self, batch: Batch[K]) -> None:
        group = (batch.op, batch.route)
        left = self._busy[group] - 1
        if left:
            self._busy[group] = left
        else:
            del self._busy[group]
