"""Monitor delivery for the ophyd layer: one ordered lane per Device, a small pool of workers.

ophyd's pyepics layer runs every monitor callback of the process on one
dispatcher thread, in arrival order.  That order is what ``EpicsMotor``
relies on (the last readback update is handled before DMOV = 1 finishes the
move: ophyd #757, #782/#783), but it also means one slow user callback
stalls every other PV's monitors.

Here each monitor event is posted to a *lane*: the top-level Device
(``signal.root``) of the ophyd object whose callback it is, or the PV
object itself for a plain function.  A lane is served by at most one worker
at a time, in the order events were posted (the order libca delivered them),
so within one Device nothing changes: its SUB_VALUE and SUB_META callbacks
run in order, as on ophyd's monitor thread.  Different lanes run on
different workers, so a slow callback holds up only its own Device.

Workers are started on demand (up to ``MAX_WORKERS``) and exit after
``IDLE_EXIT`` seconds without work, so nothing lingers between scans.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["MonitorLanes", "lane_key", "lanes"]

logger = logging.getLogger("beampipe_ca.monitors")

#: Workers serving lanes at most; a slow callback occupies one of them.
MAX_WORKERS = 16
#: A worker with nothing to do for this long exits.
IDLE_EXIT = 0.5
#: Events a worker runs from one lane before letting other ready lanes go first.
FAIR_SLICE = 64

_Event = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


def lane_key(callback: Any, default: Any) -> Any:
    """The lane of ``callback``: its owner's top-level Device (``root``), else ``default``."""
    owner = getattr(callback, "__self__", None)
    if owner is None:
        inner = getattr(callback, "__wrapped__", None)
        owner = getattr(inner, "__self__", None) if inner is not None else None
    if owner is None:
        return default
    return getattr(owner, "root", owner)  # ophyd objects: the top of the parent chain


class _Lane:
    __slots__ = ("events", "key_id", "scheduled")

    def __init__(self, key_id: int) -> None:
        self.key_id = key_id
        self.events: collections.deque[_Event] = collections.deque()
        self.scheduled = False


class MonitorLanes:
    """Ordered per-key delivery on an elastic pool of worker threads."""

    def __init__(self, attach: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._lanes: dict[int, _Lane] = {}
        self._ready: collections.deque[_Lane] = collections.deque()
        self._workers = 0
        self._idle = 0
        self._attach = attach
        self._local = threading.local()
        #: Events delivered and callbacks that raised, for tests and the benchmark.
        self.delivered = 0
        self.failed = 0

    def in_worker(self) -> bool:
        """True on a lane worker (running an event): ophyd's "monitor thread" for our signals."""
        return getattr(self._local, "worker", False)

    def post(self, key: Any, callback: Callable[..., Any], args: Any, kwargs: Any) -> None:
        """Queue ``callback(*args, **kwargs)`` behind everything posted to ``key`` before."""
        key_id = id(key)
        with self._lock:
            lane = self._lanes.get(key_id)
            if lane is None:
                lane = self._lanes[key_id] = _Lane(key_id)
            lane.events.append((callback, tuple(args), dict(kwargs)))
            if lane.scheduled:
                return
            lane.scheduled = True
            self._ready.append(lane)
            # An idle worker counts until it runs, and one woken for an earlier lane
            # takes that lane: wake one only while the idle outnumber the lanes waiting.
            if self._idle >= len(self._ready):
                self._wake.notify()
                return
            if self._workers >= MAX_WORKERS:
                return  # every worker is busy; the lane waits its turn
            self._workers += 1
        try:
            threading.Thread(target=self._run, name="beampipe-ca-monitor", daemon=True).start()
        except BaseException:
            with self._lock:
                self._workers -= 1
            raise

    def wrap(self, callback: Callable[..., Any], default_key: Any) -> Callable[..., Any]:
        """A libca-side callback that posts ``callback`` to its lane instead of running it."""
        if isinstance(callback, _Posted):
            return callback
        return _Posted(self, callback, default_key)

    def _run(self) -> None:
        self._local.worker = True
        if self._attach is not None:
            try:
                self._attach()
            except Exception:
                logger.exception("monitor worker could not attach to the CA context")
        while True:
            with self._lock:
                while not self._ready:
                    self._idle += 1
                    woke = self._wake.wait(IDLE_EXIT)
                    self._idle -= 1
                    if not woke and not self._ready:
                        self._workers -= 1
                        return
                lane = self._ready.popleft()
                batch = [lane.events.popleft() for _ in range(min(FAIR_SLICE, len(lane.events)))]
            for callback, args, kwargs in batch:
                try:
                    callback(*args, **kwargs)
                except Exception:
                    self.failed += 1
                    logger.exception(
                        "monitor callback %r (pvname=%r) failed", callback, kwargs.get("pvname")
                    )
            with self._lock:
                self.delivered += len(batch)
                if lane.events:
                    self._ready.append(lane)  # more came in: back of the line, order kept
                else:
                    lane.scheduled = False
                    if self._lanes.get(lane.key_id) is lane:
                        del self._lanes[lane.key_id]


class _Posted:
    """``callback`` as pyepics calls it: posted to its lane (a class, not a closure: cheap to make).

    ``_wrapped_callback`` tells ophyd's ``wrap_callback`` it is already dispatched.
    """

    __slots__ = ("__wrapped__", "default_key", "lanes")
    _wrapped_callback = True

    def __init__(self, lanes: MonitorLanes, callback: Callable[..., Any], default_key: Any):
        self.lanes = lanes
        self.__wrapped__ = callback
        self.default_key = default_key

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        callback = self.__wrapped__
        self.lanes.post(lane_key(callback, self.default_key), callback, args, kwargs)

    def __repr__(self) -> str:
        return f"<posted to its monitor lane: {self.__wrapped__!r}>"


_lanes: MonitorLanes | None = None
_lanes_lock = threading.Lock()


def lanes() -> MonitorLanes:
    """The process-wide lanes, attached to beampipe-ca's CA context."""
    global _lanes
    if _lanes is None:
        with _lanes_lock:
            if _lanes is None:
                from ._libca import context

                _lanes = MonitorLanes(attach=lambda: context().attach())
    return _lanes
