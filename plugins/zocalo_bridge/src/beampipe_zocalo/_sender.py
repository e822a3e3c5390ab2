"""Getting processing requests to the broker from a RunEngine without losing one.

The RunEngine must never wait on the broker, and a scan must never silently
fail to trigger its processing.  So documents are turned into messages in the
RunEngine's thread, queued, and a single sender thread owns one persistent,
confirmed connection: a message counts as sent only when the broker confirmed
it; until then it is retried (reconnecting as needed), and if the broker stays
away longer than ``retry_for`` it is appended to a fallback file that
``beampipe-zocalo-replay`` resends later.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import queue as queue_mod
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pika
import pika.exceptions

from ._queues import DEFAULT_DELIVERY_LIMIT, BrokerParams, ensure_queue
from ._transport import prepare_queue
from ._wire import dumps

__all__ = [
    "PikaPublisher",
    "Publisher",
    "ReliableSender",
    "SenderStats",
    "TransportPublisher",
    "replay_fallback",
]

log = logging.getLogger("beampipe_zocalo.sender")


class Publisher(Protocol):
    """One connection that publishes with confirmation.  Used from one thread only."""

    def connect(self) -> None: ...
    def ensure_queue(self, name: str) -> None: ...
    def publish(self, queue: str, body: str, headers: Mapping[str, Any]) -> None: ...
    def idle(self, seconds: float) -> None: ...
    def close(self) -> None: ...


class PikaPublisher:
    """Raw pika, publisher confirms and ``mandatory``: a return or nack raises."""

    def __init__(
        self,
        broker: BrokerParams | None = None,
        *,
        declare: bool = True,
        delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
    ) -> None:
        self.broker = broker or BrokerParams()
        self.declare = declare
        self.delivery_limit = delivery_limit
        self._conn: pika.BlockingConnection | None = None
        self._ch: Any = None
        self._known: set[str] = set()

    def connect(self) -> None:
        self.close()
        self._conn = pika.BlockingConnection(self.broker.pika())
        self._ch = self._conn.channel()
        self._ch.confirm_delivery()
        self._known.clear()

    def ensure_queue(self, name: str) -> None:
        if name in self._known:
            return
        if self._conn is None:
            raise ConnectionError(f"not connected to {self.broker}")
        ensure_queue(self._conn, name, create=self.declare, delivery_limit=self.delivery_limit)
        self._known.add(name)

    def publish(self, queue: str, body: str, headers: Mapping[str, Any]) -> None:
        if self._ch is None:
            raise ConnectionError(f"not connected to {self.broker}")
        self.ensure_queue(queue)
        self._ch.basic_publish(
            exchange="",
            routing_key=queue,
            body=body.encode(),
            properties=pika.BasicProperties(
                headers=dict(headers), delivery_mode=2, content_type="application/json"
            ),
            mandatory=True,
        )

    def idle(self, seconds: float) -> None:
        # Service heartbeats while there is nothing to send.
        if self._conn is not None and self._conn.is_open:
            self._conn.process_data_events(time_limit=seconds)
        else:
            time.sleep(seconds)

    def close(self) -> None:
        conn, self._conn, self._ch = self._conn, None, None
        if conn is not None and conn.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                conn.close()


class TransportPublisher:
    """Any workflows transport (e.g. the SHM transport): its ``send`` returning is the confirm."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._transport: Any = None
        self._known: set[str] = set()

    def connect(self) -> None:
        self.close()
        transport = self._factory()
        if not transport.connect():
            raise ConnectionError(f"{type(transport).__name__}.connect() failed")
        self._transport = transport
        self._known.clear()

    def ensure_queue(self, name: str) -> None:
        if name not in self._known:
            prepare_queue(self._transport, name)
            self._known.add(name)

    def publish(self, queue: str, body: str, headers: Mapping[str, Any]) -> None:
        if self._transport is None:
            raise ConnectionError("transport not connected")
        self.ensure_queue(queue)
        self._transport.raw_send(queue, body, headers=dict(headers))

    def idle(self, seconds: float) -> None:
        time.sleep(seconds)

    def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.disconnect()


@dataclass
class SenderStats:
    queued: int = 0
    sent: int = 0
    retries: int = 0
    reconnects: int = 0
    to_fallback: int = 0


@dataclass
class _Item:
    queue: str
    body: str
    headers: dict[str, Any]
    t_queued: float


@contextlib.contextmanager
def _locked(path: Path, mode: str) -> Iterator[Any]:
    with open(path, mode) as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield fh
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ReliableSender:
    """A thread that owns one confirmed connection; nothing handed to it is lost.

    ``send`` never blocks on the broker.  Each message is either confirmed by
    the broker or, after ``retry_for`` seconds of failing, appended (one JSON
    line with queue, headers and body) to ``fallback``.
    """

    def __init__(
        self,
        publisher: Publisher,
        *,
        fallback: str | Path | None = None,
        retry_for: float = 30.0,
        max_pending: int = 100_000,
        name: str = "beampipe-zocalo-sender",
    ) -> None:
        if retry_for < 0:
            raise ValueError("retry_for must be >= 0")
        self.publisher = publisher
        self.fallback = Path(fallback) if fallback is not None else None
        self.retry_for = retry_for
        self.stats = SenderStats()
        self.on_sent: Callable[[str, Mapping[str, Any]], None] | None = None
        self._q: queue_mod.Queue[_Item | None] = queue_mod.Queue(max_pending)
        self._pending = 0
        self._cond = threading.Condition()
        self._closed = False
        self._connected = False
        self._degraded = False  # broker given up on: try once per message, then fallback
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- public ---------------------------------------------------------------------
    def send(self, queue: str, message: Any, headers: Mapping[str, Any]) -> None:
        if self._closed:
            raise RuntimeError("ReliableSender is closed")
        if not isinstance(queue, str) or not queue:
            raise ValueError(f"invalid queue name {queue!r}")
        if not headers:
            raise ValueError(f"refusing to send to {queue!r} without headers")
        item = _Item(queue, dumps(message), dict(headers), time.monotonic())
        with self._cond:
            self._pending += 1
            self.stats.queued += 1
        try:
            self._q.put_nowait(item)
        except queue_mod.Full:
            log.error("sender queue full: writing message for %s to the fallback file", queue)
            self._give_up(item, "sender queue full")

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything handed over so far is confirmed or in the fallback file."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    @property
    def pending(self) -> int:
        return self._pending

    def close(self, timeout: float | None = None) -> None:
        """Flush (up to ``retry_for`` + a margin) and stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._q.put(None)
        self._thread.join(timeout if timeout is not None else self.retry_for + 30)
        if self._thread.is_alive():
            log.error("sender thread did not stop; %d message(s) unaccounted", self._pending)

    def __enter__(self) -> ReliableSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- thread ---------------------------------------------------------------------
    def _done(self) -> None:
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()

    def _give_up(self, item: _Item, reason: str) -> None:
        try:
            if self.fallback is None:
                log.error(
                    "LOST message to %s (%s) and no fallback file configured: %.200s",
                    item.queue,
                    reason,
                    item.body,
                )
                return
            line = json.dumps(
                {
                    "queue": item.queue,
                    "headers": item.headers,
                    "body": item.body,
                    "reason": reason,
                    "time": time.time(),
                }
            )
            self.fallback.parent.mkdir(parents=True, exist_ok=True)
            with _locked(self.fallback, "a") as fh:
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self.stats.to_fallback += 1
            log.error(
                "broker unavailable (%s): message to %s kept in %s",
                reason,
                item.queue,
                self.fallback,
            )
        finally:
            self._done()

    def _try_publish(self, item: _Item) -> None:
        if not self._connected:
            self.publisher.connect()
            self._connected = True
            self.stats.reconnects += 1
        self.publisher.publish(item.queue, item.body, item.headers)

    def _deliver(self, item: _Item) -> None:
        first_failure: float | None = None
        delay = 0.05
        while True:
            try:
                self._try_publish(item)
            except Exception as exc:  # noqa: BLE001 - whatever the transport raises: retry
                # The publisher is dead or refused; drop the connection and retry.
                self._connected = False
                self.publisher.close()
                now = time.monotonic()
                first_failure = first_failure or now
                if self._degraded or now - first_failure >= self.retry_for:
                    self._degraded = True
                    self._give_up(item, f"{type(exc).__name__}: {exc}")
                    return
                self.stats.retries += 1
                log.warning("send to %s failed (%r); retrying in %.2f s", item.queue, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self._degraded = False
            self.stats.sent += 1
            if self.on_sent is not None:
                with contextlib.suppress(Exception):
                    self.on_sent(item.queue, item.headers)
            self._done()
            return

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._q.get(timeout=1.0)
                except queue_mod.Empty:
                    if self._connected:
                        try:
                            self.publisher.idle(0)
                        except (pika.exceptions.AMQPError, OSError):
                            self._connected = False
                            self.publisher.close()
                    continue
                if item is None:
                    # Drain what is left, then stop.
                    while True:
                        try:
                            rest = self._q.get_nowait()
                        except queue_mod.Empty:
                            return
                        if rest is not None:
                            self._deliver(rest)
                self._deliver(item)
        finally:
            self.publisher.close()


def replay_fallback(path: str | Path, publisher: Publisher) -> tuple[int, int]:
    """Resend every message in a fallback file; keep only those that fail again.

    Returns (sent, left).  Holds the file's lock, so a running sender appends after us.
    """
    path = Path(path)
    if not path.exists():
        return 0, 0
    sent = 0
    with _locked(path, "r+") as fh:
        lines = [ln for ln in fh.read().splitlines() if ln.strip()]
        left: list[str] = []
        connected = False
        for ln in lines:
            try:
                rec = json.loads(ln)
                q, headers, body = rec["queue"], rec["headers"], rec["body"]
            except (ValueError, KeyError, TypeError):
                log.error("unreadable line kept in %s: %.120s", path, ln)
                left.append(ln)
                continue
            try:
                if not connected:
                    publisher.connect()
                    connected = True
                publisher.publish(q, body, headers)
                sent += 1
            except Exception as exc:  # noqa: BLE001 - keep the line, report, go on
                log.error("replay of a message to %s failed: %r", q, exc)
                left.append(ln)
                connected = False
                publisher.close()
        fh.seek(0)
        fh.truncate()
        fh.write("".join(ln + "\n" for ln in left))
        fh.flush()
        os.fsync(fh.fileno())
    publisher.close()
    return sent, len(left)


def replay_main(argv: list[str] | None = None) -> int:
    """``beampipe-zocalo-replay FILE``: resend what a ReliableSender could not deliver."""
    p = argparse.ArgumentParser(prog="beampipe-zocalo-replay", description=replay_main.__doc__)
    p.add_argument("file", type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5672)
    p.add_argument("--user", default="guest")
    p.add_argument("--password", default=os.environ.get("BEAMPIPE_AMQP_PASSWORD", "guest"))
    p.add_argument("--vhost", default="/")
    p.add_argument(
        "--no-declare", action="store_true", help="fail instead of declaring missing queues"
    )
    args = p.parse_args(argv)
    if not args.file.exists():
        print(f"{args.file}: no such fallback file, nothing to replay")
        return 0
    publisher = PikaPublisher(
        BrokerParams(args.host, args.port, args.user, args.password, args.vhost),
        declare=not args.no_declare,
    )
    sent, left = replay_fallback(args.file, publisher)
    print(f"replayed {sent} message(s) from {args.file}; {left} left")
    return 0 if left == 0 else 1
