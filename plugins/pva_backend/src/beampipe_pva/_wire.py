"""pvAccess on the wire: one p4p raw context, batched gets through beampipe's Coalescer.

Where a p4p get's time goes (profiled on this repo's QSRV, 100 ai records,
see docs/pva_backend.md): issuing 100 raw gets costs ~1 ms of Python, the
server ~2-3 ms, but ``Context.get`` then closes every finished operation
synchronously, and each close is a blocking round trip into pvxs's event-loop
thread (~80 us apiece, ~60% of the call).  The raw API is "no faster" for
the same reason: dropping the last reference to an operation closes it.

So a batch here issues every get at once on the caller's thread, completes
when the last callback lands, and hands the finished operation handles to a
short-lived reaper thread that closes them off the caller's critical path.
Each read is still a real GET issued after the caller asked: nothing is
served from a monitor cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from beampipe import Batch, Coalescer, Failed, Ok, Outcome

from ._decode import decode

__all__ = [
    "PvaGetIO",
    "bulk_get",
    "bulk_get_async",
    "bulk_get_raw",
    "bulk_get_raw_async",
    "close_context",
    "get_raw_async",
    "coalescer",
    "raw_context",
]

logger = logging.getLogger("beampipe.pva")

_lock = threading.Lock()
_context: Any = None
_coalescer: Coalescer[str, Any] | None = None
_io: PvaGetIO | None = None


def raw_context() -> Any:
    """The process-wide p4p raw client context (nt=False, configured from the environment)."""
    global _context
    with _lock:
        if _context is None:
            from p4p.client.raw import Context

            # raw.Context defaults to useenv=None, which ignores EPICS_PVA_ADDR_LIST.
            _context = Context("pva", nt=False, useenv=True)
        return _context


def close_context() -> None:
    """Close the shared context and cancel everything on it (tests, interpreter shutdown)."""
    global _context, _coalescer, _io
    with _lock:
        ctx, _context = _context, None
        io, _io = _io, None
        _coalescer = None
    if io is not None:
        io.close()
    if ctx is not None:
        ctx.close()


class _Housekeeper:
    """One thread, alive only while there is work: closes finished operations and ends overdue
    batches with the answers they have, so one unknown PV never sinks its batch-mates."""

    IDLE = 0.2

    def __init__(self, io: PvaGetIO) -> None:
        self._io = io
        self._cond = threading.Condition()
        self._work: list[list[Any]] = []
        self._thread: threading.Thread | None = None
        self._deadline: float | None = None

    def _ensure(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="beampipe-pva-io", daemon=True)
            self._thread.start()
        else:
            self._cond.notify()

    def bury(self, ops: list[Any]) -> None:
        if not ops:
            return
        with self._cond:
            self._work.append(ops)
            self._ensure()

    def watch(self, deadline: float) -> None:
        with self._cond:
            if self._deadline is None or deadline < self._deadline:
                self._deadline = deadline
                self._ensure()

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._cond:
                now = time.monotonic()
                if not self._work:
                    wait = self.IDLE
                    if self._deadline is not None:
                        wait = max(0.0, min(wait, self._deadline - now))
                    if wait:
                        self._cond.wait(wait)
                now = time.monotonic()
                due = self._deadline is not None and self._deadline <= now
                if due:
                    self._deadline = None
                work, self._work = self._work, []
                if work or due or self._deadline is not None:
                    idle_since = now
                elif now - idle_since >= self.IDLE:
                    self._thread = None
                    return
            for ops in work:
                _close_all(ops)
            if due:
                nxt = self._io.expire_flights(time.monotonic())
                if nxt is not None:
                    self.watch(nxt)

    def drain(self) -> None:
        with self._cond:
            work, self._work = self._work, []
            self._deadline = None
            thread = self._thread
            self._cond.notify()
        for ops in work:
            _close_all(ops)
        if thread is not None:
            thread.join(2 * self.IDLE + 1.0)


def _close_all(ops: list[Any]) -> None:
    for op in ops:
        try:
            op.close()
        except Exception:  # noqa: BLE001 - a failed close must not kill the housekeeper
            logger.debug("closing a finished PVA operation failed", exc_info=True)


class _Flight:
    __slots__ = ("complete", "deadline", "done", "lock", "ops", "results", "want")

    def __init__(
        self, want: int, complete: Callable[[Mapping[Any, Outcome[Any]]], None], deadline: float
    ) -> None:
        self.want = want
        self.complete = complete
        self.results: dict[str, Outcome[Any]] = {}
        self.ops: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.done = False
        self.deadline = deadline


class PvaGetIO:
    """BatchIO for pvAccess GET: every key of a batch is one get, issued together.

    A batch completes when every get has answered, or at the latest caller
    deadline with what it has: the rest fail alone, their gets cancelled.
    """

    #: Used for keys whose caller did not say (e.g. read straight through the Coalescer).
    default_timeout = 5.0

    def __init__(self, context: Callable[[], Any] = raw_context, request: Any = None) -> None:
        self._context = context
        self._request = request
        self._house = _Housekeeper(self)
        self._flights: dict[int, _Flight] = {}
        self._lock = threading.Lock()
        self._wanted: dict[str, float] = {}

    def want(self, names: Iterable[str], deadline: float) -> None:
        """Tell the IO how long callers will wait for these names, before they are requested."""
        with self._lock:
            for name in names:
                if self._wanted.get(name, 0.0) < deadline:
                    self._wanted[name] = deadline

    def issue(self, batch: Batch[str], complete: Callable[[Mapping[Any, Outcome[Any]]], None]) -> None:
        ctx = self._context()
        now = time.monotonic()
        with self._lock:
            wanted = [self._wanted.pop(name, 0.0) for name in batch.keys]
        deadline = max(max(wanted, default=0.0), now + 0.001)
        if deadline <= now + 0.002 and not any(wanted):
            deadline = now + self.default_timeout
        # Finish a little before the callers give up, so answers that did come are delivered.
        deadline -= min(0.05, 0.1 * (deadline - now))
        flight = _Flight(len(batch.keys), complete, deadline)
        with self._lock:
            self._flights[batch.id] = flight
        get = ctx.get
        for name in batch.keys:
            op = get(name, self._handler(batch.id, flight, name), request=self._request)
            with flight.lock:
                if name not in flight.results:
                    flight.ops[name] = op
                    continue
            self._house.bury([op])
        with flight.lock:
            pending = not flight.done
        if pending:
            self._house.watch(deadline)

    def _handler(self, batch_id: int, flight: _Flight, name: str) -> Callable[[Any], None]:
        def on_result(value: Any) -> None:
            if isinstance(value, Exception):
                outcome: Outcome[Any] = Failed(f"{name}: {type(value).__name__}: {value}")
            else:
                outcome = Ok(value)
            with flight.lock:
                if flight.done or name in flight.results:
                    return
                flight.results[name] = outcome
                finished = len(flight.results) == flight.want
                if finished:
                    flight.done = True
                    ops = list(flight.ops.values())
                    flight.ops.clear()
            if finished:
                with self._lock:
                    self._flights.pop(batch_id, None)
                self._house.bury(ops)
                flight.complete(flight.results)

        return on_result

    def expire_flights(self, now: float) -> float | None:
        """End every overdue batch with the answers it has; returns the next deadline."""
        with self._lock:
            due = [(bid, f) for bid, f in self._flights.items() if f.deadline <= now]
            for bid, _ in due:
                del self._flights[bid]
            nxt = min((f.deadline for f in self._flights.values()), default=None)
        for _, flight in due:
            with flight.lock:
                if flight.done:
                    continue
                flight.done = True
                ops = list(flight.ops.items())
                flight.ops.clear()
                waited = now - flight.deadline
                for name, _op in ops:
                    if name not in flight.results:
                        flight.results[name] = Failed(
                            f"{name}: no answer in time (unknown PV, or its server is down)"
                            + (f", {waited:.2f}s late" if waited > 1 else "")
                        )
            _close_all([op for _, op in ops])
            flight.complete(flight.results)
        return nxt

    def close(self) -> None:
        with self._lock:
            flights, self._flights = list(self._flights.values()), {}
        for flight in flights:
            with flight.lock:
                ops = list(flight.ops.values())
                flight.ops.clear()
                flight.done = True
            _close_all(ops)
        self._house.drain()


def coalescer() -> Coalescer[str, Any]:
    """The process-wide coalescer that every pva read in this process shares."""
    global _coalescer, _io
    with _lock:
        if _coalescer is None:
            _io = PvaGetIO()
            _coalescer = Coalescer(_io, max_batch=2000, max_in_flight=2, name="beampipe-pva")
        return _coalescer


def _check_names(names: Iterable[str]) -> list[str]:
    if isinstance(names, str | bytes):
        raise TypeError(f"names must be a list of PV names, not a single string {names!r}")
    out = list(names)
    for name in out:
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"not a PV name: {name!r}")
    return [n.removeprefix("pva://") for n in out]


def _announce(keys: list[str], timeout: float) -> None:
    io = _io
    if io is not None:
        io.want(keys, time.monotonic() + timeout)


def bulk_get_raw(names: Iterable[str], timeout: float = 5.0) -> dict[str, Outcome[Any]]:
    """Fresh GETs of many PVs, issued at once; each outcome is Ok(p4p Value) or Failed(reason)."""
    keys = _check_names(names)
    co = coalescer()
    _announce(keys, timeout)
    return co.get_many("get", keys, timeout)


async def bulk_get_raw_async(names: Iterable[str], timeout: float = 5.0) -> dict[str, Outcome[Any]]:
    """Like :func:`bulk_get_raw` from a coroutine; concurrent awaits in one loop turn share a batch."""
    keys = _check_names(names)
    co = coalescer()
    _announce(keys, timeout)
    return await co.get_many_async("get", keys, timeout)


async def get_raw_async(name: str, timeout: float = 5.0) -> Outcome[Any]:
    """One fresh GET from a coroutine, sharing a batch with every other read in this loop turn."""
    (key,) = _check_names([name])
    co = coalescer()
    _announce([key], timeout)
    return await co.get_async("get", key, timeout)


def _decoded(names: list[str], outcomes: Mapping[str, Outcome[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        key = name.removeprefix("pva://")
        outcome = outcomes[key]
        if isinstance(outcome, Ok):
            try:
                out[name] = decode(outcome.value, key)
            except ValueError as exc:
                logger.warning("pva://%s read but not decoded: %s", key, exc)
                out[name] = None
        else:
            logger.warning("pva://%s not read: %s", key, outcome.reason)
            out[name] = None
    return out


def bulk_get(names: Iterable[str], timeout: float = 5.0) -> dict[str, Any]:
    """Read many PVs at once: name -> decoded value, or None (with the reason logged).

    NTScalar gives its value, NTScalarArray a numpy array, NTEnum the choice
    string, NTTable a dict of columns and NTNDArray an :class:`NDArrayFrame`.
    """
    names = list(names) if not isinstance(names, str | bytes) else names
    outcomes = bulk_get_raw(names, timeout)
    return _decoded(list(dict.fromkeys(names)), outcomes)


async def bulk_get_async(names: Iterable[str], timeout: float = 5.0) -> dict[str, Any]:
    """:func:`bulk_get` for coroutines: concurrent callers in one loop turn share one batch."""
    names = list(names) if not isinstance(names, str | bytes) else names
    outcomes = await bulk_get_raw_async(names, timeout)
    return _decoded(list(dict.fromkeys(names)), outcomes)
