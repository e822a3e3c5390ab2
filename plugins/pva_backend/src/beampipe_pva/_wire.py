"""pvAccess reads through beampipe's Coalescer: the native path where it can, else p4p.

A batch (the Coalescer's, so concurrent callers share it) is split: PVs the
native reader (:mod:`._native`) has connected are EXECs of their persistent
GET, written together; the rest are p4p gets, and a PV read through p4p a
second time is connected natively once its batch is answered.  Each read is
a real GET issued after the caller asked: nothing is served from a monitor
cache.

On the p4p side (profiled on this repo's QSRV, see docs/pva_backend.md):
``Context.get`` closes every finished operation synchronously, a blocking
round trip into pvxs's event-loop thread (~80 us apiece); here a batch issues
every get at once on the caller's thread, completes when the last callback
lands, and hands the finished operations to a short-lived housekeeping
thread that closes them off the caller's critical path.  Two smaller costs
go too: p4p's per-get Python wrappers (see ``_get_starter``) and a Python
thread state created and destroyed per callback on pvxs's thread (see
``_pin_thread_state``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from beampipe import Batch, Coalescer, Failed, Ok, Outcome

from ._decode import decode, decode_fields
from ._native import OP_VALUE as OP_VALUE_GET
from ._native import Answer, NativeReader

#: Coalescer ops: "get" answers with p4p Values (ophyd, ophyd-async), "value" with decoded values.
OP_GET = "get"
OP_VALUE = "value"
_OFF = ("0", "no", "false", "off")
#: What decoding a value needs from a reply (every NT keeps its payload in ``value``).
_VALUE_ONLY = frozenset(("value",))

__all__ = [
    "PutError",
    "PvaGetIO",
    "bulk_get",
    "bulk_get_async",
    "bulk_get_raw",
    "bulk_get_raw_async",
    "close_context",
    "coalescer",
    "get_raw_async",
    "native_state",
    "put_value",
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
    with _open_puts_lock:
        puts = list(_open_puts.values())
        _open_puts.clear()
    for op, _, _ in puts:
        op.close()
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
        self._stop = False

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

    def watch(self) -> None:
        """A batch is out with a deadline: make sure someone will end it on time."""
        with self._cond:
            self._ensure()

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._cond:
                if not self._work and not self._stop:
                    nxt = self._io.next_deadline()
                    wait = self.IDLE
                    if nxt is not None:
                        wait = max(0.0, min(wait, nxt - time.monotonic()))
                    if wait:
                        self._cond.wait(wait)
                work, self._work = self._work, []
                if self._stop and not work:
                    self._thread = None
                    return
                now = time.monotonic()
                nxt = self._io.next_deadline()
                if work or nxt is not None:
                    idle_since = now
                elif now - idle_since >= self.IDLE:
                    self._thread = None
                    return
            for ops in work:
                _close_all(ops)
            if nxt is not None and nxt <= now:
                self._io.expire_flights(now)

    def drain(self) -> None:
        with self._cond:
            work, self._work = self._work, []
            self._stop = True
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
        except Exception:
            logger.debug("closing a finished PVA operation failed", exc_info=True)


class _Flight:
    __slots__ = (
        "complete",
        "deadline",
        "done",
        "keys",
        "lock",
        "native",
        "ops",
        "results",
        "want",
    )

    def __init__(
        self,
        keys: list[str],
        complete: Callable[[Mapping[Any, Outcome[Any]]], None],
        deadline: float,
    ) -> None:
        self.keys = keys
        self.want = len(keys)
        self.complete = complete
        self.results: dict[str, Outcome[Any]] = {}
        self.ops: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.done = False
        self.deadline = deadline
        #: names read through p4p that the native reader should connect once this batch is done
        self.native: tuple[NativeReader, list[str]] | None = None


_pinned: set[int] = set()
_pinned_lock = threading.Lock()


def _pin_thread_state() -> None:
    """Keep a Python thread state alive on the pvxs thread that runs our callbacks.

    p4p enters Python from pvxs's own threads with PyGILState_Ensure/Release;
    with nothing else holding it, every callback creates and destroys a thread
    state, and CPython maps and unmaps a fresh frame stack for each one
    (page faults, ~10-20% of a batch's client CPU in perf).  One extra Ensure,
    never released, makes the thread state live as long as the thread.
    Called with the GIL held, so it only bumps a counter.
    """
    ident = threading.get_ident()
    if ident in _pinned:
        return
    with _pinned_lock:
        if ident in _pinned:
            return
        _pinned.add(ident)
    if sys.implementation.name == "cpython":
        ctypes.pythonapi.PyGILState_Ensure()


def _get_starter(ctx: Any, request: Any) -> Callable[[str, Callable[[int, Any, Any], None]], Any]:
    """A function that starts one GET and returns its operation handle.

    p4p's ``raw.Context.get`` wraps every handler in two Python closures and
    an NT unwrap step; with ``nt=False`` neither does anything, and building
    the operation directly halves the Python cost of issuing a batch (p4p 4.3,
    pinned).  The handler gets p4p's raw ``(code, message, value)``: 0 is a
    server error, 1 a cancel, 2 an exception in p4p, anything else a result.
    """
    from p4p.client import raw

    op_cls = getattr(raw, "_ClientOperation", None)
    provider = getattr(ctx, "_ctxt", None)
    pv_request = raw.wrapRequest(request)
    if op_cls is None or provider is None:  # another p4p: the public, slower path

        def start_public(name: str, handler: Callable[[int, Any, Any], None]) -> Any:
            def adapt(value: Any) -> None:
                if isinstance(value, Exception):
                    handler(0, f"{type(value).__name__}: {value}", None)
                else:
                    handler(3, None, value)  # any code but 0-2 is data

            return ctx.get(name, adapt, request=request)

        return start_public

    def start(name: str, handler: Callable[[int, Any, Any], None]) -> Any:
        return op_cls(provider, name, handler=handler, pvRequest=pv_request, get=True, put=False)

    return start


class PvaGetIO:
    """BatchIO for pvAccess GET: every key of a batch is one get, issued together.

    Names the native reader has connected (see :mod:`._native`) are EXECs of
    their persistent GET, all written in one send; the rest are p4p gets, and
    the native reader starts connecting them for next time.  Batches of op
    ``"value"`` answer with decoded values, ``"get"`` with p4p Values.  A
    batch completes when every get has answered, or at the latest caller
    deadline with what it has: the rest fail alone, their gets cancelled.
    ``BEAMPIPE_PVA_NATIVE=0`` in the environment reads everything through p4p.
    """

    def __init__(
        self,
        context: Callable[[], Any] = raw_context,
        request: Any = None,
        *,
        native: bool | None = None,
    ) -> None:
        self._context = context
        self._request = request
        if native is None:
            native = os.environ.get("BEAMPIPE_PVA_NATIVE", "1").strip().lower() not in _OFF
        # The native path reads the whole PV; a custom pvRequest goes through p4p.
        self._use_native = native and request is None
        self._native: NativeReader | None = None
        self._seen: set[str] = set()
        self._closed = False
        self._house = _Housekeeper(self)
        self._flights: dict[int, _Flight] = {}
        self._lock = threading.Lock()

    def issue(
        self, batch: Batch[str], complete: Callable[[Mapping[Any, Outcome[Any]]], None]
    ) -> None:
        now = time.monotonic()  # the Coalescer's clock, which set batch.deadline
        deadline = batch.deadline if batch.deadline > now else now + 0.001
        # Finish a little before the callers give up, so answers that did come are delivered.
        deadline -= min(0.05, 0.1 * (deadline - now))
        flight = _Flight(list(batch.keys), complete, deadline)
        with self._lock:
            self._flights[batch.id] = flight
        decoded = batch.op == OP_VALUE
        keys: list[str] = list(batch.keys)
        native = self._native  # made when a PV is first read again: none for read-once PVs
        if native is not None:
            handler = self._native_handler(batch.id, flight, decoded)
            if decoded:  # the persistent GET of field(value), parsed for value alone
                keys = native.start_reads(keys, handler, _VALUE_ONLY, OP_VALUE_GET)
            else:
                keys = native.start_reads(keys, handler)
        if keys and self._use_native:
            # Read through p4p this time.  A PV read before gets a native channel and
            # persistent GET for next time; one read once (a connect) costs the server no
            # second channel.  The connect starts once this batch is answered.
            again = self._seen_before(keys)
            if again and (native := self._native_reader()) is not None:
                flight.native = (native, again)
        if keys:
            start = _get_starter(self._context(), self._request)
            for name in keys:
                op = start(name, self._handler(batch.id, flight, name, decoded))
                with flight.lock:
                    if name not in flight.results:
                        flight.ops[name] = op
                        continue
                self._house.bury([op])
        with flight.lock:
            pending = not flight.done
        if pending:
            self._house.watch()

    def _seen_before(self, names: list[str]) -> list[str]:
        """The names read through p4p before; remembers the rest (a bounded memory)."""
        with self._lock:
            seen = self._seen
            again = [n for n in names if n in seen]
            if len(seen) > 200_000:
                seen.clear()
            seen.update(names)
        return again

    def _native_reader(self) -> NativeReader | None:
        if not self._use_native:
            return None
        with self._lock:
            if self._native is None and not self._closed:
                self._native = NativeReader()
            return self._native

    def native_state(self, name: str) -> str:
        """How the native path sees a PV (``ready``, ``search``, ``unsupported``, ...).

        ``off`` when the native path is disabled or not yet started.
        """
        native = self._native
        return "off" if native is None else native.state(name.removeprefix("pva://"))

    @property
    def native_execs(self) -> int:
        """GETs served natively so far (EXECs written)."""
        native = self._native
        return 0 if native is None else native.execs

    def _native_handler(
        self, batch_id: int, flight: _Flight, decoded: bool
    ) -> Callable[[list[Answer]], None]:
        def on_native(answers: list[Answer]) -> None:
            outcomes: list[tuple[str, Outcome[Any]]] = []
            for name, desc, fields, error in answers:
                if error is not None or desc is None or fields is None:
                    outcomes.append((name, Failed(error or f"{name}: empty reply")))
                    continue
                try:
                    if decoded:
                        value = _own(decode_fields(desc, fields, name))
                        outcomes.append((name, Ok(value)))
                    else:
                        outcomes.append((name, Ok(desc.p4p_value(fields))))
                except (ValueError, TypeError, KeyError) as exc:
                    outcomes.append((name, Failed(f"{name}: read but not decoded: {exc}")))
            self._record_many(batch_id, flight, outcomes)

        return on_native

    def _handler(
        self, batch_id: int, flight: _Flight, name: str, decoded: bool = False
    ) -> Callable[[int, Any, Any], None]:
        def on_result(code: int, msg: Any, value: Any) -> None:
            if threading.get_ident() not in _pinned:
                _pin_thread_state()
            # As p4p's own raw.unwrapHandler reads them: 0 error, 1 cancel, 2 raised, else data.
            if code == 0:
                outcome: Outcome[Any] = Failed(f"{name}: server error: {msg}")
            elif code == 1:
                outcome = Failed(f"{name}: cancelled")
            elif code == 2:
                outcome = Failed(f"{name}: p4p raised {value[1]!r}")
            elif value is None:
                outcome = Failed(f"{name}: empty reply")
            elif decoded:
                try:
                    outcome = Ok(decode(value, name))
                except ValueError as exc:
                    outcome = Failed(f"{name}: read but not decoded: {exc}")
            else:
                outcome = Ok(value)
            self._record(batch_id, flight, name, outcome)

        return on_result

    def _record(self, batch_id: int, flight: _Flight, name: str, outcome: Outcome[Any]) -> None:
        self._record_many(batch_id, flight, [(name, outcome)])

    def _record_many(
        self, batch_id: int, flight: _Flight, outcomes: list[tuple[str, Outcome[Any]]]
    ) -> None:
        with flight.lock:
            if flight.done:
                return
            results = flight.results
            for name, outcome in outcomes:
                results.setdefault(name, outcome)
            finished = len(results) == flight.want
            if finished:
                flight.done = True
                ops = list(flight.ops.values())
                flight.ops.clear()
        if finished:
            with self._lock:
                self._flights.pop(batch_id, None)
            flight.complete(flight.results)
            # Not closed here: pvxs refuses a synchronous cancel on its own worker thread.
            self._house.bury(ops)
            _connect_natively(flight)

    def next_deadline(self) -> float | None:
        """When the earliest open batch must end, or None if none is open."""
        with self._lock:
            return min((f.deadline for f in self._flights.values()), default=None)

    def expire_flights(self, now: float) -> None:
        """End every overdue batch with the answers it has; the rest fail alone."""
        with self._lock:
            due = [(bid, f) for bid, f in self._flights.items() if f.deadline <= now]
            for bid, _ in due:
                del self._flights[bid]
        for _, flight in due:
            with flight.lock:
                if flight.done:
                    continue
                flight.done = True
                ops = list(flight.ops.items())
                flight.ops.clear()
                waited = now - flight.deadline
                late = f", {waited:.2f}s late" if waited > 1 else ""
                on_p4p = {name for name, _op in ops}
                for name in flight.keys:
                    if name in flight.results:
                        continue
                    if name in on_p4p:
                        reason = "no answer in time (unknown PV, or its server is down)"
                    else:  # an EXEC of its persistent GET went out on a connected circuit
                        reason = "no answer in time to its native GET (the server is slow or hung)"
                    flight.results[name] = Failed(f"{name}: {reason}{late}")
            _close_all([op for _, op in ops])
            flight.complete(flight.results)
            _connect_natively(flight)

    def close(self) -> None:
        with self._lock:
            flights, self._flights = list(self._flights.values()), {}
            native, self._native = self._native, None
            self._closed = True
        if native is not None:
            native.close()
        for flight in flights:
            with flight.lock:
                ops = list(flight.ops.values())
                flight.ops.clear()
                flight.done = True
            _close_all(ops)
        self._house.drain()


def _own(value: Any) -> Any:
    """A decoded native value the caller may change: arrays, lists and tables are copied out
    of the native reader's fields, which later delta replies are merged into."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return {k: _own(v) for k, v in value.items()}
    return value


def _connect_natively(flight: _Flight) -> None:
    if flight.native is not None:
        native, names = flight.native
        flight.native = None
        native.want(names)


def coalescer() -> Coalescer[str, Any]:
    """The process-wide coalescer that every pva read in this process shares."""
    global _coalescer, _io
    with _lock:
        if _coalescer is None:
            _io = PvaGetIO()
            _coalescer = Coalescer(_io, max_batch=2000, max_in_flight=2, name="beampipe-pva")
        return _coalescer


def native_state(name: str) -> str:
    """How the native read path sees ``name``: ready (reads are EXECs of a persistent GET),
    search/connect/create/init (on its way; p4p reads it meanwhile), unsupported (a type
    the codec does not parse, e.g. NTNDArray: p4p reads it), failed (not found: p4p reads
    it), absent (never asked for), off (native path disabled or not started)."""
    io = _io
    return "off" if io is None else io.native_state(name)


def _check_names(names: Iterable[str]) -> list[str]:
    if isinstance(names, str | bytes):
        raise TypeError(f"names must be a list of PV names, not a single string {names!r}")
    out = list(names)
    for name in out:
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"not a PV name: {name!r}")
    return [n.removeprefix("pva://") for n in out]


def bulk_get_raw(names: Iterable[str], timeout: float = 5.0) -> dict[str, Outcome[Any]]:
    """Fresh GETs of many PVs, issued at once; each outcome is Ok(p4p Value) or Failed(reason)."""
    keys = _check_names(names)
    co = coalescer()
    return co.get_many(OP_GET, keys, timeout)


async def bulk_get_raw_async(names: Iterable[str], timeout: float = 5.0) -> dict[str, Outcome[Any]]:
    """:func:`bulk_get_raw` for coroutines; concurrent awaits in one loop turn share a batch."""
    keys = _check_names(names)
    co = coalescer()
    return await co.get_many_async(OP_GET, keys, timeout)


async def get_raw_async(name: str, timeout: float = 5.0) -> Outcome[Any]:
    """One fresh GET from a coroutine, sharing a batch with every other read in this loop turn."""
    (key,) = _check_names([name])
    co = coalescer()
    return await co.get_async(OP_GET, key, timeout)


def _decoded(names: list[str], outcomes: Mapping[str, Outcome[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        key = name.removeprefix("pva://")
        outcome = outcomes[key]
        if isinstance(outcome, Ok):
            out[name] = outcome.value
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
    outcomes = coalescer().get_many(OP_VALUE, _check_names(names), timeout)
    return _decoded(list(dict.fromkeys(names)), outcomes)


async def bulk_get_async(names: Iterable[str], timeout: float = 5.0) -> dict[str, Any]:
    """:func:`bulk_get` for coroutines: concurrent callers in one loop turn share one batch."""
    names = list(names) if not isinstance(names, str | bytes) else names
    outcomes = await coalescer().get_many_async(OP_VALUE, _check_names(names), timeout)
    return _decoded(list(dict.fromkeys(names)), outcomes)


#: Puts in flight, kept alive until the server answers (dropping one cancels it):
#: id(op) -> (op, deadline, pv).  Overdue ones are cancelled at the next put.
_open_puts: dict[int, tuple[Any, float, str]] = {}
_open_puts_lock = threading.Lock()


def _sweep_puts(now: float) -> None:
    with _open_puts_lock:
        overdue = [k for k, (_, deadline, _) in _open_puts.items() if deadline <= now]
        dropped = [_open_puts.pop(k) for k in overdue]
    for op, _, pv in dropped:
        logger.warning("put to pva://%s not answered in time: cancelled", pv)
        op.close()


class PutError(RuntimeError):
    """A put the server refused or did not finish in time; the message names the PV."""


def put_value(
    name: str,
    value: Any,
    *,
    wait: bool = True,
    complete: bool = True,
    timeout: float = 5.0,
    on_done: Callable[[Exception | None], None] | None = None,
) -> None:
    """Write ``value`` to a PV's ``value`` field (or the fields of a dict).

    ``complete`` asks the server to finish processing before it answers (a CA
    put-callback); ``wait`` blocks the caller until that answer, raising
    :class:`PutError` on refusal or timeout.  ``on_done`` hears every outcome.
    NTEnum accepts the choice string; arrays go as numpy arrays.
    """
    (key,) = _check_names([name])
    if not (isinstance(timeout, int | float) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    ctx = raw_context()
    coalescer()  # the housekeeper that closes the finished operation lives on the IO
    done = threading.Event()
    result: list[Exception | None] = []
    holder: list[Any] = []

    def handler(reply: Any) -> None:
        error = reply if isinstance(reply, Exception) else None
        result.append(error)
        done.set()
        if holder:
            with _open_puts_lock:
                _open_puts.pop(id(holder[0]), None)
            if (io := _io) is not None:
                io._house.bury(holder)
        if on_done is not None:
            try:
                on_done(error)
            except Exception:
                logger.exception("put completion callback for pva://%s failed", key)

    builder = value if isinstance(value, dict) else {"value": value}
    request = "field()record[block=true]" if complete else "field()record[block=false]"
    _sweep_puts(time.monotonic())
    op = ctx.put(key, handler, builder=builder, request=request, get=True)
    with _open_puts_lock:
        if not done.is_set():
            holder.append(op)
            _open_puts[id(op)] = (op, time.monotonic() + timeout, key)
    if not wait:
        return
    if not done.wait(timeout):
        with _open_puts_lock:
            _open_puts.pop(id(op), None)
        op.close()
        raise PutError(f"pva://{key}: put of {value!r} not finished within {timeout} s")
    if result and result[0] is not None:
        raise PutError(f"pva://{key}: put of {value!r} failed: {result[0]}") from result[0]
