"""libca driven directly through ctypes: one context, a channel cache, and batched gets.

Why not pyepics or aioca for the reads: both spend a Python round of work per
PV per request (pyepics polls, aioca wakes the event loop once per reply).
Here a batch is N ``ca_array_get_callback`` calls and one ``ca_flush_io``; the
replies land on libca's receive thread, which decodes them and completes the
batch when the last one is in.  A blocking bulk read of scalars goes further:
``ca_array_get`` straight into numpy record arrays and one ``ca_pend_io``, so
no Python runs per reply at all.  Callers wait with the GIL released.

There is exactly one libca in the process (epicscorelibs' build, the one
aioca uses and the one pyepics uses once ``PYEPICS_LIBCA`` points at it) and
one preemptive CA context, pyepics' initial context, so channels, circuits
and searches are shared with pyepics and aioca rather than duplicated.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import itertools
import logging
import os
import struct
import sys
import threading
import time
import types
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import numpy as np

from beampipe import Batch, Coalescer, Failed, Ok, Outcome

__all__ = [
    "CaError",
    "Channel",
    "Reading",
    "context",
]

logger = logging.getLogger("beampipe_ca")

EPICS_EPOCH = 631152000
ECA_NORMAL = 1
ECA_TIMEOUT = 80
ECA_IODONE = 339
CA_OP_CONN_UP = 6
CS_CONN = 2
MAX_STRING_SIZE = 40

# DBR_TIME_<native> layout: status, severity (int16), secs, nsec (uint32), then per-type padding.
_TIME_HEADER = struct.Struct("<hhII")
#: native DBF type -> (offset of the value in DBR_TIME_x, numpy dtype, struct format or None)
_TIME_LAYOUT: dict[int, tuple[int, np.dtype[Any], str | None]] = {
    0: (12, np.dtype("S40"), None),  # STRING
    1: (14, np.dtype("<i2"), "<h"),  # SHORT
    2: (12, np.dtype("<f4"), "<f"),  # FLOAT
    3: (14, np.dtype("<u2"), "<H"),  # ENUM
    4: (15, np.dtype("u1"), "<B"),  # CHAR
    5: (12, np.dtype("<i4"), "<i"),  # LONG
    6: (16, np.dtype("<f8"), "<d"),  # DOUBLE
}
_MAX_KEYS = 1 << 24
# Ready ctypes arguments for the calls made without argtypes (which would convert each one).
_ONE = ctypes.c_ulong(1)
_ZERO = ctypes.c_ulong(0)
_DBR_ARGS = [ctypes.c_long(native + 14) for native in range(7)]  # DBR_TIME_<native>
#: Batches this small gain nothing from a sync group.
_SG_MIN = 4


def _time_dtype(native: int) -> np.dtype[Any]:
    from epicscorelibs.ca import dbr

    off, value_dtype, _fmt = _TIME_LAYOUT[native]
    size = ctypes.sizeof(dbr.DbrCodeToType[native + 14])
    return np.dtype(
        {
            "names": ["status", "severity", "secs", "nsec", "value"],
            "formats": ["<i2", "<i2", "<u4", "<u4", value_dtype],
            "offsets": [0, 2, 4, 8, off],
            "itemsize": size,
        }
    )


_TYPE_NAMES = ("string", "short", "float", "enum", "char", "long", "double")


class _TimeDtypes(dict[int, "np.dtype[Any]"]):
    def __missing__(self, native: int) -> np.dtype[Any]:
        self[native] = dtype = _time_dtype(native)
        return dtype


_TIME_DTYPES = _TimeDtypes()


class CaError(RuntimeError):
    """A Channel Access operation that could not be done; the message names the PV."""


class Reading(NamedTuple):
    """One fresh read of a PV: value plus the alarm and time stamp the IOC sent with it."""

    value: Any
    timestamp: float
    severity: int
    status: int
    ctrl: Mapping[str, Any] | None = None


# -- ctypes plumbing -------------------------------------------------------------
class _ConnArgs(ctypes.Structure):
    _fields_ = [("chid", ctypes.c_void_p), ("op", ctypes.c_long)]


class _EventArgs(ctypes.Structure):
    _fields_ = [
        ("usr", ctypes.c_void_p),
        ("chid", ctypes.c_void_p),
        ("type", ctypes.c_long),
        ("count", ctypes.c_long),
        ("raw_dbr", ctypes.c_void_p),
        ("status", ctypes.c_int),
    ]


_CONN_CB = ctypes.CFUNCTYPE(None, _ConnArgs)
_EVENT_CB = ctypes.CFUNCTYPE(None, _EventArgs)

_pinned = threading.local()


def _pin_thread_state() -> None:
    """Keep a Python thread state alive on the libca thread that calls us back.

    Without it ctypes creates and destroys a thread state around every
    callback from a foreign thread, which costs ~10 us: 4x the whole wire
    time of a 100-PV batch.  The state is per libca thread and lives as long
    as the thread (the context's lifetime).
    """
    if not getattr(_pinned, "done", False):
        ctypes.pythonapi.PyGILState_Ensure()
        _pinned.done = True


def _libca_path() -> str:
    from epicscorelibs import path

    return str(path.get_lib("ca"))


def point_pyepics_at_epicscorelibs() -> None:
    """Make pyepics load epicscorelibs' libca: one libca, so one context, in the process.

    pyepics reads ``PYEPICS_LIBCA`` only when it first loads libca, so setting
    it is enough even after ``import epics``.  While ``epics.ca`` is not yet
    imported we import ``epicscorelibs.path.pyepics`` itself, which sets the
    same variable, so that a later import of it (ophyd and others do that) is
    a no-op rather than a warning.
    """
    if "epics.ca" not in sys.modules:
        import epicscorelibs.path.pyepics  # noqa: F401
    os.environ.setdefault("PYEPICS_LIBCA", _libca_path())


def _load_libca() -> ctypes.CDLL:
    lib = ctypes.CDLL(_libca_path(), ctypes.RTLD_GLOBAL)
    vp = ctypes.c_void_p
    lib.ca_current_context.restype = vp
    lib.ca_current_context.argtypes = []
    lib.ca_attach_context.argtypes = [vp]
    lib.ca_create_channel.argtypes = [
        ctypes.c_char_p,
        _CONN_CB,
        vp,
        ctypes.c_uint,
        ctypes.POINTER(vp),
    ]
    lib.ca_clear_channel.argtypes = [vp]
    lib.ca_state.argtypes = [vp]
    lib.ca_state.restype = ctypes.c_int
    lib.ca_preemtive_callback_is_enabled.argtypes = []  # sic: libca's spelling
    lib.ca_preemtive_callback_is_enabled.restype = ctypes.c_int
    lib.ca_puser.argtypes = [vp]
    lib.ca_puser.restype = vp
    lib.ca_array_get_callback.argtypes = [ctypes.c_long, ctypes.c_ulong, vp, _EVENT_CB, vp]
    lib.ca_field_type.argtypes = [vp]
    lib.ca_field_type.restype = ctypes.c_short
    lib.ca_element_count.argtypes = [vp]
    lib.ca_element_count.restype = ctypes.c_ulong
    lib.ca_host_name.argtypes = [vp]
    lib.ca_host_name.restype = ctypes.c_char_p
    lib.ca_message.argtypes = [ctypes.c_long]
    lib.ca_message.restype = ctypes.c_char_p
    lib.ca_flush_io.argtypes = []
    return lib


# -- channels ----------------------------------------------------------------------
class Channel:
    """One libca channel, shared by every caller in the process that reads this PV."""

    __slots__ = (
        "_as_parameter_",
        "_waiters",
        "carg",
        "chid",
        "copyable",
        "count",
        "dead",
        "decoders",
        "generation",
        "holders",
        "host",
        "listeners",
        "name",
        "native",
        "pinned",
        "token",
        "up",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.chid: int = 0
        self._as_parameter_: int = 0  # lets epicscorelibs' cadef functions take a Channel
        #: The chid as a ready ctypes argument, for the calls that skip argtypes conversion.
        self.carg = ctypes.c_void_p(0)
        #: Connected now.  Waiters register in ``_waiters`` (no Event per channel: a
        #: threading.Event is 6 GC-tracked objects and ~4 us to make, about a tenth of what
        #: our side of an ophyd PV object costs in a Device build).
        self.up = False
        #: Up, one element, of a type the ``ca_pend_io`` scalar path decodes.
        self.copyable = False
        self.native = -1
        self.count = 0
        self.host = ""
        #: Bumped on every (re)connection: readers can tell a value from before a restart.
        self.generation = 0
        #: Who waits for the next connection: (loop, future) of a coroutine, or the
        #: ``_ConnectWait`` of a blocked thread.
        self._waiters: list[
            tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | _ConnectWait
        ] = []
        #: (generation, what) -> (dbrcode, decoder), made once per connection and request kind.
        self.decoders: dict[Hashable, Any] = {}
        self.listeners: list[Callable[[Channel, bool], None]] = []
        #: Asked for through the public calls (bulk reads, connect, ophyd-async): kept for
        #: the life of the process.  A channel only ``hold``-ers use goes with the last one.
        self.pinned = False
        #: ``_Context.hold`` calls not yet released (the ophyd layer's PV objects).
        self.holders = 0
        #: Cleared: no request may be queued on its chid any more.
        self.dead = False
        #: What libca hands back to the connection callback (``ca_puser``).
        self.token = 0

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES[self.native] if 0 <= self.native < len(_TYPE_NAMES) else "?"

    def __repr__(self) -> str:
        state = f"{self.type_name}[{self.count}] on {self.host}" if self.up else "down"
        return f"<Channel {self.name} {state}>"


class _ConnectWait:
    """One blocked thread waiting for a set of channels: one Event for the lot."""

    __slots__ = ("done", "pending")

    def __init__(self, chans: list[Channel]) -> None:
        self.pending = {id(c) for c in chans}
        self.done = threading.Event()

    def arrived(self, chan: Channel) -> None:
        """A channel connected (libca thread), or was found up on the re-check."""
        self.pending.discard(id(chan))
        if not self.pending:
            self.done.set()


class ForeignChannel(Channel):
    """A pyepics-owned chid read through our batches, so the ophyd layer needs no second channel.

    Its type and connection state are read from libca on each use: the owner's
    connection handler is the owner's, we do not get callbacks for it.
    """

    __slots__ = ("lib",)

    def __init__(self, key: str, chid: int, lib: ctypes.CDLL) -> None:
        # Not Channel.__init__: type, count, host and generation are live properties here.
        self.name, self.lib, self.dead = key, lib, False
        self.pinned, self.holders, self.token = False, 0, 0
        self.copyable = False  # read through the callback path only
        self.listeners = []
        self._waiters = []
        self.decoders = {}
        self.chid = self._as_parameter_ = chid
        self.carg = ctypes.c_void_p(chid)

    @property
    def host(self) -> str:  # type: ignore[override]
        return (self.lib.ca_host_name(self.chid) or b"").decode(errors="replace")

    @property
    def up(self) -> bool:  # type: ignore[override]
        return bool(self.lib.ca_state(self.chid) == CS_CONN)

    @property
    def native(self) -> int:  # type: ignore[override]
        return int(self.lib.ca_field_type(self.chid))

    @property
    def count(self) -> int:  # type: ignore[override]
        return int(self.lib.ca_element_count(self.chid))

    @property
    def generation(self) -> int:  # type: ignore[override]
        # Decoders are cached per (type, count): a reboot that changes either gets new ones.
        return self.native * (1 << 32) + self.count


class _GetBatch:
    """The replies still owed for one issued batch.

    The libca callback finds it by ``usr >> 24`` and the key by ``usr & 0xFFFFFF``,
    and counts replies with ``next()`` on an itertools counter, which the GIL makes
    atomic: no lock on the per-reply path.
    """

    __slots__ = ("complete", "counter", "decoders", "keys", "results", "sg", "total")

    def __init__(
        self,
        keys: tuple[Any, ...] | list[Any],
        complete: Callable[[Mapping[Any, Outcome[Any]]], None],
    ) -> None:
        self.keys = keys
        self.total = len(keys)
        self.complete = complete
        self.results: dict[Any, Outcome[Any]] = {}
        self.decoders: list[Callable[..., Any] | None] = [None] * len(keys)
        self.counter = itertools.count(1)
        #: The scalars fetched through a synchronous group, if any (see _Context._issue).
        self.sg: _SyncGroup | None = None

    def settle(self, key: Any, outcome: Outcome[Any]) -> None:
        # setdefault is one step under the GIL: a key that release() failed while its
        # reply was being delivered is counted once, whichever came first.
        if self.results.setdefault(key, outcome) is not outcome:
            return
        if next(self.counter) == self.total:
            self.complete(self.results)

    def settled(self, n: int) -> None:
        """Count ``n`` outcomes already written to ``results`` (a sync group's, at once).

        Only the very last count of the batch reaches ``total``, whichever thread
        makes it, so checking our own last one is enough.
        """
        if n > 1:
            collections.deque(itertools.islice(self.counter, n - 1), maxlen=0)
        if n > 0 and next(self.counter) == self.total:
            self.complete(self.results)


class _SyncGroup:
    """The scalars of one batch fetched with ``ca_sg_array_get``: no Python per reply.

    libca writes each DBR_TIME reply into its record of ``records`` (one record
    array per DBR type); one more read of the last member's PV, the sentinel,
    goes out behind them with a callback.  A server answers a circuit's reads
    in order, so when the sentinel's reply is in, ``ca_sg_test`` normally says
    the group is done and all of them are decoded at once; a server that
    reorders (a gateway may) is waited for with ``ca_sg_block`` on a thread of
    its own.
    Each record's severity starts as -1, a value no IOC sends, so a read the
    server never answered (a disconnect mid-read) fails alone.
    """

    __slots__ = ("blocked", "deadline", "gid", "members", "n", "records")

    def __init__(self, gid: int, n: int, deadline: float) -> None:
        self.gid = gid
        #: A thread waits in ca_sg_block on it (the group must live until that returns).
        self.blocked = False
        self.n = n
        self.deadline = deadline
        #: dbrcode -> record array libca writes into (kept alive until ca_sg_delete)
        self.records: dict[int, np.ndarray[Any, Any]] = {}
        #: dbrcode -> the batch indices of the keys in its records, row by row
        self.members: dict[int, list[int]] = {}

    def allocate(self, dbrcode: int) -> tuple[int, int, list[int]]:
        """Records for up to ``n`` replies of one DBR_TIME type: (address, size, members)."""
        records = self.records[dbrcode] = np.empty(self.n, _TIME_DTYPES[dbrcode - 14])
        records["severity"].fill(-1)  # a value no IOC sends: "no reply landed here"
        members = self.members[dbrcode] = []
        return records.ctypes.data, records.itemsize, members


class _ArrayBatch:
    """The array replies still owed to one blocking bulk read.

    The libca callback copies each reply (header and the NORD elements it
    carries) into a buffer of its own, views its value as a numpy array and
    counts it: that work overlaps the replies still on the wire, where the
    caller's thread could only start after the last one (measured 100 us of a
    100-waveform read).  The header is decoded by the caller, if asked for.
    """

    __slots__ = ("counter", "done", "layouts", "replies", "statuses", "total")

    def __init__(self, layouts: list[tuple[int, np.dtype[Any]]]) -> None:
        self.total = len(layouts)
        #: Per slot: (offset of the value in the DBR_TIME reply, element dtype).
        self.layouts = layouts
        #: Per slot: (the value, a view of the reply's copy; the copy, for its header)
        self.replies: list[tuple[np.ndarray[Any, Any], Any] | None] = [None] * self.total
        self.statuses: list[int] = [ECA_NORMAL] * self.total
        self.counter = itertools.count(1)
        self.done = threading.Event()


class _ScalarRun(NamedTuple):
    """The scalars of one native type in a :class:`_BulkPlan`, and what reading them needs."""

    native: int
    chans: list[Channel]
    names: list[str]
    #: DBR_TIME records libca writes the replies into (used under ``_pend_lock`` only)
    records: np.ndarray[Any, Any]
    #: (chid, record address) per channel as ctypes objects: ``ca_array_get`` converts nothing
    calls: list[tuple[ctypes.c_void_p, ctypes.c_void_p]]


class _BulkPlan(NamedTuple):
    """How :meth:`_Context.read_time_now` reads one list of names.

    A scan reads the same list again and again.  Sorting its channels by kind
    and type, and making the ctypes arguments of every request, was a third of
    a 100-scalar read's own Python time; a plan is made once and kept while no
    channel of the context connected, disconnected or went (``epoch``).
    """

    epoch: int
    runs: list[_ScalarRun]
    arrays: list[Channel]
    #: Names read through the general callback path (not connected, strings arrays, ...)
    rest: list[str]
    #: Every name has a pinned, connected channel (so ``rest`` is empty)
    ready: bool


class _Context:
    """The process's CA context as beampipe_ca sees it: libca, channels, in-flight gets."""

    def __init__(self) -> None:
        point_pyepics_at_epicscorelibs()
        import epics.ca

        self.lib = _load_libca()
        # A thread-local read, made by every attach(): no need to hand the GIL around for it.
        self.current_context = ctypes.PYFUNCTYPE(ctypes.c_void_p)(("ca_current_context", self.lib))
        if epics.ca.libca is None:
            # If aioca already made its context, let pyepics adopt that one (pyepics keeps
            # a context it finds attached) rather than make a second.
            aioca_context = getattr(
                getattr(sys.modules.get("aioca._catools"), "_Context", None), "_ca_context", None
            )
            if aioca_context and not self.lib.ca_current_context():
                self.lib.ca_attach_context(aioca_context)
            epics.ca.initialize_libca()
        loaded = getattr(epics.ca.libca, "_name", None)
        if loaded and os.path.realpath(loaded) != os.path.realpath(_libca_path()):
            raise CaError(
                f"pyepics already loaded a different libca ({loaded}) than epicscorelibs' "
                f"({_libca_path()}): two libcas in one process do not share channels; import "
                "beampipe_ca (or epicscorelibs.path.pyepics) before pyepics makes its first CA call"
            )
        self.ctx: int = epics.ca.initial_context
        self.attach()
        if not self.lib.ca_preemtive_callback_is_enabled():
            raise CaError(
                "the shared CA context has preemptive callbacks off (epics.ca.PREEMPTIVE_CALLBACK "
                "= False?): beampipe_ca needs them, replies would only arrive inside ca_pend_event"
            )
        # Queuing a request is a short, non-blocking call: keep the GIL across it, or
        # each of the N calls hands the GIL to libca's thread delivering the first
        # replies and the issuing loop crawls.  libca releases its own lock before
        # it calls back into Python, so holding the GIL here cannot deadlock.
        self.queue_get = ctypes.PYFUNCTYPE(
            ctypes.c_int, ctypes.c_long, ctypes.c_ulong, ctypes.c_void_p, _EVENT_CB, ctypes.c_void_p
        )(("ca_array_get_callback", self.lib))
        self.lib.ca_pend_io.argtypes = [ctypes.c_double]
        # Sync groups: the short calls keep the GIL; ca_sg_block and ca_sg_delete let it go.
        u = ctypes.c_uint
        self.sg_create = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.POINTER(u))(
            ("ca_sg_create", self.lib)
        )
        # ca_sg_delete cancels the group's outstanding reads, which waits for a callback
        # libca's thread may be running (and that one may wait for the GIL): let it go.
        self.lib.ca_sg_delete.argtypes = [u]
        self.sg_delete = self.lib.ca_sg_delete
        self.sg_test = ctypes.PYFUNCTYPE(ctypes.c_int, u)(("ca_sg_test", self.lib))
        self.sg_get_ready = ctypes.PYFUNCTYPE(ctypes.c_int)(("ca_sg_array_get", self.lib))
        self.lib.ca_sg_block.argtypes = [u, ctypes.c_double]
        #: Scalars of batches go through sync groups (``BEAMPIPE_CA_SYNC_GROUPS=0``: callbacks).
        self.use_sync_groups = os.environ.get("BEAMPIPE_CA_SYNC_GROUPS", "1") != "0"
        #: How long a blocking bulk read polls for its replies before it sleeps, in seconds
        #: (``BEAMPIPE_CA_SPIN_US``, 0: never polls).
        self.spin = _spin_budget()
        self.test_io = ctypes.PYFUNCTYPE(ctypes.c_int)(("ca_test_io", self.lib))
        # The same for the getters the connection callbacks call (200 of them in a row for
        # a Device): each CDLL call would hand the GIL to whichever thread wants it.
        vp = ctypes.c_void_p
        self.puser = ctypes.PYFUNCTYPE(vp, vp)(("ca_puser", self.lib))
        self.field_type = ctypes.PYFUNCTYPE(ctypes.c_short, vp)(("ca_field_type", self.lib))
        self.element_count = ctypes.PYFUNCTYPE(ctypes.c_ulong, vp)(("ca_element_count", self.lib))
        self.host_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, vp)(("ca_host_name", self.lib))
        self.read_access = ctypes.PYFUNCTYPE(ctypes.c_uint, vp)(("ca_read_access", self.lib))
        self.write_access = ctypes.PYFUNCTYPE(ctypes.c_uint, vp)(("ca_write_access", self.lib))
        #: (chid, handler address): libca calls the handler before returning only when the
        #: channel is up, on this very thread (it drops its lock first), so the GIL may stay.
        self.replace_access_rights_event = ctypes.PYFUNCTYPE(ctypes.c_int, vp, vp)(
            ("ca_replace_access_rights_event", self.lib)
        )
        # And channel creation, 200 in a row while a Device is built: a CDLL call hands the
        # GIL to libca's thread (busy with the connection callbacks of the names created
        # just before) and waits to get it back, every time.  libca runs no callback
        # under the lock ca_create_channel takes.
        self.create_channel = ctypes.PYFUNCTYPE(
            ctypes.c_int, ctypes.c_char_p, _CONN_CB, vp, ctypes.c_uint, ctypes.POINTER(vp)
        )(("ca_create_channel", self.lib))
        self._pend_lock = threading.Lock()
        # ca_array_get with no argtypes: it is handed ready ctypes objects (_ScalarRun.calls).
        self.queue_get_ready = ctypes.PYFUNCTYPE(ctypes.c_int)(("ca_array_get", self.lib))
        self.queue_get_cb_ready = ctypes.PYFUNCTYPE(ctypes.c_int)(
            ("ca_array_get_callback", self.lib)
        )
        #: Bumped whenever a channel connects, disconnects or goes: plans made before are stale.
        self.epoch = 0
        self._epoch_lock = threading.Lock()  # a leaf lock: += is not atomic across threads
        self._plans: dict[tuple[str, ...], _BulkPlan] = {}
        self._lock = threading.Lock()
        self._foreign_lock = threading.Lock()
        self._channels: dict[str, Channel] = {}
        #: Live channels only ``hold``-ers use: while there are none, ``channels`` needs no
        #: per-channel check on its lock-free path.
        self._unpinned = 0
        self._by_token: dict[int, Channel] = {}
        self._gets: dict[int, _GetBatch] = {}
        self._array_gets: dict[int, _ArrayBatch] = {}
        self._batch_no = 0
        #: Wire batches put on the wire so far (tests and benchmarks check coalescing with it).
        self.batches_issued = 0
        self._next_usr = 1
        self._conn_cb = _CONN_CB(self._on_connection)
        self._event_cb = _EVENT_CB(self._on_get)
        self._array_cb = _EVENT_CB(self._on_array)
        self._array_cb_arg = ctypes.cast(self._array_cb, ctypes.c_void_p)
        self._sentinel_cb = _EVENT_CB(self._on_sentinel)
        self.io = _ReadIO(self)
        self.reads: Coalescer[Any, Any] = Coalescer(self.io, max_batch=4000, name="ca")

    # -- threads and the context -------------------------------------------------
    def attach(self) -> None:
        """Attach the calling thread to the shared context (a no-op when it already is)."""
        current = self.current_context()
        if current == self.ctx:
            return
        if current:
            raise CaError(
                "this thread is attached to a different CA context than the one pyepics, aioca "
                "and beampipe_ca share; detach it (epics.ca.detach_context()) first"
            )
        status = self.lib.ca_attach_context(self.ctx)
        if status != ECA_NORMAL:
            raise CaError(f"ca_attach_context failed: {self.message(status)}")

    def message(self, status: int) -> str:
        return (self.lib.ca_message(status) or b"?").decode(errors="replace")

    # -- channels ------------------------------------------------------------------
    def channel(self, name: str) -> Channel:
        """The channel for ``name``, created (and its search queued) on first use."""
        chan = self._channels.get(name)
        if chan is not None and chan.pinned:
            return chan
        return self.channels([name])[0]

    def channels(self, names: list[str]) -> list[Channel]:
        """Channels for many names; new ones are created together and searched in one flush."""
        known = self._channels
        found = [known.get(name) for name in names]
        if None not in found and (
            not self._unpinned or all(c.pinned for c in found)  # type: ignore[union-attr]
        ):
            return found  # type: ignore[return-value]  # the common case: no lock needed
        out: list[Channel] = []
        created = False
        with self._lock:
            for name in names:
                chan = self._channels.get(name)
                fresh = chan is None
                if chan is None:
                    if not isinstance(name, str) or not name:
                        raise CaError(f"PV name must be a non-empty str, got {name!r}")
                    if not created:
                        self.attach()
                    chan = self._create(name)
                    created = True
                if not chan.pinned:
                    chan.pinned = True
                    if not fresh:
                        self._unpinned -= 1  # an ophyd PV object's channel, now ours too
                out.append(chan)
        if created:
            self.lib.ca_flush_io()
        return out

    def hold(self, name: str) -> Channel:
        """The channel for ``name`` for a holder that will ``release`` it (an ophyd PV object).

        No flush: the search goes out on libca's next search tick, with the rest
        of a Device's names, and a flush per PV would hand the GIL around 200 times.
        """
        with self._lock:
            chan = self._channels.get(name)
            if chan is None:
                if not isinstance(name, str) or not name:
                    raise CaError(f"PV name must be a non-empty str, got {name!r}")
                self.attach()
                chan = self._create(name)
                self._unpinned += 1
            chan.holders += 1
        return chan

    def release(self, chan: Channel) -> bool:
        """Give back one ``hold``; the last one clears the channel unless a public call uses it.

        Reads still in flight on it fail at once (libca drops their callbacks on a
        cleared channel).  Returns whether the channel was cleared.
        """
        with self._lock:
            chan.holders -= 1
            if chan.holders > 0 or chan.pinned or self._channels.get(chan.name) is not chan:
                return False
            del self._channels[chan.name]
            self._by_token.pop(chan.token, None)
            self._unpinned -= 1
        with self._foreign_lock:  # after this no request is queued on the chid (see _issue)
            chan.dead = True
        chan.up = chan.copyable = False
        self._changed()
        self._fail_in_flight(chan.name, f"{chan.name}: channel released while being read")
        if _libca_finalized():
            # At exit, after pyepics' atexit hook cleared every channel and destroyed the
            # context (ophyd's finalizers release PVs later): libca must not be called.
            return True
        self.attach()
        self.lib.ca_clear_channel(chan.chid)
        return True

    def adopt(self, name: str, chid: int) -> str:
        """Make a chid another library owns readable by key; returns the key to read it by."""
        key = _adopted_key(name, chid)
        if key not in self._channels:
            with self._lock:
                self._channels[key] = ForeignChannel(key, chid, self.lib)
            self._changed()
        return key

    def forget(self, name: str, chid: int) -> None:
        """Drop an adopted channel before its owner clears the chid.

        libca drops the callbacks of requests still in flight on a cleared
        channel, so their batches would never complete and would hold their
        route until every waiter timed out: fail those keys here instead.
        """
        key = _adopted_key(name, chid)
        with self._lock:
            chan = self._channels.pop(key, None)
        if isinstance(chan, ForeignChannel):
            # After this no request is queued on the chid (see _issue), so once the
            # in-flight ones are failed below, the owner may clear it safely.
            with self._foreign_lock:
                chan.dead = True
            self._changed()
        self._fail_in_flight(key, f"{name}: channel released while being read")

    def _fail_in_flight(self, key: str, reason: str) -> None:
        for state in list(self._gets.values()):
            for k in state.keys:
                if (k if isinstance(k, str) else k[0]) == key and k not in state.results:
                    state.settle(k, Failed(reason))

    def route(self, name: str) -> Hashable:
        """What shares a wire batch: the server the channel is connected to (one circuit)."""
        chan = self._channels.get(name)
        return chan.host if chan is not None and chan.up else None

    def _create(self, name: str) -> Channel:
        chan = Channel(name)
        # Registered before ca_create_channel: the connection callback may fire before it returns.
        self._channels[name] = chan
        chid = ctypes.c_void_p()
        token = self._next_usr
        self._next_usr += 1
        # The token, not the chid, finds the channel: the connection callback may run
        # on libca's thread before ca_create_channel has returned the chid to us.
        self._by_token[token] = chan
        chan.token = token
        status = self.create_channel(name.encode(), self._conn_cb, token, 0, ctypes.byref(chid))
        if status != ECA_NORMAL or not chid.value:
            del self._channels[name]
            del self._by_token[token]
            raise CaError(f"{name}: ca_create_channel failed: {self.message(status)}")
        chan.chid = chan._as_parameter_ = chid.value
        chan.carg = ctypes.c_void_p(chid.value)
        return chan

    def _on_connection(self, args: _ConnArgs) -> None:
        _pin_thread_state()
        try:
            chid = args.chid
            chan = self._by_token.get(self.puser(chid) or 0)
            if chan is None:
                return
            if not chan.chid:
                chan.chid = chan._as_parameter_ = chid
                chan.carg = ctypes.c_void_p(chid)
            up = args.op == CA_OP_CONN_UP
            if up:
                chan.native = self.field_type(chid)
                chan.count = self.element_count(chid)
                chan.host = (self.host_name(chid) or b"").decode(errors="replace")
                chan.generation += 1
                chan.copyable = chan.count == 1 and chan.native in _TIME_LAYOUT
                chan.up = True  # before the swap: a waiter registering now sees it on its re-check
                waiters, chan._waiters = chan._waiters, []
                for waiter in waiters:
                    if isinstance(waiter, _ConnectWait):
                        waiter.arrived(chan)
                    elif not waiter[0].is_closed():
                        waiter[0].call_soon_threadsafe(_set_none, waiter[1])
            else:
                chan.up = chan.copyable = False
                logger.info("%s: disconnected from %s", chan.name, chan.host)
            self._changed()
            for listener in list(chan.listeners):
                try:
                    listener(chan, up)
                except Exception:
                    logger.exception("%s: connection listener %r failed", chan.name, listener)
        except Exception:
            logger.exception("beampipe_ca connection callback failed")

    # -- connecting ------------------------------------------------------------------
    def wait_connected(self, chans: list[Channel], timeout: float) -> list[Channel]:
        """Wait until all are connected or the time is up; returns those still down."""
        down = [c for c in chans if not c.up]
        if down:
            waiter = _ConnectWait(down)
            with self._lock:
                for chan in down:
                    chan._waiters.append(waiter)
            for chan in down:  # connected between the look and the registration
                if chan.up:
                    waiter.arrived(chan)
            waiter.done.wait(timeout)
            self._unregister([(chan, waiter) for chan in down])
        return [c for c in chans if not c.up]

    async def wait_connected_async(self, chans: list[Channel], timeout: float) -> list[Channel]:
        loop = asyncio.get_running_loop()
        futures = []
        with self._lock:
            for chan in chans:
                if not chan.up:
                    fut: asyncio.Future[None] = loop.create_future()
                    chan._waiters.append((loop, fut))
                    futures.append((chan, fut))
        # A connection that landed between the check and the registration.
        for chan, fut in futures:
            if chan.up and not fut.done():
                fut.set_result(None)
        if futures:
            pending = [f for _c, f in futures]
            _done, not_done = await asyncio.wait(pending, timeout=timeout)
            for fut in not_done:
                fut.cancel()
            self._unregister([(chan, (loop, fut)) for chan, fut in futures])
        return [c for c in chans if not c.up]

    def _unregister(self, registrations: list[tuple[Channel, Any]]) -> None:
        """Take waiters off their channels: timed out, or registered just after the
        connection's swap (and told by the re-check).  One the swap took is gone already."""
        with self._lock:
            for chan, waiter in registrations:
                with contextlib.suppress(ValueError):
                    chan._waiters.remove(waiter)

    # -- gets ------------------------------------------------------------------------
    def issue_gets(
        self,
        batch: Batch[Any],
        complete: Callable[[Mapping[Any, Outcome[Any]]], None],
        plan: Callable[[Channel, Any], tuple[int, int, Callable[..., Any]]],
    ) -> None:
        """Put the batch on the wire (see :meth:`_issue`), then flush once."""
        self._issue(batch.keys, complete, plan, batch.deadline)

    def _issue(
        self,
        keys: tuple[Any, ...] | list[Any],
        complete: Callable[[Mapping[Any, Outcome[Any]]], None],
        plan: Callable[[Channel, Any], tuple[int, int, Callable[..., Any]]],
        deadline: float | None = None,
    ) -> _GetBatch:
        """One ``ca_array_get_callback`` per key, except scalars: those go in a sync group.

        A callback costs ~5-10 us of Python on libca's receive thread per reply
        (the ctypes trampoline, the GIL, the bookkeeping), and the replies of a
        batch queue behind each other there: for the 200 scalars of an
        ophyd-async ``Device.read()`` that was half of the read.  Scalars of our
        own channels are fetched with ``ca_sg_array_get`` instead (no Python per
        reply, see :class:`_SyncGroup`).  ``deadline`` (``time.monotonic``) bounds
        the wait of a sync group whose server answers out of order.
        """
        if len(keys) > _MAX_KEYS:
            raise CaError(f"at most {_MAX_KEYS} PVs per batch, got {len(keys)}")
        self.attach()
        with self._lock:
            self._batch_no = batch_no = (self._batch_no + 1) & 0xFFFFFFFF
            self.batches_issued += 1
        gets = self._gets

        def done(results: Mapping[Any, Outcome[Any]]) -> None:
            gets.pop(batch_no, None)
            complete(results)

        state = gets[batch_no] = _GetBatch(keys, done)
        base = batch_no << 24
        failed: list[tuple[Any, Failed]] = []
        issued = 0
        use_sg = self.use_sync_groups and len(keys) >= _SG_MIN
        queue_get, cb, channels, decoders = (
            self.queue_get,
            self._event_cb,
            self._channels,
            state.decoders,
        )
        sg: _SyncGroup | None = None
        rows: dict[int, tuple[int, int, list[int]]] = {}  # dbrcode -> (address, size, members)
        sentinel = None
        for idx, key in enumerate(keys):
            name = key if isinstance(key, str) else key[0]
            chan = channels.get(name)
            if chan is None or not chan.up:
                failed.append((key, Failed(f"{name}: not connected")))
                continue
            try:
                dbrcode, count, decoders[idx] = plan(chan, key)
            except Exception as exc:  # noqa: BLE001 - a bad request fails its PV alone
                failed.append((key, Failed(f"{name}: {exc}")))
                continue
            if not chan.pinned:
                # Check and queue as one step against forget() and release(): never a
                # request on a chid that is being cleared.
                with self._foreign_lock:
                    if chan.dead:
                        failed.append((key, Failed(f"{name}: channel released")))
                        continue
                    status = queue_get(dbrcode, count, chan.chid, cb, base | idx)
            elif use_sg and 14 <= dbrcode <= 20 and (count or chan.count) == 1:
                # A scalar on a pinned channel (never cleared, so every read gets an answer).
                if sg is None:
                    sg = self._new_sync_group(len(keys), deadline)
                    sg_get, gid, ptr = self.sg_get_ready, ctypes.c_uint(sg.gid), ctypes.c_void_p
                slot = rows.get(dbrcode)
                if slot is None:
                    slot = rows[dbrcode] = sg.allocate(dbrcode)
                addr, size, members = slot
                status = sg_get(
                    gid, _DBR_ARGS[dbrcode - 14], _ONE, chan.carg, ptr(addr + len(members) * size)
                )
                if status == ECA_NORMAL:
                    members.append(idx)
                    sentinel = chan
                    issued += 1
                else:
                    why = f"ca_sg_array_get: {self.message(status)}"
                    failed.append((key, Failed(f"{name}: {why}")))
                continue
            else:
                status = queue_get(dbrcode, count, chan.chid, cb, base | idx)
            if status != ECA_NORMAL:
                failed.append(
                    (key, Failed(f"{name}: ca_array_get_callback: {self.message(status)}"))
                )
                continue
            issued += 1
        if sg is not None:
            state.sg = sg
            if sentinel is None:  # every group read failed to queue
                self._settle_sg(state, "not read")
            else:
                # One more read, with a callback, behind the group's on the same circuit:
                # its reply tells that the group's replies are in (see _SyncGroup).
                status = queue_get(sentinel.native, 1, sentinel.chid, self._sentinel_cb, batch_no)
                if status != ECA_NORMAL:
                    self._wait_sg_thread(state)  # no sentinel will come: wait elsewhere
        if issued:
            self.lib.ca_flush_io()
        for key, outcome in failed:
            state.settle(key, outcome)
        return state

    def _new_sync_group(self, n: int, deadline: float | None) -> _SyncGroup:
        gid = ctypes.c_uint()
        status = self.sg_create(ctypes.byref(gid))
        if status != ECA_NORMAL:
            raise CaError(f"ca_sg_create failed: {self.message(status)}")
        return _SyncGroup(gid.value, n, time.monotonic() + 10.0 if deadline is None else deadline)

    def _on_sentinel(self, args: _EventArgs) -> None:
        _pin_thread_state()
        try:
            state = self._gets.get(args.usr or 0)
            if state is not None:
                self._finish_sg(state)
        except Exception:
            logger.exception("beampipe_ca sync group completion failed")

    def _finish_sg(self, state: _GetBatch) -> None:
        """The sentinel's reply is in: decode the group, or wait for it elsewhere if not done."""
        sg = state.sg
        if sg is None or sg.gid < 0:
            return
        if self.sg_test(sg.gid) != ECA_IODONE:  # a server that answers out of order
            self._wait_sg_thread(state)
            return
        # Decoded here, on libca's thread, not handed to the loop that issued the batch
        # (measured 1-5% quicker there): the batch may hold other callers' keys, and that
        # loop may have stopped by now, which would leave them waiting for nothing.
        self._settle_sg(state, "no reply (disconnected)")

    def _wait_sg_thread(self, state: _GetBatch) -> None:
        def wait() -> None:
            with self._lock:
                sg = state.sg
                if sg is None or sg.gid < 0:
                    return  # given up on meanwhile
                sg.blocked = True  # _give_up must not delete it under ca_sg_block
            self.attach()
            status = self.lib.ca_sg_block(sg.gid, max(1e-3, sg.deadline - time.monotonic()))
            why = "timed out" if status == ECA_TIMEOUT else "disconnected"
            self._settle_sg(state, f"no reply ({why})")

        threading.Thread(target=wait, name="beampipe-ca-sg", daemon=True).start()

    def _settle_sg(self, state: _GetBatch, why: str) -> None:
        """Decode the group's records (columns by numpy, in one go) and count them settled."""
        sg = state.sg
        if sg is None:
            return  # given up on meanwhile
        state.sg = None
        settled = 0
        try:
            keys, decoders, results = state.keys, state.decoders, state.results
            for dbrcode, members in sg.members.items():
                records = sg.records[dbrcode]
                base, size = records.ctypes.data, records.itemsize
                used = records[: len(members)]
                columns = zip(
                    members,
                    used["value"].tolist(),
                    used["status"].tolist(),
                    used["severity"].tolist(),
                    used["secs"].tolist(),
                    used["nsec"].tolist(),
                    strict=True,
                )
                for row, (idx, value, status, severity, secs, nsec) in enumerate(columns):
                    key = keys[idx]
                    if severity == -1:
                        name = key if isinstance(key, str) else key[0]
                        results[key] = Failed(f"{name}: {why}")
                        continue
                    decode = decoders[idx]
                    try:
                        if isinstance(decode, _AugScalar):
                            results[key] = Ok(decode.fields(value, status, severity, secs, nsec))
                        else:
                            results[key] = Ok(decode(base + row * size, dbrcode, 1))
                    except Exception as exc:  # noqa: BLE001 - a bad reply fails its PV alone
                        results[key] = Failed(f"{key}: could not decode the reply: {exc!r}")
                settled += len(members)
        finally:
            self._drop_sg(sg)
            state.settled(settled)

    def _drop_sg(self, sg: _SyncGroup) -> None:
        """Delete the group once: it cancels what is outstanding, so libca writes no more."""
        with self._lock:
            if sg.gid < 0:
                return
            gid, sg.gid = sg.gid, -1
        self.sg_delete(gid)

    def _give_up(self, state: _GetBatch, timeout: float) -> dict[Any, Outcome[Any]]:
        for batch_no, found in list(self._gets.items()):
            if found is state:
                self._gets.pop(batch_no, None)
        sg = state.sg
        if sg is not None and not sg.blocked:
            # No sentinel will find the batch now: stop libca writing into its records.
            # (A blocked wait deletes its group itself, by its deadline.)
            state.sg = None
            self._drop_sg(sg)
        results = dict(state.results)
        for key in state.keys:
            if key not in results:
                name = key if isinstance(key, str) else key[0]
                results[key] = Failed(f"{name}: timed out after {timeout:g} s")
        return results

    def _changed(self) -> None:
        """A channel connected, disconnected or went: plans made before this are stale."""
        with self._epoch_lock:
            self.epoch += 1

    def plan(self, names: list[str]) -> _BulkPlan:
        """The :class:`_BulkPlan` for ``names``, made afresh if a connection changed since."""
        key = tuple(names)
        found = self._plans.get(key)
        if found is not None and found.epoch == self.epoch:
            return found
        epoch = self.epoch  # read first: a change while planning leaves the plan stale
        by_type: dict[int, list[Channel]] = {}
        arrays: list[Channel] = []
        rest: list[str] = []
        get = self._channels.get
        for name in names:
            chan = get(name)
            if chan is None:
                rest.append(name)
            elif chan.copyable:
                by_type.setdefault(chan.native, []).append(chan)
            elif chan.up and chan.count > 1 and 0 < chan.native < 7 and type(chan) is Channel:
                arrays.append(chan)
            else:
                rest.append(name)
        runs = []
        for native, chans in by_type.items():
            records = np.zeros(len(chans), _TIME_DTYPES[native])
            base, size = records.ctypes.data, records.itemsize
            calls = [(c.carg, ctypes.c_void_p(base + i * size)) for i, c in enumerate(chans)]
            runs.append(_ScalarRun(native, chans, [c.name for c in chans], records, calls))
        ready = not rest and all(
            c.pinned for c in itertools.chain(arrays, *(r.chans for r in runs))
        )
        found = _BulkPlan(epoch, runs, arrays, rest, ready)
        if len(self._plans) >= 64:
            self._plans.clear()
        self._plans[key] = found
        return found

    def read_time_now(
        self, names: list[str], timeout: float, *, readings: bool = True
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Fresh DBR_TIME readings of many PVs: scalars by ``ca_pend_io``, arrays by callbacks.

        A connected scalar is fetched with ``ca_array_get`` straight into a
        record array and the whole set is awaited with one ``ca_pend_io``: no
        Python runs per reply, which is what a bulk read of many scalars is
        made of.  Each slot's severity starts as -1, a value no IOC sends,
        so a slot the reply never filled is told apart and fails alone.
        Numeric arrays need a callback (their length, NORD, is only known in
        the reply), which copies the reply aside and views its value as a numpy
        array while later replies are still on the wire (:class:`_ArrayBatch`).
        Only for Python threads: libca forbids ``ca_pend_io`` on its own
        callback threads, where everything takes the general callback path.
        """
        if isinstance(threading.current_thread(), threading._DummyThread):
            return _split(self.read_now(names, timeout, self.io.plans["time"]), readings)
        plan = self.plan(names)
        runs, arrays, rest = plan.runs, plan.arrays, plan.rest
        if not runs and not arrays:
            return _split(self.read_now(rest, timeout, self.io.plans["time"]), readings)
        deadline = time.monotonic() + timeout
        done = threading.Event()
        state = (
            self._issue(rest, lambda _r: done.set(), self.io.plans["time"], deadline)
            if rest
            else None
        )
        # Arrays first: theirs are the longest replies.
        array_batch = self._issue_arrays(arrays) if arrays else None
        ok: dict[str, Any] = {}
        failed: dict[str, str] = {}

        # One numpy record array per native type, laid out exactly as DBR_TIME_<type>:
        # libca writes each reply into its record, numpy decodes them all at once.
        decoded: list[tuple[int, list[str], list[Any], list[int], Any]] = []
        pend = ECA_NORMAL
        if runs:
            if self._pend_lock.acquire(blocking=False):
                try:
                    pend = self._scalars_by_pend_io(runs, deadline, readings, failed, decoded)
                finally:
                    self._pend_lock.release()
            else:
                # ca_pend_io waits for every ca_array_get in the context, so while another
                # thread's bulk read is in it (perhaps waiting out a hung IOC), this one
                # takes a sync group of its own: it waits for its own replies only.
                pend = self._scalars_by_sync_group(runs, deadline, readings, failed, decoded)
        why = "timed out" if pend == ECA_TIMEOUT else self.message(pend)
        for native, run_names, values, severities, header in decoded:
            if native == 0:
                values = [v.decode(errors="replace") for v in values]
            if -1 not in severities and not readings:
                ok.update(zip(run_names, values, strict=True))
                continue
            statuses: list[int] = [0] * len(run_names)
            stamps: list[float] = [0.0] * len(run_names)
            if header is not None:
                statuses = header["status"].tolist()
                stamps = (header["secs"] + float(EPICS_EPOCH) + header["nsec"] * 1e-9).tolist()
            for name, value, stamp, severity, status in zip(
                run_names, values, stamps, severities, statuses, strict=True
            ):
                if severity != -1:
                    ok[name] = Reading(value, stamp, severity, status) if readings else value
                elif name not in failed:
                    failed[name] = f"{name}: no reply ({why})"
        if array_batch is not None:
            self._finish_arrays(arrays, *array_batch, deadline, timeout, readings, ok, failed)
        if state is not None:
            if done.wait(max(0.0, deadline - time.monotonic())):
                results = state.results
            else:
                results = self._give_up(state, timeout)
            more_ok, more_failed = _split(results, readings)
            ok.update(more_ok)
            failed.update(more_failed)
        return ok, failed

    def _scalars_by_pend_io(
        self,
        runs: list[_ScalarRun],
        deadline: float,
        readings: bool,
        failed: dict[str, str],
        decoded: list[tuple[int, list[str], list[Any], list[int], Any]],
    ) -> int:
        """``ca_array_get`` x N into the plan's records and one ``ca_pend_io`` (hold _pend_lock)."""
        self.attach()
        with self._lock:  # (the counter other threads bump too: += is not atomic)
            self.batches_issued += 1
        get, one = self.queue_get_ready, _ONE
        for run in runs:
            run.records["severity"].fill(-1)  # a value no IOC sends: "no reply landed here"
            dbrcode = _DBR_ARGS[run.native]
            for i, (chid, addr) in enumerate(run.calls):
                status = get(dbrcode, one, chid, addr)
                if status != ECA_NORMAL:
                    name = run.names[i]
                    failed[name] = f"{name}: ca_array_get: {self.message(status)}"
        if self.spin:
            self.lib.ca_flush_io()
            test = self.test_io
            self._spin_until(lambda: test() == ECA_IODONE, deadline)
        pend: int = self.lib.ca_pend_io(max(1e-3, deadline - time.monotonic()))
        for run in runs:
            decoded.append(_columns(run.native, run.names, run.records, readings))
        return pend

    def _scalars_by_sync_group(
        self,
        runs: list[_ScalarRun],
        deadline: float,
        readings: bool,
        failed: dict[str, str],
        decoded: list[tuple[int, list[str], list[Any], list[int], Any]],
    ) -> int:
        """The same through a sync group of this call's own and ``ca_sg_block``."""
        self.attach()
        with self._lock:
            self.batches_issued += 1
        sg = self._new_sync_group(max(len(run.chans) for run in runs), deadline)
        sg_get, gid, ptr = self.sg_get_ready, ctypes.c_uint(sg.gid), ctypes.c_void_p
        try:
            for run in runs:
                addr, size, _members = sg.allocate(run.native + 14)
                dbrcode = _DBR_ARGS[run.native]
                for i, chan in enumerate(run.chans):
                    status = sg_get(gid, dbrcode, _ONE, chan.carg, ptr(addr + i * size))
                    if status != ECA_NORMAL:
                        why = f"ca_sg_array_get: {self.message(status)}"
                        failed[chan.name] = f"{chan.name}: {why}"
            # (flushes the requests, then waits with the GIL released)
            status = self.lib.ca_sg_block(sg.gid, max(1e-3, deadline - time.monotonic()))
        finally:
            self._drop_sg(sg)  # cancels what is left: libca writes no more into the records
        for run in runs:
            records = sg.records[run.native + 14][: len(run.chans)]
            decoded.append(_columns(run.native, run.names, records, readings))
        return ECA_TIMEOUT if status == ECA_TIMEOUT else ECA_NORMAL

    def _spin_until(self, done: Callable[[], bool], deadline: float) -> None:
        """Poll ``done`` for up to ``self.spin`` s (not past ``deadline``), yielding in between.

        A blocked thread's wake-up is tens of microseconds on a VM, a sixth of a
        100-scalar read over loopback (measured 215 -> 180 us); replies that take
        longer than the budget are slept for as before.  ``os.sched_yield`` lets
        the GIL and the CPU go on every poll.
        """
        end = min(time.monotonic() + self.spin, deadline)
        while not done() and time.monotonic() < end:
            os.sched_yield()

    def _issue_arrays(self, chans: list[Channel]) -> tuple[int, _ArrayBatch]:
        """One ``ca_array_get_callback`` of NORD elements per array PV, and one flush."""
        if len(chans) > _MAX_KEYS:
            raise CaError(f"at most {_MAX_KEYS} PVs per batch, got {len(chans)}")
        self.attach()
        with self._lock:
            self._batch_no = batch_no = (self._batch_no + 1) & 0xFFFFFFFF
            self.batches_issued += 1
        layout = _TIME_LAYOUT
        state = _ArrayBatch([(layout[chan.native][0], layout[chan.native][1]) for chan in chans])
        self._array_gets[batch_no] = state
        base = batch_no << 24
        queue_get, cb, dbrcodes = self.queue_get_cb_ready, self._array_cb_arg, _DBR_ARGS
        usr = ctypes.c_void_p
        for idx, chan in enumerate(chans):
            # Count 0: the server sends NORD elements, so a shortened waveform is not
            # padded with zeros that would pass for data.
            status = queue_get(dbrcodes[chan.native], _ZERO, chan.carg, cb, usr(base | idx))
            if status != ECA_NORMAL:
                state.statuses[idx] = status
                if next(state.counter) == state.total:
                    state.done.set()
        self.lib.ca_flush_io()
        return batch_no, state

    def _finish_arrays(
        self,
        chans: list[Channel],
        batch_no: int,
        state: _ArrayBatch,
        deadline: float,
        timeout: float,
        readings: bool,
        ok: dict[str, Any],
        failed: dict[str, str],
    ) -> None:
        """Wait for an array batch and turn its copied replies into numpy arrays."""
        # (No polling here: a poller would take the CPU and the GIL from the callbacks.)
        state.done.wait(max(0.0, deadline - time.monotonic()))
        # Replies after this are dropped by the callback (it no longer finds the batch).
        self._array_gets.pop(batch_no, None)
        unpack = _TIME_HEADER.unpack_from
        for chan, got, status in zip(chans, state.replies, state.statuses, strict=True):
            if got is None:
                why = (
                    self.message(status)
                    if status != ECA_NORMAL
                    else f"no reply (timed out after {timeout:g} s)"
                )
                failed[chan.name] = f"{chan.name}: {why}"
            elif readings:
                value, reply = got
                status_, severity, secs, nsec = unpack(reply)
                ok[chan.name] = Reading(value, secs + EPICS_EPOCH + nsec * 1e-9, severity, status_)
            else:
                ok[chan.name] = got[0]

    def read_now(
        self,
        keys: list[Any],
        timeout: float,
        plan: Callable[[Channel, Any], tuple[int, int, Callable[..., Any]]],
    ) -> dict[Any, Outcome[Any]]:
        """Issue one batch for keys the caller already grouped, and wait for it.

        An explicit bulk call is a batch already: it skips the Coalescer's
        per-key futures, which would cost more than the wire time of the batch.
        """
        done = threading.Event()
        state = self._issue(keys, lambda _r: done.set(), plan, time.monotonic() + timeout)
        if not done.wait(timeout):
            return self._give_up(state, timeout)
        return state.results

    async def read_now_async(
        self,
        keys: list[Any],
        timeout: float,
        plan: Callable[[Channel, Any], tuple[int, int, Callable[..., Any]]],
    ) -> dict[Any, Outcome[Any]]:
        """:meth:`read_now` for a coroutine: one future for the whole batch."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def complete(_results: Mapping[Any, Outcome[Any]]) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_set_none, fut)

        state = self._issue(keys, complete, plan, time.monotonic() + timeout)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return self._give_up(state, timeout)
        return state.results

    def _on_array(self, args: _EventArgs) -> None:
        _pin_thread_state()
        try:
            usr = args.usr or 0
            state = self._array_gets.get(usr >> 24)
            if state is None:
                return  # given up on (timed out) before this reply came
            idx = usr & 0xFFFFFF
            status = args.status
            if status == ECA_NORMAL:
                count = args.count
                off, dtype = state.layouts[idx]
                # Sized from the reply itself: a waveform that grew across an IOC
                # reboot can not overrun it.
                # (copied without first zeroing a new buffer: from_buffer_copy)
                kind = ctypes.c_char * (off + count * dtype.itemsize)
                reply = kind.from_buffer_copy(kind.from_address(args.raw_dbr))
                # A view of the reply's own copy: writable, and it keeps only that copy alive.
                state.replies[idx] = (np.frombuffer(reply, dtype, count, off), reply)
            else:
                state.statuses[idx] = status
            if next(state.counter) == state.total:
                state.done.set()
        except Exception:
            logger.exception("beampipe_ca array get callback failed")

    def _on_get(self, args: _EventArgs) -> None:
        _pin_thread_state()
        try:
            usr = args.usr or 0
            state = self._gets.get(usr >> 24)
            if state is None:
                return
            idx = usr & 0xFFFFFF
            key = state.keys[idx]
            if args.status != ECA_NORMAL:
                name = key if isinstance(key, str) else key[0]
                outcome: Outcome[Any] = Failed(f"{name}: {self.message(args.status)}")
            else:
                try:
                    outcome = Ok(state.decoders[idx](args.raw_dbr, args.type, args.count))  # type: ignore[misc]
                except Exception as exc:  # noqa: BLE001 - a bad reply fails its PV alone
                    outcome = Failed(f"{key}: could not decode the reply: {exc!r}")
            state.settle(key, outcome)
        except Exception:
            logger.exception("beampipe_ca get callback failed")


def _split(
    results: Mapping[str, Outcome[Reading]], readings: bool
) -> tuple[dict[str, Any], dict[str, str]]:
    ok: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for name, outcome in results.items():
        if isinstance(outcome, Ok):
            ok[name] = outcome.value if readings else outcome.value.value
        else:
            failed[name] = outcome.reason
    return ok, failed


def _columns(
    native: int, names: list[str], records: np.ndarray[Any, Any], readings: bool
) -> tuple[int, list[str], list[Any], list[int], Any]:
    """A scalar record array's columns, copied out (the arrays may be reused at once)."""
    header = records[["status", "secs", "nsec"]].copy() if readings else None
    return native, names, records["value"].tolist(), records["severity"].tolist(), header


def _spin_budget() -> float:
    raw = os.environ.get("BEAMPIPE_CA_SPIN_US", "1000")
    try:
        micros = float(raw)
    except ValueError:
        raise CaError(
            f"BEAMPIPE_CA_SPIN_US must be a number of microseconds, got {raw!r}"
        ) from None
    if not 0 <= micros <= 1e6:
        raise CaError(f"BEAMPIPE_CA_SPIN_US must be between 0 and 1e6, got {raw!r}")
    return micros * 1e-6


def _libca_finalized() -> bool:
    """pyepics' atexit hook has run: its context and every channel in it are gone."""
    ca = sys.modules.get("epics.ca")
    return ca is not None and ca.libca is getattr(ca, "_LIBCA_FINALIZED", object())


def _adopted_key(name: str, chid: int) -> str:
    return f"{name} (chid {chid:#x})"


def _set_none(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# -- decoding --------------------------------------------------------------------------
def _decode_value(buf: bytes, native: int, count: int, scalar: bool, off: int) -> Any:
    _off, dtype, fmt = _TIME_LAYOUT[native]
    if native == 0:
        if scalar:
            return buf[off : off + MAX_STRING_SIZE].split(b"\0", 1)[0].decode(errors="replace")
        return [
            buf[o : o + MAX_STRING_SIZE].split(b"\0", 1)[0].decode(errors="replace")
            for o in range(off, off + count * MAX_STRING_SIZE, MAX_STRING_SIZE)
        ]
    if scalar:
        assert fmt is not None
        return struct.unpack_from(fmt, buf, off)[0]
    return np.frombuffer(buf, dtype, count, off).copy()


def make_time_decoder(native: int, scalar: bool) -> Callable[[int, int, int], Reading]:
    """A decoder of DBR_TIME_<native> replies into a :class:`Reading` with plain Python values."""
    off, dtype, _fmt = _TIME_LAYOUT[native]
    itemsize = dtype.itemsize
    unpack = _TIME_HEADER.unpack_from

    def decode(raw: int, _dbr: int, count: int) -> Reading:
        if not scalar and native != 0:
            # A view of libca's buffer, then one copy into a numpy array we own: no
            # intermediate bytes object (the array's .ctypes.data alone costs more).
            mem = (ctypes.c_char * (off + count * itemsize)).from_address(raw)
            status, severity, secs, nsec = unpack(mem)
            value: Any = np.frombuffer(memoryview(mem), dtype, count, off).copy()
        else:
            buf = ctypes.string_at(raw, off + count * itemsize)
            status, severity, secs, nsec = unpack(buf)
            value = _decode_value(buf, native, count, scalar, off)
        return Reading(value, secs + EPICS_EPOCH + nsec * 1e-9, severity, status)

    return decode


def make_ctrl_decoder(native: int) -> Callable[[int, int, int], dict[str, Any]]:
    """A decoder of DBR_CTRL_<native> (DBR_TIME_STRING for strings) into a metadata dict."""
    from epicscorelibs.ca import dbr

    def decode(raw: int, dbrcode: int, _count: int) -> dict[str, Any]:
        struct_type = dbr.DbrCodeToType[dbrcode]
        value = ctypes.cast(raw, ctypes.POINTER(struct_type))[0]
        sink = types.SimpleNamespace()
        value.copy_attributes(sink)  # epicscorelibs' own field names, as aioca reports them
        md: dict[str, Any] = vars(sink)
        if "enums" in md:
            md["enums"] = tuple(md["enums"])
        md.pop("raw_stamp", None)
        return md

    return decode


_CTRL_DECODERS: dict[int, Callable[[int, int, int], dict[str, Any]]] = {}


def _decode_stamp(raw: int, _dbr: int, _count: int) -> tuple[int, int, int, int]:
    """(status, severity, seconds past the POSIX epoch, nanoseconds) of a DBR_TIME_* reply."""
    status, severity, secs, nsec = _TIME_HEADER.unpack(ctypes.string_at(raw, 12))
    return status, severity, secs + EPICS_EPOCH, nsec


class _AugScalar:
    """epicscorelibs' decoding of one numeric DBR_TIME scalar, as aioca hands it to ophyd-async.

    The same ``ca_float``/``ca_int`` with the same attributes (a test holds the
    two side by side for every type), made from the fields a sync group's record
    array yields all at once (:meth:`fields`) instead of a ctypes cast per reply.
    """

    __slots__ = ("base", "count", "name", "scalar", "size", "unpack")

    def __init__(self, name: str, dbrcode: int, base: int, count: int) -> None:
        from epicscorelibs.ca import dbr

        self.name, self.base, self.count = name, base, count
        self.scalar = dbr.DbrCodeToType[dbrcode].scalar
        off, _dtype, fmt = _TIME_LAYOUT[dbrcode - 14]
        layout = struct.Struct(f"<hhII{off - 12}x{fmt.lstrip('<')}")  # type: ignore[union-attr]
        self.unpack, self.size = layout.unpack_from, layout.size

    def __call__(self, raw: int, _dbrcode: int, _count: int) -> Any:
        status, severity, secs, nsec, value = self.unpack(ctypes.string_at(raw, self.size))
        return self.fields(value, status, severity, secs, nsec)

    def fields(self, value: Any, status: int, severity: int, secs: int, nsec: int) -> Any:
        secs += EPICS_EPOCH  # (epicscorelibs' EPICS_epoch: the same number)
        result = self.scalar(value)
        # A new dict in one go: half the time of setting eight attributes.
        result.__dict__ = {
            "status": status,
            "severity": severity,
            "raw_stamp": (secs, nsec),
            "timestamp": round(secs + nsec * 1e-9, 6),
            "name": self.name,
            "ok": True,
            "element_count": self.count,
            "datatype": self.base,
        }
        return result


class _OaReading(_AugScalar):
    """A numeric DBR_TIME scalar decoded straight into the ophyd-async ``Reading`` dict.

    What ophyd-async's CA backend makes of aioca's value for a plain number
    signal (``converter.value``, the rounded time stamp, severities above
    INVALID as -1), without the augmented value in between: a ``Device.read()``
    of 200 signals spent 4.5 us per signal on that object and the dict after it.
    ``cast`` is what the converter applies to the number (``int``, ``bool``) or None.
    """

    __slots__ = ("cast",)

    def __init__(self, name: str, dbrcode: int, cast: Callable[[Any], Any] | None) -> None:
        super().__init__(name, dbrcode, dbrcode - 14, 1)
        self.cast = cast

    def fields(self, value: Any, status: int, severity: int, secs: int, nsec: int) -> Any:
        secs += EPICS_EPOCH
        return {
            "value": value if self.cast is None else self.cast(value),
            "timestamp": round(secs + nsec * 1e-9, 6),  # (epicscorelibs' own rounding)
            "alarm_severity": -1 if severity > 2 else severity,
        }


class _ReadIO:
    """The BatchIO the Coalescer drives: ops ``time``, ``ctrl``, ``aug`` (aioca), ``meta``,
    ``reading`` (ophyd-async readings of numeric scalars)."""

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.plans = {
            "time": self._plan_time,
            "ctrl": self._plan_ctrl,
            "aug": self._plan_aug,
            "meta": self._plan_meta,
            "reading": self._plan_reading,
        }

    def issue(
        self, batch: Batch[Any], complete: Callable[[Mapping[Any, Outcome[Any]]], None]
    ) -> None:
        self.ctx.issue_gets(batch, complete, self.plans[batch.op])

    def _cached(
        self, chan: Channel, what: Hashable, make: Callable[[], tuple[int, Callable[..., Any]]]
    ) -> tuple[int, Callable[..., Any]]:
        # Keyed on the connection generation: a PV whose type changed across an IOC
        # reboot gets a new decoder.
        cache_key = (chan.generation, what)
        found = chan.decoders.get(cache_key)
        if found is None:
            found = chan.decoders[cache_key] = make()
        return found

    def _plan_time(self, chan: Channel, _key: Any) -> tuple[int, int, Callable[..., Any]]:
        native, scalar = chan.native, chan.count == 1
        if native not in _TIME_LAYOUT:
            raise CaError(f"unsupported native DBF type {native}")
        dbrcode, decode = self._cached(
            chan, "time", lambda: (native + 14, make_time_decoder(native, scalar))
        )
        return dbrcode, 0 if chan.count > 1 else 1, decode

    def _plan_ctrl(self, chan: Channel, _key: Any) -> tuple[int, int, Callable[..., Any]]:
        native = chan.native
        dbrcode = 14 if native == 0 else native + 28
        _code, decode = self._cached(chan, "ctrl", lambda: (dbrcode, make_ctrl_decoder(native)))
        return dbrcode, 1, decode

    def _plan_meta(self, chan: Channel, key: Any) -> tuple[int, int, Callable[..., Any]]:
        """Keys ``(name, "time")`` and ``(name, "ctrl")``: the ophyd layer's metadata.

        The decoders depend on the native type alone, so they are made once per type,
        not once per channel (a Device connect meets 200 new channels of one type).
        """
        native = chan.native
        if native not in _TIME_LAYOUT:
            raise CaError(f"unsupported native DBF type {native}")
        if key[1] == "time":  # the stamp and alarm only: one element is enough
            return native + 14, 1, _decode_stamp
        decode = _CTRL_DECODERS.get(native)
        if decode is None:
            decode = _CTRL_DECODERS[native] = make_ctrl_decoder(native)
        return (14 if native == 0 else native + 28), 1, decode

    def _plan_aug(self, chan: Channel, key: Any) -> tuple[int, int, Callable[..., Any]]:
        # Written out (no closure, no import per call): ophyd-async's Device.read() plans
        # 200 of these in a row on its event loop.
        _name, datatype, fmt = key
        cache_key = (chan.generation, datatype, fmt)  # not a 2-tuple: no clash with _cached's
        found = chan.decoders.get(cache_key)
        if found is None:
            from epicscorelibs.ca import dbr

            dbrcode, decode = dbr.type_to_dbr(chan, datatype, fmt)
            if (
                15 <= dbrcode <= 20  # a numeric DBR_TIME scalar, asked for as a plain DBR type
                and chan.count == 1
                and datatype in (None, 1, 2, 3, 4, 5, 6)
                and not chan.name.endswith("$")  # (epicscorelibs reads those as strings)
            ):
                decode = _AugScalar(chan.name, dbrcode, dbrcode - 14, 1)
            found = chan.decoders[cache_key] = (dbrcode, 0, decode)
        return found

    def _plan_reading(self, chan: Channel, key: Any) -> tuple[int, int, Callable[..., Any]]:
        """Keys ``(name, DBR type to read, cast)``: a numeric scalar read as that type."""
        _name, native, cast = key
        cache_key = (chan.generation, "reading", native, cast)
        found = chan.decoders.get(cache_key)
        if found is None:
            if not (chan.count == 1 and 0 < native < 7 and native != 3):
                raise CaError(f"not a numeric scalar read as DBR type {native}")
            found = chan.decoders[cache_key] = (
                native + 14,
                1,
                _OaReading(chan.name, native + 14, cast),
            )
        return found


_context: _Context | None = None
_context_lock = threading.Lock()


def context() -> _Context:
    """The process-wide context, made on first use (cheap to import beampipe_ca)."""
    global _context
    if _context is None:
        with _context_lock:
            if _context is None:
                _context = _Context()
    return _context
