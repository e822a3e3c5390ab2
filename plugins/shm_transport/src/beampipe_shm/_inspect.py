"""Look at a stream from outside: schema, counters, rate, readers with their lag and drops."""

from __future__ import annotations

import os
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from . import _layout as L
from ._segment import open_segment
from ._sys import lock_held_by_other

__all__ = ["ReaderInfo", "StreamInfo", "inspect", "list_streams"]


@dataclass(frozen=True)
class ReaderInfo:
    index: int
    pid: int
    alive: bool  # holds its registry lock (dead readers are reclaimed by the producer)
    mode: str  # "latest", "every", or "closed" (gone, control messages not yet read)
    last_seq: int
    lag: int  # frames published since the last one it read
    frames: int
    missed: int
    torn: int
    leases: int  # slots it holds zero-copy right now
    heartbeat_age: float  # seconds since it last polled
    control_pending: int  # control bytes the producer has not drained


@dataclass(frozen=True)
class StreamInfo:
    name: str
    path: str
    generation: int
    producer_pid: int
    producer_alive: bool
    state: str
    created: float  # epoch seconds
    schema: dict[str, Any]
    slots: int
    slot_bytes: int
    segment_bytes: int
    frames: int  # frames published (sequence of the newest)
    rate: float  # frames/s, smoothed over ~1 s
    idle: float  # seconds since the last frame
    dropped: int  # frames the producer could not place: every slot was leased
    lease_skips: int
    reclaimed: int  # dead readers whose leases were reclaimed
    # the producer's hot-slot wait (Producer.hot_wait_*; zero while it has not waited)
    hot_wait_hits: int  # waits that ended with the newest frame's slot free
    hot_wait_misses: int  # waits that ran out of budget
    hot_wait_skips: int  # waits not tried: backing off after a miss
    hot_wait_ns: int  # time spent in the hits and misses
    readers: list[ReaderInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        lines = [
            f"stream {self.name!r} ({self.path}) {self.state}, producer pid {self.producer_pid} "
            f"{'alive' if self.producer_alive else 'DEAD'}, generation {self.generation}",
            f"  frames {self.frames}  rate {self.rate:.1f}/s  idle {self.idle:.3f} s  "
            f"dropped {self.dropped}  lease-skips {self.lease_skips}  reclaimed {self.reclaimed}",
            f"  hot-wait hits {self.hot_wait_hits}  misses {self.hot_wait_misses}  "
            f"skips {self.hot_wait_skips}  waited {self.hot_wait_ns / 1e6:.3f} ms",
            f"  {self.slots} slots x {self.slot_bytes} bytes = {self.segment_bytes} bytes",
        ]
        for s in self.schema["streams"]:
            var = " (variable rows)" if s.get("variable") else ""
            units = f" [{s['units']}]" if s.get("units") else ""
            lines.append(f"  stream {s['name']}: {s['dtype']} {tuple(s['shape'])}{units}{var}")
        if self.schema.get("attrs"):
            lines.append(f"  attrs {self.schema['attrs']}")
        lines.append(f"  readers: {len(self.readers)}")
        for r in self.readers:
            lines.append(
                f"    #{r.index} pid {r.pid} {'alive' if r.alive else 'DEAD'} {r.mode}: "
                f"read {r.frames} lag {r.lag} missed {r.missed} torn {r.torn} leases {r.leases} "
                f"heartbeat {r.heartbeat_age:.3f} s ago"
            )
        return "\n".join(lines)


def inspect(name: str) -> StreamInfo:
    """Snapshot a stream (also one whose producer died, until the next producer cleans it)."""
    seg = open_segment(name, require_live=False)
    try:
        w = seg.words
        g = seg.geometry
        state = {L.STATE_LIVE: "live", L.STATE_CLOSED: "closed"}.get(int(w[L.H_STATE]), "?")
        latest = int(w[L.H_LATEST]) >> 8
        now = time.monotonic_ns()
        readers = []
        for i in range(g.max_readers):
            rw = (g.records_off + i * g.record_stride) // 8
            pid = int(w[rw + L.R_PID])
            if not pid:
                continue
            last = int(w[rw + L.R_LAST_SEQ])
            readers.append(
                ReaderInfo(
                    index=i,
                    pid=pid,
                    alive=lock_held_by_other(seg.fd, L.LOCK_READER_BASE + i),
                    mode={L.MODE_EVERY: "every", L.MODE_CLOSED: "closed"}.get(
                        int(w[rw + L.R_MODE]), "latest"
                    ),
                    last_seq=last,
                    lag=max(0, latest - last),
                    frames=int(w[rw + L.R_FRAMES]),
                    missed=int(w[rw + L.R_MISSED]),
                    torn=int(w[rw + L.R_TORN]),
                    leases=sum(1 for k in range(g.n_slots) if w[rw + L.R_LEASES + k]),
                    heartbeat_age=max(0.0, (now - int(w[rw + L.R_HEARTBEAT_NS])) / 1e9),
                    control_pending=int(w[rw + L.R_CTRL_HEAD] - w[rw + L.R_CTRL_TAIL]),
                )
            )
        last_ns = int(w[L.H_PUBLISH_NS])
        rate = struct.unpack("d", struct.pack("Q", w[L.H_RATE]))[0]
        return StreamInfo(
            name=name,
            path=L.segment_path(name),
            generation=seg.generation,
            producer_pid=int(w[L.H_PID]),
            producer_alive=lock_held_by_other(seg.fd, L.LOCK_PRODUCER),
            state=state,
            created=int(w[L.H_CREATED_NS]) / 1e9,
            schema=seg.schema.to_json(),
            slots=g.n_slots,
            slot_bytes=g.slot_stride,
            segment_bytes=g.total,
            frames=latest,
            rate=rate if last_ns and now - last_ns < 5e9 else 0.0,
            idle=(now - last_ns) / 1e9 if last_ns else float("inf"),
            dropped=int(w[L.H_DROPPED]),
            lease_skips=int(w[L.H_LEASE_SKIPS]),
            reclaimed=int(w[L.H_RECLAIMED]),
            hot_wait_hits=int(w[L.H_HOT_WAIT_HITS]),
            hot_wait_misses=int(w[L.H_HOT_WAIT_MISSES]),
            hot_wait_skips=int(w[L.H_HOT_WAIT_SKIPS]),
            hot_wait_ns=int(w[L.H_HOT_WAIT_NS]),
            readers=readers,
        )
    finally:
        seg.close()


def list_streams() -> list[str]:
    """Names of the beampipe-shm segments in /dev/shm (live or left by a dead producer)."""
    try:
        names = os.listdir(L.SHM_DIR)
    except FileNotFoundError:
        return []
    out = []
    for n in sorted(names):
        if n.startswith(L.PREFIX):
            try:
                out.append(L.check_name(n[len(L.PREFIX) :]))
            except ValueError:
                continue
    return out
