"""Opening an existing segment read-only: shared by readers and the inspector."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _layout as L
from ._errors import StreamNotFound
from ._sys import lock_held_by_other

__all__ = ["Mapped", "open_segment"]


@dataclass
class Mapped:
    """A read-only mapping of one producer instance's segment."""

    name: str
    fd: int
    ino: int
    mm: mmap.mmap
    base: np.ndarray[Any, Any]  # uint8 view pinning the mapping; its address anchors array views
    words: memoryview  # u64 view of the whole segment
    generation: int
    schema: L.Schema
    geometry: L.Geometry
    addr: int

    def slot_word(self, k: int, word: int) -> int:
        return int(
            self.words[(self.geometry.slots_off + k * self.geometry.slot_stride) // 8 + word]
        )

    def producer_alive(self) -> bool:
        if self.words[L.H_STATE] != L.STATE_LIVE:
            return False
        return lock_held_by_other(self.fd, L.LOCK_PRODUCER)

    def close(self) -> None:
        self.words.release()
        # arrays a user still holds pin the mapping; it goes when they do
        with contextlib.suppress(BufferError):
            self.mm.close()
        os.close(self.fd)


def open_segment(name: str, *, require_live: bool = True) -> Mapped:
    """Map ``bp.<name>`` read-only, or raise StreamNotFound saying why not."""
    path = L.segment_path(name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise StreamNotFound(f"stream {name!r} does not exist (no {path})") from None
    except PermissionError:
        raise StreamNotFound(f"stream {name!r}: no permission to open {path}") from None
    try:
        st = os.fstat(fd)
        if st.st_size < L.HEADER_WORDS * 8:
            raise StreamNotFound(f"stream {name!r} is still being created")
        mm = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise
    words = memoryview(mm).cast("Q")
    try:
        if words[L.H_MAGIC] != L.MAGIC:
            raise StreamNotFound(f"stream {name!r}: {path} is not a beampipe-shm segment")
        if words[L.H_VERSION] != L.VERSION:
            raise StreamNotFound(
                f"stream {name!r}: {path} has segment layout v{words[L.H_VERSION]}, this "
                f"beampipe-shm reads v{L.VERSION} (producer and reader versions differ)"
            )
        state = words[L.H_STATE]
        if state == L.STATE_INIT:
            raise StreamNotFound(f"stream {name!r} is still being created")
        if require_live and state != L.STATE_LIVE:
            raise StreamNotFound(f"stream {name!r}: its producer has closed it")
        if require_live and not lock_held_by_other(fd, L.LOCK_PRODUCER):
            raise StreamNotFound(
                f"stream {name!r}: its producer (pid {words[L.H_PID]}) died; "
                "the next producer of this name will clean the segment up"
            )
        if words[L.H_TOTAL] != st.st_size:
            raise StreamNotFound(f"stream {name!r}: segment size does not match its header")
        off, n = words[L.H_SCHEMA_OFF], words[L.H_SCHEMA_LEN]
        blob = json.loads(bytes(mm[off : off + n]))
        schema = L.Schema.from_json(blob["schema"])
        g = blob["geometry"]
        geometry = L.Geometry.plan(
            b"x" * n, schema, g["n_slots"], g["max_readers"], g["attrs_bytes"], g["control_bytes"]
        )
        if (
            geometry.slots_off != words[L.H_SLOTS_OFF]
            or geometry.slot_stride != words[L.H_SLOT_STRIDE]
            or geometry.records_off != words[L.H_RECORDS_OFF]
            or list(geometry.stream_offsets) != g["stream_offsets"]
        ):
            raise StreamNotFound(f"stream {name!r}: segment layout does not match its schema")
        generation = int(words[L.H_GENERATION])
    except BaseException:
        words.release()
        mm.close()
        os.close(fd)
        raise
    base = np.frombuffer(mm, np.uint8)
    return Mapped(
        name=name,
        fd=fd,
        ino=st.st_ino,
        mm=mm,
        base=base,
        words=words,
        generation=generation,
        schema=schema,
        geometry=geometry,
        addr=int(base.ctypes.data),
    )
