"""Segment layout: the schema, the geometry and the word offsets both sides agree on.

One segment ``/dev/shm/bp.<name>`` per producer instance::

    [0, PAGE)                 header (words below), each hot word on its own cache line
    [schema_off, +schema_len) schema JSON (streams, static attributes, geometry)
    [records_off, ...)        max_readers reader records, record_stride bytes each (page multiple)
    [slots_off, ...)          n_slots slots, slot_stride bytes each (page multiple)

All words are native-endian u64 at 8-byte aligned offsets (see ``_sys`` for why
that makes every load and store single-copy atomic).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._errors import SchemaMismatch
from ._sys import PAGE

__all__ = ["Geometry", "Schema", "StreamSpec"]

MAGIC = int.from_bytes(b"BPSHMv01", "little")
VERSION = 2  # 2: small arrays inline after the slot's first cache line
PREFIX = "bp."
SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")

MAX_SLOTS = 64
MAX_STREAMS = 32
MAX_READERS = 256

# ---- header words (index into the u64 view) ----
H_MAGIC = 0
H_VERSION = 1
H_GENERATION = 2
H_STATE = 3
H_PID = 4
H_N_SLOTS = 5
H_SLOT_STRIDE = 6
H_SLOTS_OFF = 7
H_MAX_READERS = 8
H_RECORD_STRIDE = 9
H_RECORDS_OFF = 10
H_SCHEMA_OFF = 11
H_SCHEMA_LEN = 12
H_CREATED_NS = 13
H_TOTAL = 14
# cache line 2: what readers poll.  Only the commit writes it per frame (LATEST, then NOTIFY):
# a store to it while a reader spins on it costs the next store a round trip between cores
H_LATEST = 16  # frame_seq * 256 + slot index; 0 = nothing published yet
H_DROPPED = 19  # frames the producer could not place (every slot leased)
H_RECLAIMED = 20  # dead readers whose records and leases were reclaimed
H_LEASE_SKIPS = 21  # publishes that skipped a leased slot
# the futex word (low 32 bits), in LATEST's cache line: the producer stores both per frame
# (one line to take from the readers' caches, not two), and readers read both
H_NOTIFY = 23
# cache line 3: the producer's statistics, written per frame, read by inspect()
H_PUBLISH_NS = 24  # time.monotonic_ns() of the last publish
H_RATE = 25  # f64 bits: frames/s, exponentially weighted
# the hot-slot wait's counters (Producer.hot_wait_*), stored only when one changes: the wait
# runs for big slots only, so a small frame's publish stores nothing more.  Zero in a segment
# made before they existed (the words were unused), hence no version bump
H_HOT_WAIT_HITS = 26  # waits that ended with the newest frame's slot free
H_HOT_WAIT_MISSES = 27  # waits that ran out of budget (the normal slot order followed)
H_HOT_WAIT_SKIPS = 28  # waits not tried: backing off after a miss
H_HOT_WAIT_NS = 29  # monotonic ns spent in the hits and misses
HEADER_WORDS = 64
NOTIFY_OFFSET = H_NOTIFY * 8

STATE_INIT = 0
STATE_LIVE = 1
STATE_CLOSED = 2

# OFD lock bytes in the segment file (beyond its data is fine: locks are not I/O)
LOCK_PRODUCER = 0
LOCK_READER_BASE = 1024

# ---- slot header words (relative to the slot start) ----
S_SEQ = 0  # seqlock: 2*N stable frame N, 2*N-1 being written, 0 empty
S_FRAME_SEQ = 1
S_FRAME_ID = 2  # i64, user's id (detector counter) or N
S_TIMESTAMP = 3  # f64 bits, epoch seconds
S_PUBLISH_NS = 4  # monotonic ns at publish (latency measurements)
S_ATTRS_LEN = 5
# bytes [64, 256): small arrays, right after the cache line holding the sequence word and the
# frame's metadata, so a reader of a small frame touches two adjacent cache lines in all
S_INLINE = 8
INLINE_BYTES = 192
S_LEAD = S_INLINE + INLINE_BYTES // 8  # MAX_STREAMS words: each stream's leading dimension
SLOT_FIXED = (S_LEAD + MAX_STREAMS) * 8  # 512 bytes before the attributes

# ---- reader record words (relative to the record start) ----
R_PID = 0  # 0 = free
R_MODE = 1  # 0 latest, 1 every
R_WAITING = 2  # 1 while asleep on the futex
R_HEARTBEAT_NS = 3
R_LAST_SEQ = 4
R_FRAMES = 5
R_MISSED = 6
R_TORN = 7
R_OPENED_NS = 8
R_GENERATION = 9
R_CTRL_HEAD = 16  # bytes written by the reader (own cache line)
R_CTRL_TAIL = 24  # bytes consumed by the producer (own cache line)
R_LEASES = 32  # MAX_SLOTS words: the slot sequence this reader leases, 0 = none
R_CTRL_DATA = (R_LEASES + MAX_SLOTS) * 8  # 768: start of the control ring bytes

MODE_LATEST = 0
MODE_EVERY = 1
MODE_CLOSED = 2  # the reader closed with control messages not yet read: the producer frees it


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"stream name {name!r} must be 1-128 characters of letters, digits, '_', '.', '-' "
            "and start with a letter or digit"
        )
    return name


def segment_path(name: str) -> str:
    return f"{SHM_DIR}/{PREFIX}{check_name(name)}"


def _dtype_to_json(dt: np.dtype[Any]) -> Any:
    return dt.descr if dt.fields is not None else dt.str


def _dtype_from_json(obj: Any) -> np.dtype[Any]:
    if isinstance(obj, str):
        return np.dtype(obj)

    def fix(d: Any) -> Any:
        return [tuple(fix(x) if isinstance(x, list) else x for x in item) for item in d]

    return np.dtype(fix(obj))


@dataclass(frozen=True)
class StreamSpec:
    """One named array per frame: what it holds, so readers need no out-of-band contract.

    ``shape`` is the largest shape; with ``variable=True`` a frame may carry fewer
    rows (leading dimension), as event pages and waveform pages do.
    """

    name: str
    dtype: Any
    shape: tuple[int, ...]
    units: str = ""
    description: str = ""
    variable: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _FIELD_RE.match(self.name):
            raise ValueError(f"stream name {self.name!r} must be an identifier-like string")
        try:
            dt = np.dtype(self.dtype)
        except TypeError as exc:
            raise ValueError(f"stream {self.name!r}: bad dtype {self.dtype!r}: {exc}") from None
        if dt.hasobject:
            raise ValueError(f"stream {self.name!r}: dtype {dt} holds Python objects")
        if dt.itemsize == 0:
            raise ValueError(f"stream {self.name!r}: dtype {dt} has no size")
        object.__setattr__(self, "dtype", dt)
        try:
            shape = tuple(int(n) for n in self.shape)
        except TypeError:
            raise ValueError(f"stream {self.name!r}: shape {self.shape!r} is not a tuple") from None
        if any(n < 0 for n in shape) or len(shape) > 16:
            raise ValueError(f"stream {self.name!r}: bad shape {shape}")
        if self.variable and not shape:
            raise ValueError(f"stream {self.name!r}: a variable stream needs a leading dimension")
        object.__setattr__(self, "shape", shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * int(self.dtype.itemsize)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * int(self.dtype.itemsize)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": _dtype_to_json(self.dtype),
            "shape": list(self.shape),
            "units": self.units,
            "description": self.description,
            "variable": self.variable,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StreamSpec:
        return cls(
            name=d["name"],
            dtype=_dtype_from_json(d["dtype"]),
            shape=tuple(d["shape"]),
            units=d.get("units", ""),
            description=d.get("description", ""),
            variable=bool(d.get("variable", False)),
        )


@dataclass(frozen=True)
class Schema:
    """The streams of every frame plus static attributes (detector name, pixel size, ...)."""

    streams: tuple[StreamSpec, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        streams = tuple(self.streams)
        if not streams:
            raise ValueError("a schema needs at least one stream")
        if len(streams) > MAX_STREAMS:
            raise ValueError(f"at most {MAX_STREAMS} streams per frame, got {len(streams)}")
        names = [s.name for s in streams]
        if len(set(names)) != len(names):
            raise ValueError(f"stream names must be unique: {names}")
        object.__setattr__(self, "streams", streams)
        try:
            json.dumps(dict(self.attrs))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"static attributes must be JSON-serialisable: {exc}") from None

    @classmethod
    def coerce(cls, streams: Any, attrs: Mapping[str, Any] | None = None) -> Schema:
        if isinstance(streams, Schema):
            return streams
        if isinstance(streams, StreamSpec):
            streams = [streams]
        elif isinstance(streams, Mapping):
            streams = [
                s if isinstance(s, StreamSpec) else StreamSpec(name=k, **dict(s))
                for k, s in streams.items()
            ]
        return cls(tuple(streams), dict(attrs or {}))

    def __getitem__(self, name: str) -> StreamSpec:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.streams]

    def to_json(self) -> dict[str, Any]:
        return {"streams": [s.to_json() for s in self.streams], "attrs": dict(self.attrs)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Schema:
        return cls(tuple(StreamSpec.from_json(s) for s in d["streams"]), d.get("attrs", {}))

    def differences(self, expected: Iterable[StreamSpec], stream: str) -> list[str]:
        """What a reader's expectations get wrong about this (the producer's) schema."""
        out = []
        for exp in expected:
            try:
                got = self[exp.name]
            except KeyError:
                out.append(f"no stream {exp.name!r} (streams: {', '.join(self.names)})")
                continue
            if got.dtype != exp.dtype:
                out.append(f"{exp.name}: dtype {got.dtype} != expected {exp.dtype}")
            if got.shape != exp.shape:
                out.append(f"{exp.name}: shape {got.shape} != expected {exp.shape}")
        return out

    def check(self, expected: Iterable[StreamSpec] | None, stream: str) -> None:
        if expected is None:
            return
        diff = self.differences(expected, stream)
        if diff:
            raise SchemaMismatch(f"stream {stream!r}: schema mismatch: " + "; ".join(diff))


@dataclass(frozen=True)
class Geometry:
    """Where everything sits in the segment, derived from the schema and the sizes asked for."""

    n_slots: int
    max_readers: int
    attrs_bytes: int
    control_bytes: int
    schema_off: int
    schema_len: int
    records_off: int
    record_stride: int
    slots_off: int
    slot_stride: int
    stream_offsets: tuple[int, ...]  # relative to the slot start
    total: int

    @classmethod
    def plan(
        cls,
        schema_blob: bytes,
        schema: Schema,
        n_slots: int,
        max_readers: int,
        attrs_bytes: int,
        control_bytes: int,
    ) -> Geometry:
        schema_off = PAGE
        records_off = schema_off + round_up(len(schema_blob), PAGE)
        record_stride = round_up(R_CTRL_DATA + control_bytes, PAGE)
        slots_off = records_off + max_readers * record_stride
        off = round_up(SLOT_FIXED + attrs_bytes, 64)
        inline, inline_end = S_INLINE * 8, S_INLINE * 8 + INLINE_BYTES
        offsets = []
        for s in schema.streams:
            # a zero-copy view must be aligned for its dtype (longdouble wants 16)
            start = round_up(inline, max(8, s.dtype.alignment))
            if 0 < s.nbytes <= inline_end - start:
                # small arrays (in schema order, while they fit) go inline, next to the
                # sequence word: one or two cache lines cross cores per small frame
                offsets.append(start)
                inline = start + s.nbytes
                continue
            # page-align big arrays (and their cache lines), pack small ones
            off = round_up(off, PAGE if s.nbytes >= PAGE else 64)
            offsets.append(off)
            off += s.nbytes
        slot_stride = round_up(max(off, 64), PAGE)
        total = slots_off + n_slots * slot_stride
        return cls(
            n_slots=n_slots,
            max_readers=max_readers,
            attrs_bytes=attrs_bytes,
            control_bytes=control_bytes,
            schema_off=schema_off,
            schema_len=len(schema_blob),
            records_off=records_off,
            record_stride=record_stride,
            slots_off=slots_off,
            slot_stride=slot_stride,
            stream_offsets=tuple(offsets),
            total=total,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "n_slots": self.n_slots,
            "max_readers": self.max_readers,
            "attrs_bytes": self.attrs_bytes,
            "control_bytes": self.control_bytes,
            "stream_offsets": list(self.stream_offsets),
        }
