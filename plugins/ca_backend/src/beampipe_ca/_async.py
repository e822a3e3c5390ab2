"""The ophyd-async side: ophyd-async's own CA backend with its reads and connects batched.

Subclassing ophyd-async's ``CaSignalBackend`` keeps everything users rely on
(its converters, datatype checks, enum handling, puts and monitors through
aioca) and replaces only the per-signal ``caget`` round trips: the initial
FORMAT_CTRL read at connect and every ``get_value``/``get_reading``/
``get_datakey`` go through beampipe's Coalescer, so a ``Device.connect`` or a
``gather`` over 200 signals is one wire batch.  The values are decoded by
epicscorelibs' own ``dbr`` code, exactly as aioca decodes them, so the
converters see the objects they were written for.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
from aioca import FORMAT_CTRL
from aioca.types import AugmentedValue, Format
from bluesky.protocols import Reading
from ophyd_async.core import (
    DEFAULT_TIMEOUT,
    NotConnectedError,
    SignalDatatypeT,
    SignalR,
    SignalRW,
    SignalW,
    SignalX,
)
from ophyd_async.epics.core import EpicsOptions
from ophyd_async.epics.core._aioca import (
    CaBoolConverter,
    CaConverter,
    CaIntConverter,
)
from ophyd_async.epics.core._aioca import CaSignalBackend as _AiocaSignalBackend

from beampipe import Failed, Ok, Outcome

from ._libca import Channel, context

__all__ = [
    "CaSignalBackend",
    "ca_signal_r",
    "ca_signal_rw",
    "ca_signal_rw_rbv",
    "ca_signal_w",
    "ca_signal_x",
]


def _value(outcome: Outcome[Any], pv: str) -> AugmentedValue:
    if isinstance(outcome, Ok):
        value: AugmentedValue = outcome.value
        return value
    assert isinstance(outcome, Failed)
    raise NotConnectedError(f"ca://{pv}: {outcome.reason}")


#: Converters whose ``value()`` of a numeric scalar is the number itself or one cast of it.
_CASTS: dict[type, Callable[[Any], Any] | None] = {
    CaConverter: None,
    CaIntConverter: int,
    CaBoolConverter: bool,
}


def _is_number(value: Any, expected: type) -> bool:
    allowed = int | np.integer if expected is int else int | float | np.integer | np.floating
    return isinstance(value, allowed) and not isinstance(value, bool | np.bool_)


class CaSignalBackend(_AiocaSignalBackend[SignalDatatypeT]):
    """ophyd-async's CA backend with connects and reads batched over the shared libca context."""

    protocol: ClassVar[str] = "ca"
    #: How long a read waits for a disconnected PV to come back before it raises
    #: (aioca would wait forever; a plan should fail with the PV's name instead).
    read_timeout: ClassVar[float] = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: format -> (channel, read key, coalescer) of the read PV, kept from its first read
        self._bp_reads: dict[Format, tuple[Channel, tuple[str, Any, Format], Any]] = {}
        #: (channel, "reading" key, coalescer, its native type at connect) of a number PV
        self._bp_reading: tuple[Channel, tuple[str, int, Any], Any, int] | None = None

    async def connect(self, timeout: float) -> None:
        # Attach this loop's thread to the shared context before aioca (puts, monitors)
        # first runs here, so aioca adopts it instead of making a second context.
        ctx = context()
        ctx.attach()
        self._bp_reads.clear()  # the converter, hence the read key, is made again
        self._bp_reading = None
        await super().connect(timeout)
        conv, pv = self.converter, self.read_pv
        read_dbr = int(conv.read_dbr)
        if (
            type(conv) in _CASTS
            and (type(conv) is not CaConverter or conv.datatype in (int, float))
            and read_dbr in (1, 2, 4, 5, 6)  # short, float, char, long, double
            and not pv.endswith("$")
        ):
            chan = ctx.channel(pv)
            if chan.up and chan.count == 1:
                key = (pv, read_dbr, _CASTS[type(conv)])
                self._bp_reading = (chan, key, ctx.reads, chan.native)

    async def get_reading(self) -> Reading[SignalDatatypeT]:
        # A Device.read() of plain number signals: the reading is made where the batch is
        # decoded (see _OaReading), so no augmented value is made for it.  Anything else,
        # or a channel down or of another native type since connect, takes ophyd-async's path.
        fast = self._bp_reading
        if fast is None or not fast[0].copyable or fast[0].native != fast[3]:
            return await super().get_reading()
        chan, key, reads, _native = fast
        outcome = await reads.get_async("reading", key, self.read_timeout, chan.host)
        # A copy: signals of one PV read in the same turn share one wire read.
        return dict(_value(outcome, key[0]))  # type: ignore[return-value]

    async def _read(self, pv: str, datatype: Any, fmt: Format, timeout: float) -> AugmentedValue:
        ctx = context()
        chan = ctx.channel(pv)
        if not chan.up and await ctx.wait_connected_async([chan], timeout):
            raise NotConnectedError(f"ca://{pv}: not connected within {timeout:g} s")
        key = (pv, datatype, fmt)
        return _value(await ctx.reads.get_async("aug", key, timeout, ctx.route(pv)), pv)

    async def _store_initial_value(self, pv: str, timeout: float) -> None:
        self.initial_values[pv] = await self._read(pv, None, FORMAT_CTRL, timeout)

    async def put(self, value: SignalDatatypeT | None) -> None:
        # ophyd-async hands numbers to aioca untyped, so a str sent to a float PV
        # goes out as DBR_STRING and the IOC may quietly ignore it: refuse it here.
        expected = self.converter.datatype
        if value is not None and expected in (int, float) and not _is_number(value, expected):
            raise TypeError(
                f"ca://{self.write_pv}: cannot put {value!r} ({type(value).__name__}) "
                f"to a {expected.__name__} signal"
            )
        await super().put(value)

    async def _caget(self, pv: str, format: Format) -> AugmentedValue:
        # Every get_value/get_reading lands here, 200 at a time in a Device.read():
        # the connected case is written out (no inner coroutine), and the read PV's
        # channel and key are kept per format (a channel is never replaced; the
        # converter, hence the key, only changes in connect(), which starts afresh).
        found = self._bp_reads.get(format) if pv == self.read_pv else None
        if found is None:
            ctx = context()
            chan, key, reads = ctx.channel(pv), (pv, self.converter.read_dbr, format), ctx.reads
            if pv == self.read_pv:
                self._bp_reads[format] = (chan, key, reads)
        else:
            chan, key, reads = found
        if not chan.up:
            return await self._read(pv, self.converter.read_dbr, format, self.read_timeout)
        outcome = await reads.get_async("aug", key, self.read_timeout, chan.host)
        return _value(outcome, pv)


def _backend(
    datatype: type[SignalDatatypeT] | None,
    read_pv: str,
    write_pv: str,
    options: EpicsOptions | None = None,
) -> CaSignalBackend[SignalDatatypeT]:
    pvs = []
    for pv in (read_pv, write_pv):
        if not isinstance(pv, str) or not pv:
            raise ValueError(f"PV name must be a non-empty str, got {pv!r}")
        scheme, sep, bare = pv.partition("://")
        if sep and scheme != "ca":
            raise ValueError(f"{pv}: beampipe-ca serves ca:// PVs only, not {scheme}://")
        pvs.append(bare if sep else pv)
    return CaSignalBackend(datatype, pvs[0], pvs[1], options)


def ca_signal_rw(
    datatype: type[SignalDatatypeT],
    read_pv: str,
    write_pv: str | None = None,
    name: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    attempts: int = 1,
    wait: bool | Callable[[SignalDatatypeT], bool] = True,
) -> SignalRW[SignalDatatypeT]:
    """``epics_signal_rw`` over beampipe-ca."""
    backend = _backend(datatype, read_pv, write_pv or read_pv, EpicsOptions(wait=wait))
    return SignalRW(backend, name=name, timeout=timeout, attempts=attempts)


def ca_signal_rw_rbv(
    datatype: type[SignalDatatypeT],
    write_pv: str,
    read_suffix: str = "_RBV",
    name: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    attempts: int = 1,
    wait: bool | Callable[[SignalDatatypeT], bool] = True,
) -> SignalRW[SignalDatatypeT]:
    """``epics_signal_rw_rbv`` over beampipe-ca (``X.FIELD`` reads back from ``X_RBV.FIELD``)."""
    base, dot, field = write_pv.partition(".")
    read_pv = f"{base}{read_suffix}.{field}" if dot else f"{write_pv}{read_suffix}"
    return ca_signal_rw(datatype, read_pv, write_pv, name, timeout, attempts, wait)


def ca_signal_r(
    datatype: type[SignalDatatypeT],
    read_pv: str,
    name: str = "",
    timeout: float = DEFAULT_TIMEOUT,
) -> SignalR[SignalDatatypeT]:
    """``epics_signal_r`` over beampipe-ca."""
    return SignalR(_backend(datatype, read_pv, read_pv), name=name, timeout=timeout)


def ca_signal_w(
    datatype: type[SignalDatatypeT],
    write_pv: str,
    name: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    attempts: int = 1,
    wait: bool | Callable[[SignalDatatypeT], bool] = True,
) -> SignalW[SignalDatatypeT]:
    """``epics_signal_w`` over beampipe-ca."""
    backend = _backend(datatype, write_pv, write_pv, EpicsOptions(wait=wait))
    return SignalW(backend, name=name, timeout=timeout, attempts=attempts)


def ca_signal_x(write_pv: str, name: str = "", timeout: float = DEFAULT_TIMEOUT) -> SignalX:
    """``epics_signal_x`` over beampipe-ca: triggering writes the PV's initial value back."""
    backend: CaSignalBackend[Any] = _backend(None, write_pv, write_pv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return SignalX(backend, name=name, timeout=timeout)
