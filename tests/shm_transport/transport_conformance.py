"""A workflows transport conformance suite, written once, run against every transport.

What zocalo services rely on from PikaTransport on RabbitMQ (issue 6) is stated here as
tests on a ``backend`` fixture: ``test_workflows_conformance.py`` runs the class against
ShmTransport and against PikaTransport on the real broker.  A transport that passes can
replace the other under a service unchanged.

This file is also a small program (``python transport_conformance.py worker SPEC``): the
worker processes the tests start, SIGKILL and count, each with its own transport, so
"another process" really is one.  And it defines ``EchoService``, a trivial workflows
service the zocalo.service test registers and runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue as queue_module
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import workflows
from workflows.services.common_service import CommonService
from workflows.transport.common_transport import CommonTransport

HERE = Path(__file__).resolve().parent


# -- backends -----------------------------------------------------------------------------


class Backend:
    """How the suite makes connected transports and declares queues on one kind of transport."""

    kind = ""

    def __init__(self) -> None:
        self._transports: list[CommonTransport] = []
        self._procs: list[subprocess.Popen[str]] = []

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def _make(self) -> CommonTransport:
        return make_transport(self.spec())

    def transport(self) -> CommonTransport:
        t = self._make()
        self._transports.append(t)
        return t

    def name(self, suffix: str) -> str:
        raise NotImplementedError

    def queue(self, suffix: str, *, delivery_limit: int = 50) -> str:
        """A fresh durable queue whose dead-letter queue is ``dlq.<queue>``."""
        raise NotImplementedError

    def topic(self, suffix: str) -> str:
        raise NotImplementedError

    def spawn(self, mode: str, **kw: Any) -> subprocess.Popen[str]:
        spec = dict(self.spec(), mode=mode, **kw)
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "transport_conformance.py"), "worker", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)
        for t in self._transports:
            with contextlib.suppress(Exception):
                t.disconnect()


class ShmBackend(Backend):
    kind = "shm"

    def __init__(self, namespace: str, ring_kb: int = 4096) -> None:
        super().__init__()
        self.namespace = namespace
        self.ring_kb = ring_kb
        self._admin: Any = None

    def spec(self) -> dict[str, Any]:
        return {"kind": "shm", "namespace": self.namespace, "ring_kb": self.ring_kb}

    def admin(self) -> Any:
        if self._admin is None:
            self._admin = self.transport()
        return self._admin

    def name(self, suffix: str) -> str:
        return suffix

    def queue(self, suffix: str, *, delivery_limit: int = 50) -> str:
        self.admin().declare_queue(suffix, delivery_limit=delivery_limit)
        return suffix

    def topic(self, suffix: str) -> str:
        return suffix

    def close(self) -> None:
        from beampipe_shm._workflows import ShmTransport

        super().close()
        ShmTransport.remove_store(self.namespace)


class PikaBackend(Backend):
    kind = "pika"

    def __init__(self, broker: Any) -> None:
        super().__init__()
        import pika

        self.broker = broker
        self._conn = pika.BlockingConnection(
            pika.ConnectionParameters(
                host=broker.host,
                port=broker.port,
                credentials=pika.PlainCredentials(broker.username, broker.password),
            )
        )
        self._ch = self._conn.channel()
        self._queues: list[str] = []
        self._exchanges: list[str] = []

    def spec(self) -> dict[str, Any]:
        b = self.broker
        return {"kind": "pika", "host": b.host, "port": b.port, "user": b.username,
                "password": b.password}  # fmt: skip

    def name(self, suffix: str) -> str:
        return str(self.broker.name(suffix))

    def queue(self, suffix: str, *, delivery_limit: int = 50) -> str:
        # What zocalo.configure_rabbitmq sets up at DLS: quorum queues dead-lettering to dlq.*
        name = self.name(suffix)
        for q in (f"dlq.{name}", name):
            self._ch.queue_delete(q)
        self._ch.queue_declare(f"dlq.{name}", durable=True, arguments={"x-queue-type": "quorum"})
        self._ch.queue_declare(
            name,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": delivery_limit,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": f"dlq.{name}",
            },
        )
        self._queues += [name, f"dlq.{name}"]
        return name

    def topic(self, suffix: str) -> str:
        name = self.name(suffix)
        self.declare_exchange(name)
        return name

    def declare_exchange(self, name: str) -> None:
        self._ch.exchange_declare(name, exchange_type="fanout", durable=True)
        if name not in self._exchanges:
            self._exchanges.append(name)

    def close(self) -> None:
        super().close()
        for q in self._queues:
            with contextlib.suppress(Exception):
                self._ch.queue_delete(q)
        for x in self._exchanges:
            if x != "transient.status":
                with contextlib.suppress(Exception):
                    self._ch.exchange_delete(x)
        self._conn.close()


def make_transport(spec: dict[str, Any]) -> CommonTransport:
    """A connected transport from a JSON-able spec (so worker processes can make one too)."""
    t: CommonTransport
    if spec["kind"] == "shm":
        from beampipe_shm._workflows import ShmTransport

        t = ShmTransport(
            namespace=spec["namespace"], janitor_interval=0.2, ring_kb=spec.get("ring_kb")
        )
    else:
        from workflows.transport.pika_transport import PikaTransport

        t = PikaTransport()
        # workflows keeps options and subscriptions in class-level dicts shared by every
        # instance of a process; give each of our instances its own so they cannot collide.
        t.config = {  # type: ignore[misc]
            "--rabbit-host": spec["host"],
            "--rabbit-port": spec["port"],
            "--rabbit-user": spec["user"],
            "--rabbit-pass": spec["password"],
        }
        t._CommonTransport__subscriptions = {}  # type: ignore[attr-defined]
        t._CommonTransport__transactions = set()  # type: ignore[attr-defined]
    assert t.connect()
    return t


# -- helpers ------------------------------------------------------------------------------


class Inbox:
    """Collects (header, message) pairs from a subscription callback, thread-safely."""

    def __init__(self, on_message: Callable[[dict[str, Any], Any], None] | None = None) -> None:
        self.items: list[tuple[dict[str, Any], Any]] = []
        self._cond = threading.Condition()
        self._on_message = on_message

    def __call__(self, header: dict[str, Any], message: Any) -> None:
        with self._cond:
            self.items.append((dict(header), message))
            self._cond.notify_all()
        if self._on_message is not None:
            self._on_message(header, message)

    def wait(self, n: int, timeout: float = 10.0) -> list[tuple[dict[str, Any], Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.items) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"got {len(self.items)} of {n} messages in {timeout} s")
                self._cond.wait(left)
            return list(self.items)

    def quiet(self, seconds: float = 0.5) -> int:
        """Wait and return how many messages arrived in total (for 'nothing more' checks)."""
        time.sleep(seconds)
        with self._cond:
            return len(self.items)


def read_lines(proc: subprocess.Popen[str], n: int, timeout: float) -> list[dict[str, Any]]:
    """Read ``n`` JSON lines from a worker, failing with its stderr if it dies or stalls."""
    out: list[dict[str, Any]] = []

    def reader() -> None:
        assert proc.stdout is not None
        while len(out) < n:
            line = proc.stdout.readline()
            if not line:
                return
            out.append(json.loads(line))

    th = threading.Thread(target=reader, name="conformance-reader", daemon=True)
    th.start()
    th.join(timeout)
    if len(out) < n:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        th.join(5)
        raise AssertionError(f"worker gave {len(out)} of {n} lines; stderr:\n{err[-3000:]}")
    return out


# -- the suite ----------------------------------------------------------------------------


class Conformance:
    """Semantics a workflows transport must share with PikaTransport on RabbitMQ."""

    def test_queue_roundtrip_headers_and_json(self, backend: Backend) -> None:
        q = backend.queue("roundtrip")
        tx, rx = backend.transport(), backend.transport()
        inbox = Inbox()
        sid = rx.subscribe(q, inbox, acknowledgement=True)
        tx.send(q, {"a": [1, 2.5, "x"], "b": None}, headers={"custom": "yes"})
        [(header, message)] = inbox.wait(1)
        assert message == {"a": [1, 2.5, "x"], "b": None}
        assert header["custom"] == "yes"
        assert header["subscription"] == sid
        assert header["redelivered"] is False
        assert header["routing_key"] == q
        assert header["exchange"] == ""
        assert header["consumer_tag"] == str(sid)
        assert header["message-id"]
        rx.ack(header)

    def test_plain_strings_and_disabled_mangling(self, backend: Backend) -> None:
        q = backend.queue("mangling")
        tx, rx = backend.transport(), backend.transport()
        mangled, raw = Inbox(), Inbox()
        rx.subscribe(q, mangled)
        tx.send(q, "just text")
        tx.raw_send(q, "not json {")
        assert [m for _, m in mangled.wait(2)] == ["just text", b"not json {"]
        q2 = backend.queue("raw")
        rx.subscribe(q2, raw, disable_mangling=True)
        tx.send(q2, {"k": 1})
        [(_, body)] = raw.wait(1)
        assert json.loads(body) == {"k": 1}
        assert isinstance(body, bytes)

    def test_competing_consumers_each_message_once(self, backend: Backend) -> None:
        q = backend.queue("compete")
        tx = backend.transport()
        consumers = [backend.transport() for _ in range(2)]
        inboxes = []
        for c in consumers:

            def ack_later(h: dict[str, Any], m: Any, c: CommonTransport = c) -> None:
                time.sleep(0.005)
                c.ack(h)

            inbox = Inbox(ack_later)
            c.subscribe(q, inbox, acknowledgement=True, prefetch_count=1)
            inboxes.append(inbox)
        for i in range(40):
            tx.send(q, {"i": i})
        deadline = time.monotonic() + 15
        while sum(len(b.items) for b in inboxes) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        got = sorted(m["i"] for b in inboxes for _, m in b.items)
        assert got == list(range(40))
        assert all(b.items for b in inboxes), "both competing consumers should get work"

    def test_prefetch_limits_unacknowledged(self, backend: Backend) -> None:
        q = backend.queue("prefetch")
        tx, rx = backend.transport(), backend.transport()
        inbox = Inbox()
        rx.subscribe(q, inbox, acknowledgement=True, prefetch_count=2)
        for i in range(5):
            tx.send(q, i)
        inbox.wait(2)
        assert inbox.quiet(0.5) == 2
        rx.ack(inbox.items[0][0])
        inbox.wait(3)
        assert inbox.quiet(0.3) == 3
        for h, _ in inbox.items[1:]:
            rx.ack(h)
        assert [m for _, m in inbox.wait(5)] == [0, 1, 2, 3, 4]

    def test_nack_with_requeue_redelivers(self, backend: Backend) -> None:
        q = backend.queue("nack-requeue")
        tx, rx = backend.transport(), backend.transport()
        inbox = Inbox()
        rx.subscribe(q, inbox, acknowledgement=True)
        tx.send(q, {"n": 1})
        h1, m1 = inbox.wait(1)[0]
        assert h1["redelivered"] is False
        rx.nack(h1)
        h2, m2 = inbox.wait(2)[1]
        assert m2 == m1 == {"n": 1}
        assert h2["redelivered"] is True
        assert h2["x-delivery-count"] == 1
        rx.ack(h2)

    def test_nack_without_requeue_dead_letters(self, backend: Backend) -> None:
        q = backend.queue("reject")
        tx, rx, dl = backend.transport(), backend.transport(), backend.transport()
        inbox, dead = Inbox(), Inbox()
        rx.subscribe(q, inbox, acknowledgement=True)
        tx.send(q, {"bad": True}, headers={"origin": "test"})
        rx.nack(inbox.wait(1)[0][0], requeue=False)
        dl.subscribe(f"dlq.{q}", dead, acknowledgement=True)
        [(h, m)] = dead.wait(1)
        assert m == {"bad": True}
        assert h["origin"] == "test"
        assert h["x-death"][0]["reason"] == "rejected"
        assert h["x-death"][0]["queue"] == q
        assert h["x-first-death-reason"] == "rejected"
        assert h["routing_key"] == f"dlq.{q}"
        assert inbox.quiet(0.3) == 1
        dl.ack(h)

    def test_delivery_limit_dead_letters(self, backend: Backend) -> None:
        q = backend.queue("limit", delivery_limit=2)
        tx, rx, dl = backend.transport(), backend.transport(), backend.transport()
        inbox, dead = Inbox(lambda h, m: rx.nack(h, requeue=True)), Inbox()
        rx.subscribe(q, inbox, acknowledgement=True)
        tx.send(q, "poison")
        inbox.wait(3)
        dl.subscribe(f"dlq.{q}", dead)
        [(h, m)] = dead.wait(1)
        assert m == "poison"
        assert h["x-death"][0]["reason"] == "delivery_limit"
        assert h["x-first-death-queue"] == q
        assert inbox.quiet(0.3) == 3, "delivered once plus delivery_limit redeliveries"

    def test_broadcast_fans_out_to_current_subscribers(self, backend: Backend) -> None:
        topic = backend.topic("fanout")
        tx = backend.transport()
        tx.broadcast(topic, "before anyone listens")
        a, b = backend.transport(), backend.transport()
        ina, inb = Inbox(), Inbox()
        a.subscribe_broadcast(topic, ina)
        sid_b = b.subscribe_broadcast(topic, inb)
        tx.broadcast(topic, {"to": "both"}, headers={"h": 1})
        [(ha, ma)] = ina.wait(1)
        [(_, mb)] = inb.wait(1)
        assert ma == mb == {"to": "both"}
        assert ha["exchange"] == topic
        assert ha["h"] == 1
        b.unsubscribe(sid_b)
        tx.broadcast(topic, "only a")
        ina.wait(2)
        assert inb.quiet(0.3) == 1
        assert [m for _, m in ina.items] == [{"to": "both"}, "only a"]

    def test_subscribe_temporary_returns_queue_name(self, backend: Backend) -> None:
        rx, tx = backend.transport(), backend.transport()
        inbox = Inbox()
        sub = rx.subscribe_temporary("reply", inbox)
        assert sub.queue_name.startswith("transient.reply.")
        tx.send(sub.queue_name, {"answer": 42})
        [(h, m)] = inbox.wait(1)
        assert m == {"answer": 42}
        assert h["subscription"] == sub.subscription_id
        rx.unsubscribe(sub.subscription_id)

    def test_transaction_commit_and_abort_sends(self, backend: Backend) -> None:
        q = backend.queue("tx-send")
        tx, rx = backend.transport(), backend.transport()
        inbox = Inbox()
        rx.subscribe(q, inbox)
        t1 = tx.transaction_begin()
        tx.send(q, "committed", transaction=t1)
        assert inbox.quiet(0.3) == 0
        tx.transaction_commit(t1)
        inbox.wait(1)
        t2 = tx.transaction_begin()
        tx.send(q, "aborted", transaction=t2)
        tx.transaction_abort(t2)
        # Not tx.send(): PikaTransport leaves its shared channel in AMQP tx mode after a
        # transaction, so its later plain sends wait for the next commit (a Pika quirk).
        backend.transport().send(q, "after")
        inbox.wait(2)
        assert inbox.quiet(0.3) == 2
        assert [m for _, m in inbox.items] == ["committed", "after"]

    def test_transaction_acks(self, backend: Backend) -> None:
        q = backend.queue("tx-ack")
        tx = backend.transport()
        rx = backend.transport()
        inbox = Inbox()
        sid = rx.subscribe(q, inbox, acknowledgement=True, prefetch_count=10)
        tx.send(q, "keep")
        tx.send(q, "done")
        (h_keep, _), (h_done, _) = inbox.wait(2)
        # An ack in a transaction that is not bound to the subscription is refused, as by Pika.
        loose = rx.transaction_begin()
        with pytest.raises(workflows.Error):
            rx.ack(h_keep, transaction=loose)
        rx.transaction_abort(loose)
        aborted = rx.transaction_begin(subscription_id=sid)
        rx.ack(h_keep, transaction=aborted)
        rx.transaction_abort(aborted)
        committed = rx.transaction_begin(subscription_id=sid)
        rx.ack(h_done, transaction=committed)
        rx.send(q, "sent with the ack", transaction=committed)
        rx.transaction_commit(committed)
        inbox.wait(3)
        assert inbox.items[2][1] == "sent with the ack"
        rx.ack(inbox.items[2][0])
        # The aborted ack left "keep" un-acknowledged: closing the consumer returns it.
        rx.disconnect()
        other = Inbox()
        backend.transport().subscribe(q, other, acknowledgement=True)
        [(h, m)] = other.wait(1)
        assert m == "keep"
        assert h["redelivered"] is True
        assert other.quiet(0.5) == 1

    def test_broadcast_status(self, backend: Backend) -> None:
        if isinstance(backend, PikaBackend):
            backend.declare_exchange("transient.status")
        listener, frontend = backend.transport(), backend.transport()
        inbox = Inbox()
        listener.subscribe_broadcast("transient.status", inbox)
        with pytest.raises(ValueError, match="host"):
            frontend.broadcast_status({"status": 1})
        host = f"conformance-{os.getpid()}-{time.monotonic_ns()}"
        frontend.broadcast_status({"host": host, "workflows": workflows.version(), "status": 1})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any(isinstance(m, dict) and m.get("host") == host for _, m in inbox.items):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("status broadcast not received")

    def test_messages_outlive_producer_and_consumer(self, backend: Backend) -> None:
        q = backend.queue("durable")
        producer = backend.spawn("produce", queue=q, count=5, tag="p")
        assert producer.wait(timeout=60) == 0, producer.communicate()[1]
        first = backend.transport()
        inbox = Inbox()
        first.subscribe(q, inbox, acknowledgement=True, prefetch_count=2)
        (h1, _), _ = inbox.wait(2)
        first.ack(h1)
        first.disconnect()  # one acked, one delivered-not-acked, three waiting
        again = Inbox()
        second = backend.transport()
        second.subscribe(q, again, acknowledgement=True, prefetch_count=10)
        got = again.wait(4)
        assert again.quiet(0.3) == 4
        assert sorted(m["i"] for _, m in got) == [1, 2, 3, 4]
        for h, _ in got:
            second.ack(h)

    def test_consumer_sigkill_mid_message_is_redelivered(self, backend: Backend) -> None:
        q = backend.queue("sigkill")
        worker = backend.spawn("hold", queue=q)
        assert read_lines(worker, 1, 30)[0]["ready"]
        tx = backend.transport()
        tx.send(q, {"job": 7})
        [seen] = read_lines(worker, 1, 15)
        assert seen["message"] == {"job": 7}
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        inbox = Inbox()
        rx = backend.transport()
        rx.subscribe(q, inbox, acknowledgement=True)
        [(h, m)] = inbox.wait(1, timeout=20)
        assert m == {"job": 7}
        assert h["redelivered"] is True
        rx.ack(h)

    def test_acked_message_stays_acked_after_consumer_sigkill(self, backend: Backend) -> None:
        # The ack comes from another thread than the transport's (as in a workflows service)
        # while the consumer is idle: it must take effect without further traffic.
        q = backend.queue("ackkill")
        worker = backend.spawn("mainack", queue=q)
        assert read_lines(worker, 1, 30)[0]["ready"]
        tx = backend.transport()
        tx.send(q, {"job": 1})
        seen, acked = read_lines(worker, 2, 15)
        assert seen["message"] == {"job": 1} and acked == {"acked": {"job": 1}}
        time.sleep(0.05)  # the ack takes effect promptly, not at the next janitor round
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        tx.send(q, {"job": 2})
        inbox = Inbox()
        rx = backend.transport()
        rx.subscribe(q, inbox, acknowledgement=True)
        [(h, m)] = inbox.wait(1, timeout=20)
        assert m == {"job": 2} and h["redelivered"] is False
        rx.ack(h)
        assert inbox.quiet(1.5) == 1  # > janitor interval: the dead worker was recovered

    def test_many_producers_and_consumers(self, backend: Backend) -> None:
        q = backend.queue("many")
        per, producers, consumers = 150, 3, 3
        workers = [backend.spawn("consume", queue=q) for _ in range(consumers)]
        for w in workers:
            assert read_lines(w, 1, 30)[0]["ready"]
        senders = [
            backend.spawn("produce", queue=q, count=per, tag=f"p{i}") for i in range(producers)
        ]
        for s in senders:
            assert s.wait(timeout=60) == 0, s.communicate()[1]
        got: list[dict[str, Any]] = []
        per_worker: dict[int, int] = {}
        lock = threading.Lock()
        total = per * producers

        def drain(w: subprocess.Popen[str]) -> None:
            assert w.stdout is not None
            for line in w.stdout:
                with lock:
                    got.append(json.loads(line)["message"])
                    per_worker[w.pid] = per_worker.get(w.pid, 0) + 1

        threads = [threading.Thread(target=drain, args=(w,), name="drain") for w in workers]
        for th in threads:
            th.start()
        deadline = time.monotonic() + 60
        while len(got) < total and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # any duplicate would arrive now
        for w in workers:
            w.terminate()
        for th in threads:
            th.join(30)
        for w in workers:
            w.wait(30)
        keys = sorted((m["tag"], m["i"]) for m in got)
        errors = "".join(w.stderr.read()[-1500:] for w in workers if w.stderr is not None)
        want = sorted((f"p{p}", i) for p in range(producers) for i in range(per))
        missing = sorted(set(want) - set(keys))
        assert len(keys) == total, (
            f"{len(keys)} of {total} delivered; missing {missing}; "
            f"per consumer {per_worker}; workers said:\n{errors}"
        )
        assert keys == sorted((f"p{p}", i) for p in range(producers) for i in range(per))

    def test_bounded_stress(self, backend: Backend) -> None:
        q = backend.queue("stress")
        n, senders = 1500, 2
        consumers = [backend.transport() for _ in range(2)]
        seen: list[tuple[int, int]] = []
        lock = threading.Lock()
        for c in consumers:

            def on(h: dict[str, Any], m: Any, c: CommonTransport = c) -> None:
                with lock:
                    seen.append((m[0], m[1]))
                c.ack(h)

            c.subscribe(q, on, acknowledgement=True, prefetch_count=20)
        producers = [backend.transport() for _ in range(senders)]

        def send(k: int) -> None:
            for i in range(n):
                producers[k].send(q, [k, i])

        threads = [threading.Thread(target=send, args=(k,), name="stress") for k in range(senders)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        deadline = time.monotonic() + 60
        while len(seen) < n * senders and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        assert sorted(seen) == [(k, i) for k in range(senders) for i in range(n)]


# -- worker processes ---------------------------------------------------------------------


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker(spec: dict[str, Any]) -> None:
    """A real, separate process: produce, consume (acking) or hold (never ack) messages."""
    t = make_transport(spec)
    mode, queue = spec["mode"], spec["queue"]
    if mode == "produce":
        for i in range(spec["count"]):
            t.send(queue, {"tag": spec["tag"], "i": i})
        t.disconnect()
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if mode == "txcrash":
        # Die inside a transaction: before commit, or after the redo log is written but
        # before it is applied (ShmTransport only: it patches the transport's _apply).
        sid = 0

        def on_job(header: dict[str, Any], message: Any) -> None:
            txn = t.transaction_begin(subscription_id=sid)
            t.ack(header, transaction=txn)
            t.send(spec["reply"], {"done": message}, transaction=txn)
            if spec["when"] == "after-log":
                t._apply = lambda manifest: os.kill(os.getpid(), signal.SIGKILL)  # type: ignore[attr-defined]
                t.transaction_commit(txn)
            os.kill(os.getpid(), signal.SIGKILL)

        sid = t.subscribe(queue, on_job, acknowledgement=True)
        _emit({"ready": True})
        stop.wait(120)
        return

    if mode == "mainack":  # callbacks on the transport's thread, acks from the main thread
        todo: queue_module.Queue[tuple[dict[str, Any], Any]] = queue_module.Queue()

        def on_job(header: dict[str, Any], message: Any) -> None:
            _emit({"message": message, "redelivered": header["redelivered"]})
            todo.put((header, message))

        t.subscribe(queue, on_job, acknowledgement=True, prefetch_count=5)
        _emit({"ready": True})
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                header, message = todo.get(timeout=0.05)
            except queue_module.Empty:
                continue
            t.ack(header)
            _emit({"acked": message})
        t.disconnect()
        return

    def on_message(header: dict[str, Any], message: Any) -> None:
        _emit({"message": message, "redelivered": header["redelivered"]})
        if mode == "consume":
            t.ack(header)

    t.subscribe(queue, on_message, acknowledgement=True, prefetch_count=1 if mode == "hold" else 5)
    _emit({"ready": True})
    stop.wait(120)
    t.disconnect()


class EchoService(CommonService):
    """Replies to every message on ``shmtest.echo`` (at ``reply_to``) inside a transaction."""

    _service_name = "ShmEcho"
    _logger_name = "beampipe_shm.test.echo"

    def initializing(self) -> None:
        self._sid = self._transport.subscribe(
            "shmtest.echo", self.on_message, acknowledgement=True, prefetch_count=5
        )

    def on_message(self, header: dict[str, Any], message: Any) -> None:
        txn = self._transport.transaction_begin(subscription_id=self._sid)
        self._transport.ack(header, transaction=txn)
        self._transport.send(
            message["reply_to"],
            {"echo": message["payload"], "pid": os.getpid()},
            transaction=txn,
        )
        self._transport.transaction_commit(txn)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        worker(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: transport_conformance.py worker SPEC_JSON")
