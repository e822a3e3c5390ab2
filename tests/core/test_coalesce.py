"""The Coalescer with an in-memory BatchIO: real threads and a real event loop, no EPICS."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from beampipe import Batch, Coalescer, Failed, Ok, Outcome


class FakeServer:
    """Answers each batch after ``latency`` seconds on its own timer thread, like a CA reply."""

    def __init__(self, latency: float = 0.02, missing: frozenset[str] = frozenset()) -> None:
        self.latency = latency
        self.missing = missing
        self.batches: list[tuple[str, ...]] = []
        self.issue_threads: list[str] = []
        self.hang = False
        self._timers: list[threading.Timer] = []

    def issue(
        self, batch: Batch[str], complete: Callable[[Mapping[Any, Outcome[str]]], None]
    ) -> None:
        self.batches.append(batch.keys)
        self.issue_threads.append(threading.current_thread().name)
        if self.hang:
            return
        results = {k: Ok(f"{k}!") for k in batch.keys if k not in self.missing}
        timer = threading.Timer(self.latency, complete, args=(results,))
        self._timers.append(timer)
        timer.start()

    def join(self) -> None:
        for t in self._timers:
            t.join()


@pytest.fixture
def server() -> Any:
    srv = FakeServer()
    yield srv
    srv.join()


def test_lone_sync_read_is_issued_on_the_callers_thread(server: FakeServer) -> None:
    c: Coalescer[str, str] = Coalescer(server)
    assert c.get("read", "A", timeout=1) == Ok("A!")
    assert server.batches == [("A",)]
    assert server.issue_threads == [threading.current_thread().name]


def test_concurrent_threads_coalesce(server: FakeServer) -> None:
    c: Coalescer[str, str] = Coalescer(server)
    results: dict[str, Outcome[str]] = {}
    start = threading.Barrier(20)

    def worker(i: int) -> None:
        start.wait()
        results[f"PV{i}"] = c.get("read", f"PV{i}", timeout=2)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {f"PV{i}": Ok(f"PV{i}!") for i in range(20)}
    # The first arrival goes alone; the rest pile up behind it and leave together.
    assert len(server.batches) < 20
    assert sorted(k for b in server.batches for k in b) == sorted(results)


def test_get_many_is_one_batch_and_failures_stay_per_key() -> None:
    srv = FakeServer(missing=frozenset({"BAD"}))
    c: Coalescer[str, str] = Coalescer(srv)
    out = c.get_many("read", ["A", "BAD", "B", "A"], timeout=1)
    srv.join()
    assert srv.batches == [("A", "BAD", "B")]
    assert out["A"] == Ok("A!")
    assert out["B"] == Ok("B!")
    assert isinstance(out["BAD"], Failed)
    assert "BAD" in out["BAD"].reason


async def test_gather_in_one_loop_turn_is_one_batch(server: FakeServer) -> None:
    c: Coalescer[str, str] = Coalescer(server)
    keys = [f"S{i}" for i in range(200)]
    results = await asyncio.gather(*(c.get_async("read", k, timeout=2) for k in keys))
    assert results == [Ok(f"{k}!") for k in keys]
    assert server.batches == [tuple(keys)]


async def test_single_and_many_key_awaits_and_a_thread_share_one_batch(
    server: FakeServer,
) -> None:
    """Each kind of caller gets its own outcomes, however the batch's replies are shared."""
    c: Coalescer[str, str] = Coalescer(server)
    loop = asyncio.get_running_loop()
    # A thread's read of the same keys, made while the loop's batch is in flight.
    from_thread = loop.run_in_executor(None, c.get_many, "read", ["A", "Z"], 2.0)
    got = await asyncio.gather(
        c.get_async("read", "A", timeout=2),
        c.get_many_async("read", ["A", "B", "MISSING"], timeout=2),
        c.get_async("read", "B", timeout=2),
    )
    assert got[0] == Ok("A!") and got[2] == Ok("B!")
    assert got[1] == {"A": Ok("A!"), "B": Ok("B!"), "MISSING": Ok("MISSING!")}
    assert await from_thread == {"A": Ok("A!"), "Z": Ok("Z!")}
    assert not c._waiters


async def test_lone_await_is_not_held_back(server: FakeServer) -> None:
    c: Coalescer[str, str] = Coalescer(server)
    t0 = time.perf_counter()
    assert await c.get_async("read", "A", timeout=2) == Ok("A!")
    # One server latency (20 ms) and a loop turn; no waiting for company.
    assert time.perf_counter() - t0 < server.latency + 0.5
    assert server.batches == [("A",)]


def test_timeout_fails_only_the_late_request_and_frees_the_route(server: FakeServer) -> None:
    c: Coalescer[str, str] = Coalescer(server)
    server.hang = True
    out = c.get("read", "A", timeout=0.05)
    assert out == Failed("A: timed out")
    server.hang = False
    assert c.get("read", "B", timeout=1) == Ok("B!"), "a hung batch must not block the route"


async def test_async_timeout_and_cancellation(server: FakeServer) -> None:
    c: Coalescer[str, str] = Coalescer(server)
    server.hang = True
    assert await c.get_async("read", "A", timeout=0.05) == Failed("A: timed out")
    task = asyncio.create_task(c.get_async("read", "B", timeout=5))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not c._waiters, "a cancelled or expired await must not leave its waiter behind"
    server.hang = False
    assert await c.get_async("read", "C", timeout=1) == Ok("C!")


def test_an_io_layer_that_raises_fails_its_batch_not_the_caller() -> None:
    class Broken:
        def issue(self, batch: Batch[str], complete: Callable[..., None]) -> None:
            raise OSError("no CA context")

    c: Coalescer[str, str] = Coalescer(Broken(), name="beampipe-test")
    out = c.get("read", "A", timeout=1)
    assert isinstance(out, Failed)
    assert "A" in out.reason
    assert "no CA context" in out.reason


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), "1"])
def test_bad_timeout_is_refused(server: FakeServer, timeout: Any) -> None:
    c: Coalescer[str, str] = Coalescer(server)
    with pytest.raises(ValueError, match="timeout"):
        c.get("read", "A", timeout=timeout)


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), "1", 0.0])
async def test_bad_timeout_is_refused_async(server: FakeServer, timeout: Any) -> None:
    c: Coalescer[str, str] = Coalescer(server)
    with pytest.raises(ValueError, match="timeout"):
        await c.get_async("read", "A", timeout=timeout)
    assert server.batches == []


def test_no_keys_returns_at_once(server: FakeServer) -> None:
    c: Coalescer[str, str] = Coalescer(server)
    t0 = time.perf_counter()
    assert c.get_many("read", [], timeout=5) == {}
    assert time.perf_counter() - t0 < 0.5
    assert server.batches == []


async def test_a_loop_turn_is_one_planner_request_and_one_wire_batch(server: FakeServer) -> None:
    """Awaits of one turn are one request (one ticket), duplicates read once."""
    c: Coalescer[str, str] = Coalescer(server)
    requests: list[Any] = []
    real = c._planner.request

    def counting(op: str, key: Any, **kw: Any) -> int:
        requests.append(key)
        return real(op, key, **kw)

    c._planner.request = counting  # type: ignore[method-assign]
    keys = ["A", "B", "A", "C"]
    got = await asyncio.gather(
        *(c.get_async("read", k, timeout=2.0) for k in keys),
        c.get_async("read", "D", timeout=3.0),  # another timeout: its own turn, same batch
    )
    assert got == [Ok("A!"), Ok("B!"), Ok("A!"), Ok("C!"), Ok("D!")]
    assert len(requests) == 2
    assert server.batches == [("A", "B", "C", "D")]
    assert not c._waiters


async def test_a_hung_turn_fails_each_key_by_name_and_a_cancelled_await_leaves_the_rest(
    server: FakeServer,
) -> None:
    c: Coalescer[str, str] = Coalescer(server)
    server.hang = True
    tasks = [asyncio.create_task(c.get_async("read", k, timeout=0.2)) for k in ("A", "B", "C")]
    await asyncio.sleep(0.05)
    tasks[1].cancel()
    assert await tasks[0] == Failed("A: timed out")
    assert await tasks[2] == Failed("C: timed out")
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    assert not c._waiters
    server.hang = False
    first = asyncio.create_task(c.get_async("read", "X", timeout=2.0))
    second = asyncio.create_task(c.get_async("read", "Y", timeout=2.0))
    await asyncio.sleep(0)  # both joined the turn; one of them gives up before it ends
    second.cancel()
    assert await first == Ok("X!")
    assert server.batches[-1] == ("X", "Y")  # the turn still reads what it was asked


async def test_a_turn_whose_every_await_is_cancelled_is_withdrawn(server: FakeServer) -> None:
    c: Coalescer[str, str] = Coalescer(server)
    server.hang = True
    tasks = [asyncio.create_task(c.get_async("read", k, timeout=30.0)) for k in ("A", "B")]
    await asyncio.sleep(0.05)  # the turn is on the (hung) wire
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert not c._waiters and not list(c._planner.open_tickets())
    server.hang = False
    assert await c.get_async("read", "C", timeout=1.0) == Ok("C!"), "the route must be free"
