"""The hot-slot wait's counters seen from outside the producer (docs/shm_transport.md,
"Which slot"): the producer stores ``hot_wait_hits/misses/skips/ns`` in the segment header
when they change, so ``inspect()`` and ``beampipe-shm inspect`` in another process show what
the producer object counts.  Decisions are pinned by counters, not by timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from beampipe_shm import Producer, Reader, StreamSpec, inspect

SMALL = [StreamSpec("img", "int64", (8, 8))]
MIB = [StreamSpec("img", "uint16", (1024, 512))]  # 1 MiB: the wait is on by default
KEYS = ("hot_wait_hits", "hot_wait_misses", "hot_wait_skips", "hot_wait_ns")


def fill(p: Producer, value: int) -> int:
    with p.frame() as f:
        f["img"][...] = value
    assert not f.dropped
    return f.seq


def counted(p: Producer) -> dict[str, int]:
    return {k: getattr(p, k) for k in KEYS}


def cli(*args: str) -> str:
    """``beampipe-shm ARGS`` in a process of its own (its own mapping of the segment)."""
    out = subprocess.run(
        [sys.executable, "-m", "beampipe_shm._cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def inspected_elsewhere(name: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(cli("inspect", name, "--json"))
    return info


def wait_for_readers(name: str, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(inspect(name).readers) < n:
        assert time.monotonic() < deadline, f"{n} reader(s) did not register"
        time.sleep(0.01)


def test_a_fresh_stream_and_one_that_never_waits_show_zeros(shm_name: str) -> None:
    """Big slots (the wait is on) but a reader that has read each frame before the next claim:
    the newest slot is taken without waiting, so nothing is counted, and nothing is stored."""
    with Producer(shm_name, MIB, slots=3) as p, Reader(shm_name) as r:
        assert p.hot_wait > 0
        info = inspect(shm_name)
        assert {k: getattr(info, k) for k in KEYS} == dict.fromkeys(KEYS, 0)
        for i in range(1, 6):
            fill(p, i)
            f = r.read(timeout=0)
            assert f is not None
            f.release()
        assert counted(p) == dict.fromkeys(KEYS, 0)
        info = inspect(shm_name)
        assert info.frames == 5
        assert {k: getattr(info, k) for k in KEYS} == dict.fromkeys(KEYS, 0)
        text = cli("inspect", shm_name)  # beampipe-shm inspect NAME, from another process
        assert "frames 5 " in text
        assert "hot-wait hits 0  misses 0  skips 0  waited 0.000 ms" in text


def test_hits_misses_and_skips_show_in_inspect(
    shm_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One wait that ends with the slot free (the reader lets go inside it, from the producer's
    clock: a fixed order of events), then a reader that holds a frame for good: every wait runs
    out, and more are skipped after each.  Another process's inspect reports each count."""
    with Producer(shm_name, SMALL, slots=4, hot_wait=0.01) as p, Reader(shm_name) as r:
        for i in (1, 2):  # two commits: the producer knows its frame interval (a budget)
            fill(p, i)
            f = r.read(timeout=0)
            assert f is not None
            f.release()
        fill(p, 3)
        held = r.read(timeout=0)
        assert held is not None
        real = time.monotonic_ns
        calls = first = 0

        def clock() -> int:
            nonlocal calls, first
            calls += 1
            if calls == 1:
                first = real()
                return first
            if calls == 2:  # released inside the wait, and no time has passed: a hit
                held.release()
                return first
            return real()

        monkeypatch.setattr(time, "monotonic_ns", clock)
        frame = p.frame()
        monkeypatch.undo()
        assert calls >= 2
        assert (p.hot_wait_hits, p.hot_wait_misses, p.hot_wait_skips) == (1, 0, 0)
        frame["img"][...] = 4
        frame.publish()
        kept = r.read(timeout=0)  # ... and never released: the waits for it run out
        assert kept is not None
        assert kept.seq == 4
        for i in range(5, 41):
            fill(p, i)
        assert p.dropped == 0
        mine = counted(p)
        assert mine["hot_wait_hits"] == 1
        assert mine["hot_wait_misses"] >= 1
        assert mine["hot_wait_skips"] >= 1
        assert mine["hot_wait_ns"] > 0
        seen = inspected_elsewhere(shm_name)
        assert {k: seen[k] for k in KEYS} == mine
        info = inspect(shm_name)
        assert {k: getattr(info, k) for k in KEYS} == mine
        line = (
            f"hot-wait hits 1  misses {mine['hot_wait_misses']}  "
            f"skips {mine['hot_wait_skips']}  waited {mine['hot_wait_ns'] / 1e6:.3f} ms"
        )
        assert line in info.format()
        kept.release()
    # the next producer of the name makes a new segment: its counters start at zero
    with Producer(shm_name, SMALL, hot_wait=0.01):
        info = inspect(shm_name)
        assert {k: getattr(info, k) for k in KEYS} == dict.fromkeys(KEYS, 0)


def test_a_reader_in_another_process_and_an_inspector_in_a_third(
    shm_name: str, agents: Any
) -> None:
    """A live view in its own process holds each frame 30 ms while frames come every ~1 ms:
    the producer's waits for it run out and are then skipped.  What it counted is what an
    inspector in a third process reads, while the producer is still up."""
    viewer = agents("lease_briefly", name=shm_name, mode="latest", hold=0.03, seconds=20)
    with Producer(shm_name, SMALL, slots=4, hot_wait=0.0002) as p:
        viewer.expect("ready")
        wait_for_readers(shm_name, 1)
        deadline = time.monotonic() + 10
        i = 0
        # until the viewer has made the producer wait (it may be slow to get a CPU), bounded
        while i < 100 or (p.hot_wait_misses < 1 and time.monotonic() < deadline):
            i += 1
            with p.frame() as f:
                f["img"][...] = i
                time.sleep(0.001)
        assert p.dropped == 0
        mine = counted(p)
        assert mine["hot_wait_misses"] >= 1, mine
        assert mine["hot_wait_ns"] > 0
        seen = inspected_elsewhere(shm_name)
        assert seen["frames"] == i
        assert {k: seen[k] for k in KEYS} == mine
    done = viewer.expect("done")
    assert done["bad"] == 0
