"""An ophyd control layer for ``pva://`` PVs (entry point ``ophyd.control_layers: beampipe-pva``).

ophyd's EpicsSignal talks to a pyepics-shaped PV object; this module gives it
one over pvAccess, so ``EpicsSignal("pva://IOC:x")`` reads, writes, monitors
and reports metadata under the same keys as on Channel Access: NT alarm,
timeStamp, display and control fields become status/severity/timestamp,
units/precision and the ctrl limits, an NTEnum becomes enum_strs plus an
index.  Explicit reads share the plugin's batched GETs; connection state
comes from one monitor per PV, which pvAccess needs anyway to notice a
server going away.  Callbacks run on ophyd's dispatcher threads, as with
pyepics and caproto.

Limits: pvAccess has no per-channel access-rights event in p4p, so read and
write access are reported as granted once connected; a denied put fails
with the server's error.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from beampipe import Failed, Ok

from ._decode import NTENUM, NTNDARRAY, NTTABLE, decode_ndarray, decode_table
from ._wire import bulk_get_raw, put_value, raw_context

__all__ = [
    "PvaPV",
    "caget",
    "caput",
    "get_dispatcher",
    "get_pv",
    "name",
    "protocols",
    "release_pvs",
    "setup",
    "shutdown",
    "thread_class",
]

logger = logging.getLogger("beampipe.pva.ophyd")

name = "beampipe-pva"
#: The schemes this layer serves; beampipe's routing layer sends ca:// and bare names elsewhere.
protocols = ("pva",)
thread_class = threading.Thread
_dispatcher: Any = None
_pvs: dict[str, PvaPV] = {}
_pvs_lock = threading.Lock()

_CA_STATUS = [
    "NO_ALARM",
    "READ",
    "WRITE",
    "HIHI",
    "HIGH",
    "LOLO",
    "LOW",
    "STATE",
    "COS",
    "COMM",
    "TIMEOUT",
    "HWLIMIT",
    "CALC",
    "SCAN",
    "LINK",
    "SOFT",
    "BAD_SUB",
    "UDF",
    "DISABLE",
    "SIMM",
    "READ_ACCESS",
    "WRITE_ACCESS",
]


def _wire_name(pvname: str) -> str:
    if pvname.startswith("ca://"):
        raise ValueError(
            f"{pvname}: the beampipe-pva control layer serves pva:// names; "
            "ca:// names belong to the CA layer"
        )
    return pvname.removeprefix("pva://")


def _status(alarm: Any) -> int:
    """PVA alarm -> CA alarm status: QSRV puts the CA status name in alarm.message."""
    message = str(alarm["message"]).upper()
    if message in _CA_STATUS:
        return _CA_STATUS.index(message)
    return 0 if int(alarm["severity"]) == 0 else _CA_STATUS.index("SOFT")


def metadata_from_value(value: Any, pvname: str, *, as_string: bool = False) -> dict[str, Any]:
    """A p4p Value as the dict pyepics' get_with_metadata returns, ctrl fields included."""
    typeid = value.getID()
    md: dict[str, Any] = {}
    if typeid == NTENUM:
        choices = [str(c) for c in value["value.choices"]]
        index = int(value["value.index"])
        md["enum_strs"] = tuple(choices)
        md["value"] = choices[index] if as_string and 0 <= index < len(choices) else index
    elif typeid == NTNDARRAY:
        md["value"] = decode_ndarray(value, pvname).data
    elif typeid == NTTABLE:
        md["value"] = decode_table(value, pv=pvname)
    else:
        v = value["value"]
        if as_string and not isinstance(v, str):
            if isinstance(v, np.ndarray) and v.dtype.kind in "iu":
                v = v.astype(np.uint8).tobytes().split(b"\0", 1)[0].decode(errors="replace")
            else:
                v = str(v)
        md["value"] = v
    if "alarm" in value:
        md["severity"] = int(value["alarm.severity"])
        md["status"] = _status(value["alarm"])
    if "timeStamp" in value:
        md["timestamp"] = float(value["timeStamp.secondsPastEpoch"]) + 1e-9 * float(
            value["timeStamp.nanoseconds"]
        )
        md["posixseconds"] = int(value["timeStamp.secondsPastEpoch"])
        md["nanoseconds"] = int(value["timeStamp.nanoseconds"])
    if "display" in value:
        display = value["display"]
        for key, field in (("units", "units"), ("precision", "precision")):
            if field in display:
                md[key] = display[field]
        if "limitLow" in display:
            md["lower_disp_limit"] = display["limitLow"]
            md["upper_disp_limit"] = display["limitHigh"]
    if "control" in value:
        md["lower_ctrl_limit"] = value["control.limitLow"]
        md["upper_ctrl_limit"] = value["control.limitHigh"]
    if "valueAlarm" in value:
        va = value["valueAlarm"]
        for key, field in (
            ("lower_alarm_limit", "lowAlarmLimit"),
            ("upper_alarm_limit", "highAlarmLimit"),
            ("lower_warning_limit", "lowWarningLimit"),
            ("upper_warning_limit", "highWarningLimit"),
        ):
            if field in va:
                md[key] = va[field]
    return md


def _wrap(event_type: str, callback: Callable[..., Any] | None) -> Callable[..., Any] | None:
    if callback is None or _dispatcher is None:
        return callback
    from ophyd._dispatch import wrap_callback

    return wrap_callback(_dispatcher, event_type, callback)


class PvaPV:
    """The pyepics-shaped PV ophyd's EpicsSignal drives, over pvAccess."""

    def __init__(
        self,
        pvname: str,
        *,
        form: str = "time",
        auto_monitor: bool | None = None,
        connection_callback: Callable[..., Any] | None = None,
        access_callback: Callable[..., Any] | None = None,
        callback: Callable[..., Any] | None = None,
        connection_timeout: float | None = None,
    ) -> None:
        self.pvname = pvname
        self.wire_name = _wire_name(pvname)
        self.form = form
        self.auto_monitor = bool(auto_monitor)
        self.connection_timeout = connection_timeout
        self.connected = False
        self._reference_count = 0
        self._lock = threading.RLock()
        self._connected_event = threading.Event()
        self._last: Any = None
        self._callbacks: dict[int, tuple[Callable[..., Any], bool]] = {}
        self._next_index = 0
        self.connection_callbacks: list[Callable[..., Any]] = []
        self.access_callbacks: list[Callable[..., Any]] = []
        if connection_callback is not None:
            self.connection_callbacks.append(_wrap("metadata", connection_callback))  # type: ignore[arg-type]
        if access_callback is not None:
            self.access_callbacks.append(_wrap("metadata", access_callback))  # type: ignore[arg-type]
        if callback is not None:
            self.add_callback(callback)
        self._sub: Any = raw_context().monitor(self.wire_name, self._on_event)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<PvaPV {self.pvname!r} {state}>"

    # -- events from pvxs (any thread) -----------------------------------------
    def _on_event(self) -> None:
        sub = self._sub
        for _ in range(64):  # bounded: the rest is handled at the next wake-up
            if sub is None:
                return
            item = sub.pop()
            if item is None:
                return
            if isinstance(item, Exception):
                self._set_connected(False, reason=f"{type(item).__name__}: {item}")
                continue
            self._last = item
            self._set_connected(True)
            self._run_callbacks(item)

    def _set_connected(self, conn: bool, reason: str = "") -> None:
        with self._lock:
            if conn == self.connected:
                return
            self.connected = conn
        if conn:
            self._connected_event.set()
        else:
            self._connected_event.clear()
            logger.info("%s disconnected: %s", self.pvname, reason)
        for cb in list(self.connection_callbacks):
            cb(pvname=self.pvname, conn=conn, pv=self)
        if conn:
            for cb in list(self.access_callbacks):
                cb(True, True, pv=self)

    def _run_callbacks(self, value: Any) -> None:
        with self._lock:
            callbacks = list(self._callbacks.values())
        if not callbacks:
            return
        try:
            md = metadata_from_value(value, self.wire_name)
            if md.get("enum_strs"):
                index = md["value"]
                md["char_value"] = md["enum_strs"][index]
        except ValueError:
            logger.warning("%s: update not decodable, dropped", self.pvname, exc_info=True)
            return
        for cb, _ctrl in callbacks:
            cb(pvname=self.pvname, **md)

    # -- pyepics API used by ophyd ---------------------------------------------
    def wait_for_connection(self, timeout: float | None = None) -> bool:
        return self._connected_event.wait(timeout if timeout is not None else 5.0)

    def get_with_metadata(
        self,
        count: int | None = None,
        as_string: bool = False,
        as_numpy: bool = True,
        timeout: float | None = None,
        with_ctrlvars: bool = False,
        use_monitor: bool = True,
        form: str | None = None,
    ) -> dict[str, Any] | None:
        value = self._last if (use_monitor and self.auto_monitor) else None
        if value is None:
            outcome = bulk_get_raw([self.wire_name], timeout or 5.0)[self.wire_name]
            if isinstance(outcome, Failed):
                logger.warning("%s not read: %s", self.pvname, outcome.reason)
                return None
            assert isinstance(outcome, Ok)
            value = outcome.value
        md = metadata_from_value(value, self.wire_name, as_string=as_string)
        if count is not None and isinstance(md["value"], np.ndarray):
            md["value"] = md["value"][:count]
        return md

    def get(self, **kwargs: Any) -> Any:
        md = self.get_with_metadata(**kwargs)
        return None if md is None else md["value"]

    def get_all_metadata_blocking(self, timeout: float) -> dict[str, Any]:
        md = self.get_with_metadata(timeout=timeout, use_monitor=False)
        if md is None:
            raise TimeoutError(f"{self.pvname}: no metadata within {timeout} s")
        md.pop("value", None)
        return md

    def get_all_metadata_callback(self, callback: Callable[..., Any], *, timeout: float) -> None:
        def task(pvname: str) -> None:
            callback(pvname, self.get_all_metadata_blocking(timeout))

        if _dispatcher is not None:
            _dispatcher.schedule_utility_task(task, pvname=self.pvname)
        else:
            task(self.pvname)

    def get_ctrlvars(self, timeout: float = 5.0, warn: bool = True) -> dict[str, Any]:
        return self.get_all_metadata_blocking(timeout)

    def get_timevars(self, timeout: float = 5.0, warn: bool = True) -> dict[str, Any]:
        return self.get_all_metadata_blocking(timeout)

    def put(
        self,
        value: Any,
        wait: bool = False,
        timeout: float | None = 30.0,
        use_complete: bool = False,
        callback: Callable[..., Any] | None = None,
        callback_data: Any = None,
    ) -> Any:
        done = _wrap("get_put", callback)

        def finished(error: Exception | None) -> None:
            if error is not None:
                logger.error("put to %s failed: %s", self.pvname, error)
            if done is not None:
                done(pvname=self.pvname, data=callback_data)

        blocking = wait or use_complete or callback is not None
        return put_value(
            self.wire_name,
            value,
            wait=wait,
            complete=blocking,
            timeout=timeout if timeout is not None else 315569520.0,
            on_done=finished,
        )

    def add_callback(
        self,
        callback: Callable[..., Any] | None = None,
        index: int | None = None,
        run_now: bool = False,
        with_ctrlvars: bool = True,
        **kw: Any,
    ) -> int | None:
        if callback is None:
            return None
        self.auto_monitor = True
        wrapped = _wrap("monitor", callback)
        assert wrapped is not None
        with self._lock:
            if index is None:
                index = self._next_index
                self._next_index += 1
            self._callbacks[index] = (wrapped, with_ctrlvars)
            last = self._last
        if run_now and last is not None:
            md = metadata_from_value(last, self.wire_name)
            wrapped(pvname=self.pvname, **md)
        return index

    def remove_callback(self, index: int) -> None:
        with self._lock:
            self._callbacks.pop(index, None)

    def clear_callbacks(self) -> None:
        with self._lock:
            self._callbacks.clear()
        self.connection_callbacks.clear()
        self.access_callbacks.clear()

    def clear_auto_monitor(self) -> None:
        self.auto_monitor = False

    def disconnect(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            sub.close()
        self.connected = False
        self._connected_event.clear()

    @property
    def timestamp(self) -> float | None:
        last = self._last
        if last is None or "timeStamp" not in last:
            return None
        return float(last["timeStamp.secondsPastEpoch"]) + 1e-9 * float(
            last["timeStamp.nanoseconds"]
        )

    @property
    def severity(self) -> int | None:
        last = self._last
        return None if last is None or "alarm" not in last else int(last["alarm.severity"])


# -- the shim module API ophyd copies -------------------------------------------
def get_pv(
    pvname: str,
    form: str = "time",
    connect: bool = False,
    context: Any = None,
    timeout: float = 5.0,
    connection_callback: Callable[..., Any] | None = None,
    access_callback: Callable[..., Any] | None = None,
    callback: Callable[..., Any] | None = None,
    auto_monitor: bool | None = None,
    **kwargs: Any,
) -> PvaPV:
    """A new PV object per call (ophyd reference-counts and releases them itself)."""
    if not isinstance(pvname, str) or not pvname.strip():
        raise ValueError(f"not a PV name: {pvname!r}")
    pv = PvaPV(
        pvname,
        form=form,
        auto_monitor=auto_monitor,
        connection_callback=connection_callback,
        access_callback=access_callback,
        callback=callback,
    )
    with _pvs_lock:
        _pvs[f"{pvname}#{id(pv)}"] = pv
    if connect:
        pv.wait_for_connection(timeout)
    return pv


def release_pvs(*pvs: PvaPV) -> None:
    for pv in pvs:
        pv._reference_count -= 1
        if pv._reference_count <= 0:
            pv.clear_callbacks()
            pv.disconnect()
            with _pvs_lock:
                _pvs.pop(f"{pv.pvname}#{id(pv)}", None)


def caget(pvname: str, as_string: bool = False, timeout: float = 5.0, **kwargs: Any) -> Any:
    """One fresh read; None (with the reason logged) if it failed, like pyepics."""
    wire = _wire_name(pvname)
    outcome = bulk_get_raw([wire], timeout)[wire]
    if isinstance(outcome, Failed):
        logger.warning("caget %s failed: %s", pvname, outcome.reason)
        return None
    assert isinstance(outcome, Ok)
    return metadata_from_value(outcome.value, wire, as_string=as_string)["value"]


def caput(pvname: str, value: Any, wait: bool = False, timeout: float = 60.0, **kwargs: Any) -> Any:
    return put_value(_wire_name(pvname), value, wait=wait, complete=wait, timeout=timeout)


def setup(logger: logging.Logger) -> Any:
    """Start ophyd's event dispatcher for this layer (once per session)."""
    global _dispatcher
    if _dispatcher is not None:
        return _dispatcher
    from ophyd._dispatch import EventDispatcher

    _dispatcher = EventDispatcher(context=None, logger=logger)
    atexit.register(shutdown)
    return _dispatcher


def shutdown() -> None:
    """Stop the dispatcher threads and close every PV this layer opened."""
    global _dispatcher
    with _pvs_lock:
        pvs = list(_pvs.values())
        _pvs.clear()
    for pv in pvs:
        pv.clear_callbacks()
        pv.disconnect()
    dispatcher, _dispatcher = _dispatcher, None
    if dispatcher is not None and dispatcher.is_alive():
        dispatcher.stop()


def get_dispatcher() -> Any:
    return _dispatcher
