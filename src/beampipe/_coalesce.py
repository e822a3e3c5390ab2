"""The I/O shell around the planner: thread and asyncio front ends that share one Planner.

This is the only place the batching engine meets concurrency.  It still does
no wire I/O: a plugin passes a :class:`BatchIO` that issues a batch and reports
its results, and this module decides when to call it.

Timing policy: a thread that submits a request pumps the planner itself, so a
lone read is issued on the caller's own thread with no hand-off or wake-up.
Coroutines defer the pump to the end of the current event-loop iteration, so a
``gather`` over 200 signals leaves as one batch while a lone ``await`` costs a
single loop turn.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from ._batching import Batch, Delivery, Outcome, Planner, Ticket

__all__ = ["BatchIO", "Coalescer"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BatchIO(Protocol[K, V]):
    """What a plugin implements so the engine can put batches on the wire."""

    def issue(self, batch: Batch[K], complete: Callable[[Mapping[Any, Outcome[V]]], None]) -> None:
        """Start the batch; call ``complete`` exactly once, from any thread, with its results."""
        ...


class _AsyncSink:
    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> None:
        self.loop = loop
        self.future = future


def _resolve_all(items: list[tuple[asyncio.Future[Any], Outcome[Any]]]) -> None:
    for future, outcome in items:
        if not future.done():
            future.set_result(outcome)


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
        self._planner: Planner[K, V] = Planner(max_batch=max_batch, max_in_flight=max_in_flight)
        self._lock = threading.Lock()
        self._sinks: dict[Ticket, concurrent.futures.Future[Outcome[V]] | _AsyncSink] = {}
        self._pump_scheduled: set[asyncio.AbstractEventLoop] = set()
        #: Batches issued so far, for benchmarks and tests that check coalescing.
        self.batches_issued = 0

    # -- sync front end --------------------------------------------------------
    def get(self, op: str, key: K, timeout: float, route: Hashable = None) -> Outcome[V]:
        """Block until one key's outcome arrives or ``timeout`` passes."""
        return self.get_many(op, [key], timeout, route=lambda _k: route)[key]

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
        futures: dict[K, concurrent.futures.Future[Outcome[V]]] = {}
        with self._lock:
            for key in keys:
                if key in futures:
                    continue
                fut: concurrent.futures.Future[Outcome[V]] = concurrent.futures.Future()
                ticket = self._planner.request(op, key, deadline=deadline, route=route(key))
                self._sinks[ticket] = fut
                futures[key] = fut
        self._pump()
        out: dict[K, Outcome[V]] = {}
        for key, fut in futures.items():
            try:
                out[key] = fut.result(max(0.0, deadline - self._clock()))
            except concurrent.futures.TimeoutError:
                self._expire()
                out[key] = fut.result()  # _expire resolved it, or a result raced in
        return out

    # -- async front end -------------------------------------------------------
    async def get_async(
        self, op: str, key: K, timeout: float, route: Hashable = None
    ) -> Outcome[V]:
        """Await one key's outcome; concurrent awaits in one loop turn share a batch."""
        _check_timeout(timeout)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome[V]] = loop.create_future()
        with self._lock:
            ticket = self._planner.request(op, key, deadline=self._clock() + timeout, route=route)
            self._sinks[ticket] = _AsyncSink(loop, future)
            if loop not in self._pump_scheduled:
                self._pump_scheduled.add(loop)
                loop.call_soon(self._pump_from_loop, loop)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            self._expire()
            return await future
        except asyncio.CancelledError:
            with self._lock:
                self._planner.cancel(ticket)
                self._sinks.pop(ticket, None)
            raise

    async def get_many_async(
        self,
        op: str,
        keys: Iterable[K],
        timeout: float,
        route: Callable[[K], Hashable] = lambda _k: None,
    ) -> dict[K, Outcome[V]]:
        """Await every key's outcome, issued together."""
        unique = list(dict.fromkeys(keys))
        results = await asyncio.gather(*(self.get_async(op, k, timeout, route(k)) for k in unique))
        return dict(zip(unique, results, strict=True))

    # -- pumping ---------------------------------------------------------------
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
                self._io.issue(batch, self._completer(batch.id))
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

    def _expire(self) -> None:
        with self._lock:
            deliveries = self._planner.expire(self._clock())
        self._deliver(deliveries)
        # An abandoned batch frees its route's slot: release what waited behind it.
        self._pump()

    def _deliver(self, deliveries: list[Delivery[V]]) -> None:
        if not deliveries:
            return
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Outcome[V]]]] = {}
        with self._lock:
            sinks = [(self._sinks.pop(d.ticket, None), d.outcome) for d in deliveries]
        for sink, outcome in sinks:
            if sink is None:
                continue
            if isinstance(sink, _AsyncSink):
                per_loop.setdefault(sink.loop, []).append((sink.future, outcome))
            elif not sink.done():
                sink.set_result(outcome)
        for loop, items in per_loop.items():
            if _running_loop() is loop:
                _resolve_all(items)
            elif not loop.is_closed():
                loop.call_soon_threadsafe(_resolve_all, items)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _check_timeout(timeout: float) -> None:
    if not (isinstance(timeout, int | float) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
