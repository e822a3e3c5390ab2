"""RabbitMQ for tests: the real broker on loopback, or a clear skip (a failure under CI)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field

__all__ = ["Broker", "BrokerUnavailable", "find_broker"]


class BrokerUnavailable(RuntimeError):
    """No broker answers where the tests expect one."""


@dataclass
class Broker:
    """Where the test broker is, plus a per-test namespace for queue and exchange names."""

    host: str = "127.0.0.1"
    port: int = 5672
    username: str = "guest"
    password: str = "guest"
    vhost: str = "/"
    namespace: str = field(default_factory=lambda: f"bptest.{secrets.token_hex(4)}")

    def name(self, suffix: str) -> str:
        """A queue or topic name private to this test, so parallel runs never share one."""
        return f"{self.namespace}.{suffix}"

    @property
    def url(self) -> str:
        return f"amqp://{self.username}:{self.password}@{self.host}:{self.port}/%2F"

    def reachable(self, timeout: float = 1.0) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout):
                return True
        except OSError:
            return False

    def restart(self, timeout: float = 60.0) -> None:
        """Stop and start the broker's application, as an operator's restart would.

        Connections drop; durable queues and persistent messages survive.
        """
        self.stop(timeout)
        self.start(timeout)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the broker's application; returns once it is down (connections dropped).

        A test that must send while the broker is away stops it here and starts it later,
        rather than starting a restart and hoping its sends land in the gap.
        """
        self._ctl("stop_app", timeout)

    def start(self, timeout: float = 60.0) -> None:
        """Start the broker's application again and wait until it takes connections."""
        self._ctl("start_app", timeout)
        self.wait(timeout)

    def _ctl(self, command: str, timeout: float) -> None:
        ctl = shutil.which("rabbitmqctl")
        if ctl is None:
            raise BrokerUnavailable("rabbitmqctl is not on PATH: cannot restart the broker")
        subprocess.run([ctl, command], check=True, capture_output=True, timeout=timeout)

    def wait(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.reachable():
                return
            time.sleep(0.2)
        raise BrokerUnavailable(f"RabbitMQ did not come back on {self.host}:{self.port}")


def find_broker() -> Broker:
    """The broker named by BEAMPIPE_AMQP_HOST/PORT (default 127.0.0.1:5672), if it answers."""
    broker = Broker(
        host=os.environ.get("BEAMPIPE_AMQP_HOST", "127.0.0.1"),
        port=int(os.environ.get("BEAMPIPE_AMQP_PORT", "5672")),
    )
    if not broker.reachable():
        raise BrokerUnavailable(
            f"no RabbitMQ on {broker.host}:{broker.port} "
            "(start it with `rabbitmq-server -detached`)"
        )
    return broker
