"""The on-disk message store behind :class:`beampipe_shm.ShmTransport`.

Everything that other processes must agree on lives here: the directory layout under
``/dev/shm/bpwf-<namespace>/``, the message file format, and the few atomic file-system
operations (``rename``, ``link``, ``flock``) that make queues safe across unrelated
processes without a broker.  The transport (``_workflows.py``) adds threads, callbacks and
workflows' API on top.

Layout::

    bpwf-<ns>/
      q/<queue>/ready/<name>         messages waiting; <name> sorts in delivery order
      q/<queue>/config.json          optional: delivery limit, dead-letter queue, owner
      t/<topic>/<queue>              fan-out subscribers of a topic (one private queue each)
      c/<consumer>/lock              flock()ed by the live process that owns <consumer>
      c/<consumer>/h/<queue>/<name>  messages delivered to <consumer>, not yet acknowledged
      c/<consumer>/own/<queue>       temporary queues <consumer> owns (content: topic or "")
      c/<consumer>/tx-<id>.json      committed transaction being applied (redo log)
      c/<consumer>/m/<name>          consumed array messages whose mapping is still in use
      tmp/<consumer>.<n>             messages being written or staged in a transaction
      pool/<size>.<pid>.<n>          files of consumed arrays, kept for the next send of that size
      gone/<queue>                   tombstones of deleted temporary queues

A message name is ``<due ns>.<pid>.<seq>~<returns>``: sorting by name is delivery order
(and ``delay`` is just a later ``due``); ``returns`` counts how often the message came back
un-acknowledged, so a requeue is a single ``rename`` that also bumps the delivery count.
Claiming a message is ``rename`` from ``ready/`` into the consumer's ``h/`` directory:
exactly one competing consumer wins.  A consumer that dies keeps its claims until any
live process sees its ``lock`` free (the kernel drops a dead process's flock) and moves
them back, so nothing un-acknowledged is lost.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAGIC",
    "Message",
    "QueueConfig",
    "ShmStoreError",
    "ShmStoreFull",
    "Store",
    "store_path",
    "validate_name",
]

MAGIC = b"BPWF"
_PREFIX = struct.Struct("<4sI")
_ALIGN = 64  # numpy bodies start 64-byte aligned so a mapped array is SIMD friendly
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_MAX_NAME = 200
# Array files of at least this size are reused: allocating tmpfs pages for a new file costs
# ~4x rewriting an existing one.  The pool keeps at most _POOL_BYTES parked per namespace.
POOL_MIN = 1 << 20
_POOL_BYTES = 64 << 20
_seq = itertools.count()
_last_due = 0
_pid = os.getpid()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


class ShmStoreError(Exception):
    """The shared-memory store refused an operation (bad name, missing store, ...)."""


class ShmStoreFull(ShmStoreError):
    """The file system under the store has less free space than the configured reserve."""


def store_path(root: str, namespace: str) -> str:
    validate_name(namespace, "namespace")
    return os.path.join(root, f"bpwf-{namespace}")


def validate_name(name: object, what: str = "queue") -> str:
    """Queue and topic names become directory names: refuse what cannot be one."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} name must be a non-empty string, got {name!r}")
    if len(name) > _MAX_NAME:
        raise ValueError(f"{what} name {name[:40]!r}... is longer than {_MAX_NAME} characters")
    if "/" in name or "\0" in name or "~" in name or name.startswith("."):
        raise ValueError(
            f"{what} name {name!r} may not contain '/', '~' or NUL, nor start with '.'"
        )
    return name


def next_name(delay: float | None = None, returns: int = 0) -> str:
    """A message name that sorts after every earlier one from this process."""
    global _last_due
    due = time.time_ns()
    if delay:
        due += int(delay * 1e9)
    elif due <= _last_due:  # keep FIFO per producer even if the wall clock steps back
        due = _last_due + 1
    if not delay:
        _last_due = due
    return f"{due:020d}.{_pid}.{next(_seq)}~{returns}"


def split_name(name: str) -> tuple[str, int]:
    base, _, returns = name.rpartition("~")
    return base, int(returns)


def due_ns(name: str) -> int:
    return int(name[:20])


@dataclass(frozen=True)
class QueueConfig:
    """Per-queue policy: how often a message may come back before it is dead-lettered."""

    delivery_limit: int | None
    dead_letter_queue: str | None
    temporary: bool = False
    owner: str | None = None


@dataclass
class Message:
    meta: dict[str, Any]
    body: Any  # bytes, or a read-only numpy array backed by the mapped file


def meta_json(
    headers: dict[str, Any], exchange: str, routing_key: str, expires: float | None
) -> bytes:
    meta: dict[str, Any] = {"h": headers, "x": exchange, "r": routing_key}
    if expires is not None:
        meta["e"] = expires
    try:
        return json.dumps(meta, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"message headers for {routing_key or exchange!r} are not JSON: {exc}"
        ) from exc


def encode(
    body: bytes | memoryview,
    *,
    headers: dict[str, Any],
    exchange: str,
    routing_key: str,
    expires: float | None,
    array: tuple[str, tuple[int, ...]] | None = None,
) -> list[bytes | memoryview]:
    meta: dict[str, Any] = {"h": headers, "x": exchange, "r": routing_key}
    if expires is not None:
        meta["e"] = expires
    if array is not None:
        meta["a"] = [array[0], list(array[1])]
    try:
        raw = json.dumps(meta, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"message headers for {routing_key or exchange!r} are not JSON: {exc}"
        ) from exc
    if array is not None:
        pad = -(_PREFIX.size + len(raw)) % _ALIGN
        raw += b" " * pad
    head = _PREFIX.pack(MAGIC, len(raw)) + raw
    if isinstance(body, bytes) and len(body) < 65536:
        return [head + body]  # one write() for the common small message
    return [head, memoryview(body).cast("B")]


def decode(path: str) -> Message:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _decode_fd(fd, path)
    finally:
        os.close(fd)


def take(path: str) -> Message | None:
    """Claim-and-read without acknowledgement: whoever unlinks the file owns the message."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return None  # a competing consumer took it between our open and unlink
        return _decode_fd(fd, path)
    finally:
        os.close(fd)


def _decode_fd(fd: int, path: str) -> Message:
    head = os.read(fd, 65536)
    size = len(head) if len(head) < 65536 else os.fstat(fd).st_size
    magic, hlen = _PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise ShmStoreError(f"{path} is not a beampipe workflows message")
    start = _PREFIX.size + hlen
    if start > len(head):
        head += os.pread(fd, start - len(head), len(head))
    meta = json.loads(head[_PREFIX.size : start])
    if "a" in meta:
        import mmap

        import numpy as np

        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        dtype, shape = meta["a"]
        arr = np.frombuffer(mm, dtype=np.dtype(dtype), offset=start).reshape(shape)
        return Message(meta, arr)
    body = head[start:]
    if len(head) < size:
        body += os.pread(fd, size - len(head), len(head))
    return Message(meta, body)


def _write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    for part in parts:
        n = os.write(fd, part)
        if n == len(part):
            continue
        view = memoryview(part).cast("B")[n:]
        while view:
            n = os.write(fd, view)
            view = view[n:]


class Store:
    """One namespace's directory tree, shared by every process that names it."""

    def __init__(self, path: str, reserve_bytes: int = 0) -> None:
        self.path = path
        self.reserve_bytes = reserve_bytes
        self.q = os.path.join(path, "q")
        self.t = os.path.join(path, "t")
        self.c = os.path.join(path, "c")
        self.tmp = os.path.join(path, "tmp")
        self.gone = os.path.join(path, "gone")
        self.pool = os.path.join(path, "pool")
        self._configs: dict[str, tuple[float, QueueConfig | None]] = {}
        self._writes = 0

    # -- layout ------------------------------------------------------------------------

    def create(self) -> None:
        for d in (self.q, self.t, self.c, self.tmp, self.gone, self.pool):
            os.makedirs(d, mode=0o700, exist_ok=True)

    def ready(self, queue: str) -> str:
        return f"{self.q}/{queue}/ready"

    def ensure_queue(self, queue: str, config: QueueConfig | None = None) -> None:
        os.makedirs(self.ready(queue), mode=0o700, exist_ok=True)
        if config is not None:
            self.write_json(f"{self.q}/{queue}/config.json", config.__dict__)
            self._configs.pop(queue, None)

    def queue_exists(self, queue: str) -> bool:
        return os.path.isdir(self.ready(queue))

    def write_json(self, path: str, data: Any) -> None:
        tmp = f"{path}.{os.getpid()}.{next(_seq)}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.rename(tmp, path)

    def config(self, queue: str) -> QueueConfig | None:
        """The declared policy of ``queue`` (cached for a second: config rarely changes)."""
        now = time.monotonic()
        hit = self._configs.get(queue)
        if hit is not None and now - hit[0] < 1.0:
            return hit[1]
        cfg: QueueConfig | None
        try:
            with open(f"{self.q}/{queue}/config.json") as f:
                cfg = QueueConfig(**json.load(f))
        except (FileNotFoundError, NotADirectoryError):
            cfg = None
        self._configs[queue] = (now, cfg)
        return cfg

    # -- writing -----------------------------------------------------------------------

    def check_space(self, size: int, what: str) -> None:
        """Refuse a write that would eat into the reserve, naming the queue and the numbers."""
        self._writes += 1
        if self.reserve_bytes <= 0 or (size < 65536 and self._writes % 32 != 1):
            return
        st = os.statvfs(self.path)
        free = st.f_bavail * st.f_frsize
        if free - size < self.reserve_bytes and self.purge_pool():
            st = os.statvfs(self.path)  # parked array files were in the way: not any more
            free = st.f_bavail * st.f_frsize
        if free - size < self.reserve_bytes:
            raise ShmStoreFull(
                f"shared-memory store {self.path} is full: sending {size} bytes to {what} "
                f"would leave {max(free - size, 0)} of the {self.reserve_bytes} bytes reserved; "
                "drain queues or raise --shm-reserve-mb / free /dev/shm"
            )

    def stage(self, owner: str, parts: list[bytes | memoryview], what: str) -> str:
        """Write a message to tmp/ (not yet visible to anyone) and return its path."""
        size = sum(len(p) for p in parts)
        self.check_space(size, what)
        reused = self._reuse(owner, size) if size >= POOL_MIN else None
        tmp = reused or f"{self.tmp}/{owner}.{next(_seq)}"
        try:
            fd = os.open(tmp, (os.O_WRONLY | os.O_CLOEXEC) if reused else _OPEN_NEW, 0o600)
        except FileNotFoundError:
            raise ShmStoreError(
                f"shared-memory store {self.path} has gone (removed while in use?)"
            ) from None
        try:
            _write_all(fd, parts)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if exc.errno == errno.ENOSPC:
                raise ShmStoreFull(
                    f"shared-memory store {self.path} is full (ENOSPC) writing {size} bytes "
                    f"for {what}"
                ) from None
            raise
        os.close(fd)
        return tmp

    def _reuse(self, owner: str, size: int) -> str | None:
        """Claim a parked file of exactly ``size`` bytes into tmp/ (rename: one winner)."""
        try:
            names = os.listdir(self.pool)
        except FileNotFoundError:
            return None
        prefix = f"{size}."
        for name in names:
            if name.startswith(prefix):
                tmp = f"{self.tmp}/{owner}.{next(_seq)}"
                try:
                    os.rename(f"{self.pool}/{name}", tmp)
                except FileNotFoundError:
                    continue  # another sender took it
                return tmp
        return None

    def recycle(self, path: str, size: int) -> None:
        """Park the file of a consumed, unmapped array message for reuse (else delete it).

        Only files nobody else can have mapped come here: first deliveries of queue (not
        topic) messages, which exist under exactly one name (``st_nlink`` 1).
        """
        with contextlib.suppress(OSError, ValueError):
            names = os.listdir(self.pool)
            parked = sum(int(n.split(".", 1)[0]) for n in names)
            if size >= POOL_MIN and parked + size <= _POOL_BYTES and os.stat(path).st_nlink == 1:
                os.rename(path, f"{self.pool}/{size}.{_pid}.{next(_seq)}")
                return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def purge_pool(self) -> int:
        """Delete every parked file (the store is short of space); how many went."""
        gone = 0
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.pool):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self.pool}/{name}")
                    gone += 1
        return gone

    def publish(self, tmp: str, queue: str, name: str) -> bool:
        """Make a staged message visible in ``queue``; False if it was a deleted temp queue."""
        target = f"{self.q}/{queue}/ready/{name}"
        try:
            os.rename(tmp, target)
            return True
        except FileNotFoundError:
            if not os.path.exists(tmp):
                return True  # already published (redo of a committed transaction)
        if os.path.exists(f"{self.gone}/{queue}"):
            os.unlink(tmp)
            return False
        os.makedirs(self.ready(queue), mode=0o700, exist_ok=True)
        os.rename(tmp, target)
        return True

    def fanout(self, tmp: str, topic: str, name: str) -> int:
        """Hard-link a staged message into every subscriber queue of ``topic``: one copy total."""
        delivered = 0
        try:
            subscribers = os.listdir(f"{self.t}/{topic}")
        except FileNotFoundError:
            subscribers = []
        for queue in subscribers:
            try:
                os.link(tmp, f"{self.q}/{queue}/ready/{name}")
                delivered += 1
            except FileExistsError:
                delivered += 1  # redo of a committed transaction
            except FileNotFoundError:
                if not os.path.exists(tmp):
                    break
                with contextlib.suppress(FileNotFoundError):  # subscriber has gone
                    os.unlink(f"{self.t}/{topic}/{queue}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        return delivered

    # -- topics and temporary queues ---------------------------------------------------

    def add_subscriber(self, topic: str, queue: str) -> None:
        os.makedirs(f"{self.t}/{topic}", mode=0o700, exist_ok=True)
        with open(f"{self.t}/{topic}/{queue}", "w"):
            pass

    def delete_queue(self, queue: str, topic: str | None) -> None:
        """Delete a temporary queue and what is in it; later sends to it are dropped."""
        with open(f"{self.gone}/{queue}", "w"):
            pass
        if topic:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.t}/{topic}/{queue}")
        doomed = f"{self.tmp}/.del.{queue}.{os.getpid()}.{next(_seq)}"
        try:
            os.rename(f"{self.q}/{queue}", doomed)
        except FileNotFoundError:
            return
        shutil.rmtree(doomed, ignore_errors=True)

    # -- consumer liveness ----------------------------------------------------------------

    def lock_is_free(self, cid: str) -> int | None:
        """Take a dead consumer's lock: an fd if its process is gone, None if it lives."""
        try:
            fd = os.open(f"{self.c}/{cid}/lock", os.O_RDWR | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def consumers(self) -> Iterator[str]:
        try:
            names = os.listdir(self.c)
        except FileNotFoundError:
            return
        for name in names:
            if name.endswith(".new"):
                with contextlib.suppress(OSError):
                    if time.time() - os.stat(f"{self.c}/{name}").st_mtime > 60:
                        shutil.rmtree(f"{self.c}/{name}", ignore_errors=True)
                continue
            yield name

    def tmp_of(self, cid: str) -> list[str]:
        try:
            return [f"{self.tmp}/{n}" for n in os.listdir(self.tmp) if n.startswith(cid + ".")]
        except FileNotFoundError:
            return []

    def sweep_tombstones(self, max_age: float = 600.0) -> None:
        try:
            names = os.listdir(self.gone)
        except FileNotFoundError:
            return
        now = time.time()
        for name in names:
            path = f"{self.gone}/{name}"
            with contextlib.suppress(OSError):
                if os.path.isdir(f"{self.q}/{name}"):  # a late sender recreated it
                    shutil.rmtree(f"{self.q}/{name}", ignore_errors=True)
                if now - os.stat(path).st_mtime > max_age:
                    os.unlink(path)

    def depth(self, queue: str) -> int:
        """Messages waiting (not delivered) in ``queue``."""
        try:
            return len(os.listdir(self.ready(queue)))
        except FileNotFoundError:
            return 0


def remove_store(path: str) -> None:
    """Delete a whole namespace: every queue, message and topic in it."""
    shutil.rmtree(path, ignore_errors=True)
