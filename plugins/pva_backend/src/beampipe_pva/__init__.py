"""Batched pvAccess for ophyd and ophyd-async over p4p; every NT type, NTNDArray as numpy.

``bulk_get``/``bulk_get_async`` read many PVs with one burst of GETs through
beampipe's Coalescer (repeated reads re-execute a persistent GET per PV on a
native pvAccess read path, see ``native_state``); :class:`PvaSignalBackend`
is the ophyd-async backend (entry point ``beampipe-pva``) whose reads share
those batches.
"""

from __future__ import annotations

from typing import Any

from ._decode import (
    DecodeError,
    Dimension,
    NDArrayFrame,
    decode,
    decode_ndarray,
    decode_table,
)
from ._wire import (
    PutError,
    PvaGetIO,
    bulk_get,
    bulk_get_async,
    bulk_get_raw,
    bulk_get_raw_async,
    close_context,
    coalescer,
    native_state,
    put_value,
    raw_context,
)

__all__ = [
    "DecodeError",
    "Dimension",
    "NDArrayFrame",
    "PutError",
    "PvaGetIO",
    "PvaSignalBackend",
    "bulk_get",
    "bulk_get_async",
    "bulk_get_raw",
    "bulk_get_raw_async",
    "close_context",
    "coalescer",
    "decode",
    "decode_ndarray",
    "decode_table",
    "native_state",
    "put_value",
    "raw_context",
]


def __getattr__(name: str) -> Any:
    # ophyd-async takes a second to import: only pay for it when the backend is wanted.
    if name == "PvaSignalBackend":
        from ._signal import PvaSignalBackend

        return PvaSignalBackend
    raise AttributeError(f"module 'beampipe_pva' has no attribute {name!r}")
