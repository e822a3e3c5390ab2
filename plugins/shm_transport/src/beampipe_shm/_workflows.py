"""``ShmTransport``: a workflows transport for one host that needs no broker.

zocalo services talk through ``workflows.transport``; on a workstation or in a test that
used to mean running RabbitMQ.  This transport keeps queues and topics as files in a
tmpfs directory (``/dev/shm/bpwf-<namespace>/``, see ``_workflows_store``) and gives
services the semantics they rely on with ``PikaTransport``: competing consumers with
prefetch and manual acknowledgement, nack with and without requeue, a bounded delivery
count with a dead-letter queue, fan-out topics, temporary queues, transactions and
``broadcast_status``, with headers shaped like Pika's.  Services move between the two by
changing ``-t ShmTransport`` to ``-t PikaTransport``.

Why files: every operation other processes must see is one atomic ``rename``/``link`` in
tmpfs, so producers and consumers in unrelated processes need no shared lock, a process
killed at any instruction leaves the store consistent, and a message outlives any single
process.  A consumer's liveness is a ``flock`` the kernel drops when it dies, which is how
another process knows to hand its un-acknowledged messages to someone else.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import heapq
import itertools
import json
import logging
import os
import secrets
import select
import shutil
import struct
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import workflows
from workflows.transport.common_transport import (
    CommonTransport,
    MessageCallback,
    json_serializer,
)

from ._workflows_ring import RING_MAX_RECORD, Ring
from ._workflows_store import (
    POOL_MIN,
    QueueConfig,
    ShmStoreError,
    ShmStoreFull,
    Store,
    decode,
    due_ns,
    encode,
    meta_json,
    next_name,
    remove_store,
    split_name,
    store_path,
    validate_name,
)

__all__ = ["ShmStoreError", "ShmStoreFull", "ShmTransport", "ShmTransportNotConnected"]

log = logging.getLogger("beampipe_shm.workflows")

THREAD_NAME = "beampipe-shm-workflows"
ENV_NAMESPACE = "BEAMPIPE_SHM_NAMESPACE"
ENV_ROOT = "BEAMPIPE_SHM_ROOT"
_DEFAULT_DELIVERY_LIMIT = 20  # RabbitMQ 4's default for quorum queues
_RESCAN = 1.0  # seconds between safety rescans, in case inotify dropped an event
_BATCH = 256  # deliveries per subscription per round, so one busy queue cannot starve others
# A ring that just delivered a batch and is now empty is tried once more after this pause
# before the consumer arms its bell: a producer in full flow then costs no wake-up per few
# messages (2x the two-process rate here).
_LINGER = 0.0001


# json.dumps(..., default=json_serializer) builds a new JSONEncoder per call; one is enough
# (same options, so the same text as PikaTransport's mangling).
_ENCODE = json.JSONEncoder(default=json_serializer).encode
_SCALARS = (str, int, float, bool, type(None))
_SCAN: Any = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # json.loads's C scanner


class ShmTransportNotConnected(workflows.Disconnected):
    """The transport was used before ``connect()`` or after ``disconnect()``."""


# -- inotify, through libc: wake a consumer the moment a message lands in its queue -------

_IN_ATTRIB = 0x4
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_Q_OVERFLOW = 0x4000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")


class _Inotify:
    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        self.fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")

    def watch(self, path: str, mask: int = _IN_MOVED_TO | _IN_CREATE) -> int:
        wd = self._add(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        return int(wd)

    def unwatch(self, wd: int) -> None:
        self._rm(self.fd, wd)

    def read(self) -> dict[int, list[str]] | None:
        """New file names per watch descriptor, in arrival order; None if events were lost."""
        fired: dict[int, list[str]] = {}
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return fired
            pos = 0
            while pos + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
                start = pos + _EVENT.size
                pos = start + length
                if mask & _IN_Q_OVERFLOW:
                    return None
                name = data[start:pos].rstrip(b"\0").decode()
                fired.setdefault(wd, []).append(name)

    def close(self) -> None:
        os.close(self.fd)


# -- bookkeeping ------------------------------------------------------------------------


_mapped_seq = itertools.count()


class _ArrayLease:
    """A delivered array message's file: reused for a later send once acknowledged AND unmapped.

    The consumer's ndarray is a read-only view of the file; its pages must not be rewritten
    while any view of it lives, however long the callback keeps it after ack.  So the file goes
    back to the store's pool only when both have happened: the ack (or auto-ack), and the
    mmap's finalizer (every view garbage-collected).  Until then it is an ordinary file.
    """

    __slots__ = ("_lock", "acked", "mapped_dir", "path", "size", "store", "unmapped")

    def __init__(self, store: Store, path: str, size: int, mapped_dir: str) -> None:
        self._lock = threading.RLock()  # the finalizer may run inside on_acked (GC)
        self.store, self.path, self.size, self.mapped_dir = store, path, size, mapped_dir
        self.acked = self.unmapped = False

    def attach(self, body: Any) -> None:
        base = body
        while getattr(base, "base", None) is not None:
            base = base.base  # ndarray views down to the mmap that owns the pages
        weakref.finalize(base, self.on_unmapped).atexit = False

    def on_acked(self) -> None:
        with self._lock:
            self.acked = True
            if not self.unmapped:
                if not self.path.startswith(self.mapped_dir + "/"):
                    # Still in use: park it where recovery deletes (never redelivers) it.
                    target = f"{self.mapped_dir}/{os.path.basename(self.path)}.{next(_mapped_seq)}"
                    try:
                        os.rename(self.path, target)
                        self.path = target
                    except OSError:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.path)
                        self.path = ""
                return
        self._done()

    def on_unmapped(self) -> None:
        with self._lock:
            self.unmapped = True
            if not self.acked:
                return
        self._done()

    def _done(self) -> None:
        path, self.path = self.path, ""
        if path:
            self.store.recycle(path, self.size)


@dataclass
class _Held:
    path: str  # "" for a record held in the queue's ring
    queue: str
    name: str
    pending: int | None = None  # transaction that will ack/nack this message
    ring: int = -1  # offset of the ring record
    lease: _ArrayLease | None = None  # array file to reuse after ack and unmap


@dataclass
class _Sub:
    sid: int
    queue: str
    ack: bool
    prefetch: int  # 0: unlimited
    kind: str  # "queue", "temporary" or "broadcast"
    topic: str | None = None
    held_dir: str = ""
    wd: int = -1
    active: bool = True
    next_tag: int = 1
    inflight: dict[int, _Held] = field(default_factory=dict)
    candidates: deque[str] = field(default_factory=deque)
    dirty: bool = True
    delayed: list[tuple[int, str]] = field(default_factory=list)  # heap of (due ns, name)
    last_scan: float = 0.0
    ring: Ring | None = None
    slot: int = -1
    ring_acks: list[int] = field(default_factory=list)  # acked, applied at the next claim
    warm: bool = False  # the last claim caught a batch: linger before arming the bell


@dataclass
class _Tx:
    channel: int | None  # subscription the transaction is bound to, None: the shared channel
    sends: list[tuple[str, str, str, str]] = field(default_factory=list)  # tmp, kind, dest, name
    acks: list[tuple[int, int]] = field(default_factory=list)  # sid, tag
    nacks: list[tuple[int, int, bool]] = field(default_factory=list)  # sid, tag, requeue


_live: weakref.WeakSet[ShmTransport] = weakref.WeakSet()


def _forget_in_child() -> None:
    # A forked child (workflows' frontend forks each service) must not keep the parent's
    # consumer lock open: it would hide the parent's death from every other process.
    for transport in list(_live):
        transport._abandon_after_fork()
    _live.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class ShmTransport(CommonTransport):
    """Broker-less workflows transport for processes on one host, over tmpfs.

    Select it with ``-t ShmTransport``.  All processes that use the same namespace
    (``--shm-namespace`` or ``$BEAMPIPE_SHM_NAMESPACE``, default ``default``) share queues
    and topics.  Nothing is opened until :meth:`connect`, because workflows instantiates
    every installed transport just to collect command-line options.
    """

    defaults: dict[str, Any] = {
        "--shm-namespace": None,
        "--shm-root": None,
        "--shm-delivery-limit": _DEFAULT_DELIVERY_LIMIT,
        "--shm-reserve-mb": 64,
        "--shm-janitor-interval": 0.5,
        "--shm-ring-kb": 4096,
    }
    # Effective configuration from the command line, shared by the class as PikaTransport's is.
    config: dict[str, Any] = {}

    def __init__(
        self,
        middleware: list[Any] | None = None,
        *,
        namespace: str | None = None,
        root: str | None = None,
        delivery_limit: int | None = None,
        reserve_mb: float | None = None,
        janitor_interval: float | None = None,
        ring_kb: int | None = None,
    ) -> None:
        super().__init__(middleware=middleware)
        # workflows keeps subscriptions and transactions in class-level dicts shared by every
        # instance in a process; two transports in one process would overwrite each other's
        # callbacks (same ids).  Give each instance its own.
        self._CommonTransport__subscriptions: dict[int, dict[str, Any]] = {}
        self._CommonTransport__transactions: set[int] = set()
        self._overrides = {
            "--shm-namespace": namespace,
            "--shm-root": root,
            "--shm-delivery-limit": delivery_limit,
            "--shm-reserve-mb": reserve_mb,
            "--shm-janitor-interval": janitor_interval,
            "--shm-ring-kb": ring_kb,
        }
        self._lock = threading.RLock()
        self._store: Store | None = None
        self._cid = ""
        self._lock_fd = -1
        self._pid = 0
        self._subs: dict[int, _Sub] = {}
        self._txs: dict[int, _Tx] = {}
        self._tx_on_channel: dict[int | None, int] = {}
        self._thread: threading.Thread | None = None
        self._inotify: _Inotify | None = None
        self._wake_fd = -1
        self._stopping = False
        self._broken: str | None = None
        self._delivery_limit: int | None = _DEFAULT_DELIVERY_LIMIT
        self._janitor_interval = 0.5
        self._next_janitor = 0.0
        self._dropped = 0
        self._ring_bytes = 0
        self._rings: dict[str, Ring] = {}
        self._mapped_dir = ""  # c/<cid>/m: consumed arrays still mapped
        self._linger = False
        self._plain_meta: dict[str, tuple[bytes, str]] = {}  # queue: (meta, repr(queue))
        # parsed ring metadata (plain sends share one meta per queue): headers minus the
        # per-delivery fields, expiry, and the subscription they were built for
        self._metas: dict[bytes, tuple[dict[str, Any], float | None, int]] = {}
        self._bell_wd = -1

    # -- options ---------------------------------------------------------------------------

    @classmethod
    def add_command_line_options(cls, parser: Any) -> None:
        """Add ``--shm-*`` options to an argparse or optparse parser (workflows uses both)."""
        options = [
            (
                "--shm-namespace",
                "NS",
                str,
                f"store namespace (default ${ENV_NAMESPACE} or 'default')",
            ),
            (
                "--shm-root",
                "DIR",
                str,
                f"directory of the store (default ${ENV_ROOT} or /dev/shm)",
            ),
            ("--shm-delivery-limit", "N", int, "deliveries before dead-lettering (0: no limit)"),
            ("--shm-reserve-mb", "MB", float, "refuse sends that leave less free memory"),
            ("--shm-janitor-interval", "S", float, "seconds between dead-consumer checks"),
            ("--shm-ring-kb", "KB", int, "per-queue ring for small messages (0: files only)"),
        ]
        if hasattr(parser, "add_argument"):
            import argparse

            class SetParameter(argparse.Action):
                def __call__(
                    self, parser: Any, namespace: Any, value: Any, option_string: Any = None
                ) -> None:
                    cls.config[option_string] = value
                    setattr(namespace, self.dest, value)

            for flag, metavar, typ, text in options:
                parser.add_argument(
                    flag,
                    metavar=metavar,
                    type=typ,
                    help=text,
                    action=SetParameter,
                    default=cls.defaults.get(flag),
                )
        else:

            def set_parameter(option: Any, opt: str, value: Any, parser: Any) -> None:
                cls.config[opt] = value

            for flag, metavar, typ, text in options:
                parser.add_option(
                    flag,
                    metavar=metavar,
                    type={str: "string", int: "int", float: "float"}[typ],
                    help=text,
                    nargs=1,
                    action="callback",
                    callback=set_parameter,
                    default=cls.defaults.get(flag),
                )

    def _option(self, key: str) -> Any:
        if self._overrides.get(key) is not None:
            return self._overrides[key]
        if self.config.get(key) is not None:
            return self.config[key]
        env = {"--shm-namespace": ENV_NAMESPACE, "--shm-root": ENV_ROOT}.get(key)
        if env and os.environ.get(env):
            return os.environ[env]
        return self.defaults.get(key)

    @property
    def namespace(self) -> str:
        return str(self._option("--shm-namespace") or "default")

    @property
    def store_path(self) -> str:
        """Where this transport's queues live (valid before connect)."""
        return store_path(str(self._option("--shm-root") or "/dev/shm"), self.namespace)

    @classmethod
    def remove_store(cls, namespace: str, root: str | None = None) -> None:
        """Delete a namespace with all its queues and messages (tests, ``make clean``)."""
        remove_store(store_path(root or os.environ.get(ENV_ROOT) or "/dev/shm", namespace))

    # -- connection ------------------------------------------------------------------------

    def connect(self) -> bool:
        with self._lock:
            if self._store is not None:
                return True
            root = str(self._option("--shm-root") or "/dev/shm")
            if not os.path.isdir(root):
                raise workflows.Disconnected(
                    f"ShmTransport store root {root!r} is not a directory (--shm-root/${ENV_ROOT})"
                )
            limit = int(self._option("--shm-delivery-limit") or 0)
            self._delivery_limit = limit if limit > 0 else None
            self._janitor_interval = float(self._option("--shm-janitor-interval"))
            ring_kb = self._option("--shm-ring-kb")
            self._ring_bytes = max(0, int(ring_kb if ring_kb is not None else 0)) * 1024
            reserve = int(float(self._option("--shm-reserve-mb")) * 2**20)
            store = Store(store_path(root, self.namespace), reserve_bytes=reserve)
            try:
                store.create()
                cid = f"{os.getpid()}-{secrets.token_hex(4)}"
                staging = f"{store.c}/{cid}.new"
                os.makedirs(f"{staging}/h", mode=0o700)
                os.makedirs(f"{staging}/own", mode=0o700)
                os.makedirs(f"{staging}/m", mode=0o700)
                fd = os.open(f"{staging}/lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.rename(staging, f"{store.c}/{cid}")
            except OSError as exc:
                raise workflows.Disconnected(
                    f"ShmTransport cannot open its store {store.path}: {exc}"
                ) from exc
            self._store, self._cid, self._lock_fd, self._pid = store, cid, fd, os.getpid()
            self._mapped_dir = f"{store.c}/{cid}/m"
            self._stopping, self._broken = False, None
            _live.add(self)
        log.debug("ShmTransport %s connected to %s", cid, store.path)
        self._janitor()  # recover what consumers that died before we started left behind
        return True

    def is_connected(self) -> bool:
        return (
            self._store is not None
            and self._broken is None
            and self._pid == os.getpid()
            and (self._thread is None or self._thread.is_alive())
        )

    def disconnect(self) -> None:
        """Stop consuming; un-acknowledged messages go back to their queues (redelivered)."""
        with self._lock:
            store = self._store
            if store is None or self._pid != os.getpid():
                return
            self._stopping = True
            thread = self._thread
        self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
        with self._lock:
            for tx in self._txs.values():
                for tmp, *_ in tx.sends:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            self._txs.clear()
            self._tx_on_channel.clear()
            for sub in self._subs.values():
                sub.active = False
                self._flush_acks(sub)
            self._subs.clear()
            self._recover(self._cid)  # returns our held messages, deletes temporary queues
            os.close(self._lock_fd)
            self._lock_fd = -1
            for ring in self._rings.values():
                ring.close()
            self._rings = {}
            if self._inotify is not None:
                self._inotify.close()
                self._inotify = None
            self._bell_wd = -1
            if self._wake_fd >= 0:
                os.close(self._wake_fd)
                self._wake_fd = -1
            self._thread = None
            self._store = None
            _live.discard(self)
        log.debug("ShmTransport %s disconnected", self._cid)

    def _abandon_after_fork(self) -> None:
        for fd in (self._lock_fd, self._wake_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self._inotify is not None:
            with contextlib.suppress(OSError):
                self._inotify.close()
        self._lock_fd = self._wake_fd = self._bell_wd = -1
        for ring in self._rings.values():
            with contextlib.suppress(OSError):
                os.close(ring.fd)
        self._rings = {}
        self._inotify = None
        self._thread = None
        self._store = None
        self._subs = {}
        self._txs = {}
        self._lock = threading.RLock()

    def _need(self, what: str) -> Store:
        store = self._store
        if store is None or self._pid != os.getpid():
            raise ShmTransportNotConnected(
                f"ShmTransport: cannot {what} before connect() (or after disconnect(), or in a "
                "forked child: connect a new ShmTransport there)"
            )
        if self._broken is not None:
            raise workflows.Disconnected(f"ShmTransport cannot {what}: {self._broken}")
        return store

    # -- sending ---------------------------------------------------------------------------

    def _encode_body(
        self, message: Any, dest: str
    ) -> tuple[bytes | memoryview, tuple[str, tuple[int, ...]] | None]:
        if isinstance(message, str):
            return message.encode(), None
        if isinstance(message, bytes | bytearray):
            return bytes(message), None
        if type(message).__module__ == "numpy" and hasattr(message, "__array_interface__"):
            import numpy as np

            arr = np.ascontiguousarray(message)
            if arr.dtype.hasobject:
                raise TypeError(f"cannot send an object array to {dest!r}")
            return memoryview(arr.data).cast("B"), (arr.dtype.str, tuple(arr.shape))
        raise TypeError(
            f"ShmTransport sends str, bytes or numpy arrays to {dest!r}, got "
            f"{type(message).__name__} (use send() to JSON-encode objects)"
        )

    def _stage(
        self,
        kind: str,
        destination: Any,
        message: Any,
        headers: dict[str, Any] | None,
        delay: float | None,
        expiration: float | None,
        transaction: int | None,
    ) -> None:
        what = "queue" if kind == "q" else "topic"
        store = self._need(f"send to {what} {destination!r}")
        dest = validate_name(destination, what)
        if delay is not None and (not isinstance(delay, int | float) or delay < 0):
            raise ValueError(f"delay for {dest!r} must be seconds >= 0, got {delay!r}")
        if expiration is not None and (not isinstance(expiration, int | float) or expiration <= 0):
            raise ValueError(f"expiration for {dest!r} must be seconds > 0, got {expiration!r}")
        if headers is not None and not isinstance(headers, dict):
            raise TypeError(f"headers for {dest!r} must be a dict, got {type(headers).__name__}")
        body, array = self._encode_body(message, dest)
        expires = None if expiration is None else time.time() + (delay or 0) + expiration
        if (
            kind == "q"
            and transaction is None
            and not delay
            and array is None
            and self._ring_bytes
            and len(body) <= RING_MAX_RECORD // 2
        ):  # the fast path: a small message straight into the queue's ring
            if headers or expires is not None:
                meta = meta_json(headers or {}, "", dest, expires)
            else:
                plain = self._plain_meta.get(dest)
                if plain is None:
                    plain = self._plain_meta[dest] = (meta_json({}, "", dest, None), repr(dest))
                meta = plain[0]
            if len(meta) + len(body) <= RING_MAX_RECORD:
                store.check_space(len(meta) + len(body), repr(dest))
                ring = self._ring(dest)
                if ring is None:
                    self._dropped += 1
                    log.warning("message to deleted temporary queue %r dropped", dest)
                    return
                sleepers = ring.append(meta, body if isinstance(body, bytes) else bytes(body))
                if sleepers is not None:
                    self._ring_bells(sleepers)
                    return
                # ring full (slow consumers): the file store takes it
        parts = encode(
            body,
            headers=dict(headers or {}),
            exchange="" if kind == "q" else dest,
            routing_key=dest if kind == "q" else "",
            expires=expires,
            array=array,
        )
        name = next_name(delay)
        if transaction is not None:
            with self._lock:
                tx = self._txs.get(transaction)
                if tx is None:
                    raise workflows.Error(f"send to {dest!r}: unknown transaction {transaction}")
                tx.sends.append((store.stage(self._cid, parts, repr(dest)), kind, dest, name))
            return
        tmp = store.stage(self._cid, parts, repr(dest))
        self._publish(store, tmp, kind, dest, name)

    def _ring(self, queue: str) -> Ring | None:
        """``queue``'s ring, created on first use; None if it is a deleted temporary queue."""
        ring = self._rings.get(queue)
        if ring is not None:
            return ring
        store = self._store
        assert store is not None
        if not store.queue_exists(queue):
            if os.path.exists(f"{store.gone}/{queue}"):
                return None
            store.ensure_queue(queue)
        with self._lock:
            ring = self._rings.get(queue)
            if ring is None:
                ring = self._rings[queue] = Ring(f"{store.q}/{queue}/ring", self._ring_bytes)
        return ring

    def _ring_bells(self, consumers: list[str]) -> None:
        store = self._store
        assert store is not None
        for cid in consumers:
            with contextlib.suppress(OSError):
                os.utime(f"{store.c}/{cid}/bell")

    def _publish(self, store: Store, tmp: str, kind: str, dest: str, name: str) -> None:
        if kind == "q":
            if not store.publish(tmp, dest, name):
                self._dropped += 1
                log.warning("message to deleted temporary queue %r dropped", dest)
        else:
            store.fanout(tmp, dest, name)

    def _send(
        self,
        destination: Any,
        message: Any,
        headers: dict[str, Any] | None = None,
        delay: float | None = None,
        expiration: float | None = None,
        transaction: int | None = None,
        **kwargs: Any,
    ) -> None:
        if (
            type(message) is str
            and headers is None
            and delay is None
            and expiration is None
            and transaction is None
            and self._broken is None
        ):
            # The common case (a service's plain send to a queue this process has used):
            # the checks _stage makes were made when the ring and its meta were cached.
            ring = self._rings.get(destination)
            plain = self._plain_meta.get(destination)
            store = self._store
            if ring is not None and plain is not None and store is not None:
                body = message.encode()
                meta, what = plain
                if len(body) <= RING_MAX_RECORD // 2:  # (a forked child has no rings)
                    store.check_space(len(meta) + len(body), what)
                    sleepers = ring.append(meta, body)
                    if sleepers is not None:
                        if sleepers:
                            self._ring_bells(sleepers)
                        return
                    # ring full: _stage sends it as a file
        self._stage("q", destination, message, headers, delay, expiration, transaction)

    def send(self, destination: Any, message: Any, **kwargs: Any) -> None:
        """Send a message to a queue, JSON-encoded as PikaTransport does."""
        if self.middleware:  # workflows' middleware chain, exactly as CommonTransport runs it
            super().send(destination, message, **kwargs)
        else:  # no middleware: the chain would be a no-op costing a fifth of a send
            self._send(destination, _ENCODE(message), **kwargs)

    def _broadcast(
        self,
        destination: Any,
        message: Any,
        headers: dict[str, Any] | None = None,
        delay: float | None = None,
        expiration: float | None = None,
        transaction: int | None = None,
        **kwargs: Any,
    ) -> None:
        self._stage("t", destination, message, headers, delay, expiration, transaction)

    def broadcast_status(self, status: dict[str, Any]) -> None:
        """Broadcast transient status information to all listeners (workflows' frontend)."""
        missing = {"host", "workflows", "status"} - status.keys()
        if missing:
            raise ValueError(
                f"Missing required field(s) for status broadcast: {', '.join(sorted(missing))}"
            )
        self._broadcast("transient.status", json.dumps(status), expiration=15)

    # -- queue administration (what RabbitMQ does with policies / queue arguments) --------

    def declare_queue(
        self,
        queue: str,
        *,
        delivery_limit: int | None = _DEFAULT_DELIVERY_LIMIT,
        dead_letter_queue: str | None = "",
    ) -> None:
        """Create ``queue`` with its delivery limit and dead-letter queue.

        ``dead_letter_queue=""`` (default) means ``dlq.<queue>`` (none for ``dlq.*`` queues
        themselves), None disables dead-lettering
        (rejected or over-delivered messages are then dropped, as RabbitMQ does without a
        dead-letter exchange).  Undeclared queues are created on first use with the
        transport's ``--shm-delivery-limit`` and ``dlq.<queue>``.
        """
        store = self._need(f"declare queue {queue!r}")
        validate_name(queue)
        if delivery_limit is not None and (
            not isinstance(delivery_limit, int) or delivery_limit < 0
        ):
            raise ValueError(f"delivery_limit of {queue!r} must be an int >= 0 or None")
        if dead_letter_queue == "":  # a dead-letter queue has none of its own
            dead_letter_queue = None if queue.startswith("dlq.") else f"dlq.{queue}"
        if dead_letter_queue is not None:
            validate_name(dead_letter_queue)
            store.ensure_queue(dead_letter_queue, QueueConfig(None, None))
        store.ensure_queue(queue, QueueConfig(delivery_limit, dead_letter_queue))

    def queue_depth(self, queue: str) -> int:
        """Messages waiting in ``queue`` (not counting delivered, un-acknowledged ones)."""
        store = self._need(f"count queue {queue!r}")
        depth = store.depth(validate_name(queue))
        if self._ring_bytes and store.queue_exists(queue):
            ring = self._ring(queue)
            depth += ring.ready_count() if ring is not None else 0
        return depth

    def _policy(self, queue: str) -> QueueConfig:
        store = self._store
        cfg = store.config(queue) if store is not None else None
        if cfg is not None:
            return cfg
        dlq = None if queue.startswith("dlq.") else f"dlq.{queue}"
        return QueueConfig(self._delivery_limit, dlq)

    # -- subscribing -----------------------------------------------------------------------

    def _subscribe(
        self,
        sub_id: int,
        channel: Any,
        callback: MessageCallback,
        *,
        acknowledgement: bool = False,
        prefetch_count: int = 1,
        **kwargs: Any,
    ) -> None:
        store = self._need(f"subscribe to queue {channel!r}")
        queue = validate_name(channel)
        if not isinstance(prefetch_count, int) or prefetch_count < 0:
            raise ValueError(f"prefetch_count for {queue!r} must be an int >= 0")
        store.ensure_queue(queue)
        self._add_sub(_Sub(sub_id, queue, bool(acknowledgement), prefetch_count, "queue"))

    def _subscribe_temporary(
        self,
        sub_id: int,
        channel_hint: str | None,
        callback: MessageCallback,
        *,
        acknowledgement: bool = False,
        **kwargs: Any,
    ) -> str:
        store = self._need("create a temporary queue")
        if channel_hint:
            queue = (
                channel_hint
                if channel_hint.startswith("transient.")
                else (f"transient.{channel_hint}")
            )
            queue = f"{queue}.{uuid.uuid4()}"
        else:
            queue = f"amq.gen-{uuid.uuid4()}"
        validate_name(queue)
        store.ensure_queue(queue, QueueConfig(None, None, temporary=True, owner=self._cid))
        self._own(queue, "")
        self._add_sub(_Sub(sub_id, queue, bool(acknowledgement), 0, "temporary"))
        return queue

    def _subscribe_broadcast(
        self, sub_id: int, channel: Any, callback: MessageCallback, **kwargs: Any
    ) -> None:
        store = self._need(f"subscribe to topic {channel!r}")
        topic = validate_name(channel, "topic")
        queue = f"amq.gen-{self._cid}-{sub_id}"
        store.ensure_queue(queue, QueueConfig(None, None, temporary=True, owner=self._cid))
        self._own(queue, topic)
        store.add_subscriber(topic, queue)
        self._add_sub(_Sub(sub_id, queue, False, 0, "broadcast", topic=topic))

    def _own(self, queue: str, topic: str) -> None:
        assert self._store is not None
        with open(f"{self._store.c}/{self._cid}/own/{queue}", "w") as f:
            f.write(topic)

    def _add_sub(self, sub: _Sub) -> None:
        store = self._need(f"subscribe to {sub.queue!r}")
        sub.held_dir = f"{store.c}/{self._cid}/h/{sub.queue}"
        os.makedirs(sub.held_dir, mode=0o700, exist_ok=True)
        with self._lock:
            if self._inotify is None:
                self._inotify = _Inotify()
                self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            sub.wd = self._inotify.watch(store.ready(sub.queue))
            if self._ring_bytes and sub.kind != "broadcast":
                self._ring_subscribe(store, sub)
            self._subs[sub.sid] = sub
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()
        self._wake()

    def _ring_subscribe(self, store: Store, sub: _Sub) -> None:
        assert self._inotify is not None
        if self._bell_wd < 0:
            bell = f"{store.c}/{self._cid}/bell"
            with open(bell, "w"):
                pass
            self._bell_wd = self._inotify.watch(bell, _IN_ATTRIB)
        os.makedirs(f"{store.c}/{self._cid}/rings", mode=0o700, exist_ok=True)
        with open(f"{store.c}/{self._cid}/rings/{sub.queue}", "w"):
            pass  # recorded before the slot exists, so recovery always finds it
        ring = self._ring(sub.queue)
        assert ring is not None
        with ring.locked():
            slot = ring.slot_of(self._cid)
        assert slot is not None
        sub.ring, sub.slot = ring, slot

    def _ring_held(
        self, held: list[_Held], cid: str | None
    ) -> Iterator[tuple[str, Ring, int, list[int]]]:
        """Group ring-held messages by queue, with the ring and the holder's slot."""
        by_queue: dict[str, list[int]] = {}
        for h in held:
            if h.ring >= 0:
                by_queue.setdefault(h.queue, []).append(h.ring)
        for queue, offsets in by_queue.items():
            ring = self._ring(queue)
            if ring is None:
                continue
            with ring.locked():
                slot = ring.slot_of(cid or self._cid, create=False)
            if slot is not None:
                yield queue, ring, slot, offsets

    def _give_back(self, held: list[_Held], cid: str | None = None) -> None:
        """Return delivered, un-acknowledged messages to their queues (one delivery later)."""
        for h in held:
            if h.ring < 0:
                self._return(h.path, h.queue, h.name)
        for queue, ring, slot, offsets in self._ring_held(held, cid):
            over, sleepers = ring.release(offsets, slot, self._policy(queue).delivery_limit)
            self._ring_bells(sleepers)
            for rec in over:
                self._dead_letter_message(queue, "delivery_limit", json.loads(rec.meta), rec.body)

    def _finish(self, held: list[_Held], cid: str | None = None) -> None:
        """Acknowledge: the messages are gone for good."""
        for h in held:
            if h.lease is not None:
                h.lease.on_acked()
            elif h.ring < 0:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(h.path)
        for _queue, ring, slot, offsets in self._ring_held(held, cid):
            ring.ack(offsets, slot)

    def _reject(self, held: list[_Held], cid: str | None = None) -> None:
        """nack without requeue: to the dead-letter queue (or dropped without one)."""
        for h in held:
            if h.ring < 0:
                self._dead_letter(h.path, h.queue, "rejected")
        for queue, ring, slot, offsets in self._ring_held(held, cid):
            for rec in ring.take_done(offsets, slot):
                self._dead_letter_message(queue, "rejected", json.loads(rec.meta), rec.body)

    def _unsubscribe(self, sub_id: int, **kwargs: Any) -> None:
        store = self._need(f"unsubscribe {sub_id}")
        with self._lock:
            sub = self._subs.pop(sub_id, None)
            if sub is None:
                raise workflows.Error(f"ShmTransport: no subscription {sub_id} to unsubscribe")
            sub.active = False
            held = list(sub.inflight.values())
            sub.inflight.clear()
            if self._tx_on_channel.get(sub_id) is not None:
                self._tx_on_channel.pop(sub_id)
        self._flush_acks(sub)
        # As a closed AMQP channel does: what was delivered and not acknowledged goes back.
        self._give_back(held)
        if sub.kind != "queue":
            store.delete_queue(sub.queue, sub.topic)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{store.c}/{self._cid}/own/{sub.queue}")

    # -- acknowledgement -------------------------------------------------------------------

    def _flush_acks(self, sub: _Sub) -> None:
        """Apply ring acks the consumer thread has not taken yet (unsubscribe, disconnect)."""
        with self._lock:
            acks, sub.ring_acks = sub.ring_acks, []
        if acks and sub.ring is not None:
            sub.ring.ack(acks, sub.slot)

    def _held(
        self, sub_id: int, message_id: Any, multiple: bool, transaction: int | None, verb: str
    ) -> tuple[_Sub, list[int]]:
        sub = self._subs.get(sub_id)
        if sub is None:
            raise workflows.Error(f"ShmTransport: no subscription {sub_id} to {verb} on")
        if not sub.ack:
            raise workflows.Error(
                f"cannot {verb} message {message_id} on subscription {sub_id} ({sub.queue!r}): "
                "it was subscribed without acknowledgement=True"
            )
        current = self._tx_on_channel.get(sub_id)
        if transaction != current:
            raise workflows.Error(
                "Transaction state mismatch. "
                f"Call assumes transaction {transaction}, channel has transaction {current}"
            )
        if multiple:
            tags = [t for t in sub.inflight if t <= message_id and sub.inflight[t].pending is None]
        else:
            h = sub.inflight.get(message_id)
            if h is None or h.pending is not None:
                raise workflows.Error(
                    f"cannot {verb} message {message_id} on subscription {sub_id} "
                    f"({sub.queue!r}): not delivered or already acknowledged"
                )
            tags = [message_id]
        return sub, tags

    def ack(self, message: Any, subscription_id: int | None = None, **kwargs: Any) -> None:
        """Acknowledge a message (its header dict or message id), as CommonTransport does."""
        if self.middleware:
            super().ack(message, subscription_id, **kwargs)
            return
        # CommonTransport.ack minus the no-op middleware chain (a sixth of an acked delivery)
        if isinstance(message, dict):
            message_id = message.get("message-id")
            if not subscription_id:
                subscription_id = message.get("subscription")
        else:
            message_id = message
        if not message_id:
            raise workflows.Error("Cannot acknowledge message without message ID")
        if not subscription_id:
            raise workflows.Error("Cannot acknowledge message without subscription ID")
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug(
                "Acknowledging message %s on subscription %s", message_id, subscription_id
            )
        self._ack(message_id, subscription_id=subscription_id, **kwargs)

    def _ack(
        self, message_id: Any, subscription_id: int, *, multiple: bool = False, **kwargs: Any
    ) -> None:
        self._need(f"ack message {message_id}")
        transaction = kwargs.get("transaction")
        with self._lock:
            sub, tags = self._held(subscription_id, message_id, multiple, transaction, "ack")
            if transaction is not None:
                for t in tags:
                    sub.inflight[t].pending = transaction
                self._txs[transaction].acks.extend((subscription_id, t) for t in tags)
                return
            full = sub.prefetch and len(sub.inflight) >= sub.prefetch
            done = [sub.inflight.pop(t) for t in tags]
            if sub.ring is not None and self._thread is not None:
                # Ring acks ride on the consumer thread's next claim (one lock for both);
                # wake it for the first one so an idle consumer applies them at once.
                first = not sub.ring_acks
                sub.ring_acks.extend(h.ring for h in done if h.ring >= 0)
                full = full or (first and bool(sub.ring_acks))
                done = [h for h in done if h.ring < 0]
        if done:
            self._finish(done)
        if full:
            self._wake()

    def _nack(
        self,
        message_id: Any,
        subscription_id: int,
        *,
        multiple: bool = False,
        requeue: bool = True,
        **kwargs: Any,
    ) -> None:
        self._need(f"nack message {message_id}")
        transaction = kwargs.get("transaction")
        with self._lock:
            sub, tags = self._held(subscription_id, message_id, multiple, transaction, "nack")
            if transaction is not None:
                for t in tags:
                    sub.inflight[t].pending = transaction
                self._txs[transaction].nacks.extend((subscription_id, t, requeue) for t in tags)
                return
            done = [sub.inflight.pop(t) for t in tags]
        if requeue:
            self._give_back(done)
        else:
            self._reject(done)
        self._wake()

    def _return(self, path: str, queue: str, name: str) -> None:
        """Put a delivered message back, one delivery later; dead-letter it past the limit."""
        store = self._store
        assert store is not None
        base, returns = split_name(name)
        policy = self._policy(queue)
        if policy.delivery_limit is not None and returns + 1 > policy.delivery_limit:
            self._dead_letter(path, queue, "delivery_limit")
            return
        target = f"{store.ready(queue)}/{base}~{returns + 1}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            if not os.path.exists(path):
                return  # someone else (a janitor) already returned it
            if policy.temporary or os.path.exists(f"{store.gone}/{queue}"):
                os.unlink(path)  # its temporary queue is gone, as in RabbitMQ
                return
            store.ensure_queue(queue)
            os.rename(path, target)

    def _dead_letter(self, path: str, queue: str, reason: str) -> None:
        store = self._store
        assert store is not None
        dlq = self._policy(queue).dead_letter_queue
        if dlq is None:
            self._dropped += 1
            log.warning(
                "message from %r dropped (%s) and %r has no dead-letter queue", queue, reason, queue
            )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        try:
            msg = decode(path)
        except FileNotFoundError:
            return
        self._dead_letter_message(queue, reason, msg.meta, msg.body)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _dead_letter_message(
        self, queue: str, reason: str, meta: dict[str, Any], body: Any
    ) -> None:
        store = self._store
        assert store is not None
        dlq = self._policy(queue).dead_letter_queue
        if dlq is None:
            self._dropped += 1
            log.warning("message from %r dropped (%s): no dead-letter queue", queue, reason)
            return
        headers = meta["h"]
        deaths = headers.setdefault("x-death", [])
        for death in deaths:
            if death.get("queue") == queue and death.get("reason") == reason:
                death["count"] += 1
                death["time"] = int(time.time())
                break
        else:
            deaths.insert(
                0,
                {
                    "count": 1,
                    "reason": reason,
                    "queue": queue,
                    "time": int(time.time()),
                    "exchange": meta["x"],
                    "routing-keys": [meta["r"] or queue],
                },
            )
        headers.setdefault("x-first-death-exchange", meta["x"])
        headers.setdefault("x-first-death-queue", queue)
        headers.setdefault("x-first-death-reason", reason)
        array = meta.get("a")
        parts = encode(
            body if isinstance(body, bytes) else memoryview(body),
            headers=headers,
            exchange="",
            routing_key=dlq,
            expires=None,
            array=(array[0], tuple(array[1])) if array else None,
        )
        tmp = store.stage(self._cid, parts, f"dead-letter queue {dlq!r}")
        store.publish(tmp, dlq, next_name())

    def _put_back(
        self, store: Store, queue: str, name: str, meta: dict[str, Any], body: Any
    ) -> None:
        array = meta.get("a")
        parts = encode(
            body if isinstance(body, bytes) else memoryview(body),
            headers=meta["h"],
            exchange=meta["x"],
            routing_key=meta["r"],
            expires=meta.get("e"),
            array=(array[0], tuple(array[1])) if array else None,
        )
        store.publish(store.stage(self._cid, parts, repr(queue)), queue, name)

    # -- transactions ----------------------------------------------------------------------

    def _transaction_begin(
        self, transaction_id: int, *, subscription_id: int | None = None, **kwargs: Any
    ) -> None:
        self._need("begin a transaction")
        with self._lock:
            if subscription_id and subscription_id not in self._subs:
                raise workflows.Error(
                    f"Could not find subscription {subscription_id} to begin transaction"
                )
            channel = subscription_id or None
            if channel in self._tx_on_channel:
                raise workflows.Error(
                    f"{f'subscription {channel}' if channel else 'the shared channel'} is "
                    f"already running transaction {self._tx_on_channel[channel]}, so can't "
                    f"start transaction {transaction_id}"
                )
            self._tx_on_channel[channel] = transaction_id
            self._txs[transaction_id] = _Tx(channel)

    def _transaction_abort(self, transaction_id: int, **kwargs: Any) -> None:
        self._need(f"abort transaction {transaction_id}")
        with self._lock:
            tx = self._end_tx(transaction_id)
            tags = [(sid, tag) for sid, tag in tx.acks] + [(s, t) for s, t, _ in tx.nacks]
            for sid, tag in tags:
                sub = self._subs.get(sid)
                if sub is not None and tag in sub.inflight:
                    sub.inflight[tag].pending = None
        for tmp, *_ in tx.sends:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _end_tx(self, transaction_id: int) -> _Tx:
        tx = self._txs.pop(transaction_id, None)
        if tx is None:
            raise workflows.Error(f"Could not find transaction {transaction_id}")
        self._tx_on_channel.pop(tx.channel, None)
        return tx

    def _transaction_commit(self, transaction_id: int, **kwargs: Any) -> None:
        store = self._need(f"commit transaction {transaction_id}")
        with self._lock:
            tx = self._end_tx(transaction_id)
            acks: list[_Held] = []
            nacks: list[tuple[_Held, bool]] = []
            wake = False
            for sid, tag in tx.acks:
                sub = self._subs.get(sid)
                if sub is not None and tag in sub.inflight:
                    wake |= bool(sub.prefetch and len(sub.inflight) >= sub.prefetch)
                    acks.append(sub.inflight.pop(tag))
            for sid, tag, requeue in tx.nacks:
                sub = self._subs.get(sid)
                if sub is not None and tag in sub.inflight:
                    nacks.append((sub.inflight.pop(tag), requeue))
        if tx.sends or acks or nacks:
            # The redo log: once it exists the transaction happens, even if we die now.
            manifest = {
                "cid": self._cid,
                "sends": tx.sends,
                "acks": [[h.path, h.queue, h.name, h.ring] for h in acks],
                "nacks": [[h.path, h.queue, h.name, h.ring, rq] for h, rq in nacks],
            }
            log_path = f"{store.c}/{self._cid}/tx-{transaction_id}.json"
            store.write_json(log_path, manifest)
            self._apply(manifest)
            os.unlink(log_path)
        if wake or nacks:
            self._wake()

    def _apply(self, manifest: dict[str, Any]) -> None:
        store = self._store
        assert store is not None
        cid = manifest["cid"]
        for tmp, kind, dest, name in manifest["sends"]:
            self._publish(store, tmp, kind, dest, name)
        self._finish([_Held(p, q, n, ring=r) for p, q, n, r in manifest["acks"]], cid)
        nacks = [(_Held(p, q, n, ring=r), rq) for p, q, n, r, rq in manifest["nacks"]]
        self._give_back([h for h, rq in nacks if rq], cid)
        self._reject([h for h, rq in nacks if not rq], cid)

    # -- recovery --------------------------------------------------------------------------

    def _recover(self, cid: str) -> None:
        """Finish what consumer ``cid`` (dead, or us on disconnect) left: nothing is lost."""
        store = self._store
        assert store is not None
        base = f"{store.c}/{cid}"
        try:
            entries = sorted(os.listdir(base))
        except FileNotFoundError:
            return
        for entry in entries:  # committed transactions first: they already acked
            if entry.startswith("tx-") and entry.endswith(".json"):
                try:
                    with open(f"{base}/{entry}") as f:
                        manifest = json.load(f)
                except (FileNotFoundError, ValueError):
                    continue
                self._apply(manifest)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{base}/{entry}")
        owned: dict[str, str] = {}
        with contextlib.suppress(FileNotFoundError):
            for queue in os.listdir(f"{base}/own"):
                with contextlib.suppress(FileNotFoundError), open(f"{base}/own/{queue}") as f:
                    owned[queue] = f.read()
        for queue, topic in owned.items():
            store.delete_queue(queue, topic or None)
        with contextlib.suppress(FileNotFoundError):
            for queue in os.listdir(f"{base}/h"):
                for name in os.listdir(f"{base}/h/{queue}"):
                    path = f"{base}/h/{queue}/{name}"
                    if queue in owned:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)
                    else:
                        self._return(path, queue, name)
        with contextlib.suppress(FileNotFoundError):
            for queue in os.listdir(f"{base}/rings"):
                ring = None if queue in owned else self._ring(queue)
                if ring is None:
                    continue
                over, sleepers = ring.recover(cid, self._policy(queue).delivery_limit)
                self._ring_bells(sleepers)
                for rec in over:
                    meta = json.loads(rec.meta)
                    self._dead_letter_message(queue, "delivery_limit", meta, rec.body)
        for tmp in store.tmp_of(cid):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        shutil.rmtree(base, ignore_errors=True)

    def _janitor(self) -> None:
        store = self._store
        if store is None:
            return
        for cid in store.consumers():
            if cid == self._cid:
                continue
            fd = store.lock_is_free(cid)
            if fd is None:
                continue
            try:
                log.info("consumer %s of %s has died: returning its messages", cid, store.path)
                self._recover(cid)
            except OSError:
                log.exception("recovering consumer %s failed; another process will retry", cid)
            finally:
                os.close(fd)
        store.sweep_tombstones()

    # -- the consumer thread ---------------------------------------------------------------

    def _wake(self) -> None:
        if self._wake_fd >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(self._wake_fd, 1)

    def _run(self) -> None:
        inotify = self._inotify
        assert inotify is not None
        poller = select.poll()
        poller.register(inotify.fd, select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        by_wd: dict[int, list[_Sub]] = {}
        busy = False
        try:
            while not self._stopping:
                timeout = 0 if busy else self._timeout()
                for fd, _ in poller.poll(timeout):
                    if fd == self._wake_fd:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self._wake_fd)
                with self._lock:
                    subs = list(self._subs.values())
                by_wd.clear()
                for sub in subs:
                    by_wd.setdefault(sub.wd, []).append(sub)
                fired = inotify.read()
                for sub in subs if fired is None else []:
                    sub.dirty = True
                for wd, names in (fired or {}).items():
                    for sub in by_wd.get(wd, ()):
                        if not sub.dirty:  # a pending full rescan will see them anyway
                            sub.candidates.extend(names)
                busy = self._linger = False
                for sub in subs:
                    if self._stopping:
                        break
                    busy |= self._deliver(sub)
                if self._linger and not busy:  # a ring just ran dry: look again before sleeping
                    time.sleep(_LINGER)
                busy |= self._linger
                if time.monotonic() >= self._next_janitor:
                    self._next_janitor = time.monotonic() + self._janitor_interval
                    self._janitor()
        except BaseException as exc:  # a callback raised: behave as a dropped connection
            self._broken = f"consumer thread stopped: {exc!r}"
            log.exception("ShmTransport consumer thread failed; transport is disconnected")

    def _timeout(self) -> int:
        now = time.monotonic()
        until = min(self._next_janitor, now + _RESCAN) - now
        now_ns = time.time_ns()
        with self._lock:
            for sub in self._subs.values():
                if sub.delayed:
                    until = min(until, (sub.delayed[0][0] - now_ns) / 1e9)
        return max(0, int(until * 1000) + 1)

    def _next_candidate(self, sub: _Sub, store: Store) -> str | None:
        """The next message name to try to claim: from inotify, or a directory scan."""
        now = time.time_ns()
        while sub.delayed and sub.delayed[0][0] <= now:
            sub.candidates.appendleft(heapq.heappop(sub.delayed)[1])
        if not sub.candidates:
            if not sub.dirty and time.monotonic() - sub.last_scan < _RESCAN:
                return None
            sub.dirty, sub.last_scan = False, time.monotonic()
            try:
                names = os.listdir(store.ready(sub.queue))
            except FileNotFoundError:
                return None
            names.sort()
            sub.delayed.clear()
            sub.candidates.extend(names)
        while sub.candidates:
            name = sub.candidates.popleft()
            due = due_ns(name)
            if due > now:  # delayed: park it until it is due
                heapq.heappush(sub.delayed, (due, name))
                continue
            return name
        return None

    def _dispatch(self, sub: _Sub, meta: dict[str, Any], body: Any, returns: int, tag: int) -> None:
        headers = dict(meta["h"])
        if returns:
            headers["x-delivery-count"] = returns
        headers.update(
            {
                "consumer_tag": str(sub.sid),
                "delivery_mode": 2,
                "exchange": meta["x"],
                "message-id": tag,
                "redelivered": returns > 0,
                "routing_key": meta["r"],
                "subscription": sub.sid,
            }
        )
        self.subscription_callback(sub.sid)(headers, body)

    def _deliver_ring(self, sub: _Sub) -> bool:
        """Deliver a batch from ``sub``'s ring; True if more may be waiting."""
        ring = sub.ring
        if ring is None or not sub.active or self._stopping:
            return False
        with self._lock:
            acks, sub.ring_acks = sub.ring_acks, []
        limit = _BATCH
        if sub.ack and sub.prefetch:
            limit = min(limit, sub.prefetch - len(sub.inflight))
            if limit <= 0:
                if acks:
                    ring.ack(acks, sub.slot)
                return False
        records = ring.claim(sub.slot, limit, not sub.ack, acks, arm=not sub.warm)
        if not records:
            if sub.warm:
                sub.warm = False
                self._linger = True
            return False
        # A flow (several records per claim) lingers; a lone request/reply goes straight back
        # to the bell, so round trips never wait out a linger.
        sub.warm = len(records) > 1
        now = time.time()
        callback = self.subscription_callback(sub.sid)
        metas = self._metas
        for i, rec in enumerate(records):
            parsed = metas.get(rec.meta)
            if parsed is None:
                if len(metas) >= 1024:
                    metas.clear()
                meta = json.loads(rec.meta)
                base = dict(meta["h"])
                base.update(
                    {
                        "consumer_tag": str(sub.sid),
                        "delivery_mode": 2,
                        "exchange": meta["x"],
                        "routing_key": meta["r"],
                        "subscription": sub.sid,
                    }
                )
                parsed = (base, meta.get("e"), sub.sid)
                if all(type(v) in _SCALARS for v in meta["h"].values()):
                    metas[rec.meta] = parsed  # shallow copies per delivery are then enough
            elif parsed[2] != sub.sid:  # the same meta seen first by another subscription
                base = dict(parsed[0])
                base["consumer_tag"], base["subscription"] = str(sub.sid), sub.sid
                parsed = (base, parsed[1], sub.sid)
            base, expires, _ = parsed
            with self._lock:
                if not sub.active or self._stopping:  # unsubscribed meanwhile: put back
                    rest = records[i:]
                    if sub.ack:
                        ring.release([r.offset for r in rest], sub.slot, None)
                    else:
                        for r in rest:
                            if ring.append(r.meta, r.body) is None:
                                self._put_back(
                                    self._store, sub.queue, next_name(), json.loads(r.meta), r.body
                                )
                    return False
                if expires is not None and expires < now:
                    tag = 0
                else:
                    tag = sub.next_tag
                    sub.next_tag += 1
                    if sub.ack:
                        sub.inflight[tag] = _Held("", sub.queue, "", ring=rec.offset)
            if not tag:  # expired
                if sub.ack:
                    ring.take_done([rec.offset], sub.slot)
                self._dead_letter_message(sub.queue, "expired", json.loads(rec.meta), rec.body)
                continue
            headers = base.copy()
            if rec.returns:
                headers["x-delivery-count"] = rec.returns
            headers["message-id"] = tag
            headers["redelivered"] = rec.returns > 0
            callback(headers, rec.body)
        # Anything caught: come back (without sleeping) until a claim finds the ring empty,
        # which is what arms the writers' bell.
        return True

    def _deliver(self, sub: _Sub) -> bool:
        """Deliver up to a batch from ``sub``'s queue; True if more may be waiting."""
        store = self._store
        if store is None:
            return False
        # Ring first, then files (overflow, delayed, requeued-from-file): neither starves.
        return self._deliver_ring(sub) | self._deliver_files(sub, store)

    def _deliver_files(self, sub: _Sub, store: Store) -> bool:
        for _ in range(_BATCH):
            if not sub.active or self._stopping:
                return False
            if sub.ack and sub.prefetch and len(sub.inflight) >= sub.prefetch:
                return False
            name = self._next_candidate(sub, store)
            if name is None:
                return False
            src = f"{store.ready(sub.queue)}/{name}"
            # The claim, one competing consumer wins: a rename into our held directory, or
            # without acknowledgement into m/ (consumed: recovery deletes, never returns it).
            path = (
                f"{sub.held_dir}/{name}"
                if sub.ack
                else f"{self._mapped_dir}/{name}.{next(_mapped_seq)}"  # never reused in m/
            )
            lease = None
            try:
                try:
                    os.rename(src, path)
                except FileNotFoundError:
                    continue
                msg = decode(path)
                if (
                    "a" in msg.meta
                    and msg.body.nbytes >= POOL_MIN
                    and sub.kind != "broadcast"  # fanned-out files have one name per subscriber
                    and name.endswith("~0")  # a redelivered file may still be mapped elsewhere
                ):
                    lease = _ArrayLease(store, path, os.stat(path).st_size, self._mapped_dir)
                    lease.attach(msg.body)
                    if not sub.ack:
                        lease.on_acked()
                elif not sub.ack:
                    os.unlink(path)
            except (OSError, ValueError, ShmStoreError):
                log.exception("unreadable message %s in %r dropped", name, sub.queue)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            expires = msg.meta.get("e")
            if expires is not None and expires < time.time():
                if sub.ack:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                if sub.kind == "queue":
                    self._dead_letter_message(sub.queue, "expired", msg.meta, msg.body)
                continue  # (a leased array file is recycled once its copy above is done)
            _, returns = split_name(name)
            with self._lock:
                if not sub.active:  # unsubscribed meanwhile: not delivered, so not counted
                    if sub.ack:
                        os.rename(path, src)
                    else:
                        self._put_back(store, sub.queue, name, msg.meta, msg.body)
                    return False
                tag = sub.next_tag
                sub.next_tag += 1
                if sub.ack:
                    sub.inflight[tag] = _Held(path, sub.queue, name, lease=lease)
            self._dispatch(sub, msg.meta, msg.body, returns, tag)
        return True

    # -- mangling: exactly PikaTransport's, so services see the same objects ---------------

    @staticmethod
    def _mangle_for_sending(message: Any) -> str:
        return _ENCODE(message)

    @staticmethod
    def _mangle_for_receiving(message: Any) -> Any:
        # Our bodies are UTF-8 JSON without surrounding blanks: one call of json's C scanner
        # decodes them; anything else takes json.loads's full path, as in PikaTransport.
        if type(message) is bytes:
            try:
                text = message.decode()
                value, end = _SCAN(text, 0)
                if end == len(text):
                    return value
            except (ValueError, StopIteration):
                pass
        try:
            return json.loads(message)
        except (TypeError, ValueError):
            return message
