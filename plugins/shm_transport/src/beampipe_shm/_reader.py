"""Readers: open a stream by name, get the newest frame or every frame, zero-copy or copied."""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import struct
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import numpy as np

from . import _layout as L
from ._errors import (
    ControlRingFull,
    LeaseLimitReached,
    ReaderLimitReached,
    SchemaMismatch,
    StreamNotFound,
)
from ._segment import Mapped, open_segment
from ._sys import (
    WEAK_ORDER,
    fence,
    futex_syscall,
    futex_wait,
    futex_wait_args,
    load_fence,
    release_fence,
    store_fence,
    try_lock,
    unlock,
)

__all__ = ["Frame", "Reader", "ReaderStats"]

log = logging.getLogger("beampipe_shm")

_LIVENESS_EVERY = 0.1  # s between producer-liveness checks while idle
_WRAP = 0xFFFFFFFF
_LEASE_COPY_BYTES = 256 * 1024
_BEAT_NS = 10_000_000
_SECONDS = frozenset((int, float))
#: slot words S_FRAME_ID, S_TIMESTAMP, S_PUBLISH_NS (contiguous): what read_into copies
_META = struct.Struct("QdQ")
#: What the last-frame metadata holds after a torn copy (no producer writes it: its publish_ns
#: would be 2**64-1): the copy overwrote the metadata of the frame delivered before.
_TORN_META = b"\xff" * _META.size
_META_OFF = L.S_FRAME_ID * 8


def _i64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


class _Attachment:
    """One mapped producer instance plus the reader record this reader owns in it."""

    def __init__(self, seg: Mapped, mode: int) -> None:
        self.seg = seg
        g = seg.geometry
        base = g.records_off // 8
        for i in range(g.max_readers):
            if try_lock(seg.fd, L.LOCK_READER_BASE + i):
                rw0 = base + i * g.record_stride // 8
                w = seg.words
                if w[rw0 + L.R_PID] and w[rw0 + L.R_CTRL_HEAD] != w[rw0 + L.R_CTRL_TAIL]:
                    # a gone reader's undelivered messages: the producer drains them first
                    unlock(seg.fd, L.LOCK_READER_BASE + i)
                    continue
                break
        else:
            raise ReaderLimitReached(
                f"stream {seg.name!r}: all {g.max_readers} reader records are taken by live "
                "readers (Producer(max_readers=...))"
            )
        self.index = i
        self.rec = mmap.mmap(seg.fd, g.record_stride, offset=g.records_off + i * g.record_stride)
        self.rw = memoryview(self.rec).cast("Q")
        self.rec[: L.R_CTRL_DATA] = bytes(L.R_CTRL_DATA)  # whatever a dead owner left
        now = time.monotonic_ns()
        self.rw[L.R_MODE] = mode
        self.rw[L.R_OPENED_NS] = now
        self.rw[L.R_HEARTBEAT_NS] = now
        self.rw[L.R_GENERATION] = seg.generation
        store_fence()
        self.rw[L.R_PID] = os.getpid()
        store_fence()  # registered before any lease store (the producer scans pid, then leases)
        self.f64 = memoryview(seg.mm).cast("d")
        self.slot_word = [(g.slots_off + k * g.slot_stride) // 8 for k in range(g.n_slots)]
        self.slot_addr = [seg.addr + g.slots_off + k * g.slot_stride for k in range(g.n_slots)]
        self.refs = [0] * g.n_slots
        self.retired = False
        self.notify_addr = seg.addr + L.NOTIFY_OFFSET

    def seq_of(self, k: int) -> int:
        return int(self.seg.words[self.slot_word[k]])

    def unlease(self, k: int) -> None:
        self.refs[k] -= 1
        if self.refs[k] == 0:
            if not self.retired:
                release_fence()  # the reads of the slot are done before the producer may write
                self.rw[L.R_LEASES + k] = 0
            elif not any(self.refs):
                self._unmap()

    def _unmap(self) -> None:
        self.rw.release()
        self.f64.release()
        self.rec.close()
        self.seg.close()

    def retire(self) -> None:
        """Give the record back; frames still held keep the mapping alive until they go."""
        if self.retired:
            return
        self.retired = True
        release_fence()
        self.rw[L.R_WAITING] = 0
        for k in range(len(self.refs)):
            self.rw[L.R_LEASES + k] = 0
        store_fence()
        if self.rw[L.R_CTRL_HEAD] != self.rw[L.R_CTRL_TAIL]:
            # messages the producer has not read yet: leave the record to it (poll_control
            # delivers them, then frees the record) instead of dropping them
            self.rw[L.R_MODE] = L.MODE_CLOSED
        else:
            self.rw[L.R_PID] = 0
        unlock(self.seg.fd, L.LOCK_READER_BASE + self.index)
        if not any(self.refs):
            self._unmap()


def _retire_current(current: list[_Attachment]) -> None:
    current[0].retire()


class _Lease:
    __slots__ = ("att", "k", "reader", "released")

    def __init__(self, reader: Reader, att: _Attachment, k: int) -> None:
        self.reader = reader
        self.att = att
        self.k = k
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        with self.reader._lock:
            if self.released:  # (released by another thread meanwhile)
                return
            self.released = True
            self.reader._n_leases -= 1
            self.att.unlease(self.k)

    def __del__(self) -> None:
        if not self.released:
            with contextlib.suppress(Exception):  # at interpreter exit the mapping may be gone
                self.release()


class _View:
    """What a zero-copy array's ``base`` is: it keeps the lease (and the mapping) alive."""

    __slots__ = ("__array_interface__", "_lease")

    def __init__(self, iface: dict[str, Any], lease: _Lease) -> None:
        self.__array_interface__ = iface
        self._lease = lease


class Frame:
    """One frame: named arrays plus per-frame metadata.

    Zero-copy frames hold a lease: the producer will not overwrite the slot until
    ``release()`` (or the end of a ``with`` block, or the frame and every array
    taken from it being garbage-collected).  Arrays are read-only.
    """

    __slots__ = (
        "_arrays",
        "_attrs",
        "_attrs_raw",
        "_lease",
        "_specs",
        "frame_id",
        "generation",
        "missed",
        "publish_ns",
        "seq",
        "stream",
        "timestamp",
    )

    def __init__(
        self,
        stream: str,
        seq: int,
        frame_id: int,
        timestamp: float,
        publish_ns: int,
        attrs_raw: bytes,
        missed: int,
        generation: int,
        arrays: dict[str, np.ndarray[Any, Any]],
        specs: dict[str, dict[str, Any]] | None,
        lease: _Lease | None,
    ) -> None:
        self.stream = stream
        self.seq = seq
        self.frame_id = frame_id
        self.timestamp = timestamp
        self.publish_ns = publish_ns
        self._attrs_raw = attrs_raw
        self._attrs: dict[str, Any] | None = None
        self.missed = missed
        self.generation = generation
        self._arrays = arrays
        self._specs = specs
        self._lease = lease

    @property
    def attrs(self) -> dict[str, Any]:
        """Per-frame user attributes (decoded on first use)."""
        if self._attrs is None:
            self._attrs = json.loads(self._attrs_raw) if self._attrs_raw else {}
        return self._attrs

    @property
    def leased(self) -> bool:
        """True while this zero-copy frame's slot is protected from the producer."""
        return self._lease is not None and not self._lease.released

    @property
    def names(self) -> list[str]:
        return list(self._specs) if self._specs is not None else list(self._arrays)

    def __getitem__(self, name: str) -> np.ndarray[Any, Any]:
        if self._lease is not None and self._lease.released:
            raise RuntimeError(
                f"stream {self.stream!r} frame {self.seq}: released, its slot may be rewritten"
            )
        a = self._arrays.get(name)
        if a is not None:
            return a
        if self._specs is None or name not in self._specs:
            raise KeyError(f"stream {self.stream!r} has no array {name!r} (has {self.names})")
        iface = self._specs[name]
        assert self._lease is not None
        a = np.asarray(_View(iface, self._lease))
        self._arrays[name] = a
        return a

    @property
    def arrays(self) -> dict[str, np.ndarray[Any, Any]]:
        return {n: self[n] for n in self.names}

    def copy(self) -> Frame:
        """A frame that owns copies of the arrays (no lease): keep it as long as you like."""
        arrays = {n: np.array(a) for n, a in self.arrays.items()}
        return Frame(
            self.stream,
            self.seq,
            self.frame_id,
            self.timestamp,
            self.publish_ns,
            self._attrs_raw,
            self.missed,
            self.generation,
            arrays,
            None,
            None,
        )

    def release(self) -> None:
        """Hand the slot back to the producer; arrays taken from this frame are then stale."""
        lease = self._lease
        if lease is not None and not lease.released:
            lease.release()

    def __enter__(self) -> Frame:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        kind = "leased" if self.leased else ("released" if self._lease else "copy")
        return (
            f"<Frame {self.stream!r} seq={self.seq} id={self.frame_id} missed={self.missed} {kind}>"
        )


@dataclass
class ReaderStats:
    frames: int = 0  # frames delivered
    missed: int = 0  # frames published that this reader never got (every-frame: drops)
    torn: int = 0  # reads discarded because the producer rewrote the slot during them
    reattached: int = 0  # producer restarts followed
    generation: int = 0  # producer instance currently attached


class Reader:
    """Read frames of a stream by name.

    ``mode="latest"``: each read returns the newest frame not seen yet (live view,
    never a backlog).  ``mode="every"``: frames in order; when the reader fell more
    than ``slots - 1`` frames behind, the ones overwritten are skipped and counted
    in ``Frame.missed``.  ``copy=False`` gives zero-copy read-only views under a
    lease; ``copy=True`` copies (no lease, nothing to release).
    """

    def __init__(
        self,
        name: str,
        *,
        mode: Literal["latest", "every"] = "latest",
        copy: bool = False,
        expect: Iterable[L.StreamSpec] | L.StreamSpec | None = None,
        wait: float = 0.0,
        start: Literal["latest", "oldest", "next"] | None = None,
        max_leases: int = 2,
        spin: float = 20e-6,
        reattach: bool = True,
    ) -> None:
        self.name = L.check_name(name)
        if mode not in ("latest", "every"):
            raise ValueError(f"stream {name!r}: mode must be 'latest' or 'every', got {mode!r}")
        if start not in (None, "latest", "oldest", "next"):
            raise ValueError(f"stream {name!r}: start must be 'latest', 'oldest' or 'next'")
        if not isinstance(max_leases, int) or max_leases < 1:
            raise ValueError(f"stream {name!r}: max_leases must be an integer >= 1")
        if not isinstance(spin, int | float) or spin < 0 or not isinstance(wait, int | float):
            raise ValueError(f"stream {name!r}: spin and wait are seconds >= 0")
        self.mode = mode
        self._mode = L.MODE_EVERY if mode == "every" else L.MODE_LATEST
        self.copy = bool(copy)
        if isinstance(expect, L.StreamSpec):
            expect = [expect]
        self._expect = list(expect) if expect is not None else None
        self.max_leases = max_leases
        self.spin = float(spin)
        self.reattach = reattach
        self.stats = ReaderStats()
        self._lock = threading.RLock()
        self._n_leases = 0
        self._closed = False
        self._next_liveness = 0.0
        self._next_beat = 0
        self._beat_count = 32  # frames until the next heartbeat check
        self._empty_polls = 0
        # read_into(): the out buffers last bound (identity), and per slot (dst, src) pairs
        self._into_key: Any = None
        self._into_arrays: tuple[np.ndarray[Any, Any], ...] = ()
        self._into_pairs: list[list[tuple[Any, Any]]] = []
        #: per slot (sequence word index, copies or None for a big slot, metadata bytes): what
        #: _into_fast needs, in one lookup; None when read_into must take the general path
        self._into_slots: list[tuple[int, list[tuple[Any, Any]] | None, memoryview]] | None = None
        self._into_map: dict[str, np.ndarray[Any, Any]] = {}
        self._into_sig: list[tuple[tuple[int, ...], np.dtype[Any]]] = []
        self._into_ok = False
        self._into_is_map = False
        #: metadata of the last frame read_into() delivered, as the slot holds it (frame id,
        #: timestamp, publish ns): copied in one go under the seqlock, decoded when asked for
        self._meta = memoryview(bytearray(_META.size))
        #: frames skipped just before the last frame read_into() delivered
        self.last_missed = 0
        deadline = time.monotonic() + max(0.0, float(wait))
        while True:
            try:
                seg = open_segment(self.name)
                break
            except StreamNotFound:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)
        self._att = self._attach(seg)
        # a Reader dropped without close() gives its record and leases back
        self._current = [self._att]
        self._finalizer = weakref.finalize(self, _retire_current, self._current)
        self._last = 0  # seq of the last frame delivered in this generation
        self._position(start or "latest")

    # ------------------------------------------------------------------ attach
    def _attach(self, seg: Mapped) -> _Attachment:
        try:
            seg.schema.check(self._expect, self.name)
            att = _Attachment(seg, self._mode)
        except BaseException:
            seg.close()
            raise
        self.schema = seg.schema
        self.stats.generation = seg.generation
        self._build_specs(att)
        return att

    def _build_specs(self, att: _Attachment) -> None:
        g = att.seg.geometry
        self._into_key = None  # a new mapping: read_into() binds its buffers again
        self._into_pairs = []
        self._into_slots = None
        self._into_one = False
        self._into_ok = False
        self._notify_addr = att.notify_addr
        self._words = att.seg.words
        self._rw = att.rw
        #: the slot of the last frame delivered: where a reader that keeps up finds the next
        #: one (the producer rewrites the slot every reader is done with), so an every-frame
        #: reader looks there before it looks at LATEST (one cache line less per frame)
        self._pred_k = 0
        self._f64 = att.f64
        self._slot_words = att.slot_word
        self._payload_word = g.stream_offsets[0] // 8  # (relative to the slot)
        self._has_variable = any(s.variable for s in self.schema.streams)
        # copies of big frames take a lease for the copy's duration (no wasted retries)
        self._lease_copies = g.slot_stride >= _LEASE_COPY_BYTES
        pairs = zip(self.schema.streams, g.stream_offsets, strict=True)
        self._layout = [(i, spec, off) for i, (spec, off) in enumerate(pairs)]
        # per slot, per stream: the __array_interface__ of fixed-shape streams never changes
        self._ifaces = [
            {
                spec.name: None if spec.variable else self._iface(spec, spec.shape, base + off)
                for _, spec, off in self._layout
            }
            for base in att.slot_addr
        ]
        # read-only views of each slot's full arrays, for copies (which need no lease link)
        g0 = att.seg.geometry.slots_off
        stride = att.seg.geometry.slot_stride
        self._ro_views = [
            {
                spec.name: np.frombuffer(
                    att.seg.mm,
                    spec.dtype,
                    int(np.prod(spec.shape, dtype=np.int64)),
                    g0 + k * stride + off,
                ).reshape(spec.shape)
                for _, spec, off in self._layout
            }
            for k in range(att.seg.geometry.n_slots)
        ]

    @staticmethod
    def _iface(spec: L.StreamSpec, shape: tuple[int, ...], addr: int) -> dict[str, Any]:
        return {
            "shape": shape,
            "typestr": spec.dtype.str,
            "descr": spec.dtype.descr,
            "data": (addr, True),
            "version": 3,
        }

    def _position(self, start: str) -> None:
        latest = self._att.seg.words[L.H_LATEST] >> 8
        if start == "next":
            self._last = latest
        elif start == "oldest":
            seqs = [self._att.seq_of(k) for k in range(self._att.seg.geometry.n_slots)]
            stable = [s // 2 for s in seqs if s and s % 2 == 0]
            self._last = (min(stable) - 1) if stable else latest
        else:
            self._last = max(0, latest - 1)
        self._att.rw[L.R_LAST_SEQ] = self._last

    def _try_reattach(self) -> bool:
        """Follow a restarted producer: a different segment under the same name."""
        if not self.reattach:
            return False
        try:
            seg = open_segment(self.name)
        except StreamNotFound:
            return False
        if seg.ino == self._att.seg.ino:
            seg.close()
            return False
        old = self._att
        self._att = self._attach(seg)  # SchemaMismatch propagates: the user must decide
        self._current[0] = self._att
        with self._lock:
            old.retire()
        self.stats.reattached += 1
        self._last = 0  # frames of the new generation count from 1
        log.info(
            "stream %r: producer restarted (generation %d), reattached", self.name, seg.generation
        )
        return True

    @property
    def generation(self) -> int:
        return self._att.seg.generation

    @property
    def producer_alive(self) -> bool:
        return self._att.seg.producer_alive()

    @property
    def producer_closed(self) -> bool:
        """The producer ended the stream cleanly (``Producer.close()``)."""
        return bool(self._att.seg.words[L.H_STATE] == L.STATE_CLOSED)

    # ------------------------------------------------------------------ reading
    def read(
        self, timeout: float | None = None, *, out: Mapping[str, np.ndarray[Any, Any]] | None = None
    ) -> Frame | None:
        """The next frame by this reader's mode, or None after ``timeout`` s (0: don't wait).

        ``timeout=None`` waits as long as it takes.  ``out`` (stream name -> array of the
        schema's dtype and shape) copies into your buffers instead of leasing or
        allocating: the fastest copy-out, and what to use for a long-lived result.
        """
        if self._closed:
            raise RuntimeError(f"stream {self.name!r}: reader is closed")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0
        ):
            raise ValueError(f"stream {self.name!r}: timeout must be None or >= 0, got {timeout!r}")
        if out is not None:
            self._check_out(out)
        f = self._poll(out)
        if f is not None:
            return f
        if timeout == 0:
            # non-blocking pollers (a GUI timer) follow a restarted producer too
            if self._idle() and self._try_reattach():
                return self._poll(out)
            return None
        w = self._wait(timeout, out)
        assert not isinstance(w, int)  # (only the fast path returns sequence numbers)
        return w

    def _idle(self) -> bool:
        """Found nothing without waiting: heartbeat, and every 100 ms whether the producer died."""
        now = time.monotonic_ns()
        if now >= self._next_beat:
            self._beat(now)
        t = now / 1e9
        if t >= self._next_liveness:
            self._next_liveness = t + _LIVENESS_EVERY
            return not self._att.seg.producer_alive()
        return False

    def _beat(self, now: int) -> None:
        # at most every 10 ms: a busy-polling reader must not keep dirtying the cache line the
        # producer reads on every publish
        self._next_beat = now + _BEAT_NS
        rw = self._att.rw
        st = self.stats
        rw[L.R_HEARTBEAT_NS] = now
        rw[L.R_FRAMES] = st.frames
        rw[L.R_MISSED] = st.missed
        rw[L.R_TORN] = st.torn

    # ------------------------------------------------------------------ fast copy-out
    def read_into(
        self,
        out: np.ndarray[Any, Any] | Mapping[str, np.ndarray[Any, Any]],
        timeout: float | None = None,
    ) -> int:
        """Copy the next frame into ``out`` and return its sequence number; 0 if none came.

        The low-latency path for live views and small frames: no ``Frame``, no lease
        for small slots, no allocation.  ``out`` is one array (a one-stream schema) or
        stream name -> array, of the schema's dtype and shape; it is checked once and
        remembered, so pass the same buffers on every call.  The frame's metadata is in
        ``last_frame_id``, ``last_timestamp``, ``last_publish_ns`` and ``last_missed``.
        Variable-length streams, and every-frame readers that fell behind, take the
        general path (the same result, a few microseconds slower).
        """
        if timeout is not None and not (timeout.__class__ in _SECONDS and timeout >= 0):
            self._check_timeout(timeout)  # (the slow check only for unusual types)
        if out is not self._into_key or (self._into_is_map and not self._into_same(out)):
            self._bind_into(out)  # (an array seen before needs no check: it cannot move)
        n = self._into_fast()
        if n > 0:
            return n
        if n < 0 and timeout == 0:  # nothing new: a busy-poll loop's common case, kept short
            self._empty_polls += 1
            if self._empty_polls & 255:
                return 0
        if self._closed:
            raise RuntimeError(f"stream {self.name!r}: reader is closed")
        if timeout == 0:
            f = self.read(0, out=self._into_map)
        else:
            spin = self.spin
            if n < 0 and spin:  # bound and nothing new yet: spin right here, one call less
                now = time.monotonic()
                end = now + (spin if timeout is None else min(spin, timeout))
                n = self._spin_into(end)
                if n > 0:
                    return n
                if timeout is not None:
                    timeout = max(0.0, now + timeout - time.monotonic())
            if n < 0 and self._into_one:
                # The blocked every-frame reader of small frames, flat: no call between the
                # futex's return and ours but the wait itself.  After the sleep the caches
                # are cold (other processes ran meanwhile): each lookup, call and cache line
                # then costs ~10x what it does warm, so all the frame needs is bound before
                # the sleep, and the record words (last_seq, waiting flag) that tell the
                # producer where we are wait until the next sleep (or the next 32nd frame).
                deadline = None if timeout is None else time.monotonic() + timeout
                weak = WEAK_ORDER
                while True:
                    words = self._words
                    rw = self._rw
                    v = words[23]  # L.H_NOTIFY, before the flag and the look
                    rw[4] = self._last  # L.R_LAST_SEQ (one line with the flag: no extra miss)
                    rw[2] = 1  # L.R_WAITING
                    fence()  # waiting flag before we look for frames (Dekker with _commit)
                    n = self._into_fast()
                    if n >= 0:
                        break
                    wait_s = self._sleep_s(deadline)
                    if wait_s <= 0.0:
                        self._rw[2] = 0  # L.R_WAITING (a new record after a reattach: harmless)
                        if wait_s == 0.0:
                            return 0
                        n = 0  # reattached: the general path binds the new mapping
                        break
                    last = self._last
                    n = last + 1
                    s = n + n
                    sw, copies, meta = self._into_slots[self._pred_k]  # type: ignore[index]
                    d0, s0 = copies[0]  # type: ignore[index]
                    mt = self._meta
                    missed = self.last_missed
                    st = self.stats
                    # counted ahead (one store less after the wake-up), taken back below if
                    # this wake-up does not deliver the frame
                    count = st.frames + 1
                    st.frames = count
                    beat = not count & 31
                    args = futex_wait_args(self._notify_addr, v, wait_s)
                    try:  # (free in 3.11 unless raised)
                        futex_syscall(*args)
                        if words[sw] == s:  # the frame after ours, in our last slot
                            if weak:
                                load_fence()
                            d0[:] = s0
                            mt[:] = meta
                            if weak:
                                load_fence()  # the copies before the re-check of the sequence
                            if words[sw] == s:
                                self._last = n
                                if missed:
                                    self.last_missed = 0
                                if beat:
                                    self._beat_due()
                                return n
                            st.torn += 1
                            mt[:] = _TORN_META
                    except BaseException:  # a signal's exception (Ctrl-C) during the sleep
                        if self._last != n:
                            st.frames = count - 1
                        self._rw[2] = 0  # L.R_WAITING
                        raise
                    st.frames = count - 1
                    n = self._into_fast()
                    if n >= 0:
                        break
                self._rw[2] = 0  # L.R_WAITING
                if n > 0:
                    return n
                if deadline is not None:
                    timeout = max(0.0, deadline - time.monotonic())
            r = self._wait(timeout, self._into_map, fast=True, spin=n == 0)
            if isinstance(r, int):
                return r
            f = r
        if f is None:
            return 0
        _META.pack_into(self._meta, 0, f.frame_id & 0xFFFFFFFFFFFFFFFF, f.timestamp, f.publish_ns)
        self.last_missed = f.missed
        return f.seq

    def _check_timeout(self, timeout: Any) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
            raise ValueError(f"stream {self.name!r}: timeout must be None or >= 0, got {timeout!r}")

    def _into_same(self, out: Any) -> bool:
        if isinstance(out, np.ndarray):
            return (out.shape, out.dtype) == self._into_sig[0]
        arrays = tuple(out.values())
        return (
            len(arrays) == len(self._into_arrays)
            and all(a is b for a, b in zip(arrays, self._into_arrays, strict=True))
            and [(a.shape, a.dtype) for a in arrays] == self._into_sig
        )

    def _bind_into(self, out: Any) -> None:
        if isinstance(out, np.ndarray):
            if len(self.schema.streams) != 1:
                raise SchemaMismatch(
                    f"stream {self.name!r} has streams {self.schema.names}: pass a mapping"
                )
            mapping = {self.schema.streams[0].name: out}
        elif isinstance(out, Mapping):
            mapping = dict(out)
        else:
            raise TypeError(f"stream {self.name!r}: out must be an array or a mapping of arrays")
        self._check_out(mapping)
        self._into_key = None
        self._into_map = mapping
        self._into_arrays = tuple(mapping.values())
        self._into_sig = [(a.shape, a.dtype) for a in self._into_arrays]
        self._into_pairs = []
        self._into_slots = None
        self._into_one = False
        self._into_ok = not self._has_variable and not self._closed
        self._into_is_map = not isinstance(out, np.ndarray)
        if self._into_ok:
            for views in self._ro_views:
                pairs: list[tuple[Any, Any]] = []
                for name, dst in mapping.items():
                    src = views[name]
                    if dst.flags.c_contiguous and 0 < src.nbytes < _LEASE_COPY_BYTES:
                        # small copies: a memoryview slice assignment is a bare memcpy,
                        # several times cheaper than np.copyto's call overhead
                        pairs.append((dst.data.cast("B"), src.data.cast("B")))
                    else:
                        pairs.append((dst, src))
                self._into_pairs.append(pairs)
            mm = self._att.seg.mm
            self._into_slots = [
                (
                    sw,
                    None if self._lease_copies else pairs,
                    memoryview(mm)[sw * 8 + _META_OFF : sw * 8 + _META_OFF + _META.size],
                )
                for sw, pairs in zip(self._slot_words, self._into_pairs, strict=True)
            ]
            #: read_into's flat blocked path: every-frame, one small copy per frame
            self._into_one = bool(self._mode) and all(
                c is not None and len(c) == 1 for _, c, _ in self._into_slots
            )
        self._into_key = out

    def _into_fast(self) -> int:
        """The newest or next frame copied under the seqlock: its sequence; -1: nothing new
        (with the liveness check still due now and then); 0: take the general path.

        Every attribute and constant it needs is prepared at bind time: this is the loop a
        live view spins in, and each lookup is tens of nanoseconds of a ~0.5 us budget.
        """
        slots = self._into_slots
        if slots is None:
            return 0
        words = self._words
        last = self._last
        n = last + 1
        s = n + n
        k = self._pred_k
        sw, copies, meta = slots[k]
        # every-frame: frame last+1 in the slot the last frame came from is the one to take,
        # whatever LATEST says (a sequence number names exactly one frame); latest-frame
        # readers must see LATEST to know it is the newest
        if not self._mode or words[sw] != s:
            lat = words[16]  # L.H_LATEST (literals: no global lookups on the hot path)
            n = lat >> 8
            if n <= last:
                return -1
            if self._mode and n != last + 1:
                return 0  # an every-frame reader that must catch up in order
            k = lat & 0xFF
            sw, copies, meta = slots[k]
            s = n + n
            if words[sw] != s:
                return 0
        if copies is None:  # a big slot: copied under a lease
            return self._into_leased(k, n, s)
        if WEAK_ORDER:
            load_fence()
        for dst, src in copies:
            dst[:] = src
        self._meta[:] = meta  # frame id, timestamp, publish ns: one copy, decoded on demand
        if WEAK_ORDER:
            load_fence()  # the copies before the re-check of the sequence
        if words[sw] != s:
            self.stats.torn += 1
            self._meta[:] = _TORN_META
            return 0
        # (_delivered, inlined: a call is ~0.1 us of a budget of a few tenths)
        self._last = n
        self._pred_k = k
        self._rw[4] = n  # L.R_LAST_SEQ: the producer's slot choice reads it
        missed = n - last - 1
        self.last_missed = missed
        st = self.stats
        st.frames += 1
        if missed:
            st.missed += missed
        self._beat_count -= 1
        if self._beat_count <= 0:  # frame counters and heartbeat: every 32 frames at most
            self._beat_count = 32
            self._beat_due()
        return n

    def _spin_into(self, spin_end: float) -> int:
        """Busy-wait for the next frame and copy it: its sequence; 0: take the general path;
        -1: nothing before ``spin_end``.

        An every-frame reader watches the slot its last frame came from as well as LATEST:
        a reader that keeps up finds the next frame there (the producer rewrites the slot
        every reader is done with), and takes it straight from the loop, one cache line
        (two with the payload) from the producer's store.  A latest-frame reader watches
        LATEST, which it must read anyway to know the frame is the newest.
        """
        words = self._words
        monotonic = time.monotonic
        every = self._mode
        weak = WEAK_ORDER
        # everything the frame path needs is bound before the frame comes: after it, every
        # bytecode counts (a cache line crossing cores is ~0.3 us here, a bytecode ~10 ns)
        mt = self._meta
        rw = self._rw
        st = self.stats
        latest = words[16]  # L.H_LATEST, read before the first look for a frame
        n = self._into_fast()
        if n >= 0:
            return n
        while True:
            slots = self._into_slots
            if slots is None:
                return 0
            last = self._last
            s = last + last + 2
            k = self._pred_k
            sw, copies, meta = slots[k]
            pw = sw + self._payload_word
            if not every or copies is None:
                sw, s, pw = 16, -1, 16  # never equal (words are unsigned): LATEST only
            d0, s0 = copies[0] if copies and len(copies) == 1 else (None, None)
            # the clock only every 32 looks: a change is seen within one ~70 ns iteration
            for _ in range(32):
                words[pw]  # keep the payload's line here: it is written before SEQ
                if words[sw] == s:
                    if weak:
                        load_fence()
                    if d0 is not None:
                        d0[:] = s0
                    else:
                        for dst, src in copies:  # type: ignore[union-attr]
                            dst[:] = src
                    mt[:] = meta
                    if weak:
                        load_fence()  # the copies before the re-check of the sequence
                    if words[sw] == s:
                        n = last + 1
                        self._last = n
                        rw[4] = n  # L.R_LAST_SEQ: the producer's slot choice reads it
                        self.last_missed = 0
                        f = st.frames + 1
                        st.frames = f
                        if not f & 31:  # heartbeat and frame counters, at most every 10 ms
                            self._beat_due()
                        return n
                    st.torn += 1
                    mt[:] = _TORN_META
                    break
                if words[16] != latest:
                    break
            else:
                if monotonic() >= spin_end:
                    return -1
                continue
            latest = words[16]  # (before the look: a frame after it changes LATEST again)
            n = self._into_fast()
            if n >= 0:
                return n

    def _sleep_s(self, deadline: float | None) -> float:
        """Between two looks for a frame in the blocked read_into: heartbeat, producer
        liveness (following a restart), the deadline.  Seconds to sleep; 0.0: the deadline
        passed; -1.0: reattached to a new producer (take the general path)."""
        now_ns = time.monotonic_ns()
        if now_ns >= self._next_beat:
            self._beat(now_ns)
        now = now_ns / 1e9
        att = self._att
        if now >= self._next_liveness or att.seg.words[L.H_STATE] != L.STATE_LIVE:
            self._next_liveness = now + _LIVENESS_EVERY
            if not att.seg.producer_alive():
                att.rw[L.R_WAITING] = 0
                if self._try_reattach():
                    return -1.0
                att.rw[L.R_WAITING] = 1
        if deadline is None:
            return _LIVENESS_EVERY
        remaining = deadline - time.monotonic()
        return 0.0 if remaining <= 0 else min(remaining, _LIVENESS_EVERY)

    def _beat_due(self) -> None:
        self._rw[2] = 0  # L.R_WAITING, left set by the blocked read_into's wake-up
        now = time.monotonic_ns()
        if now >= self._next_beat:
            self._beat(now)

    def _into_leased(self, k: int, n: int, s: int) -> int:
        """A long copy holds the slot instead of betting the producer stays away from it
        (and wasting a whole copy when it does not)."""
        if self._n_leases >= self.max_leases:
            return 0
        att = self._att
        with self._lock:
            if not self._lease_slot(att, k, s):
                return 0
        try:
            for dst, src in self._into_pairs[k]:
                dst[:] = src  # (numpy's copy for big arrays, a memcpy for small ones)
            self._meta[:] = self._into_slots[k][2]  # type: ignore[index]
        finally:
            with self._lock:
                self._n_leases -= 1
                att.unlease(k)
        return self._delivered(k, n, n - self._last - 1)

    def _delivered(self, k: int, n: int, missed: int) -> int:
        self._last = n
        self._pred_k = k
        self._rw[4] = n  # L.R_LAST_SEQ: the producer's slot choice reads it
        self.last_missed = missed
        st = self.stats
        st.frames += 1
        if missed:
            st.missed += missed
        self._beat_count -= 1
        if self._beat_count <= 0:  # frame counters and heartbeat: every 32 frames at most
            self._beat_count = 32
            self._beat_due()
        return n

    def _last_meta(self) -> tuple[int, float, int]:
        # The copy path writes the metadata before its sequence re-check (one copy, no
        # temporary, on the hot path); a torn copy marks it, so it is never another frame's.
        if self._meta == _TORN_META:
            raise RuntimeError(
                f"stream {self.name!r}: the last read_into saw its frame overwritten while "
                "copying (torn, returned 0): `out` and its metadata hold no frame"
            )
        return _META.unpack(self._meta)

    @property
    def last_frame_id(self) -> int:
        """Frame id of the frame in ``out`` after a ``read_into`` that returned > 0."""
        return _i64(int(self._last_meta()[0]))

    @property
    def last_timestamp(self) -> float:
        """Timestamp (epoch seconds) of the frame in ``out``, as ``last_frame_id``."""
        return float(self._last_meta()[1])

    @property
    def last_publish_ns(self) -> int:
        """``time.monotonic_ns()`` at which the producer published the frame in ``out``."""
        return int(self._last_meta()[2])

    def _check_out(self, out: Mapping[str, np.ndarray[Any, Any]]) -> None:
        for n, a in out.items():
            try:
                spec = self.schema[n]
            except KeyError:
                raise SchemaMismatch(f"stream {self.name!r} has no array {n!r}") from None
            if not isinstance(a, np.ndarray) or a.dtype != spec.dtype or a.shape != spec.shape:
                raise SchemaMismatch(
                    f"stream {self.name!r}: out[{n!r}] must be an array of {spec.dtype} "
                    f"{spec.shape}, got {getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')}"
                )
            if not a.flags.writeable:
                raise ValueError(f"stream {self.name!r}: out[{n!r}] is read-only")

    def __iter__(self) -> Iterator[Frame]:
        return self.frames()

    def frames(self, timeout: float | None = None) -> Iterator[Frame]:
        """Yield frames until the producer closes the stream (or ``timeout`` s without one)."""
        t_last = time.monotonic()
        while True:
            f = self.read(timeout=0.05 if timeout is None else min(timeout, 0.05))
            if f is not None:
                yield f
                t_last = time.monotonic()
                continue
            if self.producer_closed and self._poll_peek_empty() and not self._try_reattach():
                return
            if timeout is not None and time.monotonic() - t_last >= timeout:
                return

    def _poll_peek_empty(self) -> bool:
        return bool((self._att.seg.words[L.H_LATEST] >> 8) <= self._last)

    def _wait(
        self,
        timeout: float | None,
        out: Mapping[str, np.ndarray[Any, Any]] | None = None,
        fast: bool = False,
        spin: bool = True,
    ) -> Frame | int | None:
        """Spin, then sleep on the futex; ``fast``: try ``_into_fast`` first (read_into);
        ``spin=False``: the caller has spun already."""
        now = time.monotonic()
        deadline = None if timeout is None else now + max(0.0, timeout)
        spin_s = self.spin if spin else 0.0
        spin_end = now + spin_s if deadline is None else min(deadline, now + spin_s)
        words = self._att.seg.words
        latest = words[L.H_LATEST]
        monotonic = time.monotonic
        if spin_s:  # a frame that came before we read `latest` would not change it again
            r = (fast and max(0, self._into_fast())) or self._poll(out)
            if r:
                return r
        while spin_s and fast and self._into_slots is not None:
            n = self._spin_into(spin_end)
            if n > 0:
                return n
            if n < 0 or monotonic() >= spin_end:
                break
            f = self._poll(out)  # what the fast path does not do (an every reader behind)
            if f is not None:
                return f
        while spin_s and not fast:
            # the clock only every 32 looks: a change is seen within one ~60 ns iteration
            for _ in range(32):
                if words[16] != latest:  # L.H_LATEST
                    break
            else:
                if monotonic() >= spin_end:
                    break
                continue
            f = self._poll(out)
            if f is not None:
                return f
            latest = words[L.H_LATEST]
        while True:
            att = self._att
            words = att.seg.words
            rw = att.rw
            v = words[L.H_NOTIFY]
            rw[L.R_WAITING] = 1
            fence()  # waiting flag before we look for frames (Dekker with Producer._commit)
            r = (fast and max(0, self._into_fast())) or self._poll(out)
            if r:
                rw[L.R_WAITING] = 0
                return r
            now_ns = time.monotonic_ns()
            now = now_ns / 1e9
            if now_ns >= self._next_beat:
                self._beat(now_ns)
            if now >= self._next_liveness or words[L.H_STATE] != L.STATE_LIVE:
                self._next_liveness = now + _LIVENESS_EVERY
                if not att.seg.producer_alive():
                    rw[L.R_WAITING] = 0
                    if self._try_reattach():
                        continue
                    rw[L.R_WAITING] = 1
            remaining = _LIVENESS_EVERY if deadline is None else deadline - monotonic()
            if remaining <= 0:
                rw[L.R_WAITING] = 0
                return None
            # An every-frame read_into of one small stream binds what the frame takes before
            # it sleeps: after the wake-up the interpreter's caches are cold (other processes
            # ran meanwhile), and every attribute looked up then is a cache miss.
            d0 = None
            if fast and self._mode and self._into_slots is not None:
                last = self._last
                s = last + last + 2
                sw, copies, meta = self._into_slots[self._pred_k]
                if copies is not None and len(copies) == 1:
                    d0, s0 = copies[0]
                    mt = self._meta
                    st = self.stats
            futex_wait(att.notify_addr, v, min(remaining, _LIVENESS_EVERY))
            # woken: straight to the frame (the flag costs the producer at most a spare wake)
            if d0 is not None and words[sw] == s:
                if WEAK_ORDER:
                    load_fence()
                d0[:] = s0
                mt[:] = meta
                if WEAK_ORDER:
                    load_fence()  # the copies before the re-check of the sequence
                if words[sw] == s:
                    n = last + 1
                    self._last = n
                    rw[4] = n  # L.R_LAST_SEQ
                    rw[2] = 0  # L.R_WAITING
                    self.last_missed = 0
                    count = st.frames + 1
                    st.frames = count
                    if not count & 31:
                        self._beat_due()
                    return n
                st.torn += 1
                mt[:] = _TORN_META
            if fast:
                n = self._into_fast()
                if n > 0:
                    rw[L.R_WAITING] = 0
                    return n

    def _poll(self, out: Mapping[str, np.ndarray[Any, Any]] | None = None) -> Frame | None:
        att = self._att
        words = att.seg.words
        for _ in range(64):  # bounded: each retry means the producer moved on meanwhile
            lat = words[L.H_LATEST]
            n = lat >> 8
            if n <= self._last:
                return None
            if self._mode == L.MODE_LATEST:
                k = lat & 0xFF
                if words[att.slot_word[k]] != 2 * n:
                    continue
                f = self._take(att, k, n, n - self._last - 1, out)
            else:
                want = self._last + 1
                best_k, best_n = -1, 0
                for k, sw in enumerate(att.slot_word):
                    s = words[sw]
                    if s and not s & 1:
                        fn = s >> 1
                        if want <= fn <= n and (best_n == 0 or fn < best_n):
                            best_k, best_n = k, fn
                if best_k < 0:
                    continue
                k = best_k
                f = self._take(att, k, best_n, best_n - want, out)
            if f is not None:
                self._last = f.seq
                self._pred_k = k
                st = self.stats
                st.frames += 1
                st.missed += f.missed
                rw = att.rw  # (one cache line: the producer's slot choice reads last_seq)
                rw[L.R_LAST_SEQ] = f.seq
                rw[L.R_FRAMES] = st.frames
                rw[L.R_MISSED] = st.missed
                self._beat_count -= 1
                if self._beat_count <= 0:  # idle paths beat too; a busy one every 32 frames
                    self._beat_count = 32
                    self._beat_due()
                return f
        return None

    def _take(
        self,
        att: _Attachment,
        k: int,
        n: int,
        missed: int,
        out: Mapping[str, np.ndarray[Any, Any]] | None,
    ) -> Frame | None:
        s = 2 * n
        words = att.seg.words
        sw = att.slot_word[k]
        if self.copy or out is not None:
            if self._lease_copies and self._n_leases < self.max_leases:
                # a long copy: hold the slot instead of betting the producer stays away
                with self._lock:
                    if not self._lease_slot(att, k, s):
                        return None
                    lease = _Lease(self, att, k)
                try:
                    return self._build(att, k, n, missed, None, out)
                finally:
                    lease.release()
            load_fence()
            f = self._build(att, k, n, missed, None, out)
            load_fence()  # the copies before the re-check of the sequence
            if words[sw] != s:
                self.stats.torn += 1
                return None
            return f
        with self._lock:
            if self._n_leases >= self.max_leases:
                raise LeaseLimitReached(
                    f"stream {self.name!r}: this reader already holds {self._n_leases} zero-copy "
                    "frames; release() them (or use `with frame:`), raise max_leases, or read "
                    "with copy=True"
                )
            refs = att.refs
            if refs[k] == 0:  # (the hot path of _lease_slot, inlined)
                rw = att.rw
                rw[L.R_LEASES + k] = s
                fence()  # our lease before we re-read the sequence (Dekker with Producer._claim)
                if words[sw] != s:
                    rw[L.R_LEASES + k] = 0
                    self.stats.torn += 1
                    return None
                refs[k] = 1
                self._n_leases += 1
            elif not self._lease_slot(att, k, s):
                return None
            lease = _Lease(self, att, k)
        return self._build(att, k, n, missed, lease)

    def _lease_slot(self, att: _Attachment, k: int, s: int) -> bool:
        """Protect slot k while it holds sequence s; False if the producer got there first."""
        words = att.seg.words
        sw = att.slot_word[k]
        if att.refs[k] == 0:
            att.rw[L.R_LEASES + k] = s
            fence()  # our lease before we re-read the sequence (Dekker with Producer._claim)
            if words[sw] != s:
                att.rw[L.R_LEASES + k] = 0
                self.stats.torn += 1
                return False
        elif words[sw] != s:  # we lease this slot already, so it cannot have changed
            return False
        att.refs[k] += 1
        self._n_leases += 1
        return True

    def _build(
        self,
        att: _Attachment,
        k: int,
        n: int,
        missed: int,
        lease: _Lease | None,
        out: Mapping[str, np.ndarray[Any, Any]] | None = None,
    ) -> Frame:
        words = att.seg.words
        sw = att.slot_word[k]
        base = att.slot_addr[k]
        alen = words[sw + L.S_ATTRS_LEN]
        raw = b""
        if alen:
            off = att.seg.geometry.slots_off + k * att.seg.geometry.slot_stride + L.SLOT_FIXED
            raw = bytes(att.seg.mm[off : off + min(alen, att.seg.geometry.attrs_bytes)])
        arrays: dict[str, np.ndarray[Any, Any]] = {}
        ifaces: dict[str, dict[str, Any] | None] = self._ifaces[k]
        if lease is not None and not self._has_variable:
            return Frame(
                self.name,
                n,
                _i64(int(words[sw + L.S_FRAME_ID])),
                att.f64[sw + L.S_TIMESTAMP],
                int(words[sw + L.S_PUBLISH_NS]),
                raw,
                missed,
                att.seg.generation,
                arrays,
                ifaces,  # type: ignore[arg-type]  # no None in it: no variable stream
                lease,
            )
        specs: dict[str, dict[str, Any]] = {}
        for i, spec, off in self._layout:
            shape = spec.shape
            iface = ifaces[spec.name]
            if iface is None:
                rows = min(int(words[sw + L.S_LEAD + i]), shape[0])
                shape = (rows, *shape[1:])
                iface = self._iface(spec, shape, base + off)
            if lease is None:
                view = self._ro_views[k][spec.name]
                if spec.variable:
                    view = view[: shape[0]]
                dst = out.get(spec.name) if out is not None else None
                if dst is None:
                    arrays[spec.name] = view.copy()
                else:
                    dst = dst[: shape[0]] if spec.variable else dst
                    np.copyto(dst, view)
                    arrays[spec.name] = dst
            else:
                specs[spec.name] = iface
        return Frame(
            self.name,
            n,
            _i64(int(words[sw + L.S_FRAME_ID])),
            att.f64[sw + L.S_TIMESTAMP],
            int(words[sw + L.S_PUBLISH_NS]),
            raw,
            missed,
            att.seg.generation,
            arrays,
            specs if lease is not None else None,
            lease,
        )

    # ------------------------------------------------------------------ control
    def send_control(self, kind: int, data: bytes = b"") -> None:
        """Send the producer a message (it reads them with ``Producer.poll_control()``)."""
        if not isinstance(kind, int) or not 0 <= kind < _WRAP:
            raise ValueError(f"stream {self.name!r}: control kind must be 0..2**32-2")
        data = bytes(data)
        att = self._att
        rw = att.rw
        cap = att.seg.geometry.record_stride - L.R_CTRL_DATA
        need = 8 + L.round_up(len(data), 8)
        if need > cap:
            raise ControlRingFull(
                f"stream {self.name!r}: control message of {len(data)} bytes > ring of {cap}"
            )
        head, tail = rw[L.R_CTRL_HEAD], rw[L.R_CTRL_TAIL]
        pos = head % cap
        pad = cap - pos if cap - pos < need else 0
        if head + pad + need - tail > cap:
            raise ControlRingFull(
                f"stream {self.name!r}: the producer has not read {head - tail} bytes of control "
                "messages yet"
            )
        if pad:
            struct.pack_into("II", att.rec, L.R_CTRL_DATA + pos, _WRAP, 0)
            pos = 0
        struct.pack_into("II", att.rec, L.R_CTRL_DATA + pos, len(data), kind)
        att.rec[L.R_CTRL_DATA + pos + 8 : L.R_CTRL_DATA + pos + 8 + len(data)] = data
        store_fence()
        rw[L.R_CTRL_HEAD] = head + pad + need

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Give back the reader record and every lease (frames still held become stale)."""
        if self._closed:
            return
        self._closed = True
        self._into_ok = False
        self._into_pairs = []
        self._into_slots = None
        self._into_one = False
        with self._lock:
            self._finalizer()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Reader {self.name!r} mode={self.mode} copy={self.copy} last={self._last}>"
