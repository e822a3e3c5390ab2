"""Leak guards: a test that leaves threads, asyncio tasks or shared memory behind fails.

Leaks are how batching layers and transports rot: a forgotten subscription
thread or an un-unlinked segment is invisible until a beamline has run for a
week.  These guards make the test that caused one fail, by name.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

__all__ = ["SHM_PREFIXES", "new_segments", "new_threads", "snapshot_segments", "wrap_task_guard"]

#: /dev/shm names we own or Python's multiprocessing.shared_memory makes.
SHM_PREFIXES = ("bp", "beampipe", "psm_", "wnsm_")
_SHM_DIR = "/dev/shm"


def _live_threads() -> set[threading.Thread]:
    # _DummyThread stands for a foreign (libca/pvxs) thread that called into
    # Python; those belong to the C library's context, which lives for the process.
    return {
        t
        for t in threading.enumerate()
        if t.is_alive() and not isinstance(t, threading._DummyThread)
    }


def snapshot_threads() -> set[threading.Thread]:
    return _live_threads()


def new_threads(
    before: set[threading.Thread], allowed: Iterable[str] = (), grace: float = 1.0
) -> list[threading.Thread]:
    """Threads started since ``before`` that are still alive after ``grace`` seconds."""
    exact = {a for a in allowed if not a.endswith("*")}
    prefixes = tuple(a[:-1] for a in allowed if a.endswith("*"))
    deadline = time.monotonic() + grace
    while True:
        leaked = [
            t
            for t in _live_threads() - before
            if t.name not in exact and not (prefixes and t.name.startswith(prefixes))
        ]
        if not leaked or time.monotonic() >= deadline:
            return leaked
        time.sleep(0.02)


def snapshot_segments() -> set[str]:
    try:
        return {n for n in os.listdir(_SHM_DIR) if n.startswith(SHM_PREFIXES)}
    except FileNotFoundError:
        return set()


def new_segments(before: set[str], grace: float = 1.0) -> list[str]:
    """Shared-memory segments created since ``before`` that still exist after ``grace``.

    A segment another, unrelated process holds open (a second test run on the
    same host) is not this test's leak and is left out.
    """
    deadline = time.monotonic() + grace
    while True:
        leaked = sorted(snapshot_segments() - before)
        if not leaked or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    if leaked:
        foreign = _held_by_other_processes(set(leaked))
        leaked = [n for n in leaked if n not in foreign]
    return leaked


def _our_tree() -> set[int]:
    """This process and its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    return tree


def _held_by_other_processes(names: set[str]) -> set[str]:
    mine = _our_tree()
    held: set[str] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                maps = f.read()
            fds = [os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")]
        except OSError:
            continue
        for name in names - held:
            path = f"{_SHM_DIR}/{name}"
            if path in maps or any(fd.startswith(path) for fd in fds):
                held.add(name)
    return held


def wrap_task_guard(
    func: Callable[..., Awaitable[Any]], test_name: str
) -> Callable[..., Awaitable[Any]]:
    """Wrap an async test so it fails if tasks it started are still pending when it returns."""

    @functools.wraps(func)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        before = asyncio.all_tasks()
        result = await func(*args, **kwargs)
        for _ in range(3):  # let tasks that were just cancelled finish
            await asyncio.sleep(0)
        leaked = [t for t in asyncio.all_tasks() - before if not t.done()]
        if leaked:
            for task in leaked:
                task.cancel()
            await asyncio.gather(*leaked, return_exceptions=True)
            names = ", ".join(f"{t.get_name()} ({t.get_coro()!r})" for t in leaked)
            raise AssertionError(f"{test_name} left asyncio tasks pending: {names}")
        return result

    return guarded
