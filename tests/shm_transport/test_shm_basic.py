"""Single-process behaviour of the frame transport: API, schema, leases, errors, control, inspect.

A producer and readers in one process still talk only through /dev/shm (each
opens its own descriptor and mapping), so these exercise the real protocol.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from beampipe_shm import (
    ControlRingFull,
    FrameTooLarge,
    LeaseLimitReached,
    NameInUse,
    Producer,
    Reader,
    ReaderLimitReached,
    Schema,
    SchemaMismatch,
    StreamNotFound,
    StreamSpec,
    inspect,
    list_streams,
)

IMG = StreamSpec("img", "uint16", (8, 6), units="counts", description="detector image")


def one(name: str, **kw: object) -> Producer:
    return Producer(name, [IMG], **kw)  # type: ignore[arg-type]


def fill(p: Producer, value: int, **kw: object) -> int | None:
    with p.frame(**kw) as f:  # type: ignore[arg-type]
        f["img"][...] = value
    return f.seq if not f.dropped else None


def test_schema_travels_with_the_stream(shm_name: str) -> None:
    streams = [
        IMG,
        StreamSpec("pos", "<f8", (3,), units="mm"),
        StreamSpec("events", [("t", "<f8"), ("x", "<i4")], (100,), variable=True),
    ]
    with Producer(shm_name, streams, attrs={"detector": "eiger"}) as p, Reader(shm_name) as r:
        assert r.schema == p.schema
        assert r.schema["img"].units == "counts"
        assert r.schema["events"].dtype.names == ("t", "x")
        assert r.schema.attrs == {"detector": "eiger"}
        assert Schema.from_json(json.loads(json.dumps(p.schema.to_json()))) == p.schema


def test_write_in_place_and_read_zero_copy(shm_name: str) -> None:
    with one(shm_name) as p, Reader(shm_name, mode="every") as r:
        assert r.read(timeout=0) is None
        t0 = time.time()
        with p.frame(frame_id=77, attrs={"exposure": 0.1}) as f:
            f["img"][...] = np.arange(48).reshape(8, 6)
        with r.read(timeout=1) as got:
            assert got is not None
            assert got.seq == 1
            assert got.frame_id == 77
            assert got.attrs == {"exposure": 0.1}
            assert got.timestamp >= t0 - 1
            assert got.missed == 0
            a = got["img"]
            assert a.dtype == np.uint16
            assert a.shape == (8, 6)
            assert (a == np.arange(48).reshape(8, 6)).all()
            assert not a.flags.writeable
            with pytest.raises(ValueError, match="read-only"):
                a[0, 0] = 1
            with pytest.raises(ValueError, match=r"WRITEABLE|writeable"):
                a.flags.writeable = True
            assert got.leased
        assert not got.leased
        with pytest.raises(RuntimeError, match="released"):
            got["img"]


def test_publish_copies_and_validates(shm_name: str) -> None:
    streams = [IMG, StreamSpec("wave", "f8", (10,), variable=True)]
    with Producer(shm_name, streams) as p, Reader(shm_name, mode="every", copy=True) as r:
        seq = p.publish({"img": np.full((8, 6), 3, np.uint16), "wave": np.arange(4.0)}, frame_id=-5)
        assert seq == 1
        got = r.read(timeout=1)
        assert got is not None
        assert got.frame_id == -5
        assert got["wave"].tolist() == [0.0, 1.0, 2.0, 3.0]
        assert got["img"].flags.writeable  # a copy is the caller's
        with pytest.raises(FrameTooLarge, match="wave"):
            p.publish({"img": np.zeros((8, 6), np.uint16), "wave": np.zeros(11)})
        with pytest.raises(FrameTooLarge, match="img"):
            p.publish({"img": np.zeros((9, 6), np.uint16), "wave": np.zeros(1)})
        with pytest.raises(SchemaMismatch, match="shape"):
            p.publish({"img": np.zeros((6, 8), np.uint16), "wave": np.zeros(1)})
        with pytest.raises(SchemaMismatch, match="streams"):
            p.publish({"img": np.zeros((8, 6), np.uint16)})
        with pytest.raises(SchemaMismatch, match="dtype"):
            p.publish({"img": np.zeros((8, 6), np.float64), "wave": np.zeros(1)})
        with pytest.raises(SchemaMismatch, match="pass a mapping"):
            p.publish(np.zeros((8, 6), np.uint16))
        with pytest.raises(FrameTooLarge, match="rows"):
            p.frame(rows={"wave": 11})
        with pytest.raises(FrameTooLarge, match="attributes"):
            p.publish(
                {"img": np.zeros((8, 6), np.uint16), "wave": np.zeros(1)}, attrs={"x": "y" * 5000}
            )
        # none of the rejected frames became visible, and the stream goes on
        assert p.publish({"img": np.ones((8, 6), np.uint16), "wave": np.ones(2)}) is not None
        got = r.read(timeout=1)
        assert got is not None
        assert got.missed == 0
        assert got["wave"].tolist() == [1.0, 1.0]


def test_copy_out_into_callers_buffer(shm_name: str) -> None:
    with one(shm_name) as p, Reader(shm_name) as r:
        fill(p, 9)
        buf = np.zeros((8, 6), np.uint16)
        got = r.read(timeout=1, out={"img": buf})
        assert got is not None
        assert got["img"] is buf
        assert (buf == 9).all()
        assert not got.leased
        with pytest.raises(SchemaMismatch, match="out"):
            r.read(timeout=0, out={"img": np.zeros((8, 6), np.int32)})


def test_latest_mode_skips_the_backlog_every_mode_does_not(shm_name: str) -> None:
    with (
        one(shm_name, slots=8) as p,
        Reader(shm_name, mode="latest", copy=True) as latest,
        Reader(shm_name, mode="every", copy=True) as every,
    ):
        for i in range(1, 6):
            fill(p, i)
        f = latest.read(timeout=0)
        assert f is not None
        assert f.seq == 5
        assert (f["img"] == 5).all()
        assert f.missed == 4
        assert latest.read(timeout=0) is None
        got = [every.read(timeout=0) for _ in range(5)]
        assert [g.seq for g in got if g] == [1, 2, 3, 4, 5]
        assert all(g is not None and (g["img"] == g.seq).all() for g in got)
        assert every.read(timeout=0) is None


def test_every_mode_counts_the_frames_it_missed(shm_name: str) -> None:
    with one(shm_name, slots=3) as p, Reader(shm_name, mode="every", copy=True) as r:
        fill(p, 1)
        assert r.read(timeout=0).seq == 1  # type: ignore[union-attr]
        for i in range(2, 12):
            fill(p, i)
        seqs, missed = [], 0
        while (f := r.read(timeout=0)) is not None:
            seqs.append(f.seq)
            missed += f.missed
        assert seqs == sorted(seqs)
        assert seqs[-1] == 11
        assert len(seqs) + missed == 10  # every frame is either delivered or counted
        assert r.stats.missed == missed > 0


def test_producer_never_overwrites_a_leased_slot(shm_name: str) -> None:
    with one(shm_name, slots=3) as p, Reader(shm_name, mode="latest", max_leases=2) as r:
        fill(p, 1)
        held = r.read(timeout=0)
        assert held is not None
        for i in range(2, 50):
            fill(p, i)
        assert (held["img"] == 1).all()  # 48 frames later, still frame 1
        assert held.seq == 1
        assert p.dropped == 0
        held.release()
        # with the lease gone the slot is reused
        for i in range(50, 60):
            fill(p, i)
        assert inspect(shm_name).readers[0].leases == 0


def test_every_slot_leased_drops_and_counts_the_frame(shm_name: str) -> None:
    with (
        one(shm_name, slots=2) as p,
        Reader(shm_name, mode="every", max_leases=2, start="oldest") as r,
    ):
        fill(p, 1)
        fill(p, 2)
        a, b = r.read(timeout=0), r.read(timeout=0)
        assert a is not None
        assert b is not None
        assert fill(p, 3) is None  # nowhere to put it
        assert p.dropped == 1
        assert inspect(shm_name).dropped == 1
        assert (a["img"] == 1).all()
        assert (b["img"] == 2).all()
        a.release()
        assert fill(p, 4) == 3  # the sequence has no hole: drops are counted, not numbered
        b.release()


def test_lease_limit_and_garbage_collection_release(shm_name: str) -> None:
    with one(shm_name, slots=6) as p, Reader(shm_name, mode="every", max_leases=2) as r:
        for i in range(1, 5):
            fill(p, i)
        r.read(timeout=0)  # not kept: released when garbage-collected
        f2 = r.read(timeout=0)
        f3 = r.read(timeout=0)
        with pytest.raises(LeaseLimitReached, match=shm_name):
            r.read(timeout=0)
        img = f3["img"]  # an array keeps its lease after the frame object goes
        del f2, f3
        f4 = r.read(timeout=0)
        assert f4 is not None
        assert f4.seq == 4
        assert (img == 3).all()
        del img, f4


def test_errors_name_the_stream(shm_name: str) -> None:
    with pytest.raises(StreamNotFound, match=shm_name):
        Reader(shm_name)
    t0 = time.monotonic()
    with pytest.raises(StreamNotFound):
        Reader(shm_name, wait=0.2)
    assert 0.15 < time.monotonic() - t0 < 2
    with one(shm_name, max_readers=2) as p:
        with pytest.raises(NameInUse, match=f"{shm_name}.*live producer.*pid {os.getpid()}"):
            one(shm_name)
        with pytest.raises(SchemaMismatch, match="img: dtype uint16 != expected float32"):
            Reader(shm_name, expect=[StreamSpec("img", "f4", (8, 6))])
        with pytest.raises(SchemaMismatch, match="no stream 'other'"):
            Reader(shm_name, expect=StreamSpec("other", "u2", (8, 6)))
        r1, r2 = Reader(shm_name), Reader(shm_name)
        with pytest.raises(ReaderLimitReached, match="max_readers"):
            Reader(shm_name)
        r1.close()
        Reader(shm_name).close()  # a freed record is reused
        r2.close()
        with pytest.raises(RuntimeError, match="still open"), p.frame():
            p.frame()
    with pytest.raises(ValueError, match="stream name"):
        Producer("../etc", [IMG])
    with pytest.raises(ValueError, match="object"):
        Producer(shm_name, [StreamSpec("o", object, (1,))])
    with pytest.raises(ValueError, match="slots"):
        one(shm_name, slots=1)
    with pytest.raises(ValueError, match="unique"):
        Producer(shm_name, [IMG, IMG])
    with pytest.raises(ValueError, match="mode"):
        Reader(shm_name, mode="oldest")  # type: ignore[arg-type]


def test_aborted_frame_is_never_visible(shm_name: str) -> None:
    with one(shm_name) as p, Reader(shm_name, mode="every", copy=True) as r:
        fill(p, 1)

        def write_then_fail() -> None:
            with p.frame() as f:
                f["img"][...] = 99
                raise ZeroDivisionError

        with pytest.raises(ZeroDivisionError):
            write_then_fail()
        fill(p, 2)
        seqs = [r.read(timeout=0), r.read(timeout=0), r.read(timeout=0)]
        assert [(s.seq, int(s["img"][0, 0])) for s in seqs if s] == [(1, 1), (2, 2)]


def test_blocking_read_times_out_and_wakes(shm_name: str) -> None:
    with one(shm_name) as p, Reader(shm_name, spin=0.0) as r:
        t0 = time.monotonic()
        assert r.read(timeout=0.3) is None
        assert 0.25 < time.monotonic() - t0 < 1.5
        t0 = time.monotonic()
        assert r.read(timeout=0) is None
        assert time.monotonic() - t0 < 0.2  # (generous: other jobs share the 2 cores)
        fill(p, 1)
        t0 = time.monotonic()
        f = r.read(timeout=5)
        assert f is not None
        assert time.monotonic() - t0 < 0.5
        f.release()


def test_clean_close_ends_iteration_and_removes_the_segment(shm_name: str) -> None:
    p = one(shm_name)
    path = f"/dev/shm/bp.{shm_name}"
    assert os.path.exists(path)
    assert shm_name in list_streams()
    r = Reader(shm_name, mode="every", copy=True)
    for i in range(1, 4):
        fill(p, i)
    p.close()
    assert not os.path.exists(path)
    assert r.producer_closed
    # frames published before the close are still delivered, then the iteration ends
    assert [f.seq for f in r.frames(timeout=2)] == [1, 2, 3]
    r.close()
    p.close()  # idempotent


def test_control_messages_reach_the_producer_in_order(shm_name: str) -> None:
    with one(shm_name, control_bytes=256) as p, Reader(shm_name) as r1, Reader(shm_name) as r2:
        assert p.poll_control() == []
        for i in range(3):
            r1.send_control(1, f"a{i}".encode())
        r2.send_control(2)
        msgs = p.poll_control()
        assert [(m.kind, m.data) for m in msgs if m.reader == msgs[0].reader] == [
            (1, b"a0"),
            (1, b"a1"),
            (1, b"a2"),
        ]
        assert (2, b"") in [(m.kind, m.data) for m in msgs]
        assert {m.pid for m in msgs} == {os.getpid()}
        # fill the ring, get a clear error, drain, and go around the end many times

        def flood() -> None:
            for _ in range(1000):
                r1.send_control(3, b"x" * 40)

        with pytest.raises(ControlRingFull, match=shm_name):
            flood()
        assert 1 < len(p.poll_control()) < 1000
        sent = []
        for i in range(200):
            body = os.urandom(i % 50)
            r1.send_control(i, body)
            sent.append((i, body))
            if i % 3 == 0:
                sent_back = [(m.kind, m.data) for m in p.poll_control()]
                assert sent_back == sent
                sent = []
        assert [(m.kind, m.data) for m in p.poll_control()] == sent
        with pytest.raises(ControlRingFull, match="ring of"):
            r1.send_control(1, b"x" * 4096)


def test_inspect_reports_readers_lag_and_rate(shm_name: str) -> None:
    with one(shm_name, slots=8) as p, Reader(shm_name, mode="every", copy=True) as r:
        for i in range(1, 6):
            fill(p, i)
            time.sleep(0.01)
        r.read(timeout=0)
        info = inspect(shm_name)
        assert info.frames == 5
        assert info.producer_pid == os.getpid()
        assert info.producer_alive
        assert info.state == "live"
        assert info.schema["streams"][0]["units"] == "counts"
        assert 10 < info.rate < 1000
        (ri,) = info.readers
        assert ri.pid == os.getpid()
        assert ri.alive
        assert ri.mode == "every"
        assert ri.lag == 4
        assert ri.frames == 1
        assert ri.heartbeat_age < 5
        text = info.format()
        assert "img: <u2 (8, 6) [counts]" in text
        assert "lag 4" in text
        out = subprocess.run(
            [sys.executable, "-m", "beampipe_shm._cli", "inspect", shm_name, "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert json.loads(out.stdout)["readers"][0]["lag"] == 4
    missing = subprocess.run(
        [sys.executable, "-m", "beampipe_shm._cli", "inspect", shm_name],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr


def test_forgotten_producer_and_reader_clean_up_after_themselves(shm_name: str) -> None:
    p = one(shm_name)
    r = Reader(shm_name)
    assert len(inspect(shm_name).readers) == 1
    del r
    gc.collect()
    assert inspect(shm_name).readers == []
    r2 = Reader(shm_name, mode="every")
    del p
    gc.collect()
    assert not os.path.exists(f"/dev/shm/bp.{shm_name}")
    assert r2.producer_closed
    r2.close()


def test_a_copy_the_producer_rewrote_meanwhile_is_discarded(
    shm_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seqlock check, made deterministic: the producer starts rewriting the slot while
    the reader copies it; the copy must be dropped (and counted), never returned."""
    with one(shm_name, slots=3) as p, Reader(shm_name, copy=True) as r:
        fill(p, 1)
        k = p._latest_k
        original = Reader._build
        calls = []

        def racing_build(self: Reader, *args: object, **kw: object) -> object:
            frame = original(self, *args, **kw)  # type: ignore[arg-type]
            if not calls:  # producer claims the same slot for frame 2 mid-copy
                p._words[p._slot_word[k]] = 2 * 2 - 1
                p._views[k]["img"][...] = 2
            calls.append(1)
            return frame

        monkeypatch.setattr(Reader, "_build", racing_build)
        assert r.read(timeout=0) is None  # frame 1's slot is half-rewritten: nothing to give
        assert r.stats.torn == 1
        monkeypatch.undo()
        p._words[p._slot_word[k]] = 0  # the "crashed" rewrite: abandoned
        fill(p, 3)
        f = r.read(timeout=0)
        assert f is not None
        assert (f["img"] == 3).all()


def test_a_lease_taken_during_the_claim_wins(shm_name: str) -> None:
    """The Dekker handshake's other side: the producer's snapshot missed a fresh lease, its
    re-check after the fence finds it, and it leaves the slot alone."""
    with one(shm_name, slots=3) as p, Reader(shm_name) as r:
        fill(p, 1)
        held = r.read(timeout=0)
        assert held is not None
        real_scan = p._scan
        p._scan = lambda: (set(), -1, -1)  # type: ignore[method-assign]  # a stale snapshot
        try:
            for i in range(2, 8):
                fill(p, i)
        finally:
            p._scan = real_scan  # type: ignore[method-assign]
        assert p.lease_skips >= 1
        assert (held["img"] == 1).all()
        held.release()


def test_control_messages_of_a_reader_that_closed_are_still_delivered(shm_name: str) -> None:
    with one(shm_name, max_readers=1) as p:
        with Reader(shm_name) as r:
            r.send_control(5, b"last words")
        assert [(i.mode, i.control_pending > 0) for i in inspect(shm_name).readers] == [
            ("closed", True)
        ]
        with pytest.raises(ReaderLimitReached):  # its record is kept until the producer reads
            Reader(shm_name)
        assert [(m.kind, m.data) for m in p.poll_control()] == [(5, b"last words")]
        assert inspect(shm_name).readers == []
        assert inspect(shm_name).reclaimed == 0  # a clean close is not a death
        Reader(shm_name).close()  # the record is free again


def test_frame_metadata_set_inside_the_block(shm_name: str) -> None:
    with one(shm_name) as p, Reader(shm_name, mode="every", copy=True) as r:
        with p.frame() as f:
            f["img"][...] = 1
            f.frame_id = 12345
            f.timestamp = 1.5e9
            f.attrs["roi"] = [0, 0, 4, 4]
            assert f.publish() == 1  # publishing inside the block is fine too
        with p.frame(timestamp=2.0e9) as f:
            f["img"][...] = 2
        a, b = r.read(timeout=0), r.read(timeout=0)
        assert a is not None
        assert b is not None
        assert (a.frame_id, a.timestamp, a.attrs) == (12345, 1.5e9, {"roi": [0, 0, 4, 4]})
        assert (b.frame_id, b.timestamp) == (2, 2.0e9)


def test_garbage_or_empty_leftovers_are_reported_and_replaced(shm_name: str) -> None:
    path = f"/dev/shm/bp.{shm_name}"
    with open(path, "wb") as fh:
        fh.write(b"not a segment" * 1000)
    with pytest.raises(StreamNotFound, match="is not a beampipe-shm segment"):
        Reader(shm_name)
    with one(shm_name) as p:  # nobody holds its lock: stale, removed, replaced
        assert p.frames_published == 0
        assert Reader(shm_name).schema == p.schema
    open(path, "wb").close()  # empty, as a producer killed between create and lock leaves it
    old = time.time() - 10
    os.utime(path, (old, old))
    with pytest.raises(StreamNotFound, match="being created"):
        Reader(shm_name)
    with one(shm_name, mode=0o640) as p:
        assert os.stat(path).st_mode & 0o777 == 0o640


def test_schema_change_across_a_restart_is_an_error_for_a_reader_that_expects(
    shm_name: str,
) -> None:
    with one(shm_name):
        r = Reader(shm_name, expect=[IMG])
        loose = Reader(shm_name)
    other = StreamSpec("img", "float32", (8, 6))
    with Producer(shm_name, [other]) as p2:
        with pytest.raises(SchemaMismatch, match="float32"):
            r.read(timeout=0.5)
        p2.publish(np.ones((8, 6), np.float32))
        f = loose.read(timeout=2)  # no expectations: follows the new schema
        assert f is not None
        assert f["img"].dtype == np.float32
        assert loose.schema.streams[0].dtype == np.float32
        f.release()
    r.close()
    loose.close()


def test_cli_lists_streams(shm_name: str) -> None:
    with one(shm_name) as p:
        fill(p, 1)
        out = subprocess.run(
            [sys.executable, "-m", "beampipe_shm._cli", "list"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    line = next(x for x in out.stdout.splitlines() if x.startswith(shm_name))
    assert f"pid {os.getpid()}" in line
    assert "1 frames" in line


def test_slot_choice_keeps_history_unread_and_reuses_the_hot_slot_when_read(
    shm_name: str,
) -> None:
    with one(shm_name, slots=4) as p:
        for i in range(1, 7):
            fill(p, i)
        # nobody was reading: oldest-first, so a late reader still finds slots-worth of history
        with Reader(shm_name, mode="every", start="oldest", copy=True) as r:
            got = [f.seq for f in iter(lambda: r.read(timeout=0), None)]
            assert got == [3, 4, 5, 6]
            # a reader that keeps up: the producer rewrites the slot it just read (in cache)
            slots = set()
            for i in range(7, 13):
                fill(p, i)
                slots.add(p._latest_k)
                f = r.read(timeout=0)
                assert f is not None
                assert (f.seq, int(f["img"][0, 0])) == (i, i)
            assert len(slots) == 1
            # a reader that falls behind gets slots - 1 frames of slack, oldest overwritten first
            for i in range(13, 17):
                fill(p, i)
            got = [f.seq for f in iter(lambda: r.read(timeout=0), None)]
            assert got == [13, 14, 15, 16]


def test_ring_reuse_keeps_history_even_while_readers_keep_up(shm_name: str) -> None:
    with one(shm_name, slots=4, reuse="ring") as p, Reader(shm_name, copy=True) as live:
        slots = set()
        for i in range(1, 9):
            fill(p, i)
            slots.add(p._latest_k)
            assert live.read(timeout=0) is not None
        assert len(slots) == 4
        with Reader(shm_name, mode="every", start="oldest", copy=True) as late:
            assert [f.seq for f in iter(lambda: late.read(timeout=0), None)] == [5, 6, 7, 8]
    with pytest.raises(ValueError, match="reuse"):
        one(shm_name, reuse="lru")


def test_bad_frame_metadata_aborts_the_frame_with_a_clear_error(shm_name: str) -> None:
    with one(shm_name) as p, Reader(shm_name, mode="every", copy=True) as r:
        with pytest.raises(ValueError, match=f"{shm_name}.*JSON"), p.frame(attrs={"x": object()}):
            pass
        with pytest.raises(ValueError, match="frame_id"), p.frame(frame_id="seven"):  # type: ignore[arg-type]
            pass
        with pytest.raises(ValueError, match="64 bits"), p.frame(frame_id=2**64):
            pass
        assert r.read(timeout=0) is None  # nothing half-published
        assert fill(p, 1) == 1  # and the sequence has no hole
        assert r.read(timeout=0).seq == 1  # type: ignore[union-attr]
        with pytest.raises(ValueError, match="timeout"):
            r.read(timeout=-1)
        with pytest.raises(ValueError, match="max_messages"):
            p.poll_control(0)


def test_small_arrays_sit_next_to_the_sequence_word_big_ones_on_pages(shm_name: str) -> None:
    """Layout v2: arrays that fit go inline in the 192 bytes after the slot's first cache
    line (a reader of a small frame touches two adjacent lines), in schema order while they
    fit; the rest after the attributes, page-aligned when 4 KiB or more."""
    from beampipe_shm import _layout as L

    streams = [
        StreamSpec("pos", "<f8", (8,)),  # 64 B: inline at 64
        StreamSpec("img", "uint16", (64, 64)),  # 8 KiB: a page of its own
        StreamSpec("flags", "u1", (3,)),  # 3 B: inline after pos
        StreamSpec("wave", "<f4", (64,)),  # 256 B: does not fit what is left inline
    ]
    with Producer(shm_name, streams) as p, Reader(shm_name, mode="every", copy=True) as r:
        offs = dict(zip([s.name for s in streams], p.geometry.stream_offsets, strict=True))
        assert offs["pos"] == L.S_INLINE * 8 == 64
        assert offs["flags"] == 128
        assert offs["img"] % 4096 == 0 and offs["wave"] >= L.SLOT_FIXED + p.geometry.attrs_bytes
        assert L.S_LEAD * 8 == 64 + L.INLINE_BYTES
        data = {
            "pos": np.arange(8.0),
            "img": np.full((64, 64), 7, np.uint16),
            "flags": np.array([1, 2, 3], np.uint8),
            "wave": np.linspace(0, 1, 64, dtype=np.float32),
        }
        p.publish(data, frame_id=5, attrs={"a": 1})
        f = r.read(timeout=1.0)
        assert f is not None and f.frame_id == 5 and f.attrs == {"a": 1}
        for n, a in data.items():
            assert (f[n] == a).all()


def test_inline_arrays_are_aligned_for_their_dtype(shm_name: str) -> None:
    """A zero-copy view of an inline array must be aligned for its dtype: longdouble wants
    16 bytes, so it does not simply follow a 3-byte array at the next 8-byte boundary."""
    wide = np.dtype(np.longdouble)
    streams = [StreamSpec("flags", "u1", (3,)), StreamSpec("wide", wide.str, (2,))]
    with Producer(shm_name, streams) as p, Reader(shm_name, mode="every") as r:
        flags_off, wide_off = p.geometry.stream_offsets
        assert flags_off == 64 and wide_off % wide.alignment == 0 and wide_off < 256
        p.publish({"flags": np.ones(3, np.uint8), "wide": np.array([1.5, -2.25], wide)})
        f = r.read(timeout=1.0)
        assert f is not None
        view = f["wide"]
        assert view.flags.aligned and view.ctypes.data % wide.alignment == 0
        assert view.tolist() == [1.5, -2.25]
        f.release()


def test_a_segment_of_another_layout_version_is_refused_by_name(shm_name: str) -> None:
    from beampipe_shm import _layout as L

    with one(shm_name) as p:
        p._words[L.H_VERSION] = 1  # what an older producer would have written
        with pytest.raises(StreamNotFound, match="segment layout v1, this beampipe-shm reads v2"):
            Reader(shm_name)
        p._words[L.H_VERSION] = L.VERSION
        Reader(shm_name).close()
