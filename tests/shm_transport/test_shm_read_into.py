"""The fast copy-out path, ``Reader.read_into``: same protocol, fewer Python steps.

Each test pins down one thing the fast path must not get wrong where the general
path already got it right: the seqlock, ordering and gap counts, the lease on big
slots, rebinding buffers, metadata, timeouts, a restarted producer, bad input.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from beampipe_shm import Producer, Reader, SchemaMismatch, StreamSpec

IMG = StreamSpec("img", "uint16", (8, 6))
BIG = StreamSpec("img", "uint16", (512, 512))  # a 512 KiB slot: copied under a lease


def fill(p: Producer, value: int, **kw: object) -> int:
    with p.frame(**kw) as f:  # type: ignore[arg-type]
        f["img"][...] = value
    assert not f.dropped
    return f.seq


def test_read_into_copies_the_newest_frame_with_its_metadata(shm_name: str) -> None:
    with Producer(shm_name, [IMG]) as p, Reader(shm_name) as r:
        buf = np.zeros(IMG.shape, np.uint16)
        assert r.read_into(buf, timeout=0) == 0
        fill(p, 3, frame_id=-7, timestamp=1.5e9)
        fill(p, 4, frame_id=42, timestamp=1.7e9)
        assert r.read_into(buf, timeout=1.0) == 2
        assert (buf == 4).all()
        assert r.last_frame_id == 42
        assert r.last_timestamp == 1.7e9
        assert r.last_publish_ns > 0
        assert r.last_missed == 1  # latest mode skipped frame 1
        assert r.read_into(buf, timeout=0) == 0  # nothing new
        fill(p, 5, frame_id=-7)
        assert r.read_into(buf, timeout=0) == 3
        assert r.last_frame_id == -7
        assert r.stats.frames == 2
        assert r.stats.missed == 1


def test_read_into_every_mode_is_in_order_and_counts_gaps(shm_name: str) -> None:
    with (
        Producer(shm_name, [IMG], slots=3) as p,
        Reader(shm_name, mode="every", start="next") as r,
    ):
        buf = np.zeros(IMG.shape, np.uint16)
        for v in range(1, 6):  # 5 frames into 3 slots: the reader fell behind
            fill(p, v)
        got = []
        while n := r.read_into(buf, timeout=0):
            assert (buf == n).all()
            got.append((n, r.last_missed))
        assert got[-1][0] == 5
        assert [n for n, _ in got] == sorted(n for n, _ in got)
        assert sum(m for _, m in got) + len(got) == 5
        assert r.stats.missed == sum(m for _, m in got)
        for v in (6, 7):  # caught up: the fast path, one by one
            fill(p, v)
            assert r.read_into(buf, timeout=0) == v
            assert r.last_missed == 0


def test_read_into_accepts_a_mapping_and_rebinds_new_buffers(shm_name: str) -> None:
    streams = [IMG, StreamSpec("pos", "<f8", (3,))]
    with Producer(shm_name, streams) as p, Reader(shm_name) as r:
        a, pos = np.zeros(IMG.shape, np.uint16), np.zeros(3)
        p.publish({"img": np.full(IMG.shape, 2, np.uint16), "pos": np.arange(3.0)})
        assert r.read_into({"img": a, "pos": pos}, timeout=1.0) == 1
        assert (a == 2).all() and list(pos) == [0.0, 1.0, 2.0]
        b = np.zeros(IMG.shape, np.uint16)
        out = {"img": b, "pos": pos}
        p.publish({"img": np.full(IMG.shape, 3, np.uint16), "pos": np.ones(3)})
        assert r.read_into(out, timeout=1.0) == 2
        assert (b == 3).all() and (a == 2).all()  # the new buffer, not the old one
        out["img"] = a  # same dict, other array: noticed
        p.publish({"img": np.full(IMG.shape, 4, np.uint16), "pos": np.ones(3)})
        assert r.read_into(out, timeout=1.0) == 3
        assert (a == 4).all() and (b == 3).all()
        only_img = np.zeros(IMG.shape, np.uint16)  # a subset of the streams is fine
        p.publish({"img": np.full(IMG.shape, 5, np.uint16), "pos": np.ones(3)})
        assert r.read_into({"img": only_img}, timeout=1.0) == 4
        assert (only_img == 5).all()
        with pytest.raises(SchemaMismatch, match="pass a mapping"):
            r.read_into(only_img)  # two streams: which one?


def test_read_into_rejects_bad_buffers_naming_the_stream(shm_name: str) -> None:
    with Producer(shm_name, [IMG]) as p, Reader(shm_name) as r:
        fill(p, 1)
        with pytest.raises(SchemaMismatch, match=shm_name):
            r.read_into(np.zeros((8, 6), np.int32))
        with pytest.raises(SchemaMismatch, match=shm_name):
            r.read_into(np.zeros((6, 8), np.uint16))
        with pytest.raises(SchemaMismatch, match="no array 'nope'"):
            r.read_into({"nope": np.zeros(IMG.shape, np.uint16)})
        ro = np.zeros(IMG.shape, np.uint16)
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):
            r.read_into(ro)
        with pytest.raises(TypeError, match=shm_name):
            r.read_into([1, 2, 3])  # type: ignore[arg-type]
        buf = np.zeros(IMG.shape, np.uint16)
        with pytest.raises(ValueError, match="timeout"):
            r.read_into(buf, timeout=-1)
        assert r.read_into(buf) == 1  # after all that, a good buffer still works
        r.close()
        with pytest.raises(RuntimeError, match="closed"):
            r.read_into(buf, timeout=0)


def test_read_into_discards_a_copy_the_producer_rewrote(shm_name: str) -> None:
    """The seqlock on the fast path: the producer takes the slot back mid-copy."""
    with Producer(shm_name, [IMG], slots=3) as p, Reader(shm_name) as r:
        buf = np.zeros(IMG.shape, np.uint16)
        fill(p, 1)
        k = p._latest_k
        assert r.read_into(buf, timeout=0) == 1  # binds the buffer, delivers frame 1
        r._last = 0  # read frame 1 again, through the fast path

        class Racing:
            """A destination whose copy is interleaved with the producer's claim."""

            def __init__(self, inner: object) -> None:
                self.inner = inner

            def __setitem__(self, key: object, value: object) -> None:
                self.inner[key] = value  # type: ignore[index]
                p._words[p._slot_word[k]] = 2 * 2 - 1  # frame 2 claims the slot now

        assert r._into_slots is not None
        sw, copies, meta = r._into_slots[k]
        assert copies is not None
        r._into_slots[k] = (sw, [(Racing(d), s) for d, s in copies], meta)
        torn = r.stats.torn
        assert r.read_into(buf, timeout=0) == 0  # the torn copy is never returned
        assert r.stats.torn == torn + 1
        p._words[p._slot_word[k]] = 0  # the "crashed" rewrite: abandoned
        r._into_key = None  # drop the doctored binding
        fill(p, 3)
        assert r.read_into(buf, timeout=0) == 2
        assert (buf == 3).all()


def test_read_into_big_frames_are_copied_under_a_lease(shm_name: str) -> None:
    with Producer(shm_name, [BIG], slots=2) as p, Reader(shm_name) as r:
        buf = np.zeros(BIG.shape, np.uint16)
        fill(p, 7)
        leases = []
        real_copyto = np.copyto

        def spying_copyto(dst: object, src: object) -> None:
            rec = r._att.rw
            leases.append([rec[32 + i] for i in range(2)])  # R_LEASES words during the copy
            real_copyto(dst, src)  # type: ignore[arg-type]

        class Spy:
            """A destination that records the lease words while it is being written."""

            def __setitem__(self, key: object, value: object) -> None:
                spying_copyto(buf, value)

        assert r.read_into(buf, timeout=0) == 1  # binds; now spy on a second copy of frame 1
        buf[...] = 0
        r._last = 0
        k = p._latest_k
        r._into_pairs[k] = [(Spy(), s) for _, s in r._into_pairs[k]]
        assert r.read_into(buf, timeout=1.0) == 1
        r._into_key = None  # drop the doctored binding
        assert (buf == 7).all()
        assert leases and any(leases[0])  # the slot was leased while it was copied
        assert not any(r._att.rw[32 + i] for i in range(2))  # and given back after
        assert r._n_leases == 0
        for v in range(2, 6):  # the producer keeps going: slots come back every time
            fill(p, v)
            assert r.read_into(buf, timeout=1.0) == v
            assert (buf == v).all()
        assert p.dropped == 0


def test_read_into_big_slot_with_small_streams_too(shm_name: str) -> None:
    streams = [BIG, StreamSpec("pos", "<f8", (3,))]
    with Producer(shm_name, streams, slots=2) as p, Reader(shm_name, mode="every") as r:
        img, pos = np.zeros(BIG.shape, np.uint16), np.zeros(3)
        for v in (1, 2, 3):
            p.publish({"img": np.full(BIG.shape, v, np.uint16), "pos": np.full(3, v / 2)})
            assert r.read_into({"img": img, "pos": pos}, timeout=1.0) == v
            assert (img == v).all() and (pos == v / 2).all()
        assert r._n_leases == 0


def test_read_into_blocks_until_a_frame_comes_and_times_out(shm_name: str) -> None:
    with Producer(shm_name, [IMG]) as p, Reader(shm_name, spin=0.0) as r:
        buf = np.zeros(IMG.shape, np.uint16)
        t0 = time.monotonic()
        assert r.read_into(buf, timeout=0.2) == 0
        assert 0.15 < time.monotonic() - t0 < 2.0
        timer = threading.Timer(0.1, fill, (p, 9))
        timer.start()
        try:
            assert r.read_into(buf, timeout=5.0) == 1  # woken from the futex sleep
        finally:
            timer.join()
        assert (buf == 9).all()


def test_a_frame_just_before_a_long_spin_is_not_missed(shm_name: str) -> None:
    """A frame published between the failed first look and the spin's start must not cost
    the whole spin (it used to: the spin waited for the *next* change of LATEST)."""
    with Producer(shm_name, [IMG]) as p, Reader(shm_name, spin=5.0) as r:
        buf = np.zeros(IMG.shape, np.uint16)
        r.read_into(buf, timeout=0)  # bind
        original = r._into_fast
        first = []

        def late_frame() -> int:
            n = original()
            if not first:  # the first look finds nothing, then the frame lands
                first.append(1)
                fill(p, 4)
            return n

        r._into_fast = late_frame  # type: ignore[method-assign]
        t0 = time.monotonic()
        assert r.read_into(buf, timeout=10.0) == 1
        assert time.monotonic() - t0 < 1.0
        assert (buf == 4).all()
        f = r.read(timeout=0)  # the general path, same situation
        assert f is None
        original_poll = r._poll
        polled = []

        def late_poll(out: object = None) -> object:
            got = original_poll(out)  # type: ignore[arg-type]
            if not polled:
                polled.append(1)
                fill(p, 5)
            return got

        r._poll = late_poll  # type: ignore[method-assign]
        t0 = time.monotonic()
        g = r.read(timeout=10.0)
        assert g is not None and g.seq == 2
        assert time.monotonic() - t0 < 1.0
        g.release()


def test_a_spinning_every_reader_sees_a_frame_in_another_slot_at_once(
    shm_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spin watches the slot of the last frame and LATEST; a frame that lands in another
    slot while the spin looks at the clock must still be seen (it was once missed until the
    spin ended: LATEST was re-read after the clock check and the change absorbed)."""
    from beampipe_shm import _reader

    with (
        Producer(shm_name, [IMG], slots=4, reuse="ring") as p,
        Reader(shm_name, mode="every", start="next", spin=5.0) as r,
    ):
        buf = np.zeros(IMG.shape, np.uint16)
        fill(p, 1)
        assert r.read_into(buf, timeout=1.0) == 1
        k1 = p._latest_k
        real = time.monotonic
        landed: list[int] = []

        class Clock:
            monotonic_ns = staticmethod(time.monotonic_ns)
            sleep = staticmethod(time.sleep)

            @staticmethod
            def monotonic() -> float:
                if not landed and len(calls) > 2:  # inside the spin: its clock check
                    landed.append(fill(p, 2))
                calls.append(1)
                return real()

        calls: list[int] = []
        monkeypatch.setattr(_reader, "time", Clock)
        t0 = real()
        assert r.read_into(buf, timeout=10.0) == 2
        assert real() - t0 < 1.0
        assert landed == [2]
        assert p._latest_k != k1  # (ring reuse: frame 2 is not where the spin watched)
        assert (buf == 2).all()


@pytest.mark.parametrize("mode", ["latest", "every"])
def test_read_into_follows_a_restarted_producer(shm_name: str, mode: str) -> None:
    buf = np.zeros(IMG.shape, np.uint16)
    p = Producer(shm_name, [IMG])
    r = Reader(shm_name, mode=mode, spin=0.0)  # type: ignore[arg-type]
    try:
        fill(p, 1)
        assert r.read_into(buf, timeout=1.0) == 1
        p.close()
        p = Producer(shm_name, [IMG])
        fill(p, 2)
        deadline = time.monotonic() + 5
        n = 0
        while not n and time.monotonic() < deadline:
            n = r.read_into(buf, timeout=0.2)
        assert n == 1  # the new generation's first frame, copied from the new mapping
        assert (buf == 2).all()
        assert r.stats.reattached == 1
        fill(p, 3)
        assert r.read_into(buf, timeout=1.0) == 2  # and the fast path is bound to it again
        assert (buf == 3).all()
    finally:
        r.close()
        p.close()


def test_the_weak_order_branches_deliver_the_same_frames(
    shm_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The aarch64 branches (fences between the payload and the sequence words) taken on this
    machine: every read_into path (polled, spinning, woken from the futex) with the fences
    switched on delivers the same frames, and the fences are really called."""
    from beampipe_shm import _producer, _reader, _sys

    calls: list[int] = []

    def fence() -> None:
        calls.append(1)
        _sys.fence()

    for mod in (_reader, _producer):
        monkeypatch.setattr(mod, "WEAK_ORDER", True)
        monkeypatch.setattr(mod, "store_fence", fence)
    monkeypatch.setattr(_reader, "load_fence", fence)
    monkeypatch.setattr(_reader, "release_fence", fence)
    buf = np.zeros(IMG.shape, np.uint16)
    with Producer(shm_name, [IMG], slots=3) as p:
        with Reader(shm_name, mode="every", start="next", spin=0.0) as r:
            for v in (1, 2, 3):  # polled: predicted slot and LATEST
                fill(p, v)
                assert r.read_into(buf, timeout=0) == v and (buf == v).all()
            timer = threading.Timer(0.05, fill, (p, 4))
            timer.start()
            try:  # asleep on the futex, the frame taken right after the wake-up
                assert r.read_into(buf, timeout=5.0) == 4 and (buf == 4).all()
            finally:
                timer.join()
        with Reader(shm_name, mode="every", start="next", spin=5.0) as r:
            r.read_into(buf, timeout=0)
            timer = threading.Timer(0.05, fill, (p, 5))
            timer.start()
            try:  # spinning: the frame taken inside the spin loop
                assert r.read_into(buf, timeout=5.0) == 5 and (buf == 5).all()
            finally:
                timer.join()
            assert r.stats.torn == 0
    assert calls


def test_a_blocked_every_reader_takes_each_frame_on_the_flat_path(
    shm_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every-frame read_into asleep on the futex: each frame is taken right after the
    wake-up (never the general path), in order, with its metadata and counters; the record
    words it leaves for later (last_seq, the waiting flag) are right by the next sleep and
    the flag is cleared within 32 frames of fast-path reads."""
    from beampipe_shm import _layout as L
    from beampipe_shm import _reader

    real_wait = _reader.futex_syscall
    sleeps: list[tuple[int, int]] = []

    def futex_syscall(*args: object) -> int:
        sleeps.append((int(r._rw[L.R_LAST_SEQ]), int(r._rw[L.R_WAITING])))
        return real_wait(*args)

    monkeypatch.setattr(_reader, "futex_syscall", futex_syscall)
    with (
        Producer(shm_name, [IMG], slots=4) as p,
        Reader(shm_name, mode="every", start="next", spin=0.0) as r,
    ):
        buf = np.zeros(IMG.shape, np.uint16)
        assert r.read_into(buf, timeout=0) == 0  # bind

        def general(*a: object, **kw: object) -> object:
            raise AssertionError("the blocked every-frame read_into took the general path")

        monkeypatch.setattr(r, "_wait", general)
        for v in range(1, 6):
            timer = threading.Timer(0.03, fill, (p, v), {"frame_id": 100 + v})
            timer.start()
            try:
                assert r.read_into(buf, timeout=5.0) == v
            finally:
                timer.join()
            assert (buf == v).all()
            assert r.last_frame_id == 100 + v and r.last_missed == 0
            assert r.stats.frames == v and r.stats.missed == 0
        # each sleep told the producer where the reader was and that it sleeps
        assert sleeps and all(w == 1 for _, w in sleeps)
        assert [s for s, _ in sleeps][-1] == 4  # (the last sleep: frames 1-4 delivered)
        assert r._rw[L.R_WAITING] == 1  # left for later by the last wake-up...
        for v in range(6, 6 + 40):
            fill(p, v)
            assert r.read_into(buf, timeout=0) == v
        assert r._rw[L.R_WAITING] == 0  # ...and cleared by the fast path's bookkeeping
        assert r._rw[L.R_LAST_SEQ] == 45 and r.stats.frames == 45
        timer = threading.Timer(0.03, fill, (p, 46))
        timer.start()
        try:
            assert r.read_into(buf, timeout=5.0) == 46
        finally:
            timer.join()
        assert r._rw[L.R_WAITING] == 1
        for v in range(47, 47 + 40):  # a reader that goes on with read(): the same
            fill(p, v)
            f = r.read(timeout=0)
            assert f is not None and f.seq == v
            f.release()
        assert r._rw[L.R_WAITING] == 0 and r.stats.frames == 86


def test_a_blocked_every_reader_that_fell_behind_counts_the_gap(
    shm_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames that overwrite the reader's next one while it sleeps: the wake-up finds the
    slot it watched holding a later frame, and the general path counts the gap."""
    from beampipe_shm import _reader

    real_wait = _reader.futex_syscall
    with (
        Producer(shm_name, [IMG], slots=3) as p,
        Reader(shm_name, mode="every", start="next", spin=0.0) as r,
    ):
        buf = np.zeros(IMG.shape, np.uint16)
        fill(p, 1)
        assert r.read_into(buf, timeout=0) == 1

        def burst(*args: object) -> int:
            for v in range(2, 8):  # 6 frames into 3 slots while the reader "sleeps"
                fill(p, v)
            return real_wait(*args)  # (returns at once: the word changed)

        monkeypatch.setattr(_reader, "futex_syscall", burst)
        got = []
        while len(got) < 3:
            n = r.read_into(buf, timeout=5.0)
            assert n
            got.append((n, int(buf[0, 0]), r.last_missed))
            monkeypatch.setattr(_reader, "futex_syscall", real_wait)
        assert got[0][0] == got[0][1] and got[0][2] == got[0][0] - 2  # oldest kept, gap counted
        assert [g[0] for g in got] == list(range(got[0][0], got[0][0] + 3))
        assert r.stats.missed == got[0][2] and r.stats.frames == 4


def test_a_blocked_every_reader_times_out_keeping_its_last_frame(shm_name: str) -> None:
    with (
        Producer(shm_name, [IMG]) as p,
        Reader(shm_name, mode="every", start="next", spin=0.0) as r,
    ):
        buf = np.zeros(IMG.shape, np.uint16)
        fill(p, 1, frame_id=7)
        assert r.read_into(buf, timeout=0) == 1
        t0 = time.monotonic()
        assert r.read_into(buf, timeout=0.2) == 0
        assert 0.15 < time.monotonic() - t0 < 2.0
        assert r.last_frame_id == 7 and r.stats.frames == 1
        from beampipe_shm import _layout as L

        assert r._rw[L.R_WAITING] == 0  # not asleep: the producer must not keep waking us


def test_an_exception_in_the_blocked_read_into_leaves_the_counters_right(
    shm_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while read_into sleeps: the frame counted ahead is taken back and the waiting
    flag cleared, so the producer stops waking a reader that no longer sleeps."""
    from beampipe_shm import _layout as L
    from beampipe_shm import _reader

    def interrupted(*args: object) -> int:
        raise KeyboardInterrupt

    with (
        Producer(shm_name, [IMG]) as p,
        Reader(shm_name, mode="every", start="next", spin=0.0) as r,
    ):
        buf = np.zeros(IMG.shape, np.uint16)
        fill(p, 1)
        assert r.read_into(buf, timeout=0) == 1
        monkeypatch.setattr(_reader, "futex_syscall", interrupted)
        with pytest.raises(KeyboardInterrupt):
            r.read_into(buf, timeout=5.0)
        assert r.stats.frames == 1 and r._rw[L.R_WAITING] == 0
        monkeypatch.undo()
        fill(p, 2)
        assert r.read_into(buf, timeout=5.0) == 2 and r.stats.frames == 2


def test_a_torn_copy_leaves_no_other_frames_metadata(shm_name: str) -> None:
    """read_into copies the metadata before its sequence re-check; when the re-check finds the
    slot reclaimed (torn), the reader must not report the torn frame's id as the last frame."""
    spec = StreamSpec("img", "uint16", (8, 6))
    with Producer(shm_name, [spec], slots=3) as p, Reader(shm_name) as r:
        buf = np.zeros(spec.shape, np.uint16)
        with p.frame(frame_id=11) as f:
            f["img"][...] = 1
        assert r.read_into(buf, timeout=0) == 1
        assert r.last_frame_id == 11
        with p.frame(frame_id=22) as f:
            f["img"][...] = 2
        k = p._latest_k

        class Racing:  # the producer claims the slot for frame 3 in the middle of the copy
            def __init__(self, inner: np.ndarray) -> None:
                self.inner = inner

            def __setitem__(self, key: object, value: object) -> None:
                self.inner[key] = value
                p._words[p._slot_word[k]] = 2 * 3 - 1

        sw, copies, meta = r._into_slots[k]
        r._into_slots[k] = (sw, [(Racing(d), s) for d, s in copies], meta)
        assert r.read_into(buf, timeout=0) == 0
        assert r.stats.torn == 1
        with pytest.raises(RuntimeError, match=f"{shm_name}.*torn"):
            r.last_frame_id  # noqa: B018
        p._words[p._slot_word[k]] = 2 * 2  # frame 2's sequence back: the next read delivers it
        r._into_slots[k] = (sw, copies, meta)
        assert r.read_into(buf, timeout=0) == 2
        assert r.last_frame_id == 22 and (buf == 2).all()
