"""Batched pvAccess for ophyd and ophyd-async over p4p, with every NT type including NTNDArray as numpy.

``bulk_get``/``bulk_get_async`` read many PVs with one burst of GETs through
beampipe's Coalescer; :class:`PvaSignalBackend` is the ophyd-async backend
(entry point ``beampipe-pva``) whose reads share those batches.
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
    PvaGetIO,
    bulk_get,
    bulk_get_async,
    bulk_get_raw,
    bulk_get_raw_async,
    close_context,
    coalescer,
    raw_context,
)

__all__ = [
    "DecodeError",
    "Dimension",
    "NDArrayFrame",
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
    "raw_context",
]


def __getattr__(name: str) -> Any:
    # ophyd-async takes a second to import: only pay for it when the backend is wanted.
    if name == "PvaSignalBackend":
        from ._signal import PvaSignalBackend

        return PvaSignalBackend
    raise AttributeError(f"module 'beampipe_pva' has no attribute {name!r}")
