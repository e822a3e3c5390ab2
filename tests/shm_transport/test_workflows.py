"""ShmTransport beyond the shared conformance suite: options, errors, numpy, fork, zocalo."""

from __future__ import annotations

import argparse
import gc
import json
import optparse
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import workflows
import workflows.transport

from beampipe_shm._workflows import (
    THREAD_NAME,
    ShmStoreFull,
    ShmTransport,
    ShmTransportNotConnected,
)

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent


class Inbox:
    def __init__(self) -> None:
        self.items: list[tuple[dict[str, Any], Any]] = []
        self.cond = threading.Condition()

    def __call__(self, header: dict[str, Any], message: Any) -> None:
        with self.cond:
            self.items.append((header, message))
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 10.0) -> list[tuple[dict[str, Any], Any]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= n, timeout), (
                f"got {len(self.items)} of {n} messages"
            )
            return list(self.items)


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = f"t{secrets.token_hex(4)}"
    yield ns
    ShmTransport.remove_store(ns)


@pytest.fixture
def connect(namespace: str) -> Iterator[Any]:
    made: list[ShmTransport] = []

    def make(**kw: Any) -> ShmTransport:
        t = ShmTransport(namespace=namespace, janitor_interval=0.2, **kw)
        t.connect()
        made.append(t)
        return t

    yield make
    for t in made:
        t.disconnect()


@pytest.fixture
def clean_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ShmTransport, "config", {})


def test_registered_as_workflows_transport() -> None:
    assert workflows.transport.get_known_transports()["ShmTransport"] is ShmTransport
    assert workflows.transport.lookup("ShmTransport") is ShmTransport


@pytest.mark.usefixtures("clean_config")
def test_command_line_options_argparse_and_optparse(namespace: str) -> None:
    before = set(os.listdir("/dev/shm"))
    parser = argparse.ArgumentParser()
    # workflows instantiates every transport here: that must open nothing.
    workflows.transport.add_command_line_options(parser, transport_argument=True)
    args = parser.parse_args(["-t", "ShmTransport", "--shm-namespace", namespace])
    assert args.transport == "ShmTransport"
    assert ShmTransport().namespace == namespace
    assert ShmTransport().store_path == f"/dev/shm/bpwf-{namespace}"
    assert not any(t.name == THREAD_NAME for t in threading.enumerate())
    assert set(os.listdir("/dev/shm")) - before == set()

    ShmTransport.config = {}
    op = optparse.OptionParser()
    workflows.transport.add_command_line_options(op, transport_argument=True)
    op.parse_args(["--shm-namespace", "other", "--shm-delivery-limit", "3"])
    assert ShmTransport().namespace == "other"
    assert ShmTransport.config["--shm-delivery-limit"] == 3


@pytest.mark.usefixtures("clean_config")
def test_namespace_from_environment(monkeypatch: pytest.MonkeyPatch, namespace: str) -> None:
    monkeypatch.setenv("BEAMPIPE_SHM_NAMESPACE", namespace)
    t = ShmTransport()
    assert t.namespace == namespace
    t.connect()
    try:
        assert os.path.isdir(f"/dev/shm/bpwf-{namespace}/q")
    finally:
        t.disconnect()
    assert ShmTransport(namespace="explicit").namespace == "explicit"


def test_clear_errors_before_connect_and_after_disconnect(namespace: str) -> None:
    t = ShmTransport(namespace=namespace)
    with pytest.raises(ShmTransportNotConnected, match="before connect"):
        t.send("some.queue", {"x": 1})
    with pytest.raises(ShmTransportNotConnected, match=r"some\.queue"):
        t.subscribe("some.queue", print)
    with pytest.raises(ShmTransportNotConnected):
        t.broadcast_status({"host": "h", "workflows": "1", "status": 1})
    assert not t.is_connected()
    t.connect()
    assert t.is_connected()
    t.disconnect()
    assert not t.is_connected()
    with pytest.raises(ShmTransportNotConnected):
        t.send("some.queue", "late")


def test_reconnect_after_disconnect(connect: Any, namespace: str) -> None:
    tx = connect()
    rx = ShmTransport(namespace=namespace, janitor_interval=5)  # poll timeouts: 1 s
    for round_ in range(2):
        rx.connect()
        inbox = Inbox()
        rx.subscribe("again", inbox)
        time.sleep(0.2)  # the consumer is asleep: only the writer's bell can wake it
        start = time.monotonic()
        tx.send("again", round_)
        assert inbox.wait(1)[0][1] == round_
        assert time.monotonic() - start < 0.3, "woken by the bell, not by a timeout"
        rx.disconnect()


def test_bad_names_and_arguments_name_the_queue(connect: Any) -> None:
    t = connect()
    with pytest.raises(ValueError, match="'a/b'"):
        t.send("a/b", 1)
    with pytest.raises(ValueError, match="non-empty"):
        t.send("", 1)
    with pytest.raises(ValueError, match=r"'q\.delay'"):
        t.send("q.delay", 1, delay=-1)
    with pytest.raises(TypeError, match=r"'q\.raw'"):
        t.raw_send("q.raw", {"not": "bytes"})
    with pytest.raises(TypeError, match="not JSON"):
        t.send("q.hdr", 1, headers={"obj": object()})


def test_store_full_is_a_clear_error(connect: Any) -> None:
    free = os.statvfs("/dev/shm")
    reserve_mb = free.f_bavail * free.f_frsize / 2**20 + 1  # more than there is
    t = connect(reserve_mb=reserve_mb)
    with pytest.raises(ShmStoreFull, match=r"'jobs'.*reserved"):
        t.send("jobs", {"x": 1})
    assert t.queue_depth("jobs") == 0


def test_full_ring_falls_back_to_files(connect: Any) -> None:
    tx, rx = connect(ring_kb=1), connect(ring_kb=1)
    for i in range(40):  # ~80 bytes each: the 1 KiB ring holds about ten
        tx.send("spill", {"i": i})
    assert tx.queue_depth("spill") == 40
    assert len(os.listdir(f"{tx.store_path}/q/spill/ready")) > 20
    inbox = Inbox()
    rx.subscribe("spill", inbox, acknowledgement=True, prefetch_count=5)
    got = []
    while len(got) < 40:
        h, m = inbox.wait(len(got) + 1)[len(got)]
        got.append(m["i"])
        rx.ack(h)
    assert sorted(got) == list(range(40))
    assert tx.queue_depth("spill") == 0


def test_numpy_payload_is_memory_mapped(connect: Any) -> None:
    tx, rx = connect(), connect()
    inbox = Inbox()
    rx.subscribe("frames", inbox, disable_mangling=True)
    image = np.arange(1024 * 1024, dtype=np.float64).reshape(1024, 1024)  # 8 MiB
    tx.raw_send("frames", image, headers={"frame": 3})
    [(header, got)] = inbox.wait(1)
    assert header["frame"] == 3
    assert isinstance(got, np.ndarray)
    assert got.shape == image.shape and got.dtype == image.dtype
    assert np.array_equal(got, image)
    assert not got.flags.writeable
    assert got.ctypes.data % 64 == 0


@pytest.mark.parametrize("ack", [False, True])
def test_array_files_are_reused_only_after_ack_and_unmap(connect: Any, ack: bool) -> None:
    """A consumer's view stays intact after ack; its file is reused once every view is gone."""
    tx, rx = connect(), connect()
    inbox = Inbox()
    rx.subscribe("reuse", inbox, disable_mangling=True, acknowledgement=ack)
    pool = Path(tx.store_path) / "pool"
    frame = np.empty((512, 512), dtype=np.float64)  # 2 MiB: pooled (>= 1 MiB)

    def send(value: float) -> np.ndarray:
        frame.fill(value)
        tx.raw_send("reuse", frame)
        [(header, got)] = inbox.wait(1)
        inbox.items.clear()  # the test holds the only references
        if ack:
            rx.ack(header)
        return got

    first = send(1.0)
    kept = first[100:200]  # a view of a view: keeps the mapping alive on its own
    del first
    second = send(2.0)  # first is acked but mapped: its file must not be reused
    assert list(pool.iterdir()) == []
    assert (kept == 1.0).all() and (second == 2.0).all()
    del kept
    gc.collect()
    assert len(list(pool.iterdir())) == 1  # acked and unmapped: parked for reuse
    inode = next(pool.iterdir()).stat().st_ino
    third = send(3.0)
    assert list(pool.iterdir()) == []  # the send took the parked file ...
    assert (third == 3.0).all() and (second == 2.0).all()  # ... without touching live views
    mapped = Path(rx.store_path) / "c" / rx._cid / "m"
    assert inode in {p.stat().st_ino for p in mapped.iterdir()}
    del second, third
    gc.collect()
    assert len(list(pool.iterdir())) == 2
    assert list(mapped.iterdir()) == []


def test_redelivered_array_file_is_not_reused(connect: Any) -> None:
    """A nacked array may still be mapped by its first consumer: never recycle it."""
    tx, rx = connect(), connect()
    inbox = Inbox()
    rx.subscribe("again", inbox, disable_mangling=True, acknowledgement=True)
    tx.raw_send("again", np.full((512, 512), 7.0))
    h1, first = inbox.wait(1)[0]
    rx.nack(h1)
    h2 = inbox.wait(2)[1][0]
    assert h2["redelivered"] is True
    rx.ack(h2)
    del inbox.items[1]
    gc.collect()
    assert list((Path(tx.store_path) / "pool").iterdir()) == []
    tx.raw_send("again", np.full((512, 512), 8.0))
    h3, third = inbox.wait(2)[-1]  # (the redelivery was dropped above)
    rx.ack(h3)
    assert (first == 7.0).all() and (third == 8.0).all()


@pytest.mark.parametrize("middleware", [False, True])
def test_send_and_ack_run_workflows_middleware(connect: Any, middleware: bool) -> None:
    """send()/ack() skip workflows' middleware chain only when there is none to run."""
    from workflows.transport.middleware import CounterMiddleware

    tx, rx = connect(), connect()
    counters = [CounterMiddleware(), CounterMiddleware()]
    if middleware:
        tx.add_middleware(counters[0])
        rx.add_middleware(counters[1])
    inbox = Inbox()
    rx.subscribe("mw", inbox, acknowledgement=True, prefetch_count=10)
    for i in range(3):
        tx.send("mw", {"i": i})
    got = inbox.wait(3)
    assert [m for _, m in got] == [{"i": 0}, {"i": 1}, {"i": 2}]
    for h, _ in got:
        rx.ack(h)
    with pytest.raises(workflows.Error, match="without message ID"):
        rx.ack({"subscription": got[0][0]["subscription"]})
    with pytest.raises(workflows.Error, match="without subscription ID"):
        rx.ack(got[0][0]["message-id"])
    assert counters[0].send_count == (3 if middleware else 0)
    assert counters[1].ack_count == (3 if middleware else 0)
    assert tx.queue_depth("mw") == 0


def test_delay_and_expiration(connect: Any) -> None:
    tx, rx = connect(), connect()
    tx.declare_queue("short", delivery_limit=5)
    tx.send("short", "stale", expiration=0.2)
    time.sleep(0.4)
    inbox, dead = Inbox(), Inbox()
    start = time.monotonic()
    tx.send("short", "later", delay=0.5)
    rx.subscribe("short", inbox)
    rx.subscribe("dlq.short", dead)
    [(_, msg)] = inbox.wait(1)
    assert msg == "later"
    assert time.monotonic() - start >= 0.45
    [(h, m)] = dead.wait(1)
    assert m == "stale"
    assert h["x-death"][0]["reason"] == "expired"


def test_dead_consumer_recovered_when_next_process_connects(namespace: str, connect: Any) -> None:
    env = dict(os.environ)
    spec = {"kind": "shm", "namespace": namespace, "mode": "hold", "queue": "work"}
    worker = subprocess.Popen(
        [sys.executable, str(HERE / "transport_conformance.py"), "worker", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert worker.stdout is not None
        assert json.loads(worker.stdout.readline())["ready"]
        tx = connect()
        tx.send("work", {"n": 1})
        assert json.loads(worker.stdout.readline())["message"] == {"n": 1}
        assert tx.queue_depth("work") == 0
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        # No consumer is running: the next process to connect returns the message.
        later = connect()
        assert later.queue_depth("work") == 1
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.communicate(timeout=10)


@pytest.mark.parametrize("when", ["before-commit", "after-log"])
def test_transaction_is_all_or_nothing_across_sigkill(
    namespace: str, connect: Any, when: str
) -> None:
    spec = {
        "kind": "shm",
        "namespace": namespace,
        "mode": "txcrash",
        "queue": "txjobs",
        "reply": "txdone",
        "when": when,
    }
    worker = subprocess.Popen(
        [sys.executable, str(HERE / "transport_conformance.py"), "worker", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        assert json.loads(worker.stdout.readline())["ready"]
        client = connect()
        client.send("txjobs", "job-1")
        assert worker.wait(15) == -signal.SIGKILL
        jobs, done = Inbox(), Inbox()
        client.subscribe("txdone", done)
        client.subscribe("txjobs", jobs, acknowledgement=True)
        time.sleep(1.0)  # > janitor interval: the dead worker has been recovered
        if when == "before-commit":  # nothing happened: the job comes back, no reply
            [(h, m)] = jobs.wait(1)
            assert m == "job-1" and h["redelivered"] is True
            assert done.items == []
        else:  # committed: the reply exists and the job stays acknowledged
            [(_, m)] = done.wait(1)
            assert m == {"done": "job-1"}
            assert jobs.items == []
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.communicate(timeout=10)


def test_forked_child_gives_up_the_parents_consumer(connect: Any) -> None:
    t = connect()
    lock_fd = t._lock_fd
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            t.send("x", 1)
            code = 2
        except ShmTransportNotConnected:
            pass
        try:
            os.fstat(lock_fd)
            code = 3  # still open: the parent's death would be hidden from other processes
        except OSError:
            pass
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    t.send("x", 1)  # the parent is unaffected


def test_callback_error_disconnects_like_pika(connect: Any) -> None:
    tx, rx = connect(), connect()

    def boom(header: dict[str, Any], message: Any) -> None:
        raise RuntimeError("service bug")

    rx.subscribe("boom", boom, acknowledgement=True)
    tx.send("boom", 1)
    deadline = time.monotonic() + 10
    while rx.is_connected() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not rx.is_connected()
    with pytest.raises(workflows.Disconnected, match="service bug"):
        rx.send("boom", 2)
    rx.disconnect()  # returns the un-acknowledged message
    assert tx.queue_depth("boom") == 1


def _service_env(tmp_path: Path) -> dict[str, str]:
    # Register the test's EchoService the way an installed package would: an entry point in
    # a dist-info directory on the service's sys.path.
    dist = tmp_path / "beampipe_shm_echo-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: beampipe-shm-echo\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        "[workflows.services]\nShmEcho = transport_conformance:EchoService\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(HERE)])
    return env


@pytest.mark.slow
def test_zocalo_service_runs_without_broker(tmp_path: Path, namespace: str, connect: Any) -> None:
    cmd = [
        str(VENV_BIN / "zocalo.service"),
        "-s",
        "ShmEcho",
        "-t",
        "ShmTransport",
        "--shm-namespace",
        namespace,
        "--rabbit-port",
        "1",  # prove no broker is used: nothing listens on port 1
    ]
    proc = subprocess.Popen(
        cmd,
        env=_service_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        client = connect()
        status, replies = Inbox(), Inbox()
        client.subscribe_broadcast("transient.status", status)
        reply = client.subscribe_temporary("echo", replies)
        for i in range(3):
            client.send("shmtest.echo", {"reply_to": reply.queue_name, "payload": i})
        got = replies.wait(3, timeout=60)
        assert sorted(m["echo"] for _, m in got) == [0, 1, 2]
        assert all(m["pid"] != proc.pid for _, m in got), "answered by the forked service"
        statuses = status.wait(1, timeout=30)
        assert any(m.get("serviceclass") == "EchoService" for _, m in statuses)
        assert client.queue_depth("shmtest.echo") == 0
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=10)
    assert "Traceback" not in out, out[-3000:]
