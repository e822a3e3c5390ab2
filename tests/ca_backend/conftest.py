from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

HERE = Path(__file__).parent
TEST_DB = HERE / "ca_test.db"
BANK_SIZE = 200


def bank_db(path: Path, n: int = BANK_SIZE) -> Path:
    """A database of ``n`` ao records ``$(P)s<i>`` (VAL=i) and ``n`` 1000-double waveforms."""
    lines = [
        f'record(ao, "$(P)s{i}") {{ field(VAL, "{i}") field(PREC, "2") field(EGU, "V") }}'
        for i in range(n)
    ]
    lines += [
        f'record(waveform, "$(P)w{i}") {{ field(FTVL, "DOUBLE") field(NELM, "1000") }}'
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def ioc(session_ioc_factory):
    """The typed-records IOC, shared by the session (tests that restart it use their own)."""
    return session_ioc_factory(TEST_DB)


@pytest.fixture(scope="session")
def bank_ioc(session_ioc_factory, tmp_path_factory):
    return session_ioc_factory(bank_db(tmp_path_factory.mktemp("bank") / "bank.db"))


@pytest.fixture(autouse=True)
def _purge_aioca_channels(ioc_factory):
    """aioca caches channels per event loop and pytest-asyncio gives each test a new loop.

    Channels of a closed loop would call into it on the next connection event,
    so clear them after every test (a real session has one loop and never needs this),
    before the test's own IOCs stop (hence ``ioc_factory``: torn down after this).
    """
    yield
    import sys

    if "aioca" in sys.modules:
        sys.modules["aioca"].purge_channel_caches()


def _free_slot_port() -> int:
    """A port from EPICS_CA_ADDR_LIST that no IOC of this process has bound (highest first).

    The pytest plugin gives this process a block of CA ports and lists them all in
    EPICS_CA_ADDR_LIST; softIocs take them from the bottom, so a caproto IOC takes
    one from the top and libca searches it like any other.
    """
    import os
    import socket

    ports = [int(a.rpartition(":")[2]) for a in os.environ["EPICS_CA_ADDR_LIST"].split()]
    for port in sorted(ports, reverse=True):
        socks = []
        try:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                s = socket.socket(socket.AF_INET, kind)
                socks.append(s)
                if kind == socket.SOCK_STREAM:
                    # As CA servers do: a port in TIME_WAIT from the last IOC is reusable.
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free CA port in EPICS_CA_ADDR_LIST for the caproto IOC")


@contextlib.contextmanager
def caproto_ioc(module: str, prefix: str, pv_to_check: str, log_path: Path):
    """Run one of caproto's (or ophyd's) example IOCs on a free CA port of this process."""
    import os
    import subprocess
    import sys
    import time

    port = _free_slot_port()
    env = {**os.environ, "EPICS_CA_SERVER_PORT": str(port), "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--prefix", prefix, "--interfaces", "127.0.0.1"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            import beampipe_ca

            deadline = time.monotonic() + 30
            while beampipe_ca.connect([pv_to_check], timeout=1.0):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{module} did not come up: {log_path.read_text()}")
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def motor_record_ioc(tmp_path):
    """caproto's fake motor-record IOC (mtr1: velocity 1, limits 0..10); yields the motor PV."""
    import secrets

    prefix = f"BPM{secrets.token_hex(3).upper()}:"
    module = "caproto.ioc_examples.fake_motor_record"
    with caproto_ioc(module, prefix, f"{prefix}mtr1.DMOV", tmp_path / "motor.log"):
        yield f"{prefix}mtr1"


def pytest_configure(config):
    # ophyd's own test module (imported by test_ophyd_upstream.py) marks its motor tests.
    config.addinivalue_line("markers", "motorsim: ophyd's marker for its motor-simulator tests")
