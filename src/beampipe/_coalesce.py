"""The I/O shell around the planner: thread and asyncio front ends that share one Planner.

This is the only place the batching engine meets concurrency.  It still does
no wire I/O: a plugin passes a :class:`BatchIO` that issues a batch and reports
its results, and this module decides when to call it.

Timing policy: a thread that submits a request pumps the planner itself, so a
lone read is issued on the caller's own thread with no hand-off or wake-up.
Coroutines defer the pump to the end of the current event-loop iteration, so a
``gather`` over 200 signals leaves as one batch while a lone ``await`` costs a
single loop turn.  The single-key awaits of one loop turn (same op, route and
timeout) go to the planner as one request, a :class:`_Turn`: one ticket, one
delivery and one expiry for the lot, which is what an ophyd-async
``Device.read()`` makes of its signals.
"""

from __future__ import annotations

import asyncio
import threading
import time
from asyncio import get_running_loop as _get_running_loop
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from ._batching import Batch, Delivery, Failed, Ok, Outcome, Planner, Ticket

__all__ = ["BatchIO", "Coalescer"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BatchIO(Protocol[K, V]):
    """What a plugin implements so the engine can put batches on the wire."""

    def issue(self, batch: Batch[K], complete: Callable[[Mapping[Any, Outcome[V]]], None]) -> None:
        """Start the batch; call ``complete`` exactly once, from any thread, with its results."""
        ...


class _Waiter(Generic[K, V]):
    """One caller's wait for a set of keys: one wake-up per call, not one future per key."""

    __slots__ = ("keys", "remaining", "results")

    def __init__(self) -> None:
        self.keys: dict[Ticket, K] = {}
        self.results: dict[K, Outcome[V]] = {}
        self.remaining = 0

    def deliver(self, ticket: Ticket, outcome: Outcome[V]) -> bool:
        """Record one outcome (under the coalescer's lock); True when the last one arrived."""
        self.results[self.keys[ticket]] = outcome
        self.remaining -= 1
        return self.remaining == 0


class _SyncWaiter(_Waiter[K, V]):
    __slots__ = ("event",)

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()


class _AsyncWaiter(_Waiter[K, V]):
    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Written out (no super().__init__): one of these is made per ophyd-async read.
        self.keys = {}
        self.results = {}
        self.remaining = 0
        self.loop = loop
        self.future: asyncio.Future[dict[K, Outcome[V]]] = loop.create_future()


class _Turn(Generic[K, V]):
    """The single-key awaits of one event-loop turn under one (op, route, timeout).

    The planner sees the turn as one request (its key is the turn itself); the
    I/O layer sees its keys, flattened into the batch.  ``live`` counts the
    awaits not cancelled: when none is left the request is withdrawn.
    """

    __slots__ = ("deadline", "futures", "keys", "live", "loop", "results", "ticket")

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self.loop = loop
        self.deadline = deadline
        self.keys: list[K] = []
        self.futures: list[asyncio.Future[Outcome[V]]] = []
        self.live = 0
        self.ticket: Ticket | None = None
        #: The wire batch's results, set by the completer before the turn is delivered.
        self.results: Mapping[Any, Outcome[V]] = {}

    def __repr__(self) -> str:
        return f"<turn of {len(self.keys)} reads>"

    def finish(self, outcome: Outcome[Any]) -> None:
        """On the turn's loop: every await gets its key's outcome (or the turn's failure)."""
        if isinstance(outcome, Failed):
            why = outcome.reason.removeprefix(f"{self!r}: ")
            for key, future in zip(self.keys, self.futures, strict=True):
                if not future.done():
                    future.set_result(Failed(f"{key}: {why}"))
            return
        results = self.results
        for key, future in zip(self.keys, self.futures, strict=True):
            if not future.done():
                got = results.get(key)
                future.set_result(got if got is not None else Failed(f"{key}: no result"))


#: What the planner is told of a turn whose batch came back (its keys' results are on it).
_TURN_DONE: Ok[None] = Ok(None)


def _finish_all(finished: list[tuple[Any, Any]]) -> None:
    """On the waiters' loop: ``(turn, its outcome)`` or ``(many-key waiter, None)``."""
    for waiter, outcome in finished:
        if type(waiter) is _Turn:
            waiter.finish(outcome)
        elif not waiter.future.done():
            waiter.future.set_result(waiter.results)


class Coalescer(Generic[K, V]):
    """Coalesces concurrent requests from threads and coroutines into batches for one BatchIO."""

    def __init__(
        self,
        io: BatchIO[K, V],
        *,
        max_batch: int = 1000,
        max_in_flight: int = 1,
        clock: Callable[[], float] = time.monotonic,
        name: str = "beampipe",
    ) -> None:
        self._io = io
        self._clock = clock
        self.name = name
        # (keys: the callers' keys, and _Turns)
        self._planner: Planner[Any, V] = Planner(max_batch=max_batch, max_in_flight=max_in_flight)
        self._lock = threading.Lock()
        #: ticket -> its caller: a waiter for a set of keys, or a loop turn of single-key awaits
        self._waiters: dict[Ticket, _Waiter[K, V] | _Turn[K, V]] = {}
        #: loop -> its turns still open, by (op, route, timeout)
        self._open_turns: dict[asyncio.AbstractEventLoop, dict[tuple[Any, ...], _Turn[K, V]]] = {}
        self._pump_scheduled: set[asyncio.AbstractEventLoop] = set()
        # loop -> (deadline on our clock, the timer that fires then)
        self._timers: dict[asyncio.AbstractEventLoop, tuple[float, asyncio.TimerHandle]] = {}
        #: Batches issued so far, for benchmarks and tests that check coalescing.
        self.batches_issued = 0

    # -- sync front end --------------------------------------------------------
    def get(self, op: str, key: K, timeout: float, route: Hashable = None) -> Outcome[V]:
        """Block until one key's outcome arrives or ``timeout`` passes."""
        return self.get_many(op, (key,), timeout, route=lambda _k: route)[key]

    def get_many(
        self,
        op: str,
        keys: Iterable[K],
        timeout: float,
        route: Callable[[K], Hashable] = lambda _k: None,
    ) -> dict[K, Outcome[V]]:
        """Block until every key has an outcome; a key that failed or timed out is ``Failed``."""
        _check_timeout(timeout)
        deadline = self._clock() + timeout
        waiter: _SyncWaiter[K, V] = _SyncWaiter()
        self._submit(op, keys, deadline, route, waiter)
        if not waiter.remaining:
            return waiter.results
        self._pump()
        if not waiter.event.wait(max(0.0, deadline - self._clock())):
            self._expire()
            waiter.event.wait()  # _expire resolved what was left, or results raced in
        return waiter.results

    # -- async front end -------------------------------------------------------
    async def get_async(
        self, op: str, key: K, timeout: float, route: Hashable = None
    ) -> Outcome[V]:
        """Await one key's outcome; concurrent awaits in one loop turn share a batch.

        This is the path every ophyd-async signal read takes, 200 at a time in a
        ``gather``, so it only joins this loop turn's :class:`_Turn` (no lock, no
        planner call): the turn goes to the planner as one request when the
        turn ends.
        """
        if type(timeout) is not float or not timeout > 0.0:
            _check_timeout(timeout)
        if not isinstance(op, str) or not op:
            raise ValueError(f"op must be a non-empty string, got {op!r}")
        loop = _get_running_loop()
        turns = self._open_turns.get(loop)
        if turns is None:
            turns = self._open_turns[loop] = {}
            loop.call_soon(self._close_turns, loop)
        try:
            hash(key)
            turn = turns.get((op, route, timeout))
        except TypeError as exc:
            raise TypeError(f"key and route must be hashable: {key!r}, {route!r}") from exc
        if turn is None:
            turn = turns[(op, route, timeout)] = _Turn(loop, self._clock() + timeout)
        future: asyncio.Future[Outcome[V]] = loop.create_future()
        turn.keys.append(key)
        turn.futures.append(future)
        turn.live += 1
        try:
            return await future
        except asyncio.CancelledError:
            turn.live -= 1
            if not turn.live and turn.ticket is not None:
                # Nobody waits for the turn any more: withdraw it (frees its route's slot).
                with self._lock:
                    if self._waiters.pop(turn.ticket, None) is not None:
                        self._planner.cancel(turn.ticket)
            raise

    def _close_turns(self, loop: asyncio.AbstractEventLoop) -> None:
        """At the end of a loop turn: its turns go to the planner, one request each."""
        turns = self._open_turns.pop(loop, {})
        nearest = None
        with self._lock:
            for (op, route, _timeout), turn in turns.items():
                if not turn.live:
                    continue  # every await of it was cancelled within the turn
                turn.ticket = self._planner.request(op, turn, deadline=turn.deadline, route=route)
                self._waiters[turn.ticket] = turn
                if nearest is None or turn.deadline < nearest:
                    nearest = turn.deadline
        if nearest is not None:
            self._arm_timer(loop, nearest)
            self._pump()

    async def get_many_async(
        self,
        op: str,
        keys: Iterable[K],
        timeout: float,
        route: Callable[[K], Hashable] = lambda _k: None,
    ) -> dict[K, Outcome[V]]:
        """Await every key's outcome; requests made in the same loop turn leave together."""
        _check_timeout(timeout)
        loop = asyncio.get_running_loop()
        deadline = self._clock() + timeout
        waiter: _AsyncWaiter[K, V] = _AsyncWaiter(loop)
        self._submit(op, keys, deadline, route, waiter)
        if not waiter.remaining:
            return waiter.results
        return await self._wait(loop, waiter, deadline)

    async def _wait(
        self, loop: asyncio.AbstractEventLoop, waiter: _AsyncWaiter[K, V], deadline: float
    ) -> dict[K, Outcome[V]]:
        """Pump at the end of this loop turn, keep the expiry timer armed, await the outcomes."""
        with self._lock:
            if loop not in self._pump_scheduled:
                self._pump_scheduled.add(loop)
                loop.call_soon(self._pump_from_loop, loop)
        self._arm_timer(loop, deadline)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            with self._lock:
                for ticket in waiter.keys:
                    if self._waiters.pop(ticket, None) is not None:
                        self._planner.cancel(ticket)
            raise

    # -- internals -------------------------------------------------------------
    def _submit(
        self,
        op: str,
        keys: Iterable[K],
        deadline: float,
        route: Callable[[K], Hashable],
        waiter: _Waiter[K, V],
    ) -> None:
        unique = dict.fromkeys(keys)
        with self._lock:
            placed = self._planner.request_many(op, unique, deadline=deadline, route=route)
            waiters = self._waiters
            for ticket, _key in placed:
                waiters[ticket] = waiter
            waiter.keys.update(placed)
            waiter.remaining += len(placed)

    def _arm_timer(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """One expiry timer per loop, at the earliest deadline, instead of one per request."""
        armed = self._timers.get(loop)
        if armed is not None and armed[0] <= deadline:
            return  # the common case: a timer at or before this deadline is already set
        if armed is not None:
            armed[1].cancel()
        when = loop.time() + max(0.0, deadline - self._clock())
        self._timers[loop] = (deadline, loop.call_at(when, self._on_timer, loop))

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timers.pop(loop, None)
        self._expire()
        with self._lock:
            left = any(_loop_of(w) is loop for w in self._waiters.values())
            nearest = self._planner.next_deadline() if left else None
        if nearest is not None:
            self._arm_timer(loop, nearest)

    def _pump_from_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._pump_scheduled.discard(loop)
        self._pump()

    def _pump(self) -> None:
        with self._lock:
            batches = self._planner.plan()
            self.batches_issued += len(batches)
        for batch in batches:
            try:
                turns: list[_Turn[K, V]] = [k for k in batch.keys if isinstance(k, _Turn)]
                if not turns:
                    self._io.issue(batch, self._completer(batch.id))
                    continue
                # The I/O layer sees the turns' keys, each once, in the order they came.
                flat = dict.fromkeys(
                    key for k in batch.keys for key in (k.keys if type(k) is _Turn else (k,))
                )
                wire = Batch(batch.id, batch.op, batch.route, tuple(flat), batch.deadline)
                self._io.issue(wire, self._turn_completer(batch, turns))
            except Exception as exc:  # noqa: BLE001 - a plugin bug must fail its batch, not hang it
                with self._lock:
                    deliveries = self._planner.fail_batch(
                        batch.id, f"{self.name} could not issue {batch.op}: {exc!r}"
                    )
                self._deliver(deliveries)

    def _completer(self, batch_id: int) -> Callable[[Mapping[Any, Outcome[V]]], None]:
        def complete(results: Mapping[Any, Outcome[V]]) -> None:
            with self._lock:
                deliveries = self._planner.complete(batch_id, results)
            self._deliver(deliveries)
            self._pump()

        return complete

    def _turn_completer(
        self, batch: Batch[Any], turns: list[_Turn[K, V]]
    ) -> Callable[[Mapping[Any, Outcome[V]]], None]:
        def complete(results: Mapping[Any, Outcome[V]]) -> None:
            for turn in turns:
                turn.results = results
            told: dict[Any, Any] = {
                k: (_TURN_DONE if type(k) is _Turn else results.get(k)) for k in batch.keys
            }
            with self._lock:
                deliveries = self._planner.complete(
                    batch.id, {k: v for k, v in told.items() if v is not None}
                )
            self._deliver(deliveries)
            self._pump()

        return complete

    def _expire(self) -> None:
        with self._lock:
            deliveries = self._planner.expire(self._clock())
        self._deliver(deliveries)
        # An abandoned batch frees its route's slot: release what waited behind it.
        self._pump()

    def _deliver(self, deliveries: list[Delivery[V]]) -> None:
        if not deliveries:
            return
        done_sync: list[_SyncWaiter[K, V]] = []
        # loop -> what to finish there: (turn, its outcome) or (many-key waiter, None)
        done_async: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
        last_loop: asyncio.AbstractEventLoop | None = None
        last: list[tuple[Any, Any]] = []
        with self._lock:
            pop = self._waiters.pop
            for ticket, outcome in deliveries:
                waiter = pop(ticket, None)
                if waiter is None:
                    continue
                if isinstance(waiter, _Turn):  # the common case: a loop turn of awaits
                    loop = waiter.loop
                    if loop is not last_loop:
                        last_loop = loop
                        last = done_async.setdefault(loop, [])
                    last.append((waiter, outcome))
                elif not waiter.deliver(ticket, outcome):
                    continue
                elif isinstance(waiter, _SyncWaiter):
                    done_sync.append(waiter)
                else:
                    assert isinstance(waiter, _AsyncWaiter)
                    done_async.setdefault(waiter.loop, []).append((waiter, None))
        for sync_waiter in done_sync:
            sync_waiter.event.set()
        for loop, finished in done_async.items():
            if _running_loop() is loop:
                _finish_all(finished)
            elif not loop.is_closed():
                loop.call_soon_threadsafe(_finish_all, finished)


def _loop_of(waiter: Any) -> asyncio.AbstractEventLoop | None:
    return waiter.loop if isinstance(waiter, _AsyncWaiter | _Turn) else None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _check_timeout(timeout: float) -> None:
    if not (isinstance(timeout, int | float) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
