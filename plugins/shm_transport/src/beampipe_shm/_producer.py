"""The producer: owns one segment, writes frames straight into slots, never blocks on readers.

(Its one wait, for the slot still in cache, is a spin of bounded length: ``Producer._hot_wait``.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import struct
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from . import _layout as L
from ._errors import FrameTooLarge, NameInUse, SchemaMismatch
from ._sys import (
    WEAK_ORDER,
    fence,
    futex_syscall,
    futex_wake,
    futex_wake_args,
    lock_held_by_other,
    store_fence,
    try_lock,
    unlock,
)

__all__ = ["ControlMessage", "Producer", "WritableFrame"]

log = logging.getLogger("beampipe_shm")

_RECLAIM_EVERY_NS = 250_000_000
_WRAP = 0xFFFFFFFF

#: Slots whose arrays take at least this many bytes get the hot-slot wait (``Producer(hot_wait=)``
#: defaults to ``HOT_WAIT_CAP`` for them, 0 below): a frame bigger than a core's L2 (2 MiB here,
#: 0.5-2 MiB on most x86-64) is refilled faster where it still sits in L3 (8 MiB: ~300 us into
#: the slot just read, ~450-600 us into another one on the 2-core EPYC of docs' "Numbers").
HOT_WAIT_MIN_BYTES = 1 << 20
#: The longest the producer spins for the newest frame's slot (seconds), whatever the rate.
HOT_WAIT_CAP = 50e-6
#: ... and at most this share of its recent frame interval (a slow reader costs no more).
HOT_WAIT_SHARE = 0.1
#: After a wait that timed out, the next ``n`` waits are skipped, ``n`` doubling per timeout up
#: to this (halving per hit): a reader that keeps the producer waiting stops being waited for.
HOT_WAIT_BACKOFF_MAX = 256


@dataclass(frozen=True)
class ControlMessage:
    """A message a reader sent to the producer (``Reader.send_control``)."""

    reader: int  # record index
    pid: int
    kind: int
    data: bytes


def _frame_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"frame_id must be an integer, got {value!r}")
    fid = int(value)
    if not -(2**63) <= fid < 2**63:
        raise OverflowError(f"frame_id {fid} does not fit 64 bits")
    return fid


class WritableFrame:
    """A claimed slot: fill ``frame[stream]`` in place; publishing happens on ``__exit__``.

    The arrays are views into shared memory and are only yours inside the
    ``with`` block: after it the slot belongs to readers and, later, to the next frame.
    """

    __slots__ = (
        "_arrays",
        "_done",
        "_k",
        "_producer",
        "_rows",
        "attrs",
        "frame_id",
        "seq",
        "timestamp",
    )

    def __init__(
        self,
        producer: Producer,
        k: int | None,
        seq: int,
        arrays: dict[str, np.ndarray[Any, Any]],
        rows: dict[str, int],
        frame_id: int | None,
        attrs: dict[str, Any],
    ) -> None:
        self._producer = producer
        self._k = k
        self.seq = seq
        self._arrays = arrays
        self._rows = rows
        self.frame_id = frame_id
        self.attrs = attrs
        self.timestamp: float | None = None  # epoch seconds; None: the time of publishing
        self._done = False

    @property
    def dropped(self) -> bool:
        """True when every slot was leased: the data goes nowhere and the drop is counted."""
        return self._k is None

    def __getitem__(self, stream: str) -> np.ndarray[Any, Any]:
        try:
            return self._arrays[stream]
        except KeyError:
            raise KeyError(
                f"stream {self._producer.name!r} has no array {stream!r} "
                f"(has {', '.join(self._arrays)})"
            ) from None

    def __enter__(self) -> WritableFrame:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            if not self._done:  # (unless publish() was called inside the block)
                self._done = True  # (publish(), inlined: one frame less after the wake-up)
                self._producer._commit(self, self.timestamp)
        else:
            self.abort()

    def publish(self, timestamp: float | None = None) -> int | None:
        """Make the frame visible; returns its sequence number, None if it was dropped."""
        if self._done:
            raise RuntimeError(f"stream {self._producer.name!r}: frame {self.seq} already finished")
        self._done = True
        return self._producer._commit(self, self.timestamp if timestamp is None else timestamp)

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._producer._abort(self)


class Producer:
    """Publish frames of a fixed schema to any number of readers on this host.

    Why the shape of the API: the producer never blocks on a reader (a slow or
    dead reader only loses frames, counted), frames are written in place (no copy
    on either side) and a crash leaves nothing that the next producer of the same
    name does not clean up.

    ``streams``: StreamSpecs (or a mapping name -> spec kwargs); ``slots``: frames in
    the ring (leased frames included); ``max_readers``: reader records; ``attrs``:
    static attributes carried in the schema; ``attrs_bytes``/``control_bytes``: room
    for per-frame attributes and for each reader's control ring; ``mode``: file mode
    of the segment; ``reuse``: ``"hot"`` (default: rewrite the slot readers just
    finished with, still in cache) or ``"ring"`` (always the oldest frame: the most
    history for readers that look frames up after the fact).  ``hot_wait``: how long (seconds)
    the producer may spin, per frame, for the newest frame's slot when a reader has not yet
    read it or still leases it (the slot stays in cache; see "Which slot" in the docs): at
    most ``HOT_WAIT_SHARE`` of the recent frame interval, and a reader that keeps it waiting
    stops being waited for.  None: ``HOT_WAIT_CAP`` for frames of ``HOT_WAIT_MIN_BYTES`` or
    more, else 0 (off: a small slot is rewritten in cache whichever it is).  The outcomes are
    counted in ``hot_wait_hits``, ``hot_wait_misses`` (timed out) and ``hot_wait_skips``
    (not tried while backing off), and ``hot_wait_ns`` is the time spent waiting; the
    segment's header carries them too, for ``inspect()`` in another process.
    """

    def __init__(
        self,
        name: str,
        streams: Any,
        *,
        slots: int = 4,
        max_readers: int = 16,
        attrs: Mapping[str, Any] | None = None,
        attrs_bytes: int = 4096 - L.SLOT_FIXED,
        control_bytes: int = 4096 - L.R_CTRL_DATA,
        mode: int = 0o600,
        reuse: str = "hot",
        hot_wait: float | None = None,
    ) -> None:
        self.name = L.check_name(name)
        if reuse not in ("hot", "ring"):
            raise ValueError(f"stream {name!r}: reuse must be 'hot' or 'ring', got {reuse!r}")
        self.reuse = reuse
        self.schema = L.Schema.coerce(streams, attrs)
        if hot_wait is None:
            big = sum(s.nbytes for s in self.schema.streams) >= HOT_WAIT_MIN_BYTES
            hot_wait = HOT_WAIT_CAP if big else 0.0
        if (
            isinstance(hot_wait, bool)
            or not isinstance(hot_wait, int | float)
            or not 0 <= hot_wait <= 1.0
        ):
            raise ValueError(
                f"stream {name!r}: hot_wait must be 0..1 seconds or None, got {hot_wait!r}"
            )
        #: the hot-slot wait's cap per frame, in seconds (0: off; "ring" reuse never waits)
        self.hot_wait = float(hot_wait) if reuse == "hot" else 0.0
        self._hot_cap_ns = int(self.hot_wait * 1e9)
        if not isinstance(slots, int) or not 2 <= slots <= L.MAX_SLOTS:
            raise ValueError(f"stream {name!r}: slots must be 2..{L.MAX_SLOTS}, got {slots!r}")
        if not isinstance(max_readers, int) or not 1 <= max_readers <= L.MAX_READERS:
            raise ValueError(f"stream {name!r}: max_readers must be 1..{L.MAX_READERS}")
        if attrs_bytes < 0 or control_bytes < 64:
            raise ValueError(f"stream {name!r}: attrs_bytes >= 0 and control_bytes >= 64")
        attrs_bytes = L.round_up(attrs_bytes, 8)
        control_bytes = L.round_up(control_bytes, 8)
        g = L.Geometry.plan(b"", self.schema, slots, max_readers, attrs_bytes, control_bytes)
        blob = json.dumps({"schema": self.schema.to_json(), "geometry": g.to_json()}).encode()
        self.geometry = g = L.Geometry.plan(
            blob, self.schema, slots, max_readers, attrs_bytes, control_bytes
        )
        self.path = L.segment_path(name)
        self._fd = -1
        prev_generation = self._create(mode)
        try:
            os.ftruncate(self._fd, g.total)
            self._mm = mmap.mmap(self._fd, g.total)
        except BaseException:
            self._discard()
            raise
        self._notify_addr = int(np.frombuffer(self._mm, np.uint8).ctypes.data) + L.NOTIFY_OFFSET
        #: the commit's FUTEX_WAKE, arguments made once: no Python call around the syscall
        #: (a reader woken onto this CPU runs when we block again, so what follows counts too)
        self._wake_args = futex_wake_args(self._notify_addr)
        # from here on the segment is removed however the producer goes: close(), garbage
        # collection, interpreter exit, or an error in the rest of this constructor
        self._finalizer = weakref.finalize(
            self, Producer._shutdown, self.path, self._fd, self._mm, self._notify_addr
        )
        try:
            self._words = memoryview(self._mm).cast("Q")
            self._f64 = memoryview(self._mm).cast("d")
            w = self._words
            w[L.H_MAGIC] = L.MAGIC
            w[L.H_VERSION] = L.VERSION
            self.generation = max(time.time_ns(), prev_generation + 1)
            w[L.H_GENERATION] = self.generation
            w[L.H_PID] = os.getpid()
            w[L.H_N_SLOTS] = slots
            w[L.H_SLOT_STRIDE] = g.slot_stride
            w[L.H_SLOTS_OFF] = g.slots_off
            w[L.H_MAX_READERS] = max_readers
            w[L.H_RECORD_STRIDE] = g.record_stride
            w[L.H_RECORDS_OFF] = g.records_off
            w[L.H_SCHEMA_OFF] = g.schema_off
            w[L.H_SCHEMA_LEN] = len(blob)
            w[L.H_CREATED_NS] = time.time_ns()
            w[L.H_TOTAL] = g.total
            self._mm[g.schema_off : g.schema_off + len(blob)] = blob
            # numpy views built once: per frame only the slot index changes
            self._slot_base = [g.slots_off + k * g.slot_stride for k in range(slots)]
            self._slot_word = [b // 8 for b in self._slot_base]
            self._views: list[dict[str, np.ndarray[Any, Any]]] = []
            for base in self._slot_base:
                views = {}
                for spec, off in zip(self.schema.streams, g.stream_offsets, strict=True):
                    count = int(np.prod(spec.shape, dtype=np.int64))
                    arr = np.frombuffer(self._mm, spec.dtype, count, base + off).reshape(spec.shape)
                    views[spec.name] = arr
                self._views.append(views)
            self._scratch = {
                s.name: np.empty(s.shape, s.dtype) for s in self.schema.streams
            }  # where a dropped frame is written
            rec0 = g.records_off
            rs = g.record_stride
            self._rec_word = [(rec0 + i * rs) // 8 for i in range(max_readers)]
            self._rec_waiting = [rw + L.R_WAITING for rw in self._rec_word]
            # every reader's waiting flag in one strided slice: one C-level gather per publish
            # instead of a Python loop over the records (0.3 us instead of 0.5 us for 16)
            w0 = self._rec_waiting[0]
            # (the strided view is made once: per publish only its bytes are read)
            self._waiting = self._words[w0 : w0 + max_readers * (rs // 8) : rs // 8]
            self._nobody_waits = bytes(8 * max_readers)
            self._leases = np.ndarray(
                (max_readers, slots), np.uint64, self._mm, rec0 + L.R_LEASES * 8, (rs, 8)
            )
            self._slot_seq = [0] * slots  # frame seq last written per slot (0 = never)
            self._all_slots = list(range(slots))
            self._variable = [
                (i, s.name, s.shape[0]) for i, s in enumerate(self.schema.streams) if s.variable
            ]
            self._seq = 0
            self._latest_k = -1
            self._open: WritableFrame | None = None
            self._last_ns = 0
            self._rate = 0.0
            self._next_reclaim = 0
            self.dropped = 0
            self.lease_skips = 0
            self.hot_wait_hits = 0  # waits that ended with the newest frame's slot free
            self.hot_wait_misses = 0  # waits that ran out of budget (the normal order followed)
            self.hot_wait_skips = 0  # waits not tried: backing off after a miss
            self.hot_wait_ns = 0  # time spent in them, hits and misses
            self._hot_penalty = 0  # waits to skip after the next miss (doubles, halves)
            self._hot_backoff = 0  # waits still to skip
            self._pending: list[ControlMessage] = []
            self._closed = False
        except BaseException:
            self._finalizer()
            raise
        store_fence()
        w[L.H_STATE] = L.STATE_LIVE
        log.debug("stream %r: created %s (%d bytes)", name, self.path, g.total)

    # ------------------------------------------------------------------ lifecycle
    def _create(self, mode: int) -> int:
        """Create the segment exclusively; clean a dead producer's one. Returns its generation."""
        prev = 0
        for _ in range(200):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            except FileExistsError:
                prev = max(prev, self._clean_stale())
                continue
            if try_lock(fd, L.LOCK_PRODUCER):
                os.fchmod(fd, mode)  # exactly what was asked, whatever the umask
                self._fd = fd
                return prev
            os.close(fd)  # a cleaner judged our empty file stale and is removing it: retry
            time.sleep(0.005)
        raise NameInUse(f"stream {self.name!r}: could not create {self.path} (contended)")

    def _clean_stale(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            st = os.fstat(fd)
            if not try_lock(fd, L.LOCK_PRODUCER):
                pid = "?"
                if st.st_size >= L.HEADER_WORDS * 8:
                    with mmap.mmap(fd, L.HEADER_WORDS * 8, prot=mmap.PROT_READ) as hm:
                        pid = str(struct.unpack_from("Q", hm, L.H_PID * 8)[0])
                raise NameInUse(
                    f"stream {self.name!r} is already published by a live producer (pid {pid})"
                )
            if st.st_size == 0 and time.time() - st.st_mtime < 2.0:
                unlock(fd, L.LOCK_PRODUCER)  # a producer is between create and lock
                time.sleep(0.005)
                return 0
            gen = pid_old = 0
            if st.st_size >= L.HEADER_WORDS * 8:
                with mmap.mmap(fd, L.HEADER_WORDS * 8, prot=mmap.PROT_READ) as hm:
                    gen = struct.unpack_from("Q", hm, L.H_GENERATION * 8)[0]
                    pid_old = struct.unpack_from("Q", hm, L.H_PID * 8)[0]
            # We hold the dead producer's lock, so nobody else can replace the path now.
            try:
                if os.stat(self.path).st_ino == st.st_ino:
                    os.unlink(self.path)
                    log.warning(
                        "stream %r: removed the stale segment of dead producer pid %s",
                        self.name,
                        pid_old,
                    )
            except FileNotFoundError:
                pass
            return int(gen)
        finally:
            os.close(fd)

    def _discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = -1

    def close(self) -> None:
        """Tell readers the stream ended, wake them and remove the segment.

        Also done when the producer is garbage-collected or the interpreter exits,
        so only a crash leaves a (stale) segment, which the next producer removes.
        """
        if self._closed:
            return
        self._closed = True
        if self._open is not None:
            self._open.abort()
        self._finalizer()
        self._views.clear()
        self._leases = np.empty((0, 0), np.uint64)
        self._waiting.release()
        self._words.release()
        self._f64.release()
        # the caller kept a slot view; the mapping goes with it
        with contextlib.suppress(BufferError):
            self._mm.close()

    @staticmethod
    def _shutdown(path: str, fd: int, mm: mmap.mmap, notify_addr: int) -> None:
        """End the stream: state CLOSED, readers woken, segment unlinked, lock released."""
        struct.pack_into("Q", mm, L.H_STATE * 8, L.STATE_CLOSED)
        notify = (struct.unpack_from("Q", mm, L.H_NOTIFY * 8)[0] + 1) & 0xFFFFFFFF
        struct.pack_into("Q", mm, L.H_NOTIFY * 8, notify)
        fence()
        futex_wake(notify_addr)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
        unlock(fd, L.LOCK_PRODUCER)
        os.close(fd)

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._seq} frames"
        return f"<Producer {self.name!r} {state}>"

    # ------------------------------------------------------------------ writing
    @property
    def frames_published(self) -> int:
        return self._seq

    def frame(
        self,
        *,
        frame_id: int | None = None,
        attrs: Mapping[str, Any] | None = None,
        rows: Mapping[str, int] | None = None,
        timestamp: float | None = None,
    ) -> WritableFrame:
        """Claim a slot to fill in place; use as ``with producer.frame() as f: f["img"][...] = x``.

        ``rows`` gives the leading dimension of ``variable`` streams for this frame;
        ``frame_id`` (default: the sequence number), ``timestamp`` (default: the time of
        publishing) and ``attrs`` may also be set on the frame inside the block.  When every
        slot is leased the frame is written to scratch memory, ``dropped`` is True and the
        drop is counted: the producer never blocks (its only wait, for big slots, is the
        bounded spin for the newest frame's slot: ``hot_wait``).
        """
        if self._closed:
            raise RuntimeError(f"stream {self.name!r}: producer is closed")
        if self._open is not None:
            raise RuntimeError(f"stream {self.name!r}: frame {self._open.seq} is still open")
        row_counts = self._check_rows(rows) if rows else {}
        seq = self._seq + 1
        k = self._claim(seq)
        arrays = self._views[k] if k is not None else self._scratch
        if row_counts:
            arrays = {n: (a[: row_counts[n]] if n in row_counts else a) for n, a in arrays.items()}
        wf = WritableFrame(self, k, seq, arrays, row_counts, frame_id, dict(attrs) if attrs else {})
        wf.timestamp = timestamp
        self._open = wf
        return wf

    def publish(
        self,
        data: Mapping[str, Any] | np.ndarray[Any, Any],
        *,
        frame_id: int | None = None,
        timestamp: float | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> int | None:
        """Copy arrays into a slot and publish them: the frame's sequence, or None if dropped.

        A bare array is accepted when the schema has one stream.
        """
        if not isinstance(data, Mapping):
            if len(self.schema.streams) != 1:
                raise SchemaMismatch(
                    f"stream {self.name!r} has streams {self.schema.names}: pass a mapping"
                )
            data = {self.schema.streams[0].name: data}
        missing = set(self.schema.names) - set(data)
        extra = set(data) - set(self.schema.names)
        if missing or extra:
            raise SchemaMismatch(
                f"stream {self.name!r}: frame has streams {sorted(data)}, schema has "
                f"{self.schema.names}"
            )
        arrays = {n: np.asarray(v) for n, v in data.items()}
        rows = {}
        for spec in self.schema.streams:
            a = arrays[spec.name]
            self._check_array(spec, a)
            if spec.variable:
                rows[spec.name] = a.shape[0]
        f = self.frame(frame_id=frame_id, attrs=attrs, rows=rows, timestamp=timestamp)
        try:
            for n, a in arrays.items():
                np.copyto(f[n], a, casting="same_kind")
        except BaseException:
            f.abort()
            raise
        return f.publish()

    def _check_array(self, spec: L.StreamSpec, a: np.ndarray[Any, Any]) -> None:
        where = f"stream {self.name!r} array {spec.name!r}"
        if not np.can_cast(a.dtype, spec.dtype, "same_kind"):
            raise SchemaMismatch(f"{where}: dtype {a.dtype} cannot be written as {spec.dtype}")
        if a.size * spec.dtype.itemsize > spec.nbytes or (
            spec.variable and a.ndim and a.shape[0] > spec.shape[0]
        ):
            raise FrameTooLarge(
                f"{where}: {a.shape} ({a.size * spec.dtype.itemsize} bytes) does not fit the "
                f"slot's {spec.shape} ({spec.nbytes} bytes)"
            )
        if spec.variable:
            if a.ndim != len(spec.shape) or a.shape[1:] != spec.shape[1:]:
                raise SchemaMismatch(
                    f"{where}: shape {a.shape} is not (n <= {spec.shape[0]},) + {spec.shape[1:]}"
                )
        elif a.shape != spec.shape:
            raise SchemaMismatch(f"{where}: shape {a.shape} != schema's {spec.shape}")

    def _check_rows(self, rows: Mapping[str, int]) -> dict[str, int]:
        out = {}
        for n, r in rows.items():
            try:
                spec = self.schema[n]
            except KeyError:
                raise SchemaMismatch(f"stream {self.name!r} has no array {n!r}") from None
            if not spec.variable:
                raise SchemaMismatch(f"stream {self.name!r} array {n!r} is not variable")
            if not isinstance(r, int | np.integer) or r < 0:
                raise ValueError(f"stream {self.name!r} array {n!r}: bad row count {r!r}")
            if r > spec.shape[0]:
                raise FrameTooLarge(
                    f"stream {self.name!r} array {n!r}: {r} rows > slot's {spec.shape[0]}"
                )
            out[n] = int(r)
        return out

    def _scan(self) -> tuple[set[int], int, int]:
        """Slots leased by any registered reader, and how far the readers have read.

        Returns (leased slots, smallest ``last_seq`` of the every-frame readers, smallest
        ``last_seq`` of all readers); -1 where there is no such reader.  A plain loop: for
        the usual handful of readers it is cheaper than a numpy reduction.
        """
        w = self._words
        leased: set[int] = set()
        behind = behind_all = -1
        n = self.geometry.n_slots
        for rw in self._rec_word:
            if w[rw]:  # R_PID is word 0 of a record
                mode = w[rw + L.R_MODE]
                if mode != L.MODE_CLOSED:
                    last = w[rw + L.R_LAST_SEQ]
                    behind_all = last if behind_all < 0 else min(behind_all, last)
                    if mode == L.MODE_EVERY:
                        behind = last if behind < 0 else min(behind, last)
                base = rw + L.R_LEASES
                for k in range(n):
                    if w[base + k]:
                        leased.add(k)
        return leased, behind, behind_all

    def _leased_now(self, k: int) -> bool:
        w = self._words
        off = L.R_LEASES + k
        # R_PID is word 0 of a record (a loop: cheaper than a generator here)
        for rw in self._rec_word:  # noqa: SIM110
            if w[rw] and w[rw + off]:
                return True
        return False

    def _claim(self, seq: int) -> int | None:
        """Pick a slot nobody leases and mark it being written (odd sequence).

        The order (docs/shm_transport.md, "Which slot"): the newest frame's slot if every
        registered reader has read it (the hottest memory, and nobody needs that frame);
        then slots every every-frame reader has read past, most recently written first;
        then the oldest frame first (with no reader registered: the most history for one
        that joins with ``start="oldest"``); the newest frame's slot as a last resort.
        ``reuse="ring"`` always takes the oldest frame's slot instead: the most history, for
        readers that come looking for a given frame after the fact.  With ``hot_wait``, a
        newest slot that a reader has not finished with yet is waited for, briefly
        (``_hot_wait``), before the rest of the order is taken.
        """
        leased, behind, behind_all = self._scan()
        latest = self._latest_k
        cands = [k for k in self._all_slots if k != latest and k not in leased]
        if not cands:
            self._reclaim(force=True)
            leased, behind, behind_all = self._scan()
            cands = [k for k in self._all_slots if k != latest and k not in leased]
        seqs = self._slot_seq
        hot = False
        if latest >= 0 and behind_all >= 0 and self.reuse == "hot":
            if latest not in leased and behind_all >= seqs[latest]:
                hot = True  # every reader has it: rewrite it while it is hot
            elif self._hot_cap_ns:
                hot = self._hot_wait(latest, seqs[latest])
        if self.reuse == "ring":  # history first: always the oldest frame
            cands.sort(key=seqs.__getitem__)
        elif len(cands) > 1:
            if behind_all < 0:  # nobody reads: keep history, overwrite the oldest
                cands.sort(key=seqs.__getitem__)
            else:
                done = [k for k in cands if behind < 0 or seqs[k] <= behind]
                done.sort(key=seqs.__getitem__, reverse=True)
                if len(done) < len(cands):
                    rest = [k for k in cands if not (behind < 0 or seqs[k] <= behind)]
                    rest.sort(key=seqs.__getitem__)
                    done += rest
                cands = done
        if hot:
            cands.insert(0, latest)
        elif latest >= 0 and latest not in leased:
            cands.append(latest)  # last resort: replace the newest frame, not drop one
        w = self._words
        for k in cands:
            sw = self._slot_word[k]
            old = w[sw + L.S_SEQ]
            w[sw + L.S_SEQ] = 2 * seq - 1
            fence()  # our odd sequence before we look at leases (Dekker with Reader._take)
            if not self._leased_now(k):
                return k
            w[sw + L.S_SEQ] = old  # a reader leased it meanwhile: its data is untouched
            self.lease_skips += 1
            w[L.H_LEASE_SKIPS] += 1
        self.dropped += 1
        w[L.H_DROPPED] += 1
        if self.dropped & (self.dropped - 1) == 0:  # log 1, 2, 4, 8, ... not every drop
            log.warning(
                "stream %r: every slot is leased by readers, frame %d dropped (%d so far)",
                self.name,
                seq,
                self.dropped,
            )
        return None

    def _hot_wait(self, k: int, seq_k: int) -> bool:
        """Spin, within budget, until every reader has read slot k's frame and none leases it.

        Why: with a reader that keeps up, the producer claims the next frame a few
        microseconds after the commit, while the reader is still taking the newest frame
        (about 5-10 us of Python); without the wait the producer alternates between two big
        slots, and a fill of 8 MiB where it is not in cache costs 1.5-2x one where it is.
        The budget is ``hot_wait`` capped at ``HOT_WAIT_SHARE`` of the recent frame
        interval; a wait that runs out makes the next ones skipped, more of them per miss in
        a row, so a reader that holds a frame for long (a live view) costs the budget now and
        then, not every frame.  Only a heuristic: the claim's odd sequence, fence and lease
        re-check (Dekker with ``Reader._take``) still decide whether the slot may be written.
        """
        if self._hot_backoff:
            self._hot_backoff -= 1
            self.hot_wait_skips += 1
            self._words[L.H_HOT_WAIT_SKIPS] = self.hot_wait_skips  # (for inspect)
            return False
        rate = self._rate
        if rate <= 0.0:
            return False  # no interval known yet (the first frames): no budget
        budget = min(self._hot_cap_ns, int(HOT_WAIT_SHARE * 1e9 / rate))
        w = self._words
        lease = L.R_LEASES + k
        last_seq = L.R_LAST_SEQ
        mode = L.R_MODE
        closed = L.MODE_CLOSED
        recs = [rw for rw in self._rec_word if w[rw]]  # (R_PID is word 0 of a record)
        clock = time.monotonic_ns
        t0 = clock()
        end = t0 + budget
        while True:
            for rw in recs:
                # last_seq before the lease: a reader stores its lease, then last_seq, so
                # seeing the frame read means seeing a lease still held (the other order
                # could miss a lease taken between the two loads; the claim's re-check
                # would catch it, at the cost of a lease skip).  A reader that left
                # meanwhile (pid 0) holds nothing and needs nothing.
                if w[rw] and (
                    (w[rw + last_seq] < seq_k and w[rw + mode] != closed) or w[rw + lease]
                ):
                    break
            else:
                self.hot_wait_ns += clock() - t0
                self.hot_wait_hits += 1
                w[L.H_HOT_WAIT_NS] = self.hot_wait_ns  # (for inspect)
                w[L.H_HOT_WAIT_HITS] = self.hot_wait_hits
                self._hot_penalty >>= 1
                return True
            now = clock()
            if now >= end:
                self.hot_wait_ns += now - t0
                self.hot_wait_misses += 1
                w[L.H_HOT_WAIT_NS] = self.hot_wait_ns  # (for inspect)
                w[L.H_HOT_WAIT_MISSES] = self.hot_wait_misses
                self._hot_penalty = min(2 * self._hot_penalty + 1, HOT_WAIT_BACKOFF_MAX)
                self._hot_backoff = self._hot_penalty
                return False

    def _commit(self, f: WritableFrame, timestamp: float | None) -> int | None:
        self._open = None
        now = time.monotonic_ns()
        if now >= self._next_reclaim:
            self._reclaim()
        k = f._k
        if k is None:
            return None
        w = self._words
        sw = self._slot_word[k]
        seq = f.seq
        try:  # what the caller set on the frame: bad values abort it, never half-publish it
            fid = seq if f.frame_id is None else _frame_id(f.frame_id)
            ts = time.time() if timestamp is None else float(timestamp)
            blob = json.dumps(f.attrs).encode() if f.attrs else b""
        except (TypeError, ValueError, OverflowError) as exc:
            self._abort(f)
            raise ValueError(
                f"stream {self.name!r}: frame {seq} not published: bad frame_id, timestamp or "
                f"attrs (attrs must be JSON-serialisable): {exc}"
            ) from None
        w[sw + L.S_FRAME_SEQ] = seq
        w[sw + L.S_FRAME_ID] = fid & 0xFFFFFFFFFFFFFFFF
        self._f64[sw + L.S_TIMESTAMP] = ts
        if blob:
            if len(blob) > self.geometry.attrs_bytes:
                self._abort(f)
                raise FrameTooLarge(
                    f"stream {self.name!r}: frame attributes take {len(blob)} bytes, "
                    f"the slot holds {self.geometry.attrs_bytes} (Producer(attrs_bytes=...))"
                )
            start = self._slot_base[k] + L.SLOT_FIXED
            self._mm[start : start + len(blob)] = blob
            w[sw + L.S_ATTRS_LEN] = len(blob)
        else:
            w[sw + L.S_ATTRS_LEN] = 0
        for i, sname, rows in self._variable:
            w[sw + L.S_LEAD + i] = f._rows.get(sname, rows)
        latest = seq * 256 + k
        even = 2 * seq
        # the producer's own bookkeeping before the frame goes out, so that nothing but the
        # wake-up follows the commit (a reader woken on this CPU runs when we stop)
        self._slot_seq[k] = seq
        self._latest_k = k
        self._seq = seq
        if self._last_ns:
            dt = (now - self._last_ns) / 1e9
            if dt > 0:
                # ~1 s time constant whatever the rate; the first interval seeds it
                alpha = 1.0 if self._rate == 0.0 else -math.expm1(-dt)
                self._rate += alpha * (1.0 / dt - self._rate)
        self._last_ns = now
        w[L.H_PUBLISH_NS] = now
        self._f64[L.H_RATE] = self._rate
        waiting, nobody, wake_args = self._waiting, self._nobody_waits, self._wake_args
        notify = (w[23] + 1) & 0xFFFFFFFF  # L.H_NOTIFY (only the producer writes it)
        if WEAK_ORDER:
            w[sw + L.S_PUBLISH_NS] = time.monotonic_ns()
            store_fence()  # payload and metadata before the even sequence
            w[sw + L.S_SEQ] = even
            store_fence()  # the slot before the pointer to it
            w[L.H_LATEST] = latest
        else:  # x86-64 keeps stores in order: no fence calls between the stamp and LATEST
            w[sw + L.S_PUBLISH_NS] = time.monotonic_ns()
            w[sw] = even  # (L.S_SEQ is word 0 of a slot)
            w[16] = latest  # L.H_LATEST
        w[23] = notify  # L.H_NOTIFY
        fence()  # latest/notify before we read the waiting flags (Dekker with Reader._wait)
        # (flags are 0 or 1, so even a byte-wise copy of one reads it right; a dead reader's
        # stale flag costs one spurious wake)
        if waiting.tobytes() != nobody:
            futex_syscall(*wake_args)
        return seq

    def _abort(self, f: WritableFrame) -> None:
        self._open = None
        if f._k is not None:
            k = f._k
            self._words[self._slot_word[k] + L.S_SEQ] = 0  # half-written: never readable
            self._slot_seq[k] = 0
            if self._latest_k == k:
                self._latest_k = -1

    # ------------------------------------------------------------------ readers
    def _reclaim(self, force: bool = False) -> int:
        """Free the records and leases of readers that died (their OFD lock is gone)."""
        self._next_reclaim = time.monotonic_ns() + _RECLAIM_EVERY_NS
        n = 0
        w = self._words
        for i, rw in enumerate(self._rec_word):
            if w[rw + L.R_PID] == 0:
                continue
            byte = L.LOCK_READER_BASE + i
            if lock_held_by_other(self._fd, byte) or not try_lock(self._fd, byte):
                continue
            try:
                pid = w[rw + L.R_PID]
                # what it sent before it went is still delivered (poll_control)
                self._pending.extend(self._drain(i, rw, 1 << 30))
                self._leases[i, :] = 0
                w[rw + L.R_WAITING] = 0
                closed = w[rw + L.R_MODE] == L.MODE_CLOSED
                w[rw + L.R_PID] = 0
                if not closed:
                    n += 1
                    log.warning(
                        "stream %r: reclaimed reader %d (pid %d) which died", self.name, i, pid
                    )
            finally:
                unlock(self._fd, byte)
        if n:
            w[L.H_RECLAIMED] += n
        return n

    def reclaim_dead_readers(self) -> int:
        """Reclaim now (publishing does it every 0.25 s); returns how many were reclaimed."""
        return self._reclaim(force=True)

    def poll_control(self, max_messages: int = 256) -> list[ControlMessage]:
        """Drain readers' control rings (reader -> producer requests), oldest first per reader.

        Messages of a reader that closed (or died) before they were read are delivered too.
        """
        if self._closed:
            raise RuntimeError(f"stream {self.name!r}: producer is closed")
        if not isinstance(max_messages, int) or max_messages < 1:
            raise ValueError(f"stream {self.name!r}: max_messages must be a positive integer")
        out = self._pending[:max_messages]
        del self._pending[:max_messages]
        w = self._words
        for i, rw in enumerate(self._rec_word):
            if len(out) >= max_messages:
                break
            if w[rw + L.R_PID] and w[rw + L.R_CTRL_HEAD] != w[rw + L.R_CTRL_TAIL]:
                out.extend(self._drain(i, rw, max_messages - len(out)))
        if len(out) < max_messages and any(
            w[rw + L.R_MODE] == L.MODE_CLOSED for rw in self._rec_word if w[rw + L.R_PID]
        ):
            self._reclaim(force=True)  # closed readers left messages: free their records
            out.extend(self._pending[: max_messages - len(out)])
            del self._pending[: max_messages - len(out)]
        return out

    def _drain(self, i: int, rw: int, limit: int) -> list[ControlMessage]:
        w = self._words
        g = self.geometry
        cap = g.record_stride - L.R_CTRL_DATA
        pid = int(w[rw + L.R_PID])
        head = w[rw + L.R_CTRL_HEAD]
        tail = w[rw + L.R_CTRL_TAIL]
        out: list[ControlMessage] = []
        if head == tail:
            return out
        fence()  # head before the bytes it covers
        data0 = g.records_off + i * g.record_stride + L.R_CTRL_DATA
        while tail < head and len(out) < limit:
            pos = tail % cap
            length, kind = struct.unpack_from("II", self._mm, data0 + pos)
            if length == _WRAP:
                tail += cap - pos
                continue
            if length > cap - 8:  # a dead reader's half-written garbage: stop, never crash
                tail = head
                break
            body = bytes(self._mm[data0 + pos + 8 : data0 + pos + 8 + length])
            tail += 8 + L.round_up(length, 8)
            out.append(ControlMessage(i, pid, kind, body))
        fence()  # finish reading before the reader may reuse the bytes
        w[rw + L.R_CTRL_TAIL] = tail
        return out
