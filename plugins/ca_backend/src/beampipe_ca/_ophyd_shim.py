"""The ophyd control layer ``beampipe-ca``: pyepics PV objects on beampipe's channels, batched.

What changes against ophyd's own pyepics shim, and why:

* **Channels made for a 200-PV Device.**  pyepics' channel creation and
  connection handler make ~8 GIL-releasing libca calls per PV, a ``ca.poll()``,
  and a ``time.sleep(0)`` before every connection callback; in a burst of 200
  connections each hands the GIL around.  Here a PV object's channel comes from
  the shared ``_Context`` (``_open``, ``_LinkListener``), registered in pyepics'
  cache so every ``epics.PV`` method works on it unchanged.
* **Metadata in batches.**  When a PV connects, ophyd asks for its time and
  ctrl metadata (``get_all_metadata_callback``); the pyepics layer does two
  blocking round trips per PV on four utility threads, so a 200-PV Device
  waits for ~100 sequential round trips.  Here every request that arrives
  while a batch is in flight joins the next one: a Device's PVs get their
  metadata in one or two libca batches (time and ctrl together).
* **``Device.read()``/``describe()`` in one wire batch** instead of one blocking
  get per signal (``_install_device_read_batch``).
* **No shared PV objects.**  ``epics.get_pv`` hands the same PV object to
  every caller with the same name, so two Devices over one prefix share
  callbacks, auto-monitor settings and, on release, a cleared channel
  (pyepics #159, ophyd #708).  ``get_pv`` here makes a new PV object each
  time, and ``release_pvs`` only clears the libca channel when the last PV
  object using it is released.
* **One libca, one context**: the PVs are pyepics PVs on epicscorelibs'
  libca, in the context aioca and beampipe-ca's bulk reads use.
* **Monitors on per-Device lanes** (``_monitors``): a slow callback stalls
  only its own top-level Device, and a Device's callbacks keep their order
  (EpicsMotor's RBV before DMOV).

Everything else (gets, puts with completion, monitors, connection and access
callbacks on ophyd's dispatcher threads) is ophyd's own ``PyepicsShimPV`` and
pyepics', so devices behave as they do on the pyepics layer.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

import beampipe

from ._libca import _libca_finalized
from ._libca import context as ca_context
from ._monitors import lane_key, lanes

beampipe.import_ophyd()
import epics  # noqa: E402 - after ophyd is imported the way beampipe says
from ophyd import _pyepics_shim as _base  # noqa: E402

from beampipe import Failed, Ok  # noqa: E402

__all__ = [
    "BeampipeShimPV",
    "caget",
    "caput",
    "get_dispatcher",
    "get_pv",
    "name",
    "release_pvs",
    "setup",
    "thread_class",
]

logger = logging.getLogger("beampipe_ca.ophyd")

name = "beampipe-ca"
thread_class = _base.thread_class
caget = _base.caget
caput = _base.caput


class _LaneThreadContext:
    """ophyd's "monitor" thread context for our signals: their lane instead of one thread.

    ophyd runs a signal's SUB_META callbacks through this (``_metadata_thread_ctx``):
    inline when already on the monitor thread, queued to it otherwise.  Here "the
    monitor thread" is a lane worker, and queued work goes to the signal's own
    lane, so value and metadata callbacks of one Device stay in one order.
    """

    event_type = "monitor"

    def run(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        monitor_lanes = lanes()
        if monitor_lanes.in_worker():
            func(*args, **kwargs)
        else:
            monitor_lanes.post(lane_key(func, func), func, args, kwargs)

    __call__ = run


class _Dispatcher:
    """ophyd's dispatcher with the "monitor" thread context replaced by per-Device lanes."""

    def __init__(self, base: Any) -> None:
        self._base = base
        self._monitor = _LaneThreadContext()

    def get_thread_context(self, name: str) -> Any:
        if name == "monitor":
            return self._monitor
        return self._base.get_thread_context(name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._base, attr)

    def __repr__(self) -> str:
        return f"<beampipe-ca dispatcher over {self._base!r}>"


_dispatcher: _Dispatcher | None = None

#: ``BEAMPIPE_CA_MONITOR_LANES=0`` keeps ophyd's single monitor thread (the pyepics layer's way).
_use_lanes = os.environ.get("BEAMPIPE_CA_MONITOR_LANES", "1") != "0"


def get_dispatcher() -> Any:
    """ophyd's event dispatcher (shared with the pyepics layer), monitors on per-Device lanes."""
    global _dispatcher
    base = _base.get_dispatcher()
    if base is None or not _use_lanes:
        return base
    if _dispatcher is None or _dispatcher._base is not base:
        _dispatcher = _Dispatcher(base)
    return _dispatcher


def setup(logger: logging.Logger) -> Any:
    """Called by ophyd once per session: make the shared CA context, then ophyd's dispatcher."""
    ca_context().attach()
    _install_event_driven_device_wait()
    _install_device_read_batch()
    return _base.setup(logger)


_original_device_wait: Callable[..., Any] | None = None


def _install_event_driven_device_wait() -> None:
    """Let ``Device.wait_for_connection`` wake when our signals are ready, not on a 50 ms poll.

    ophyd's Device checks ``sig.connected`` for all signals and sleeps 50 ms
    between checks, so a Device whose PVs connect and get their metadata in
    one batch 40 ms after construction still waits a whole extra poll.  The
    wrapper first waits on each beampipe-ca signal's own readiness event (set
    by ophyd the moment connection, access rights and metadata are in), then
    hands over to ophyd's method, whose first check then passes.  Signals of
    other control layers are left to ophyd's poll; set
    ``BEAMPIPE_CA_DEVICE_WAIT=0`` to not install it at all.
    """
    global _original_device_wait
    from ophyd import Device
    from ophyd.device import DEFAULT_CONNECTION_TIMEOUT

    if _original_device_wait is not None or os.environ.get("BEAMPIPE_CA_DEVICE_WAIT") == "0":
        return
    original = _original_device_wait = Device.wait_for_connection

    def wait_for_connection(
        self: Any, all_signals: bool = False, timeout: Any = DEFAULT_CONNECTION_TIMEOUT
    ) -> Any:
        if timeout is DEFAULT_CONNECTION_TIMEOUT:
            timeout = self.connection_timeout
        if timeout is not None:
            deadline = time.monotonic() + timeout
            signals = [walk.item for walk in self.walk_signals(include_lazy=all_signals)]
            for sig in signals:  # the Device is built: tell its PVs that were already up
                for attr in ("_read_pv", "_write_pv"):
                    pv: Any = getattr(sig, attr, None)
                    if getattr(pv, "_bp_deferred", False):
                        pv._bp_tell()
            for walk in self.walk_signals(include_lazy=all_signals):
                ready = getattr(walk.item, "_signal_is_ready", None)
                layer = getattr(getattr(walk.item, "cl", None), "name", "")
                if ready is not None and name in str(layer):
                    left = deadline - time.monotonic()
                    if left <= 0 or not ready.wait(left):
                        break  # ophyd's own check below reports what is missing
            timeout = max(deadline - time.monotonic(), 1e-3)
        return original(self, all_signals=all_signals, timeout=timeout)

    wait_for_connection.__doc__ = original.__doc__
    Device.wait_for_connection = wait_for_connection


_read_batch_state = threading.local()


def _wire_read_pvs(device: Any, kind: Any, out: list[Any], unread_only: bool = False) -> None:
    """The PVs a ``read()``/``describe()`` (or their configuration forms) will get from the wire.

    Mirrors ophyd's walk (components of ``kind``, sub-Devices recursively); a signal
    whose reads are served from its monitor is left out.  ``describe`` gets only the
    signals that never had a value (ophyd's ``_infer_value_kind``): ``unread_only``.
    """
    from ophyd import Device
    from ophyd.signal import UNSET_VALUE

    for _cpt_name, cpt in device._get_components_of_kind(kind):
        if isinstance(cpt, Device):
            _wire_read_pvs(cpt, kind, out, unread_only)
            continue
        pv = getattr(cpt, "_read_pv", None)
        if (
            isinstance(pv, BeampipeShimPV)
            and not getattr(cpt, "_auto_monitor", True)
            and pv.connected
            and pv.context is not None
            and (not unread_only or getattr(cpt, "_readback", None) is UNSET_VALUE)
        ):
            out.append(pv)


def _install_device_read_batch() -> None:
    """Make ``Device.read()``, ``describe()`` and their configuration forms one wire batch.

    ophyd reads a Device's signals one after the other, each a blocking round
    trip: ~250 us apiece, 50 ms for 200 signals.  The wrapper first asks for all of
    the Device's non-monitored beampipe-ca PVs at once (pyepics' own
    ``get_with_metadata(wait=False)``, one flush), then runs ophyd's method, whose
    gets collect those replies (``BeampipeShimPV.get_with_metadata``).  Every value is
    still a wire read issued after the caller asked, decoded by pyepics as before;
    only the calling thread's gets inside this call take them.  ``describe()`` gets
    the signals that never had a value, which is every unmonitored one on a Device's
    first describe (bluesky's first read in a run).  Set ``BEAMPIPE_CA_READ_BATCH=0``
    to not install it.
    """
    from ophyd import Device, Kind

    if getattr(Device.read, "_beampipe_batched", False) or (
        os.environ.get("BEAMPIPE_CA_READ_BATCH") == "0"
    ):
        return

    def batched(method: Callable[..., Any], kind: Any, unread_only: bool) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(_read_batch_state, "active", False):
                return method(self, *args, **kwargs)  # a sub-Device: the outer call asked
            pvs: list[Any] = []
            _read_batch_state.active = True
            try:
                _wire_read_pvs(self, kind, pvs, unread_only)
                _prefetch_values(pvs)
                return method(self, *args, **kwargs)
            finally:
                _read_batch_state.active = False
                for pv in pvs:  # nothing asked for in this call serves a later one
                    pv._bp_ticket = None

        wrapper.__doc__ = method.__doc__
        wrapper.__name__ = method.__name__
        wrapper._beampipe_batched = True  # type: ignore[attr-defined]
        return wrapper

    Device.read = batched(Device.read, Kind.normal, False)
    Device.read_configuration = batched(Device.read_configuration, Kind.config, False)
    Device.describe = batched(Device.describe, Kind.normal, True)
    Device.describe_configuration = batched(Device.describe_configuration, Kind.config, True)


def _prefetch_values(pvs: list[Any]) -> None:
    """Put one DBR_TIME get per PV on the wire, as its own ``get_with_metadata`` would."""
    if len(pvs) < 2:
        return  # one signal: its own get is just as fast
    try:
        # pyepics' module-level calls use the calling thread's context (its PV methods
        # attach their own): a thread with none would get a fresh one from libca.
        ca_context().attach()
    except Exception as exc:  # noqa: BLE001 - another context here: ophyd's gets, one by one
        logger.debug("Device read not batched: %s", exc)
        return
    me = threading.get_ident()
    issued = False
    for pv in pvs:
        args = pv._args
        count = args["count"] if args["count"] != args["nelm"] else None
        try:
            epics.ca.get_with_metadata(pv.chid, ftype=pv.ftype, count=count, wait=False)
        except Exception as exc:  # noqa: BLE001 - its own get will then fail or succeed itself
            logger.debug("%s: batched read not issued: %r", pv.pvname, exc)
            continue
        pv._bp_ticket = (me, pv.ftype, count)
        issued = True
    if issued:
        epics.ca.flush_io()


def _chid(pv: Any) -> int | None:
    chid = getattr(pv, "chid", None)
    if chid is None:
        return None
    return int(getattr(chid, "value", chid) or 0) or None


#: Orders reading a PV's chid for a metadata request against releasing it: a request is
#: either made before the release (and failed by ``forget``) or sees no chid at all.
_release_lock = threading.Lock()


def _time_ctrl_keys(pv: Any) -> tuple[tuple[str, str], tuple[str, str]] | None:
    with _release_lock:
        chid = _chid(pv)
        if chid is None:
            return None
        # Our own channel is read by name; a chid pyepics made (its PV came first) is adopted.
        key = pv.pvname if pv._bp_chan is not None else ca_context().adopt(pv.pvname, chid)
    return (key, "time"), (key, "ctrl")


def fetch_metadata(pvs: Iterable[Any], timeout: float) -> list[dict[str, Any] | str]:
    """Time and ctrl metadata of many PVs in one batch, in order; a failed PV gives its reason.

    Calls from many threads at once share batches through the Coalescer.
    """
    pvs = list(pvs)
    pairs = [_time_ctrl_keys(pv) for pv in pvs]
    flat = [k for pair in pairs if pair is not None for k in pair]
    ctx = ca_context()
    results = (
        ctx.reads.get_many("meta", flat, timeout, route=lambda k: ctx.route(k[0])) if flat else {}
    )
    out: list[dict[str, Any] | str] = []
    for pv, pair in zip(pvs, pairs, strict=True):
        if pair is None:
            out.append(f"{pv.pvname}: no channel (released?)")
            continue
        tval, cval = results[pair[0]], results[pair[1]]
        if isinstance(tval, Ok) and isinstance(cval, Ok):
            out.append(_apply(pv, tval.value, cval.value))
        else:
            bad = tval if isinstance(tval, Failed) else cval
            assert isinstance(bad, Failed)
            reason = bad.reason
            for key in pair:  # the Coalescer names the key: say the PV instead
                reason = reason.replace(str(key), pv.pvname).replace(key[0], pv.pvname)
            out.append(reason)
    return out


_CTRL_KEYS = (
    "units",
    "precision",
    "upper_disp_limit",
    "lower_disp_limit",
    "upper_alarm_limit",
    "lower_alarm_limit",
    "upper_warning_limit",
    "lower_warning_limit",
    "upper_ctrl_limit",
    "lower_ctrl_limit",
)


def _apply(pv: Any, tval: tuple[int, int, int, int], cval: dict[str, Any]) -> dict[str, Any]:
    """Store fresh metadata in the PV the way pyepics' get_timevars/get_ctrlvars would."""
    args = pv._args
    args["status"], args["severity"], secs, nsec = tval
    args["timestamp"] = secs + nsec * 1e-9
    args["posixseconds"], args["nanoseconds"] = secs, nsec
    for key in _CTRL_KEYS:
        if key in cval:
            args[key] = cval[key]
    if "enums" in cval:
        args["enum_strs"] = tuple(cval["enums"])
    md = dict(args)
    md.pop("value", None)
    return md


class _Pending:
    """A PV's metadata prefetch in flight, and the ophyd callbacks waiting for it."""

    __slots__ = ("stale", "waiters")

    def __init__(self) -> None:
        self.waiters: list[tuple[Callable[[str, dict[str, Any]], None], float]] = []
        self.stale = False


#: ``BEAMPIPE_CA_PREFETCH=0``: read metadata only when ophyd asks (for comparisons).
_prefetch = os.environ.get("BEAMPIPE_CA_PREFETCH", "1") != "0"

#: How long the metadata thread waits for the connections of PV objects just made, in s:
#: a 200-PV Device's first connection comes up to one search tick (32 ms) after it is built.
_LINGER_S = 0.25

#: A PV whose prefetched metadata ophyd has taken: no prefetch on later reconnections
#: (ophyd asks for initial metadata once per signal).
_USED = "used"


class _MetadataBatcher:
    """Serves ophyd's metadata requests in batches; a short-lived thread does the reads.

    While one batch is on the wire, new requests queue and leave together as
    the next one.  The thread is started by whoever makes PV objects
    (``expect``) and exits once the queue is empty and no PV object was made
    for ``_LINGER_S``, so nothing lingers between connection storms.

    A PV's first connection also starts its metadata read at once (*prefetch*),
    from the libca thread that reports it: ophyd only asks for the metadata when
    its single metadata thread gets to that PV's connection callback, which for a
    200-PV Device is ~15 ms of other signals' callbacks later.  ophyd's request
    then takes the prefetched result (or waits for it) instead of a new read.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queue: list[tuple[Any, Callable[[str, dict[str, Any]], None] | None, float]] = []
        self._thread: threading.Thread | None = None
        #: When the last PV object was made (``expect``): the thread stays for its connection.
        self._expected_at = 0.0
        #: Batches served, for tests and benchmarks.
        self.batches = 0
        #: Requests answered from a prefetch, for tests and benchmarks.
        self.prefetch_hits = 0

    def _enqueue(
        self, pv: Any, callback: Callable[[str, dict[str, Any]], None] | None, timeout: float
    ) -> None:
        # Called with self._lock held.
        self._queue.append((pv, callback, timeout))
        if self._thread is None:
            self._start()
        else:
            self._work.notify()

    def _start(self) -> None:
        # Called with self._lock held (the new thread takes it only once it runs).
        self._thread = threading.Thread(target=self._run, name="beampipe-ca-metadata", daemon=True)
        self._thread.start()

    def expect(self) -> None:
        """A PV object was made, on its user's thread: have the thread up for its connection.

        ``Thread.start`` waits until the new thread runs.  On libca's receive
        thread, in the middle of a Device's connection storm, that wait gave the
        GIL to the thread still building the Device and took up to 25 ms to get
        it back (4.5 ms per 200-PV Device on average), with every connection
        callback behind it waiting too.  Started here, it costs the building
        thread one start per storm instead.
        """
        if not _prefetch:
            return
        with self._lock:
            self._expected_at = time.monotonic()
            if self._thread is None:
                self._start()

    def on_connection(self, pv: Any, conn: bool) -> None:
        """A PV object's connection changed (libca thread): prefetch on its first connection."""
        if not _prefetch:
            return
        with self._lock:
            state = getattr(pv, "_bp_md", None)
            if not conn:
                if isinstance(state, _Pending):
                    state.stale = True
                elif isinstance(state, dict):
                    pv._bp_md = None  # read before the disconnect: not for the next connection
                return
            if state is None:
                pv._bp_md = _Pending()
                self._enqueue(pv, None, 10.0)

    def submit(
        self, pv: Any, callback: Callable[[str, dict[str, Any]], None], timeout: float
    ) -> None:
        ready: dict[str, Any] | None = None
        with self._lock:
            state = getattr(pv, "_bp_md", None)
            if isinstance(state, _Pending) and not state.stale:
                state.waiters.append((callback, timeout))
                return
            if isinstance(state, dict):
                pv._bp_md, ready = _USED, state
                self.prefetch_hits += 1
            else:
                self._enqueue(pv, callback, timeout)
        if ready is not None:
            self._deliver(pv, callback, ready)

    @staticmethod
    def _deliver(
        pv: Any, callback: Callable[[str, dict[str, Any]], None], md: dict[str, Any]
    ) -> None:
        try:
            callback(pv.pvname, md)
        except Exception:
            logger.exception("%s: metadata callback %r failed", pv.pvname, callback)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    # Idle: stay while a connection storm may still come (a PV object
                    # was made lately), else go, so nothing lingers between storms.
                    left = self._expected_at + _LINGER_S - time.monotonic()
                    if left <= 0:
                        self._thread = None
                        return
                    self._work.wait(left)
                items, self._queue = self._queue, []
            self.batches += 1
            try:
                found: list[dict[str, Any] | str] = fetch_metadata(
                    [pv for pv, _cb, _t in items], max(t for *_x, t in items)
                )
            except Exception as exc:
                logger.exception("metadata batch of %d PVs failed", len(items))
                found = [f"{pv.pvname}: {exc!r}" for pv, _cb, _t in items]
            for (pv, callback, _timeout), md in zip(items, found, strict=True):
                deliver: list[Callable[[str, dict[str, Any]], None]] = []
                if callback is None:  # a prefetch
                    with self._lock:
                        state = pv._bp_md
                        waiters = state.waiters if isinstance(state, _Pending) else []
                        if not isinstance(md, dict) or (
                            isinstance(state, _Pending) and state.stale
                        ):
                            pv._bp_md = None
                            for cb, timeout in waiters:  # read them afresh
                                self._enqueue(pv, cb, timeout)
                            continue
                        if waiters:
                            pv._bp_md = _USED
                            self.prefetch_hits += len(waiters)
                            deliver = [cb for cb, _t in waiters]
                        else:
                            pv._bp_md = md
                elif isinstance(md, dict):
                    deliver = [callback]
                else:
                    # ophyd falls back to get_all_metadata_blocking in wait_for_connection,
                    # which raises with this reason if it persists.
                    logger.warning("%s: initial metadata not read: %s", pv.pvname, md)
                for cb in deliver:
                    assert isinstance(md, dict)
                    self._deliver(pv, cb, md)


_batcher = _MetadataBatcher()


def _metadata_queue() -> Any:
    return _base.get_dispatcher()._threads["metadata"].queue


class _Queued:
    """What ophyd's ``wrap_callback`` makes (run ``callback`` on a dispatcher thread), cheaper."""

    __slots__ = ("__wrapped__", "queue")
    _wrapped_callback = True

    def __init__(self, callback: Callable[..., Any], queue: Any) -> None:
        self.__wrapped__ = callback
        self.queue = queue

    @classmethod
    def wrap(cls, callback: Any, queue: Any) -> Any:
        if callback is None or getattr(callback, "_wrapped_callback", False):
            return callback
        return cls(callback, queue)

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.queue.put((self.__wrapped__, args, kwargs))


class _ConnectionQueued(_Queued):
    """ophyd's connection callback, queued as ophyd would; a first connection prefetches."""

    __slots__ = ("pv",)

    def __init__(self, callback: Callable[..., Any], queue: Any, pv: Any) -> None:
        super().__init__(callback, queue)
        self.pv = pv

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        _batcher.on_connection(self.pv, bool(kwargs.get("conn")))
        self.queue.put((self.__wrapped__, args, kwargs))


_ACCESS_NAMES = ("no access", "read-only", "write-only", "read/write")


class _LinkListener:
    """Runs a channel's pyepics connection callbacks when our ``_Context`` channel changes state.

    What pyepics' ``_onConnectionEvent`` does for a channel it made, without the
    ``time.sleep(0)`` it puts before every callback: in a burst of 200 connections
    that sleep hands the GIL to another thread 200 times, and each time the libca
    thread waits for it to come back.
    """

    __slots__ = ("entry",)

    def __init__(self, entry: Any) -> None:
        self.entry = entry

    def __call__(self, chan: Any, up: bool) -> None:
        entry = self.entry
        with _release_lock:  # against _open: a PV object is told once, by us or by _open
            entry.conn = up
            entry.ts = time.time()
            entry.failures = 0
            callbacks = list(entry.callbacks)
            for callback in callbacks:  # this news supersedes an "already up" still held back
                owner: Any = getattr(callback, "__self__", None)
                if getattr(owner, "_bp_deferred", False):
                    owner._bp_deferred = False
        for callback in callbacks:
            try:
                callback(pvname=entry.pvname, chid=chan.chid, conn=up)
            except Exception:
                logger.exception("%s: connection callback %r failed", entry.pvname, callback)


def _cache_item(chid: int, pvname: str, context: int) -> Any:
    """pyepics' ``_CacheItem(chid, pvname)``, without the libca call its ``__init__`` makes.

    That call asks libca for the thread's context, which we already know, and
    as a CDLL call it hands the GIL to libca's thread and waits to get it back:
    200 times in a row while a Device is built, with that thread busy running
    the connection callbacks of the names made before.  ``test_ophyd_layer``
    holds the two side by side (pyepics is pinned to a minor release).
    """
    entry = epics.ca._CacheItem.__new__(epics.ca._CacheItem)
    entry._chid = None
    entry.context = context
    entry.lock = threading.RLock()
    entry.conn = False
    entry.pvname = pvname
    entry.ts = 0
    entry.failures = 0
    entry.get_results = collections.defaultdict(lambda: [None])
    entry.callbacks = []
    entry.access_event_callback = []
    entry.chid = chid
    return entry


def _open(pv: Any) -> None:
    """Give a new PV object its channel: ours from ``_Context.hold``, seen through pyepics' cache.

    pyepics' ``create_channel`` would make the channel with its own connection
    handler (above) and a GIL hand-off per libca call; here the libca channel is the
    ``_Context``'s (one call, its callback keeps the GIL), and a pyepics cache entry
    for its chid is registered so every ``epics.PV`` method (get, put, monitors)
    works on it as on a channel pyepics made.  A name pyepics already has a channel
    for (a user's ``epics.PV`` came first) shares that one, as before.
    """
    ca = epics.ca
    ctx = ca_context()
    cache = ca._cache[pv.context]
    found = cache.setdefault(pv.pvname, ca._SentinelWithLock())
    with found.lock:  # pyepics' own protocol against a concurrent create_channel
        entry = cache[pv.pvname]
        chan: Any
        if isinstance(entry, ca._SentinelWithLock):
            chan = ctx.hold(pv.pvname)
            try:
                entry = _cache_item(chan.chid, pv.pvname, pv.context)
                entry.bp_chan = chan
                entry.bp_listener = _LinkListener(entry)
                ca._chid_cache[chan.chid] = entry
                cache[pv.pvname] = entry
                chan.listeners.append(entry.bp_listener)
                with _release_lock:  # already up (a bulk read's channel): the listener missed it
                    entry.conn = chan.up
                # pyepics' own access-rights handler: it finds the entry by chid.
                ctx.replace_access_rights_event(chan.chid, _access_handler())
            except BaseException:
                cache.pop(pv.pvname, None)
                ca._chid_cache.pop(chan.chid, None)
                listener = getattr(entry, "bp_listener", None)
                if listener in chan.listeners:
                    chan.listeners.remove(listener)
                ctx.release(chan)
                raise
        else:
            chan = getattr(entry, "bp_chan", None)
            if chan is not None:
                # Under the entry's lock, so the entry's last release (which takes it too)
                # cannot clear the channel in between: this is the same channel.
                chan = ctx.hold(pv.pvname)
    pv._bp_chan, pv._bp_entry = chan, entry
    pv.chid = pv._args["chid"] = entry.chid
    _batcher.expect()
    global _deferred_timer
    timer = None
    with _release_lock:
        entry.callbacks.append(pv._bp_on_connect)
        entry.access_event_callback.append(pv._bp_on_access)
        if entry.conn:
            # Connected before we listened (another Device, a bulk read).  Not told now,
            # inside the signal's __init__: its monitor's first event would race with the
            # subscriptions the Device makes after it (an EpicsMotor's DMOV subscription
            # then never sees its first value: ophyd's subscribe and _run_subs race).
            # Told when someone waits for it, or after _DEFER_S.
            pv._bp_deferred = True
            _deferred.append(pv)
            if _deferred_timer is None:
                timer = _deferred_timer = threading.Timer(_DEFER_S, _tell_deferred)
                timer.name = "beampipe-ca-connected"
                timer.daemon = True
    if timer is not None:  # outside the lock: the libca thread's listeners take it
        timer.start()


#: How long an "already connected" PV object waits, at most, to be told (see ``_open``).
_DEFER_S = 0.05
_deferred: list[Any] = []
_deferred_timer: threading.Timer | None = None


def _tell_deferred() -> None:
    global _deferred_timer
    with _release_lock:
        pvs = _deferred[:]
        _deferred.clear()
        _deferred_timer = None
    if not pvs or _libca_finalized():
        return
    ca_context().attach()
    for pv in pvs:
        try:
            pv._bp_tell()
        except Exception:
            logger.exception("%s: connection callback failed", pv.pvname)


_access_handler_address: int | None = None


def _access_handler() -> int:
    """The address of pyepics' access-rights callback (pyepics keeps the object alive)."""
    global _access_handler_address
    if _access_handler_address is None:
        import ctypes

        _access_handler_address = ctypes.cast(epics.ca._CB_ACCESS, ctypes.c_void_p).value
    assert _access_handler_address
    return _access_handler_address


def _access_of(chid: Any) -> tuple[bool, bool]:
    ctx = ca_context()
    raw = int(getattr(chid, "value", chid) or 0)
    return bool(ctx.read_access(raw)), bool(ctx.write_access(raw))


class BeampipeShimPV(_base.PyepicsShimPV):
    """ophyd's pyepics PV on beampipe-ca's own channel, metadata batched, monitors on lanes.

    An ``epics.PV`` in every method ophyd and users call; what differs is how it is
    made and told about its connection (``_open``, ``_bp_on_connect``): a 200-PV
    Device spends its connect time in exactly those two, 200 times over.
    """

    def __init__(
        self,
        pvname: str,
        callback: Any = None,
        form: str = "time",
        verbose: bool = False,
        auto_monitor: Any = None,
        count: int | None = None,
        connection_callback: Any = None,
        connection_timeout: float | None = None,
        access_callback: Any = None,
        monitor_delta: Any = None,
    ) -> None:
        # epics.PV.__init__ and ophyd's PyepicsShimPV.__init__, attribute for attribute
        # (test_ophyd_layer checks the two agree), with the channel from _open.  The
        # callbacks are wrapped here: the monitor callback goes to its lane, not ophyd's
        # single monitor thread, and the connection and access callbacks to ophyd's
        # metadata thread as before, through a cheaper wrapper than ophyd's closure.
        if callback is not None:
            callback = (
                lanes().wrap(callback, pvname)
                if _use_lanes
                else _base.wrap_callback(_base._dispatcher, "monitor", callback)
            )
        metadata_queue = _metadata_queue()
        self._bp_md: Any = None  # metadata prefetch state (_MetadataBatcher)
        self._bp_chan: Any = None
        self._bp_entry: Any = None
        self._bp_deferred = False
        self._bp_access_seen = False  # access rights told since the last (re)connection
        self._bp_ticket: Any = None  # a get issued for this PV by its Device's read()
        self.pvname = pvname.strip()
        self.form = form.lower()
        self.verbose = verbose
        self._auto_monitor = auto_monitor
        self.ftype = None
        self.connected = False
        if connection_timeout is None:
            connection_timeout = epics.ca.DEFAULT_CONNECTION_TIMEOUT
        self.connection_timeout = connection_timeout
        self._user_max_count = count
        args = self._args = dict.fromkeys(self._fields)
        args.update(
            pvname=self.pvname,
            count=count,
            nelm=-1,
            type="unknown",
            typefull="unknown",
            access="unknown",
            monitor_delta=monitor_delta,
        )
        self._monitor_delta_local = False
        self._monitor_last_value = None
        self.connection_callbacks = (
            []
            if connection_callback is None
            else [_ConnectionQueued(connection_callback, metadata_queue, self)]
        )
        wrapped_access = _Queued.wrap(access_callback, metadata_queue)
        self.access_callbacks = [] if wrapped_access is None else [wrapped_access]
        self.callbacks: dict[int, Any] = {}
        if isinstance(callback, (tuple, list)):
            for i, each in enumerate(callback):
                if callable(each):
                    self.callbacks[i] = (each, {})
        elif callable(callback):
            self.callbacks[0] = (callback, {})
        self._put_complete = None
        self._monref = None
        self._monref_mask = None
        self._conn_started = False
        self.chid = None
        self.context = ca_context().ctx
        self._cache_key = (pvname, form, self.context)
        self._reference_count = 0
        _open(self)

    def _bp_on_connect(self, pvname: Any = None, chid: Any = None, conn: bool = True) -> None:
        """epics.PV's connection handler, minus its ``ca.poll()`` and per-call context checks.

        Type, count and host come from our channel (read once, on libca's thread, in
        ``_Context._on_connection``), access rights from two calls that keep the GIL.
        """
        if self.context is None:  # released meanwhile
            return
        args = self._args
        if conn:
            chan = self._bp_chan
            if chan is not None:
                native, count, host = chan.native, chan.count, chan.host
            else:  # a channel pyepics made
                native = epics.ca.field_type(self.chid)
                count = epics.ca.element_count(self.chid)
                host = epics.ca.host_name(self.chid)
            args["nelm"] = count
            args["count"] = min(count, self._user_max_count or count)
            args["host"] = host
            self.ftype = epics.ca.promote_fieldtype(
                native, use_ctrl=self.form == "ctrl", use_time=self.form == "time"
            )
            type_name = epics.dbr.Name(self.ftype).lower()
            args["type"] = args["typefull"] = type_name
            args["ftype"] = epics.dbr.Name(type_name, reverse=True)
            if not self._bp_access_seen:
                # libca reports access rights once per connection, and may have done so
                # before this PV object listened (a server sends them ahead of the claim
                # reply; a busy machine can deschedule _open between making the channel
                # and listening): ophyd's signal is never ready without them.
                self._bp_on_access(*_access_of(self.chid))
        else:
            self._bp_access_seen = False
        for callback in self.connection_callbacks:
            if callable(callback):
                callback(pvname=self.pvname, conn=conn, pv=self)
        read, write = _access_of(self.chid) if conn else (False, False)
        args["read_access"], args["write_access"] = read, write
        args["access"] = _ACCESS_NAMES[read + 2 * write]
        self.connected = conn
        if conn and (self._auto_monitor is not False or self._monref is not None):
            self._check_auto_monitor()

    def _bp_tell(self) -> None:
        """Deliver a held-back "already connected" (``_open``), if it is still news."""
        with _release_lock:
            if not self._bp_deferred:
                return
            self._bp_deferred = False
            up = self.context is not None and bool(self._bp_entry.conn)
        if up:
            self._bp_on_access(*_access_of(self.chid))
            self._bp_on_connect(pvname=self.pvname, chid=_chid(self), conn=True)

    def get_with_metadata(
        self,
        count: int | None = None,
        as_string: bool = False,
        as_numpy: bool = True,
        timeout: float | None = None,
        with_ctrlvars: bool = False,
        form: str | None = None,
        use_monitor: bool = True,
        as_namespace: bool = False,
    ) -> Any:
        """epics.PV's, except that a get its Device's ``read()`` already issued is collected.

        The request part of epics.PV's method is replaced by pyepics'
        ``get_complete_with_metadata`` on the get ``_prefetch_values`` issued for this
        very call (same thread, DBR type and count); the rest is epics.PV's.
        """
        ticket, self._bp_ticket = self._bp_ticket, None
        wire_count = count
        if wire_count is None and self._args["count"] != self._args["nelm"]:
            wire_count = self._args["count"]
        if (
            ticket is None
            or ticket != (threading.get_ident(), self.ftype, wire_count)
            or with_ctrlvars
            or as_namespace
            or (form is not None and form != self.form)
            or (use_monitor and self.auto_monitor)
            or not self.connected
        ):
            return super().get_with_metadata(
                count=count,
                as_string=as_string,
                as_numpy=as_numpy,
                timeout=timeout,
                with_ctrlvars=with_ctrlvars,
                form=form,
                use_monitor=use_monitor,
                as_namespace=as_namespace,
            )
        count = wire_count
        metad = epics.ca.get_complete_with_metadata(
            self.chid, ftype=self.ftype, count=0 if count is None else count, timeout=timeout,
            as_numpy=as_numpy,
        )  # fmt: skip
        if metad is None:
            return None
        self._args.update(**metad)
        val = metad["value"]
        if as_string:
            metad["value"] = self._set_charval(val, force_long_string=as_string)
        elif self.nelm > 1 and val is not None:  # epics.PV's array handling, as is
            if not hasattr(val, "__len__"):
                val = [val]
            if count is None:
                count = len(val)
            if as_numpy and not isinstance(val, np.ndarray):
                val = np.asarray(val)
            elif not as_numpy and isinstance(val, np.ndarray):
                val = val.tolist()
            if count < len(val):
                val = val[:count]
            metad["value"] = val
        return metad

    def wait_for_connection(self, timeout: float | None = None) -> bool:
        """As epics.PV's, after delivering a held-back connection (see ``_open``)."""
        if self._bp_deferred:
            self._bp_tell()
        return bool(super().wait_for_connection(timeout=timeout))

    def _bp_on_access(self, read_access: bool, write_access: bool) -> None:
        """epics.PV's access-rights handler, without the per-call context check."""
        if self.context is None:
            return
        self._bp_access_seen = True
        args = self._args
        args["read_access"], args["write_access"] = read_access, write_access
        args["access"] = _ACCESS_NAMES[read_access + 2 * write_access]
        for callback in self.access_callbacks:
            if callable(callback):
                callback(read_access, write_access, pv=self)

    def add_callback(
        self,
        callback: Any = None,
        index: Any = None,
        run_now: bool = False,
        with_ctrlvars: bool = True,
        **kw: Any,
    ) -> Any:
        """As ophyd's, but the callback runs on its Device's lane, not ophyd's monitor thread."""
        if not self.auto_monitor:  # type: ignore[has-type]
            self.auto_monitor = epics.ca.DEFAULT_SUBSCRIPTION_MASK
        if not _use_lanes:
            return super().add_callback(
                callback, index=index, run_now=run_now, with_ctrlvars=with_ctrlvars, **kw
            )
        if callback is not None:
            callback = lanes().wrap(callback, self)
        return epics.PV.add_callback(
            self, callback=callback, index=index, run_now=run_now, with_ctrlvars=with_ctrlvars, **kw
        )

    def get_all_metadata_blocking(self, timeout: float) -> dict[str, Any]:
        md = fetch_metadata([self], timeout)[0]
        if isinstance(md, str):
            raise TimeoutError(f"could not read the metadata of {self.pvname}: {md}")
        return md

    def get_all_metadata_callback(
        self, callback: Callable[[str, dict[str, Any]], None], *, timeout: float
    ) -> None:
        _batcher.submit(self, callback, timeout)


def get_pv(
    pvname: str,
    form: str = "time",
    connect: bool = False,
    context: Any = None,
    timeout: float = 5.0,
    connection_callback: Any = None,
    access_callback: Any = None,
    callback: Any = None,
    verbose: bool = False,
    count: int | None = None,
    auto_monitor: Any = None,
    **kwargs: Any,
) -> BeampipeShimPV:
    """A new PV object for every call (never a cached one shared with other Devices)."""
    if not isinstance(pvname, str) or not pvname:
        raise ValueError(f"PV name must be a non-empty str, got {pvname!r}")
    if context is not None and context != epics.ca.current_context():
        raise ValueError(f"{pvname}: beampipe-ca uses one CA context; got context={context!r}")
    pv = BeampipeShimPV(
        pvname,
        callback=callback,
        form=form,
        verbose=verbose,
        auto_monitor=auto_monitor,
        count=count,
        connection_callback=connection_callback,
        connection_timeout=timeout,
        access_callback=access_callback,
        **kwargs,
    )
    if connect and not pv.wait_for_connection(timeout=timeout):
        raise TimeoutError(f"{pvname}: not connected within {timeout:g} s")
    return pv


def _detach(pv: Any, entry: Any) -> None:
    """Remove one PV object's callbacks from pyepics' per-name channel entry.

    What ``epics.PV.disconnect(deepclean=True)`` does, without its 1 s
    ``ca.poll`` and without calling ophyd's ``clear_callbacks`` override
    with arguments it does not take.
    """
    if entry is None:
        return
    for registered, ours in (
        (getattr(entry, "callbacks", []), getattr(pv, "_bp_on_connect", None)),
        (getattr(entry, "access_event_callback", []), getattr(pv, "_bp_on_access", None)),
    ):
        while ours is not None and ours in registered:
            registered.remove(ours)


def _clear_subscription(pv: Any) -> None:
    """End a PV object's monitor subscription, connected or not.

    pyepics' ``clear_auto_monitor`` goes through ``_check_auto_monitor``, which
    returns early for a PV that is not connected (or has no chid): the libca
    subscription then outlives the PV object, its events hit a released PV
    ("Expected CA context is unset") and, once the PV is collected, libca calls
    a freed ctypes callback.  Clear the subscription itself.
    """
    pv._auto_monitor = False
    clear = getattr(pv, "_clear_auto_monitor_subscription", None)
    if clear is not None:
        clear()
    else:  # a pyepics without it: the public call, connected PVs only
        pv.clear_auto_monitor()


def release_pvs(*pvs: Any) -> None:
    """Release PV objects; the libca channel goes only when no other PV object listens on it.

    pyepics shares one chid per name among all PV objects (ours, the pyepics
    layer's, a user's ``epics.PV``); ophyd's pyepics layer clears it on
    release regardless, which kills the others (ophyd #708).  Here a PV
    object detaches its own callbacks and monitor, and the channel is cleared
    only if no other PV object's connection callback is still registered (and,
    for our own channels, no bulk read or ophyd-async signal uses it).
    """
    for pv in pvs:
        pv._reference_count -= 1
        if pv._reference_count > 0 or pv.context is None:  # still used, or released already
            continue
        pv.clear_callbacks()
        _clear_subscription(pv)
        chan, pv._bp_chan = getattr(pv, "_bp_chan", None), None
        cache = epics.ca._cache.get(pv.context, {})
        with _release_lock:
            chid, pvname = _chid(pv), pv.pvname
            pv.chid = None
            entry = cache.get(pvname) if chid is not None else None
            _detach(pv, entry)
            last = entry is not None and not getattr(entry, "callbacks", None)
        pv.context = None
        if chan is not None:  # our channel: every PV object holds it once
            with entry.lock if entry is not None else contextlib.nullcontext():
                # Under the entry's lock, against _open taking another hold on it.
                if last and cache.get(pvname) is entry:
                    cache.pop(pvname, None)
                    epics.ca._chid_cache.pop(chan.chid, None)
                    with contextlib.suppress(ValueError):
                        chan.listeners.remove(entry.bp_listener)
                ca_context().release(chan)
        elif last:
            assert chid is not None
            ca_context().forget(pvname, chid)
            epics.ca.clear_channel(chid)
