"""zocalo -> bluesky: wait for processing results inside a plan, for the right run only.

dodal's ZocaloResults blocks in ``queue.get`` inside ``trigger()`` and drains
stale results with a sleep; results of an earlier (or someone else's) run can
be taken for this one.  Here each client has its own durable reply queue named
in the request (``beampipe_reply_to``), every result carries the run uid and
trigger id it answers, ``trigger()`` awaits without blocking the event loop,
duplicates from at-least-once delivery collapse on the trigger id, and a
timeout says what was and was not received.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from bluesky.protocols import Triggerable
from ophyd_async.core import (
    Array1D,
    AsyncStatus,
    StandardReadable,
    StandardReadableFormat,
    soft_signal_r_and_setter,
)

from ._callback import RunTracker
from ._queues import BrokerParams
from ._transport import GuardedPikaTransport, prepare_queue

__all__ = ["ResultsListener", "ZocaloResults", "ZocaloResultsError", "ZocaloResultsTimeout"]

log = logging.getLogger("beampipe_zocalo.results")


class ZocaloResultsError(RuntimeError):
    """The results device cannot say what to wait for."""


class ZocaloResultsTimeout(ZocaloResultsError, TimeoutError):
    """Processing results did not all arrive in time."""


class ResultsListener:
    """Consumes this client's reply queue on its own connection and keeps results by run.

    The queue is durable, so results sent while the broker restarts or this
    process reconnects wait for us; it expires ``queue_ttl`` seconds after its
    last consumer went away, so a crashed client leaves nothing behind for long.
    """

    def __init__(
        self,
        transport_factory: Callable[[], Any] | None = None,
        *,
        broker: BrokerParams | None = None,
        queue: str | None = None,
        queue_ttl: float = 3600.0,
        keep_runs: int = 64,
    ) -> None:
        if transport_factory is None:
            params = broker or BrokerParams()

            def transport_factory() -> Any:
                return GuardedPikaTransport(broker=params)

        self._factory = transport_factory
        self.queue = queue or (
            f"beampipe.results.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
        )
        self.queue_ttl = queue_ttl
        self._keep_runs = keep_runs
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, dict[str, dict[str, Any]]] = OrderedDict()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.received = 0
        self.duplicates = 0
        self.rejected: list[str] = []
        #: Called (run uid, trigger id) on the transport's thread after each new result.
        self.on_result: Callable[[str, str], None] | None = None
        self._transport: Any = None
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> ResultsListener:
        """Connect, declare the reply queue and consume; raise clearly if the broker is away."""
        self._connect()
        self._supervisor = threading.Thread(
            target=self._supervise, name="beampipe-zocalo-results", daemon=True
        )
        self._supervisor.start()
        return self

    def close(self, delete_queue: bool = True) -> None:
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(10)
        transport, self._transport = self._transport, None
        if transport is not None:
            if delete_queue and hasattr(transport, "delete_queue"):
                with contextlib.suppress(Exception):
                    transport.delete_queue(self.queue)
            with contextlib.suppress(Exception):
                transport.disconnect()

    def __enter__(self) -> ResultsListener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> None:
        transport = self._factory()
        try:
            if not transport.connect():
                raise ConnectionError(f"{type(transport).__name__}.connect() returned False")
            prepare_queue(transport, self.queue, reply_queue_ttl=self.queue_ttl)
            transport.subscribe(
                self.queue,
                self._on_message,
                acknowledgement=True,
                prefetch_count=64,
                disable_mangling=True,
            )
        except Exception as exc:
            with contextlib.suppress(Exception):
                transport.disconnect()
            raise ConnectionError(
                f"results listener cannot consume reply queue {self.queue!r}: {exc!r}"
            ) from exc
        self._transport = transport

    def _supervise(self) -> None:
        # workflows cannot resume acknowledged subscriptions after a connection
        # loss; the queue is durable, so a fresh connection picks up where we were.
        delay = 0.2
        while not self._stop.wait(0.2):
            transport = self._transport
            if transport is not None and transport.is_connected():
                delay = 0.2
                continue
            if transport is not None:
                log.warning("results listener lost its connection; reconnecting")
                with contextlib.suppress(Exception):
                    transport.disconnect()
                self._transport = None
            try:
                self._connect()
                log.info("results listener reconnected to %s", self.queue)
            except ConnectionError as exc:
                log.warning("%s; retrying in %.1f s", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 2.0)

    # -- incoming -------------------------------------------------------------------
    def _on_message(self, header: Mapping[str, Any], raw: Any) -> None:
        transport = self._transport
        try:
            msg = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
            payload = msg.get("payload", msg) if isinstance(msg, dict) else None
            run_uid = payload.get("beampipe_run_uid") if isinstance(payload, dict) else None
            trigger_id = payload.get("beampipe_trigger_id") if isinstance(payload, dict) else None
            if (
                not isinstance(payload, dict)
                or not isinstance(run_uid, str)
                or not isinstance(trigger_id, str)
            ):
                raise ValueError("no beampipe_run_uid/beampipe_trigger_id")
        except (ValueError, AttributeError) as exc:
            reason = f"result on {self.queue} not understood ({exc}): {str(raw)[:200]}"
            log.error(reason)
            self.rejected.append(reason)
        else:
            self._store(run_uid, trigger_id, payload)
        if transport is not None:
            transport.ack(header)

    def _store(self, run_uid: str, trigger_id: str, payload: dict[str, Any]) -> None:
        with self._lock:
            run = self._runs.setdefault(run_uid, {})
            self._runs.move_to_end(run_uid)
            new = trigger_id not in run
            if new:
                run[trigger_id] = payload
                self.received += 1
            else:
                self.duplicates += 1
            while len(self._runs) > self._keep_runs:
                self._runs.popitem(last=False)
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                loop.call_soon_threadsafe(event.set)
        if new and self.on_result is not None:
            self.on_result(run_uid, trigger_id)

    # -- waiting --------------------------------------------------------------------
    def results(self, run_uid: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self._runs.get(run_uid, {}))

    async def wait_for(
        self, run_uid: str, trigger_ids: Sequence[str], timeout: float
    ) -> list[dict[str, Any]]:
        """The results for ``trigger_ids`` of ``run_uid``, in that order, once all arrived."""
        deadline = time.monotonic() + timeout
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._lock:
            self._waiters.add(waiter)
        try:
            while True:
                event.clear()
                have = self.results(run_uid)
                missing = [t for t in trigger_ids if t not in have]
                if not missing:
                    return [have[t] for t in trigger_ids]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ZocaloResultsTimeout(
                        f"{len(trigger_ids) - len(missing)} of {len(trigger_ids)} results for run "
                        f"{run_uid} arrived on {self.queue!r} within {timeout:g} s; missing e.g. "
                        f"{missing[:3]}. Are the zocalo services running and the broker reachable?"
                    )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(event.wait(), left)
        finally:
            with self._lock:
                self._waiters.discard(waiter)


DEFAULT_FIELDS = ("sum", "centroid_x", "centroid_y", "max")


class ZocaloResults(StandardReadable, Triggerable):
    """``trigger()`` waits for the results of the run the tracker last triggered; read gives them.

    Each field signal holds one value per awaited trigger (an array in trigger
    order, e.g. one per frame), ``count`` how many results that is.  ``rules``
    limits waiting to the named trigger rules (an end-of-run request whose
    recipe sends nothing back should not be waited for).
    """

    def __init__(
        self,
        listener: ResultsListener,
        tracker: RunTracker,
        *,
        fields: Sequence[str] = DEFAULT_FIELDS,
        rules: Sequence[str] | None = None,
        timeout: float = 60.0,
        name: str = "",
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if tracker.reply_to != listener.queue:
            raise ZocaloResultsError(
                f"the tracker asks for replies on {tracker.reply_to!r} but the listener consumes "
                f"{listener.queue!r}; pass reply_to=listener.queue to the callback"
            )
        self._listener = listener
        self._tracker = tracker
        self._rules = None if rules is None else set(rules)
        self._timeout = timeout
        self._fields = tuple(fields)
        self._expect: str | None = None
        self._setters: dict[str, Callable[[Any], None]] = {}
        with self.add_children_as_readables():
            self.count, self._set_count = soft_signal_r_and_setter(int, 0)
            for f in self._fields:
                sig, setter = soft_signal_r_and_setter(Array1D[np.float64], np.zeros(0))
                setattr(self, f, sig)
                self._setters[f] = setter
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.run_uid, self._set_run_uid = soft_signal_r_and_setter(str, "")
        super().__init__(name=name)

    def expect(self, run_uid: str | None) -> None:
        """Pin the run to wait for (default: the last run the tracker triggered)."""
        self._expect = run_uid

    def _awaited(self, run_uid: str) -> list[str]:
        ids = self._tracker.expected(run_uid)
        if self._rules is not None:
            ids = [t for t in ids if t.split("/")[1] in self._rules]
        return ids

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        run_uid = self._expect or self._tracker.last_triggered
        if run_uid is None:
            raise ZocaloResultsError(f"{self.name}: no run has triggered zocalo processing yet")
        ids = self._awaited(run_uid)
        if not ids:
            raise ZocaloResultsError(
                f"{self.name}: run {run_uid} triggered no processing that replies "
                f"(rules {sorted(self._rules) if self._rules else 'any'})"
            )
        results = await self._listener.wait_for(run_uid, ids, self._timeout)
        self._set_run_uid(run_uid)
        self._set_count(len(results))
        for f, setter in self._setters.items():
            setter(np.array([float(r.get("results", {}).get(f, np.nan)) for r in results]))
