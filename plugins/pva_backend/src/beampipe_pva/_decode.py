"""Normative-type decoding: a p4p ``Value`` (unwrapped, ``nt=False``) into plain Python and numpy.

p4p's own NT wrappers allocate a subclass per value and reshape NTNDArray
without checking that the dimensions fit the pixels; here an image whose
``dimension[]`` disagrees with its data is an error that names the PV, never
a silently wrong-shaped array.  Uncompressed pixel data stays zero-copy: the
numpy array is a view on p4p's buffer, so decoding costs a reshape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin

import numpy as np

__all__ = [
    "DecodeError",
    "Dimension",
    "NDArrayFrame",
    "decode",
    "decode_fields",
    "decode_ndarray",
    "decode_table",
    "nt_kind",
]

NTSCALAR = "epics:nt/NTScalar:1.0"
NTSCALARARRAY = "epics:nt/NTScalarArray:1.0"
NTENUM = "epics:nt/NTEnum:1.0"
NTTABLE = "epics:nt/NTTable:1.0"
NTNDARRAY = "epics:nt/NTNDArray:1.0"

#: areaDetector's NDDataType_t, which NDPluginCodec puts in ``codec.parameters``.
ND_DATA_TYPES: dict[int, np.dtype[Any]] = {
    0: np.dtype(np.int8),
    1: np.dtype(np.uint8),
    2: np.dtype(np.int16),
    3: np.dtype(np.uint16),
    4: np.dtype(np.int32),
    5: np.dtype(np.uint32),
    6: np.dtype(np.int64),
    7: np.dtype(np.uint64),
    8: np.dtype(np.float32),
    9: np.dtype(np.float64),
}


class DecodeError(ValueError):
    """A value that does not fit its normative type (e.g. an image whose dimensions lie)."""


@dataclass(frozen=True, slots=True)
class Dimension:
    """One NTNDArray ``dimension_t`` entry, in C order (slowest first) like the array's shape."""

    size: int
    offset: int = 0
    full_size: int = 0
    binning: int = 1
    reverse: bool = False


@dataclass(frozen=True, slots=True)
class NDArrayFrame:
    """One detector image: pixels in C order plus what areaDetector sent with them."""

    data: np.ndarray
    unique_id: int
    #: dataTimeStamp (when the detector took it), seconds since the epoch; 0.0 if unset.
    timestamp: float
    #: timeStamp of the PV update itself.
    update_timestamp: float
    attributes: dict[str, Any] = field(default_factory=dict)
    dims: tuple[Dimension, ...] = ()
    codec: str = ""
    alarm_severity: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.data.dtype


def nt_kind(value: Any) -> str:
    """The normative type id of a p4p Value ('' for a plain structure)."""
    return str(value.getID())


def _stamp(ts: Any) -> float:
    return float(ts["secondsPastEpoch"]) + float(ts["nanoseconds"]) * 1e-9


def decode(value: Any, pv: str = "?") -> Any:
    """A p4p Value as the Python a scan wants: scalar, array, choice string, columns, frame."""
    kind = nt_kind(value)
    if kind == NTNDARRAY:
        return decode_ndarray(value, pv)
    if kind == NTENUM:
        return decode_enum(value, pv)
    if kind == NTTABLE:
        return decode_table(value, pv=pv)
    try:
        return value["value"]
    except (KeyError, AttributeError) as exc:
        raise DecodeError(f"pva://{pv}: {kind or 'structure'} has no 'value' field") from exc


def decode_fields(desc: Any, fields: dict[str, Any], pv: str = "?") -> Any:
    """:func:`decode` for the native reader's parsed fields (a dict) and their type.

    Gives what :func:`decode` gives for the same PV read through p4p.  The
    reader hands over complete fields (delta replies merged into its previous
    copy), so a missing field is an error naming the PV, never a default.
    """
    kind = desc.id
    if "value" not in fields:
        have = "value" in desc
        raise DecodeError(
            f"pva://{pv}: {kind or 'structure'} "
            + ("reply holds no 'value'" if have else "has no 'value' field")
        )
    value = fields["value"]
    if kind == NTENUM:
        if not isinstance(value, dict) or "index" not in value or "choices" not in value:
            raise DecodeError(f"pva://{pv}: NTEnum value without index and choices: {value!r}")
        return _enum_choice(int(value["index"]), value["choices"], pv)
    if kind == NTTABLE:
        columns = [n for n, _ in desc["value"].fields]
        if not isinstance(value, dict) or list(value) != columns:
            got = list(value) if isinstance(value, dict) else value
            raise DecodeError(f"pva://{pv}: NTTable reply has columns {got}, not {columns}")
        return value
    if kind == NTNDARRAY:
        return decode(desc.p4p_value(fields), pv)
    return value


def _enum_choice(index: int, choices: Sequence[Any], pv: str) -> str:
    if not 0 <= index < len(choices):
        raise DecodeError(
            f"pva://{pv}: NTEnum index {index} is outside its "
            f"{len(choices)} choices {list(choices)}"
        )
    return str(choices[index])


def decode_enum(value: Any, pv: str = "?") -> str:
    return _enum_choice(int(value["value.index"]), value["value.choices"], pv)


def decode_table(value: Any, table_cls: type | None = None, pv: str = "?") -> Any:
    """NTTable columns as a dict, or as ``table_cls`` (an ophyd-async Table) typed from its fields.

    Columns are matched to the Table's annotations by name and cast to the
    annotated dtype, so an int32 column the server sent as int64 still builds
    the Table, while a missing or extra column is an error naming both sides.
    """
    columns = value["value"].todict()
    if table_cls is None:
        return columns
    expected = _table_columns(table_cls)
    if set(expected) != set(columns):
        raise DecodeError(
            f"pva://{pv}: NTTable columns {sorted(columns)} do not match "
            f"{table_cls.__name__} fields {sorted(expected)}"
        )
    kwargs: dict[str, Any] = {}
    for name, dtype in expected.items():
        col = columns[name]
        if dtype is None:
            kwargs[name] = [str(x) for x in col]
        else:
            kwargs[name] = np.asarray(col).astype(dtype, copy=False)
    return table_cls(**kwargs)


def _table_columns(table_cls: type) -> dict[str, np.dtype[Any] | None]:
    """Column name -> numpy dtype (None for a Sequence[str] column) from a Table's annotations."""
    from ophyd_async.core import get_dtype

    out: dict[str, np.dtype[Any] | None] = {}
    fields = getattr(table_cls, "model_fields", None)
    if not isinstance(fields, Mapping):
        raise TypeError(f"{table_cls!r} is not an ophyd-async Table (no model_fields)")
    for name, info in fields.items():
        annotation = info.annotation
        if get_origin(annotation) in (Sequence, list) and get_args(annotation) == (str,):
            out[name] = None
            continue
        try:
            out[name] = get_dtype(annotation)
        except TypeError as exc:
            raise TypeError(
                f"{table_cls.__name__}.{name}: column type {annotation} is neither "
                "Array1D[...] nor Sequence[str]"
            ) from exc
    return out


def decode_ndarray(value: Any, pv: str = "?") -> NDArrayFrame:
    """An NTNDArray as a C-ordered numpy array with its metadata, decompressing if needed."""
    raw = value["value"]
    dims = [
        Dimension(
            size=int(d["size"]),
            offset=int(d["offset"]),
            full_size=int(d["fullSize"]),
            binning=int(d["binning"]),
            reverse=bool(d["reverse"]),
        )
        for d in reversed(value["dimension"])
    ]
    shape = tuple(d.size for d in dims)
    codec = str(value["codec.name"] or "")
    if raw is None:
        raw = np.zeros((0,), dtype=np.uint8)
    if not isinstance(raw, np.ndarray):
        raise DecodeError(f"pva://{pv}: NTNDArray value is {type(raw).__name__}, not an array")
    if codec:
        raw = _decompress(value, raw, codec, shape, pv)
    expected = math.prod(shape) if shape else 0
    if any(s < 0 for s in shape) or raw.size != expected:
        raise DecodeError(
            f"pva://{pv}: NTNDArray dimensions {list(shape)} need {expected} elements "
            f"but the value holds {raw.size} {raw.dtype} elements"
        )
    data = raw.reshape(shape) if shape else raw
    attributes = {str(a["name"]): a["value"] for a in value["attribute"]}
    return NDArrayFrame(
        data=data,
        unique_id=int(value["uniqueId"]),
        timestamp=_stamp(value["dataTimeStamp"]),
        update_timestamp=_stamp(value["timeStamp"]),
        attributes=attributes,
        dims=tuple(dims),
        codec=codec,
        alarm_severity=int(value["alarm.severity"]),
    )


def _decompress(
    value: Any, raw: np.ndarray, codec: str, shape: tuple[int, ...], pv: str
) -> np.ndarray:
    params = value["codec.parameters"]
    try:
        dtype = ND_DATA_TYPES[int(params)]
    except (TypeError, ValueError, KeyError) as exc:
        raise DecodeError(
            f"pva://{pv}: {codec}-compressed NTNDArray has codec.parameters {params!r}, "
            "not an areaDetector NDDataType (0-9)"
        ) from exc
    nbytes = int(value["uncompressedSize"])
    need = math.prod(shape) * dtype.itemsize if shape else 0
    if nbytes != need:
        raise DecodeError(
            f"pva://{pv}: {codec} NTNDArray dimensions {list(shape)} of {dtype} need {need} "
            f"bytes but uncompressedSize is {nbytes}"
        )
    src = np.ascontiguousarray(raw).view(np.uint8)
    try:
        if codec == "lz4":
            import lz4.block

            out = np.frombuffer(lz4.block.decompress(src, uncompressed_size=nbytes), dtype=dtype)
        elif codec == "bslz4":
            import bitshuffle

            count = nbytes // dtype.itemsize
            src, block = _strip_bslz4_header(src, nbytes, dtype.itemsize)
            out = bitshuffle.decompress_lz4(src, (count,), dtype, block).reshape(-1)
        elif codec == "blosc":
            import blosc

            out = np.frombuffer(blosc.decompress(src.tobytes()), dtype=dtype)
        else:
            raise DecodeError(
                f"pva://{pv}: NTNDArray codec {codec!r} is not supported (lz4, bslz4, blosc are)"
            )
    except ImportError as exc:
        raise DecodeError(
            f"pva://{pv}: NTNDArray uses codec {codec!r} but {exc.name} is not installed; "
            "pip install 'beampipe-pva[codecs]'"
        ) from exc
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"pva://{pv}: {codec} decompression failed: {exc}") from exc
    if out.nbytes != nbytes:
        raise DecodeError(
            f"pva://{pv}: {codec} decompressed to {out.nbytes} bytes, uncompressedSize is {nbytes}"
        )
    return out


def _strip_bslz4_header(src: np.ndarray, nbytes: int, itemsize: int) -> tuple[np.ndarray, int]:
    """Drop the 12-byte HDF5-filter header (BE total size, BE block size) when present.

    ADCore's NDPluginCodec sends the bare bitshuffle stream, Dectris-style
    sources prepend the header; the total size identifies the latter.
    """
    if src.size >= 12 and int.from_bytes(src[:8].tobytes(), "big") == nbytes:
        return src[12:], int.from_bytes(src[8:12].tobytes(), "big") // itemsize
    return src, 0
