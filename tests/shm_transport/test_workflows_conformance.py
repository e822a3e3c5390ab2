"""The transport conformance suite, run on ShmTransport and on PikaTransport + real RabbitMQ."""

from __future__ import annotations

import importlib.util
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def _load_suite() -> Any:
    # The suite is a plain module next to this file (pytest's importlib mode puts no test
    # directory on sys.path); worker processes run the same file as a script.
    name = "beampipe_shm_transport_conformance"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("transport_conformance.py")
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


suite = _load_suite()


class TestShmTransport(suite.Conformance):
    @pytest.fixture
    def backend(self) -> Iterator[Any]:
        b = suite.ShmBackend(f"t{secrets.token_hex(4)}")
        try:
            yield b
        finally:
            b.close()


class TestShmTransportFilesOnly(suite.Conformance):
    """Every message through the file store (what a full ring falls back to)."""

    @pytest.fixture
    def backend(self) -> Iterator[Any]:
        b = suite.ShmBackend(f"t{secrets.token_hex(4)}", ring_kb=0)
        try:
            yield b
        finally:
            b.close()


@pytest.mark.broker
class TestPikaTransport(suite.Conformance):
    @pytest.fixture
    def backend(self, rabbitmq: Any) -> Iterator[Any]:
        b = suite.PikaBackend(rabbitmq)
        try:
            yield b
        finally:
            b.close()

    # The reference transport itself loses messages here, intermittently: workflows 3.3's
    # PikaTransport publishes without confirms, and a producer that calls disconnect() right
    # after its last send() drops the tail of what it sent (seen: p1 140..149 and p1 104..149
    # of 450 never reached the broker, while the other producers' messages all arrived).
    # ShmTransport passes the same test strictly.  Non-strict, so every run still executes it
    # and reports XPASS/XFAIL; beampipe_zocalo's ReliableSender (confirms) is the fix for users.
    @pytest.mark.xfail(
        strict=False,
        reason="workflows 3.3 PikaTransport drops unconfirmed sends on disconnect()",
    )
    def test_many_producers_and_consumers(self, backend: Any) -> None:
        super().test_many_producers_and_consumers(backend)
