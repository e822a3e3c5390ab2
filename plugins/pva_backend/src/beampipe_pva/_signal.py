"""The ophyd-async backend for ``pva://`` signals, with reads and connects batched by beampipe.

It subclasses ophyd-async's own PvaSignalBackend so converters, metadata
projection (units, precision, limits, choices), alarm severity, puts and
monitors behave exactly as users know them; what changes is where values
come from.  connect(), get_value(), get_reading(), get_setpoint() and
get_datakey() go through the process-wide Coalescer, so an EpicsDevice of
200 signals connects with one burst of GETs instead of 200 awaits, and the
type check at connect names the PV, the field and both types.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from bluesky.protocols import Reading
from event_model import DataKey
from ophyd_async.core import (
    DEFAULT_TIMEOUT,
    NotConnectedError,
    SignalDatatypeT,
    Table,
    make_datakey,
)
from ophyd_async.epics.core import _p4p
from ophyd_async.epics.core._util import format_datatype

from beampipe import BatchedSignalBackend, Failed, unwrap

from ._decode import NTNDARRAY, NTTABLE, DecodeError, _table_columns, decode_ndarray
from ._wire import bulk_get_raw_async, get_raw_async

__all__ = ["PvaSignalBackend", "make_checked_converter"]


class _NDArrayConverter(_p4p.PvaNDArrayConverter[Any]):
    """ophyd-async's converter reshapes blindly; this one validates and decompresses."""

    def __init__(self, datatype: Any, pv: str) -> None:
        super().__init__(datatype)
        self.pv = pv

    def value(self, value: Any) -> Any:
        return decode_ndarray(value, self.pv).data


def _describe(value: Any) -> str:
    typeid = value.getID()
    try:
        spec = _p4p._get_specifier(value)
    except (KeyError, AttributeError, TypeError):
        spec = "?"
    inferred = _p4p._datatype_converter_from_typeid.get((typeid, spec))
    name = format_datatype(inferred[0]) if inferred else "unsupported"
    return f"{name} ({typeid or 'plain structure'}, type code {spec!r})"


def _check_table(pv: str, datatype: type, value: Any) -> None:
    expected = _table_columns(datatype)
    columns = value["value"].todict()
    if set(expected) != set(columns):
        raise TypeError(
            f"pva://{pv}: field 'value' has NTTable columns {sorted(columns)}, "
            f"but {datatype.__name__} wants {sorted(expected)}"
        )
    for name, dtype in expected.items():
        col = np.asarray(columns[name])
        if dtype is None:
            ok = col.dtype.kind in "OUS" or col.size == 0
            want = "str"
        else:
            ok = np.can_cast(col.dtype, dtype, "same_kind") or col.dtype == dtype
            want = str(dtype)
        if not ok:
            raise TypeError(
                f"pva://{pv}: field 'value.{name}' is {col.dtype}[], "
                f"but {datatype.__name__}.{name} wants {want}"
            )


def make_checked_converter(datatype: type | None, values: dict[str, Any]) -> _p4p.PvaConverter:
    """ophyd-async's converter choice, with errors that name PV, field and both types."""
    pv = next(iter(values))
    value = values[pv]
    typeid = value.getID()
    if "value" not in value:
        raise TypeError(
            f"pva://{pv}: has no field 'value' ({typeid or 'plain structure'}), "
            f"cannot read it as {format_datatype(datatype)}"
        )
    if typeid == NTTABLE and datatype is not None and issubclass(datatype, Table):
        _check_table(pv, datatype, value)
    try:
        converter = _p4p.make_converter(datatype, values)
    except KeyError as exc:
        raise TypeError(
            f"pva://{pv}: field 'value' is {_describe(value)}, which ophyd-async cannot map; "
            f"asked for {format_datatype(datatype)}"
        ) from exc
    except TypeError as exc:
        raise TypeError(
            f"pva://{pv}: field 'value' is {_describe(value)}, "
            f"but the signal asks for {format_datatype(datatype)} ({exc})"
        ) from exc
    if typeid == NTNDARRAY:
        try:
            decode_ndarray(value, pv)
        except DecodeError as exc:
            raise TypeError(str(exc)) from exc
        return _NDArrayConverter(converter.datatype, pv)
    return converter


class PvaSignalBackend(
    _p4p.PvaSignalBackend[SignalDatatypeT], BatchedSignalBackend[SignalDatatypeT]
):
    """ophyd-async's PVA backend with batched connect and reads (registered as ``beampipe-pva``)."""

    protocol: ClassVar[str] = "pva"
    #: How long a read waits for its batch; ophyd-async's get_* take no timeout.
    read_timeout: ClassVar[float] = DEFAULT_TIMEOUT

    def source(self, name: str, read: bool) -> str:
        return f"pva://{self.read_pv if read else self.write_pv}"

    async def connect(self, timeout: float) -> None:
        pvs = list(dict.fromkeys(p for p in (self.read_pv, self.write_pv) if p))
        if not pvs:
            raise NotConnectedError("pva signal has no PV name")
        outcomes = await bulk_get_raw_async(pvs, timeout)
        for pv in pvs:
            outcome = outcomes[pv]
            if isinstance(outcome, Failed):
                raise NotConnectedError(f"pva://{pv}: {outcome.reason}")
            self.initial_values[pv] = unwrap(outcome, pv, self.protocol)
        values = {self.read_pv: self.initial_values[self.read_pv]}
        values.update({pv: self.initial_values[pv] for pv in pvs})
        self.converter = make_checked_converter(self.datatype, values)

    async def _read(self, pv: str) -> Any:
        return unwrap(await get_raw_async(pv, self.read_timeout), pv, self.protocol)

    async def get_reading(self) -> Reading[SignalDatatypeT]:
        return self._make_reading(await self._read(self.read_pv))

    async def get_value(self) -> SignalDatatypeT:
        return self.converter.value(await self._read(self.read_pv))

    async def get_setpoint(self) -> SignalDatatypeT:
        return self.converter.value(await self._read(self.write_pv))

    async def get_datakey(self, source: str) -> DataKey:
        value = await self._read(self.read_pv)
        metadata = _p4p._metadata_from_value(self.converter.datatype, value)
        return make_datakey(self.converter.datatype, self.converter.value(value), source, metadata)
