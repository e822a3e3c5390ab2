"""Real RabbitMQ, real ``zocalo.service`` subprocesses, a session RunEngine."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

from beampipe_zocalo import BrokerParams, delete_queues, dlq_name

VENV_BIN = Path(sys.executable).parent
ZOCALO_SERVICE = str(VENV_BIN / "zocalo.service")


@pytest.fixture(scope="session")
def run_engine() -> Any:
    # Session scope: the RunEngine's loop thread outlives every test by design.
    from bluesky import RunEngine

    return RunEngine({}, call_returns_result=False)


@pytest.fixture
def broker(rabbitmq: Any) -> BrokerParams:
    return BrokerParams(
        rabbitmq.host, rabbitmq.port, rabbitmq.username, rabbitmq.password, rabbitmq.vhost
    )


def _connect(broker: BrokerParams) -> pika.BlockingConnection:
    return pika.BlockingConnection(broker.pika())


@dataclass
class Queues:
    """Private queue names for one test; every one (and its dlq.) is deleted at teardown."""

    rabbitmq: Any
    broker: BrokerParams
    names: list[str] = field(default_factory=list)

    def __call__(self, suffix: str) -> str:
        name = self.rabbitmq.name(suffix)
        self.names += [name, dlq_name(name)]
        return name

    def track(self, name: str) -> str:
        self.names += [name, dlq_name(name)]
        return name

    def declare(self, name: str) -> None:
        """A plain durable queue, as a reply-queue owner would make it."""
        conn = _connect(self.broker)
        try:
            conn.channel().queue_declare(name, durable=True)
        finally:
            conn.close()

    def get_all(self, name: str, timeout: float = 10.0, expect: int = 1) -> list[tuple[Any, bytes]]:
        """Drain messages (properties, body) from a queue until ``expect`` arrived or timeout."""
        out: list[tuple[Any, bytes]] = []
        deadline = time.monotonic() + timeout
        conn = _connect(self.broker)
        try:
            ch = conn.channel()
            while time.monotonic() < deadline and len(out) < expect:
                method, props, body = ch.basic_get(name, auto_ack=True)
                if method is None:
                    time.sleep(0.05)
                    continue
                out.append((props, body))
        finally:
            conn.close()
        return out

    def depth(self, name: str) -> tuple[int, int]:
        conn = _connect(self.broker)
        try:
            ok = conn.channel().queue_declare(name, passive=True).method
            return ok.message_count, ok.consumer_count
        finally:
            conn.close()

    def publish_raw(self, name: str, body: bytes, headers: dict[str, Any] | None) -> None:
        conn = _connect(self.broker)
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish(
                "",
                name,
                body,
                pika.BasicProperties(headers=headers, delivery_mode=2),
                mandatory=True,
            )
        finally:
            conn.close()

    def cleanup(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            conn = _connect(self.broker)
            delete_queues(conn, self.names)
            conn.close()


@pytest.fixture
def queues(rabbitmq: Any, broker: BrokerParams) -> Iterator[Queues]:
    q = Queues(rabbitmq, broker)
    yield q
    q.cleanup()


@dataclass
class Service:
    name: str
    env: dict[str, str]
    log: Path
    transport_args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> Service:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [ZOCALO_SERVICE, "-s", self.name, *self.transport_args],
                env=self.env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def pika_args(broker: BrokerParams) -> list[str]:
    return [
        "-t",
        "GuardedPikaTransport",
        "--rabbit-host",
        broker.host,
        "--rabbit-port",
        str(broker.port),
    ]


@pytest.fixture
def services(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Start ``zocalo.service -s <name>`` subprocesses; all are stopped at teardown.

    On RabbitMQ (GuardedPikaTransport) unless ``transport_args`` says otherwise.
    """
    started: list[Service] = []

    def start(name: str, transport_args: list[str] | None = None, **settings: str) -> Service:
        if transport_args is None:
            transport_args = pika_args(request.getfixturevalue("broker"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("BEAMPIPE_ZOCALO_")}
        env.pop("ZOCALO_CONFIG", None)
        env.update({f"BEAMPIPE_ZOCALO_{k.upper()}": str(v) for k, v in settings.items()})
        svc = Service(name, env, tmp_path / f"{name}-{len(started)}.log", transport_args)
        started.append(svc)
        return svc.start()

    yield start
    for svc in started:
        svc.stop()


def wait_consumers(
    queues: Queues, name: str, n: int = 1, timeout: float = 30.0, service: Service | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
            if queues.depth(name)[1] >= n:
                return
        if service is not None and not service.alive():
            raise AssertionError(f"{service.name} exited:\n{service.output()[-3000:]}")
        time.sleep(0.2)
    out = service.output()[-3000:] if service else ""
    raise AssertionError(f"no consumer on {name} after {timeout} s\n{out}")


@dataclass
class Backend:
    """One transport the bridge runs on: RabbitMQ (GuardedPikaTransport) or ShmTransport."""

    kind: str
    name: Callable[[str], str]
    factory: Callable[[], Any]
    publisher: Callable[[], Any]
    service_args: list[str]
    queues: Queues | None = None

    def publish_raw(self, queue: str, body: bytes, headers: dict[str, Any] | None) -> None:
        if self.queues is not None:
            self.queues.publish_raw(queue, body, headers)
            return
        t = self.factory()
        t.connect()
        try:
            t.raw_send(queue, body, headers=headers)
        finally:
            t.disconnect()

    def drain(self, queue: str, n: int, timeout: float = 20) -> list[tuple[dict[str, Any], bytes]]:
        """Take up to ``n`` messages (headers, raw body) off a queue."""
        if self.queues is not None:
            return [(p.headers or {}, b) for p, b in self.queues.get_all(queue, timeout, n)]
        import queue as queue_mod

        got: queue_mod.Queue[tuple[dict[str, Any], bytes]] = queue_mod.Queue()
        t = self.factory()
        t.connect()
        out: list[tuple[dict[str, Any], bytes]] = []
        try:
            t.subscribe(
                queue,
                lambda h, m: got.put((dict(h), m)),
                acknowledgement=True,
                disable_mangling=True,
            )
            deadline = time.monotonic() + timeout
            while len(out) < n and time.monotonic() < deadline:
                try:
                    h, m = got.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue_mod.Empty:
                    break
                t.ack(h)
                out.append((h, m if isinstance(m, bytes) else str(m).encode()))
        finally:
            t.disconnect()
        return out

    def wait_ready(self, queue: str, service: Service, ready_line: str) -> None:
        if self.queues is not None:
            wait_consumers(self.queues, queue, service=service)
            return
        deadline = time.monotonic() + 30
        while ready_line not in service.output():
            if not service.alive():
                raise AssertionError(f"{service.name} exited:\n{service.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{service.name} not ready:\n{service.output()[-3000:]}")
            time.sleep(0.1)


@pytest.fixture(params=["pika", "shm"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    from beampipe_zocalo import GuardedPikaTransport, PikaPublisher, TransportPublisher

    if request.param == "pika":
        broker = request.getfixturevalue("broker")
        queues = request.getfixturevalue("queues")
        yield Backend(
            "pika",
            queues,
            lambda: GuardedPikaTransport(broker=broker),
            lambda: PikaPublisher(broker),
            pika_args(broker),
            queues,
        )
        return
    shm = pytest.importorskip("beampipe_shm")
    ns = f"bpzt{secrets.token_hex(4)}"
    yield Backend(
        "shm",
        lambda suffix: f"bptest.{suffix}",
        lambda: shm.ShmTransport(namespace=ns),
        lambda: TransportPublisher(lambda: shm.ShmTransport(namespace=ns)),
        ["-t", "ShmTransport", "--shm-namespace", ns],
    )
    shm.ShmTransport.remove_store(ns)
