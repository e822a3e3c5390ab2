"""Real producer and reader processes for the multi-process tests.

Run as ``python shm_agents.py ROLE JSON_ARGS``; each role prints JSON lines on
stdout ("ready" when it has set up, a summary when it is done) so the test can
synchronise with it and check what it saw.  Every loop is bounded in time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np

from beampipe_shm import Producer, Reader, StreamSpec, inspect


def say(**msg: Any) -> None:
    print(json.dumps(msg), flush=True)


def spec(shape: list[int], dtype: str = "int64") -> list[StreamSpec]:
    return [StreamSpec("img", dtype, tuple(shape), units="counts")]


def produce(
    name: str,
    n: int,
    shape: list[int],
    period: float = 0.0,
    slots: int = 4,
    wait_readers: int = 0,
    linger: float = 0.0,
    close: bool = True,
    reclaim_after: float = 0.0,
) -> None:
    """Publish n frames whose every element is the frame's sequence number."""
    p = Producer(name, spec(shape), slots=slots, attrs={"who": "agent"})
    say(event="ready", pid=os.getpid(), generation=p.generation)
    deadline = time.monotonic() + 20
    while wait_readers and time.monotonic() < deadline:
        if sum(1 for r in _readers(name) if r) >= wait_readers:
            break
        time.sleep(0.01)
    t_next = time.monotonic()
    give_up = time.monotonic() + 30
    while p.frames_published < n and time.monotonic() < give_up:
        seq = p.frames_published + 1  # a dropped frame's number is reused by the next one
        with p.frame(frame_id=1000 + seq, attrs={"i": seq}) as f:
            f["img"][...] = seq
        if period:
            t_next += period
            time.sleep(max(0.0, t_next - time.monotonic()))
    say(event="done", published=p.frames_published, dropped=p.dropped)
    if reclaim_after:
        time.sleep(reclaim_after)
        p.reclaim_dead_readers()
        say(event="reclaimed", total=inspect(name).reclaimed)
    time.sleep(linger)
    if close:
        p.close()


def _readers(name: str) -> list[int]:
    return [r.pid for r in inspect(name).readers]


def produce_forever(name: str, shape: list[int], seconds: float, slots: int = 3) -> None:
    """A producer that never waits: frames back to back (to provoke torn reads)."""
    p = Producer(name, spec(shape), slots=slots)
    say(event="ready", pid=os.getpid())
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with p.frame() as f:
            f["img"][...] = f.seq  # (a dropped frame's number is reused by the next one)
    say(event="done", published=p.frames_published, dropped=p.dropped, lease_skips=p.lease_skips)
    p.close()


def produce_then_hang(name: str, shape: list[int], n: int) -> None:
    """Publish n frames, then die (SIGKILL from the test) halfway through frame n+1."""
    p = Producer(name, spec(shape), slots=4)
    for i in range(1, n + 1):
        with p.frame() as f:
            f["img"][...] = i
    f = p.frame()
    f["img"][: shape[0] // 2] = -1
    say(event="ready", pid=os.getpid(), generation=p.generation, mid_frame=f.seq)
    time.sleep(60)


def read(
    name: str,
    mode: str,
    copy: bool,
    seconds: float,
    delay: float = 0.0,
    expect_shape: list[int] | None = None,
    until_closed: bool = True,
) -> None:
    """Read for a while, checking each frame is whole (every element == its sequence)."""
    exp = spec(expect_shape) if expect_shape else None
    r = Reader(name, mode=mode, copy=copy, wait=10.0, expect=exp)  # type: ignore[arg-type]
    say(event="ready", pid=os.getpid(), generation=r.generation)
    seqs, missed, bad = [], [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        f = r.read(timeout=0.2)
        if f is None:
            if until_closed and r.producer_closed and not r.producer_alive:
                break
            continue
        a = f["img"]
        if not (a == f.seq).all() or f.frame_id != 1000 + f.seq or f.attrs.get("i") != f.seq:
            bad += 1
        seqs.append(f.seq)
        missed.append(f.missed)
        f.release()
        if delay:
            time.sleep(delay)
    say(
        event="done",
        seqs=seqs,
        missed=missed,
        bad=bad,
        torn=r.stats.torn,
        reattached=r.stats.reattached,
        generation=r.generation,
    )
    r.close()


def check_torn(name: str, seconds: float, copy: bool) -> None:
    """Read as fast as possible from a producer that never waits; count inconsistent frames."""
    r = Reader(name, mode="latest", copy=copy, wait=10.0)
    say(event="ready", pid=os.getpid())
    good = bad = changed_under_lease = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end and not r.producer_closed:
        f = r.read(timeout=0.2)
        if f is None:
            continue
        a = f["img"]
        first = int(a.flat[0])
        if (a == f.seq).all() and first == f.seq:
            good += 1
        else:
            bad += 1
        if not copy:
            again = np.array(a)  # read again later under the same lease: must not change
            if not (again == f.seq).all():
                changed_under_lease += 1
        f.release()
    say(event="done", good=good, bad=bad, changed=changed_under_lease, torn=r.stats.torn)
    r.close()


def hold(name: str, count: int) -> None:
    """Lease ``count`` frames (zero-copy) and keep them until killed."""
    r = Reader(name, mode="every", wait=10.0, max_leases=count, start="oldest")
    held: list[Any] = []
    deadline = time.monotonic() + 10
    while len(held) < count and time.monotonic() < deadline:
        f = r.read(timeout=0.2)
        if f is not None:
            held.append(f)
    say(event="ready", pid=os.getpid(), held=[f.seq for f in held])
    time.sleep(60)


def lease_briefly(name: str, mode: str, hold: float, seconds: float, spin: float = 0.0) -> None:
    """Zero-copy reader: check each frame, keep its lease ``hold`` s, release.

    The producer's next claim comes while the lease is held, so its hot-slot wait decides
    whether that slot is rewritten; a long ``hold`` is a live view that keeps a frame a while.
    Asleep between frames by default: a woken reader gets a CPU sooner than a spinning one
    that shares it with other jobs.
    """
    r = Reader(name, mode=mode, wait=10.0, spin=spin)  # type: ignore[arg-type]
    say(event="ready", pid=os.getpid())
    seqs, bad = [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        f = r.read(timeout=0.2)
        if f is None:
            if r.producer_closed and not r.producer_alive:
                break
            continue
        bad += not (f["img"] == f.seq).all()
        seqs.append(f.seq)
        if hold >= 0.001:
            time.sleep(hold)
        else:
            until = time.perf_counter() + hold
            while time.perf_counter() < until:  # (a sleep would oversleep a short hold)
                pass
        bad += not (f["img"] == f.seq).all()  # unchanged under the lease
        f.release()
    say(event="done", seqs=seqs, bad=bad)
    r.close()


def control(name: str, n: int) -> None:
    r = Reader(name, wait=10.0)
    for i in range(n):
        r.send_control(7, f"msg {i}".encode())
    say(event="ready", pid=os.getpid())
    time.sleep(60)


def wait_n(name: str, n: int, timeout: float) -> None:
    """Block in read() (futex sleep, no spinning) n times; report each frame's wake latency."""
    r = Reader(name, mode="every", start="next", wait=10.0, spin=0.0)
    say(event="ready", pid=os.getpid())
    got, lat = [], []
    for _ in range(n):
        f = r.read(timeout=timeout)
        now = time.monotonic_ns()
        if f is None:
            break
        got.append(f.seq)
        lat.append((now - f.publish_ns) / 1e3)
        f.release()
    say(event="done", got=got, latency_us=lat)
    r.close()


if __name__ == "__main__":
    role, args = sys.argv[1], json.loads(sys.argv[2])
    globals()[role](**args)
