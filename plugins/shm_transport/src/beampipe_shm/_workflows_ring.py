"""A per-queue mmap'd ring for small messages: the fast path of ``ShmTransport``.

A file per message (``_workflows_store``) costs ~8 syscalls from send to ack; a small
message appended to a shared ring under ``flock`` costs two.  The ring keeps the file
store's guarantees with record states instead of renames:

* a record is READY, HELD by a consumer slot, or DONE; ``head`` only moves past DONE (and
  WRAP) records, so an un-acknowledged message is never overwritten;
* a consumer registers its id in a slot of the ring header; when its process dies (its
  flock in ``c/<id>/lock`` is free) the janitor turns its HELD records back to READY, one
  delivery later, exactly as it moves held files back;
* a writer publishes a record by advancing ``tail`` after the bytes are in place, so a
  writer killed mid-append leaves nothing visible;
* a full ring is not an error: the sender falls back to the file store.

Consumers sleeping in ``poll`` are woken through a per-consumer "bell" file watched by
inotify; a writer rings only consumers that said (under the lock) they found nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["RING_MAX_RECORD", "Record", "Ring"]

_MAGIC = 0x42505752  # "BPWR"
_HDR = struct.Struct("<IIQQQQ")  # magic, version, size, head, tail, cursor
_SLOTS = 64
_SLOT = struct.Struct("<40sBxxxxxxx")  # consumer id, sleeping
_ANY_SLEEPER = 40  # header byte: some slot is sleeping (saves writers a 64-slot scan)
_SLOT_BASE = 64
_DATA = 4096
_REC = struct.Struct("<IBBHII")  # length, state, slot, flags, returns, meta length
_TAIL = struct.Struct("<Q")
_NOBODY: list[str] = []  # returned, never mutated
WRAP, READY, HELD, DONE = 0, 1, 2, 3
RING_MAX_RECORD = 16384

# flock() through a PyDLL keeps the GIL: fcntl.flock releases it around the syscall, and in a
# process whose consumer thread waits for the GIL every release becomes a thread switch (two
# per ring operation).  Only the non-blocking attempt runs that way; a lock held by another
# process is waited for with fcntl.flock, GIL released, so our other threads keep running.
_libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_flock = _libc.flock
_flock.argtypes = [ctypes.c_int, ctypes.c_int]
_flock.restype = ctypes.c_int
_TRY_EX = fcntl.LOCK_EX | fcntl.LOCK_NB
_UN = fcntl.LOCK_UN


@dataclass
class Record:
    offset: int  # absolute, never reused: identifies the record for ack/nack
    returns: int
    meta: bytes
    body: bytes


def _align(n: int) -> int:
    return (n + 7) & ~7


class Ring:
    """One queue's ring, mapped by every process that sends to or consumes from it."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self._tlock = threading.Lock()  # flock does not exclude threads sharing our fd
        fd = self._open_or_create(path, size)
        self.fd = fd
        total = os.fstat(fd).st_size
        self.mm = mmap.mmap(fd, total)
        magic, _version, self.size, *_ = _HDR.unpack_from(self.mm, 0)
        if magic != _MAGIC or self.size + _DATA != total:
            raise ValueError(f"{path} is not a beampipe message ring")

    @staticmethod
    def _open_or_create(path: str, size: int) -> int:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            # Allocate now: a write into a sparse mapping of a full tmpfs would be SIGBUS.
            os.posix_fallocate(fd, 0, _DATA + size)
            os.pwrite(fd, _HDR.pack(_MAGIC, 1, size, 0, 0, 0), 0)
            try:
                os.link(tmp, path)  # publish fully initialised, or lose the race cleanly
            except FileExistsError:
                os.close(fd)
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        finally:
            os.unlink(tmp)
        return fd

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.mm.close()
        os.close(self.fd)

    def acquire(self) -> None:
        self._tlock.acquire()
        if _flock(self.fd, _TRY_EX) != 0:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX)  # contended: wait with the GIL released
            except BaseException:
                self._tlock.release()
                raise

    def release_lock(self) -> None:
        _flock(self.fd, _UN)
        self._tlock.release()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release_lock()

    # -- header fields (call with the lock held) -----------------------------------------

    def _get(self) -> tuple[int, int, int]:
        _m, _v, _s, head, tail, cursor = _HDR.unpack_from(self.mm, 0)
        return head, tail, cursor

    def _set(self, head: int, tail: int, cursor: int) -> None:
        struct.pack_into("<QQQ", self.mm, 16, head, tail, cursor)

    def _rec(self, offset: int) -> tuple[int, int, int, int, int, int]:
        return _REC.unpack_from(self.mm, _DATA + offset % self.size)

    def _record(self, offset: int, returns: int | None = None) -> Record:
        length, _state, _slot, pad, stored, mlen = self._rec(offset)
        a = _DATA + offset % self.size + _REC.size
        end = _DATA + offset % self.size + length - pad
        meta, body = self.mm[a : a + mlen], self.mm[a + mlen : end]  # mmap slices are copies
        return Record(offset, stored if returns is None else returns, meta, body)

    # -- slots: which consumer holds what --------------------------------------------------

    def slot_of(self, cid: str, create: bool = True) -> int | None:
        key = cid.encode()
        free = None
        for i in range(_SLOTS):
            name = _SLOT.unpack_from(self.mm, _SLOT_BASE + i * _SLOT.size)[0].rstrip(b"\0")
            if name == key:
                return i
            if not name and free is None:
                free = i
        if not create:
            return None
        if free is None:
            raise RuntimeError(f"{self.path}: more than {_SLOTS} consuming processes")
        _SLOT.pack_into(self.mm, _SLOT_BASE + free * _SLOT.size, key, 0)
        return free

    def free_slot(self, slot: int) -> None:
        _SLOT.pack_into(self.mm, _SLOT_BASE + slot * _SLOT.size, b"", 0)

    def set_sleeping(self, slot: int, sleeping: bool) -> None:
        self.mm[_SLOT_BASE + slot * _SLOT.size + 40] = 1 if sleeping else 0
        if sleeping:
            self.mm[_ANY_SLEEPER] = 1

    def _sleepers(self) -> list[str]:
        if not self.mm[_ANY_SLEEPER]:
            return []
        self.mm[_ANY_SLEEPER] = 0
        out = []
        for i in range(_SLOTS):
            base = _SLOT_BASE + i * _SLOT.size
            if self.mm[base + 40]:
                self.mm[base + 40] = 0
                out.append(bytes(self.mm[base : base + 40]).rstrip(b"\0").decode())
        return out

    # -- producer --------------------------------------------------------------------------

    def append(self, meta: bytes, body: bytes) -> list[str] | None:
        """Append a READY record; None if the ring is full. Returns consumers to wake."""
        n = _REC.size + len(meta) + len(body)
        need = (n + 7) & ~7
        size, mm, fd = self.size, self.mm, self.fd
        self._tlock.acquire()  # acquire(), inlined: this is the hot path of every send
        if _flock(fd, _TRY_EX) != 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                self._tlock.release()
                raise
        try:
            _m, _v, _s, head, tail, _c = _HDR.unpack_from(mm, 0)
            pos = tail % size
            free = size - (tail - head)
            if pos + need > size:  # does not fit before the end: wrap
                gap = size - pos
                if free < gap + need:
                    return None
                _REC.pack_into(mm, _DATA + pos, gap, WRAP, 0, 0, 0, 0)
                tail += gap
                pos = 0
                free -= gap
            if free < need:
                return None
            start = _DATA + pos  # one copy into the ring: record header, meta, body
            mm[start : start + n] = _REC.pack(need, READY, 0, need - n, 0, len(meta)) + meta + body
            _TAIL.pack_into(mm, 24, tail + need)  # the publish: bytes first, then tail
            return self._sleepers() if mm[_ANY_SLEEPER] else _NOBODY
        finally:
            _flock(fd, _UN)
            self._tlock.release()

    # -- consumer --------------------------------------------------------------------------

    def claim(
        self,
        slot: int,
        limit: int,
        auto_ack: bool,
        acks: list[int] | None = None,
        arm: bool = True,
    ) -> list[Record]:
        """Take up to ``limit`` READY records (oldest first) for ``slot``.

        ``acks``: offsets this slot acknowledged since its last claim, marked DONE under the
        same lock (a consumer's acks cost no lock of their own).  ``arm``: if nothing is
        READY, ask writers to ring this slot's bell.
        """
        out: list[Record] = []
        mm, size = self.mm, self.size
        self.acquire()
        try:
            if acks:
                for o in acks:
                    if self._check_held(o, slot):
                        mm[_DATA + o % size + 4] = DONE
            head, tail, cursor = self._get()
            o = max(cursor, head)
            state_now = DONE if auto_ack else HELD
            while o < tail and len(out) < limit:
                base = _DATA + o % size
                length, state, _slot, pad, returns, mlen = _REC.unpack_from(mm, base)
                if state == READY:
                    a = base + _REC.size
                    out.append(
                        Record(o, returns, mm[a : a + mlen], mm[a + mlen : base + length - pad])
                    )
                    mm[base + 4] = state_now
                    mm[base + 5] = slot
                o += length
            cursor = o
            if auto_ack or acks:
                head = self._advance(head, tail)
            self._set(head, tail, cursor)
            if not out and arm:  # drained: writers ring our bell (callers retry after a catch)
                self.set_sleeping(slot, True)
        finally:
            self.release_lock()
        return out

    def _advance(self, head: int, tail: int) -> int:
        while head < tail:
            length, state, *_ = self._rec(head)
            if state not in (DONE, WRAP):
                break
            head += length
        return head

    def _check_held(self, offset: int, slot: int) -> bool:
        head, tail, _ = self._get()
        if not head <= offset < tail:
            return False
        _length, state, owner, *_ = self._rec(offset)
        return state == HELD and owner == slot

    def ack(self, offsets: list[int], slot: int) -> None:
        with self.locked():
            for o in offsets:
                if self._check_held(o, slot):
                    self.mm[_DATA + o % self.size + 4] = DONE
            head, tail, cursor = self._get()
            self._set(self._advance(head, tail), tail, cursor)

    def release(
        self, offsets: list[int] | None, slot: int, limit: int | None
    ) -> tuple[list[Record], list[str]]:
        """Make held records READY again, one delivery later (all of ``slot``'s if None).

        Records over ``limit`` deliveries are marked DONE and returned for dead-lettering.
        """
        over: list[Record] = []
        with self.locked():
            head, tail, cursor = self._get()
            if offsets is None:
                offsets = []
                o = head
                while o < tail:
                    length, state, owner, *_ = self._rec(o)
                    if state == HELD and owner == slot:
                        offsets.append(o)
                    o += length
            for o in offsets:
                if not self._check_held(o, slot):
                    continue
                length, _state, _owner, flags, returns, mlen = self._rec(o)
                base = _DATA + o % self.size
                if limit is not None and returns + 1 > limit:
                    over.append(self._record(o, returns + 1))
                    self.mm[base + 4] = DONE
                else:
                    _REC.pack_into(self.mm, base, length, READY, 0, flags, returns + 1, mlen)
                    cursor = min(cursor, o)
            self._set(self._advance(head, tail), tail, cursor)
            return over, self._sleepers()

    def take_done(self, offsets: list[int], slot: int) -> list[Record]:
        """Mark held records DONE and return them (for nack without requeue)."""
        out: list[Record] = []
        with self.locked():
            for o in offsets:
                if not self._check_held(o, slot):
                    continue
                out.append(self._record(o))
                self.mm[_DATA + o % self.size + 4] = DONE
            head, tail, cursor = self._get()
            self._set(self._advance(head, tail), tail, cursor)
        return out

    def recover(self, cid: str, limit: int | None) -> tuple[list[Record], list[str]]:
        """Give back everything dead (or departing) consumer ``cid`` holds; free its slot."""
        with self.locked():
            slot = self.slot_of(cid, create=False)
            if slot is None:
                return [], []
        over, sleepers = self.release(None, slot, limit)
        with self.locked():
            self.free_slot(slot)
        return over, sleepers

    def ready_count(self) -> int:
        n = 0
        with self.locked():
            head, tail, _ = self._get()
            o = head
            while o < tail:
                length, state, *_ = self._rec(o)
                n += state == READY
                o += length
        return n
