"""Fixtures for the frame-transport tests: unique stream names and real agent processes."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

AGENTS = Path(__file__).with_name("shm_agents.py")


class Agent:
    """A producer or reader in its own process, talking JSON lines on stdout."""

    def __init__(self, role: str, **kwargs: Any) -> None:
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, str(AGENTS), role, json.dumps(kwargs)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._buf = b""
        self.messages: list[dict[str, Any]] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, event: str, timeout: float = 20.0) -> dict[str, Any]:
        """Wait (bounded) for the agent to print ``{"event": event, ...}``."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                self.messages.append(json.loads(line))
            for m in self.messages:
                if m.get("event") == event:
                    self.messages.remove(m)
                    return m
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._buf += chunk
        err = b""
        if self.proc.poll() is not None and self.proc.stderr is not None:
            err = self.proc.stderr.read()
        raise AssertionError(
            f"agent {self.role} (pid {self.pid}) did not report {event!r} within {timeout} s; "
            f"exit={self.proc.poll()} stderr={err.decode(errors='replace')[-2000:]}"
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        self.kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def shm_name() -> str:
    """A stream name no other test (or parallel run) uses."""
    return f"t{os.getpid()}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def agents() -> Iterator[Any]:
    """Start agent processes: ``agents("produce", name=..., n=...)``; all are killed at teardown."""
    started: list[Agent] = []

    def start(role: str, **kwargs: Any) -> Agent:
        agent = Agent(role, **kwargs)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.close()
