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
WRAP, READY, HELD, DONE = 0, 1, 2, 3
RING_MAX_RECORD = 16384


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

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with self._tlock:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

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
        meta, body = bytes(self.mm[a : a + mlen]), bytes(self.mm[a + mlen : end])
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
        need = _align(_REC.size + len(meta) + len(body))
        with self.locked():
            head, tail, cursor = self._get()
            pos = tail % self.size
            free = self.size - (tail - head)
            if pos + need > self.size:  # does not fit before the end: wrap
                gap = self.size - pos
                if free < gap + need:
                    return None
                _REC.pack_into(self.mm, _DATA + pos, gap, WRAP, 0, 0, 0, 0)
                tail += gap
                pos = 0
                free -= gap
            if free < need:
                return None
            start = _DATA + pos
            pad = need - (_REC.size + len(meta) + len(body))  # kept in "flags"
            _REC.pack_into(self.mm, start, need, READY, 0, pad, 0, len(meta))
            a = start + _REC.size
            self.mm[a : a + len(meta)] = meta
            self.mm[a + len(meta) : a + len(meta) + len(body)] = body
            self._set(head, tail + need, cursor)  # the publish: bytes first, then tail
            return self._sleepers()

    # -- consumer --------------------------------------------------------------------------

    def claim(self, slot: int, limit: int, auto_ack: bool) -> list[Record]:
        """Take up to ``limit`` READY records (oldest first) for ``slot``."""
        out: list[Record] = []
        with self.locked():
            head, tail, cursor = self._get()
            o = max(cursor, head)
            while o < tail and len(out) < limit:
                length, state, *_ = self._rec(o)
                if state == READY:
                    out.append(self._record(o))
                    self.mm[_DATA + o % self.size + 4] = DONE if auto_ack else HELD
                    self.mm[_DATA + o % self.size + 5] = slot
                o += length
            cursor = o
            if auto_ack:
                head = self._advance(head, tail)
            self._set(head, tail, cursor)
            if not out:  # drained: ask writers to ring our bell (callers retry after a catch)
                self.set_sleeping(slot, True)
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
