"""The fixtures every plugin relies on: real IOCs on loopback, the broker, the leak guards."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from beampipe.testing import LOOPBACK_ENV, Broker, Ioc, IocError

DB = Path(__file__).with_name("fixture_test.db")


def test_epics_is_pinned_to_loopback_with_private_ports() -> None:
    for key, value in LOOPBACK_ENV.items():
        if key not in ("EPICS_CA_ADDR_LIST", "EPICS_PVA_ADDR_LIST"):
            assert os.environ[key] == value
    for entry in os.environ["EPICS_CA_ADDR_LIST"].split():
        assert entry.startswith("127.0.0.1:")
    assert os.environ["EPICS_PVA_ADDR_LIST"].startswith("127.0.0.1:")


def test_two_iocs_at_once_are_both_reachable_over_ca_and_pva(ioc_factory) -> None:
    import epics
    from p4p.client.thread import Context

    a = ioc_factory(DB, macros={"VAL": "1.5"})
    b = ioc_factory(DB, macros={"VAL": "2.5"})
    assert a.prefix != b.prefix
    assert epics.caget(a.pv("ai"), timeout=5, use_monitor=False) == 1.5
    assert epics.caget(b.pv("ai"), timeout=5, use_monitor=False) == 2.5
    with Context("pva") as ctx:
        assert ctx.get(a.pv("ai"), timeout=5) == 1.5
        assert ctx.get(b.pv("ai"), timeout=5) == 2.5


def test_restart_keeps_prefix_and_state_resets(ioc_factory) -> None:
    from p4p.client.thread import Context

    ioc = ioc_factory(DB, macros={"VAL": "1.5"})
    first_pid = ioc.pid
    with Context("pva") as ctx:
        ctx.put(ioc.pv("ai"), 9.0)
        assert ctx.get(ioc.pv("ai"), timeout=5) == 9.0
        ioc.restart()
        assert ioc.pid != first_pid
        assert ioc.starts == 2
        assert ctx.get(ioc.pv("ai"), timeout=10) == 1.5


def test_kill_is_a_crash(ioc_factory) -> None:
    ioc = ioc_factory(DB, macros={"VAL": "0"})
    ioc.kill()
    assert not ioc.running
    ioc.start()
    assert ioc.running


def test_bad_database_fails_with_the_iocs_own_words(tmp_path: Path) -> None:
    with pytest.raises(IocError, match="does not exist"):
        Ioc(tmp_path / "missing.db")
    bad = tmp_path / "bad.db"
    bad.write_text('record(nosuchtype, "$(P)x") {}\n')
    ioc = Ioc(bad)
    with pytest.raises(IocError, match=r"nosuchtype|exited"):
        ioc.start()
    ioc.close()


def test_rabbitmq_fixture_gives_a_live_broker_and_private_names(rabbitmq: Broker) -> None:
    with socket.create_connection((rabbitmq.host, rabbitmq.port), timeout=2):
        pass
    assert rabbitmq.name("q") != Broker().name("q")
    assert rabbitmq.name("q").startswith("bptest.")


@pytest.mark.parametrize(("ci", "outcome"), [("true", "errors"), ("", "skipped")])
def test_missing_broker_skips_locally_and_fails_under_ci(
    pytester: pytest.Pytester, ci: str, outcome: str
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    pytester.makepyfile("def test_needs_broker(rabbitmq):\n    pass\n")
    env = {"BEAMPIPE_AMQP_PORT": str(closed), "CI": ci}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(**{outcome: 1})
    result.stdout.fnmatch_lines([f"*no RabbitMQ on 127.0.0.1:{closed}*"])


LEAKY = """
import asyncio, threading, time
from multiprocessing import shared_memory

def test_thread():
    threading.Thread(target=time.sleep, args=(5,), name="leaky-thread", daemon=True).start()

async def test_task():
    asyncio.get_running_loop().create_task(asyncio.sleep(5), name="leaky-task")

def test_shm():
    shm = shared_memory.SharedMemory(create=True, size=64, name="bpleaktest")
    shm.close()

import pytest
@pytest.mark.allow_leaks("threads")
def test_allowed_thread():
    threading.Thread(target=time.sleep, args=(2,), name="allowed", daemon=True).start()
"""


def test_leak_guards_fail_the_leaking_test_by_name(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(LEAKY)
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    finally:
        from multiprocessing import shared_memory

        try:
            leftover = shared_memory.SharedMemory(name="bpleaktest")
            leftover.close()
            leftover.unlink()
        except FileNotFoundError:
            pass
    result.stdout.fnmatch_lines(
        [
            "*test_thread leaked: threads still running: leaky-thread*",
            "*test_shm leaked: shared memory left in /dev/shm: bpleaktest*",
            "*test_task left asyncio tasks pending: leaky-task*",
        ]
    )
    # A leaked thread or segment errors the test at teardown; a leaked task fails it.
    result.assert_outcomes(passed=3, errors=2, failed=1)
