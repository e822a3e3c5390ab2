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


class _Reaper:
    """Closes finished p4p operations on a thread that lives only while there is work."""

    IDLE = 0.2

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._work: list[list[Any]] = []
        self._thread: threading.Thread | None = None

    def bury(self, ops: list[Any]) -> None:
        if not ops:
            return
        with self._cond:
            self._work.append(ops)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="beampipe-pva-reaper", daemon=True
                )
                self._thread.start()
            else:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._work:
                    self._cond.wait(self.IDLE)
                if not self._work:
                    self._thread = None
                    return
                work, self._work = self._work, []
            for ops in work:
                for op in ops:
                    try:
                        op.close()
                    except Exception:  # noqa: BLE001 - a failed close must not kill the reaper
                        logger.debug("closing a finished PVA operation failed", exc_info=True)

    def drain(self) -> None:
        with self._cond:
            work, self._work = self._work, []
            thread = self._thread
        for ops in work:
            for op in ops:
                op.close()
        if thread is not None:
            thread.join(2 * self.IDLE + 1.0)


class _Flight:
    __slots__ = ("complete", "done", "lock", "ops", "results", "started", "want")

    def __init__(self, want: int, complete: Callable[[Mapping[Any, Outcome[Any]]], None]) -> None:
        self.want = want
        self.complete = complete
        self.results: dict[str, Outcome[Any]] = {}
        self.ops: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.done = False
        self.started = time.monotonic()


class PvaGetIO:
    """BatchIO for pvAccess GET: every key of a batch is one get, issued together."""

    def __init__(self, context: Callable[[], Any] = raw_context, request: Any = None) -> None:
        self._context = context
        self._request = request
        self._reaper = _Reaper()
        self._flights: dict[int, _Flight] = {}
        self._flights_lock = threading.Lock()

    def issue(self, batch: Batch[str], complete: Callable[[Mapping[Any, Outcome[Any]]], None]) -> None:
        ctx = self._context()
        flight = _Flight(len(batch.keys), complete)
        with self._flights_lock:
            self._flights[batch.id] = flight
        get = ctx.get
        for name in batch.keys:
            op = get(name, self._handler(batch.id, flight, name), request=self._request)
            with flight.lock:
                if name not in flight.results:
                    flight.ops[name] = op
                    continue
            self._reaper.bury([op])

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
                with self._flights_lock:
                    self._flights.pop(batch_id, None)
                self._reaper.bury(ops)
                flight.complete(flight.results)

        return on_result

    def abandon(self, names: Iterable[str], older_than: float) -> None:
        """Cancel gets that nobody waits for any more (their callers timed out).

        Without this an unknown PV's get would search forever; only flights
        older than the callers' timeout are touched, so a newer caller's
        read of the same name keeps its own operation.
        """
        names = set(names)
        now = time.monotonic()
        with self._flights_lock:
            flights = [
                (bid, f) for bid, f in self._flights.items() if now - f.started >= older_than
            ]
        for batch_id, flight in flights:
            ops = []
            with flight.lock:
                for name in names & set(flight.ops):
                    ops.append(flight.ops.pop(name))
                    flight.results.setdefault(name, Failed(f"{name}: no answer, cancelled"))
                finished = not flight.done and len(flight.results) == flight.want
                if finished:
                    flight.done = True
            self._reaper.bury(ops)
            if finished:
                with self._flights_lock:
                    self._flights.pop(batch_id, None)
                flight.complete(flight.results)

    def close(self) -> None:
        with self._flights_lock:
            flights, self._flights = list(self._flights.values()), {}
        for flight in flights:
            with flight.lock:
                ops = list(flight.ops.values())
                flight.ops.clear()
                flight.done = True
            for op in ops:
                op.close()
        self._reaper.drain()


def coalescer() -> Coalescer[str, Any]:
    """The process-wide coalescer that every pva read in this process shares."""
    global _coalescer, _io
    with _lock:
        if _coalescer is None:
            _io = PvaGetIO()
            _coalescer = Coalescer(_io, max_batch=2000, max_in_flight=2, name="beampipe-pva")
        return _coalescer


def _io_for_abandon() -> PvaGetIO | None:
    return _io


def _check_names(names: Iterable[str]) -> list[str]:
    if isinstance(names, str | bytes):
        raise TypeError(f"names must be a list of PV names, not a single string {names!r}")
    out = list(names)
    for name in out:
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"not a PV name: {name!r}")
    return [n.removeprefix("pva://") for n in out]


def _after(outcomes: Mapping[str, Outcome[Any]], timeout: float) -> None:
    timed_out = [k for k, o in outcomes.items() if isinstance(o, Failed) and "timed out" in o.reason]
    if timed_out and (io := _io_for_abandon()) is not None:
        io.abandon(timed_out, older_than=timeout * 0.999)


def bulk_get_raw(names: Iterable[str], timeout: float = 5.0) -> dict[str, Outcome[Any]]:
    """Fresh GETs of many PVs, issued at once; each outcome is Ok(p4p Value) or Failed(reason)."""
    keys = _check_names(names)
    outcomes = coalescer().get_many("get", keys, timeout)
    _after(outcomes, timeout)
    return outcomes


async def bulk_get_raw_async(names: Iterable[str], timeout: float = 5.0) -> dict[str, Outcome[Any]]:
    """Like :func:`bulk_get_raw` from a coroutine; concurrent awaits in one loop turn share a batch."""
    keys = _check_names(names)
    outcomes = await coalescer().get_many_async("get", keys, timeout)
    _after(outcomes, timeout)
    return outcomes


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
