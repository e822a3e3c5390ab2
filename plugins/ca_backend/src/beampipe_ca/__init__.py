"""Batched Channel Access for ophyd and ophyd-async, over epicscorelibs' libca.

Importing this package only points pyepics at epicscorelibs' libca (so the
process has one libca and one CA context); nothing touches the network until
the first call.
"""

from typing import Any

from ._bulk import (
    CaTimeoutError,
    bulk_get,
    bulk_get_async,
    bulk_read,
    bulk_read_async,
    caget,
    caget_async,
    connect,
    connect_async,
)
from ._libca import CaError, Reading, point_pyepics_at_epicscorelibs

point_pyepics_at_epicscorelibs()

# ophyd-async takes a second to import: only pay for it when its backend is wanted.
_ASYNC = {
    "CaSignalBackend",
    "ca_signal_r",
    "ca_signal_rw",
    "ca_signal_rw_rbv",
    "ca_signal_w",
    "ca_signal_x",
}


def __getattr__(name: str) -> Any:
    if name in _ASYNC:
        from . import _async

        return getattr(_async, name)
    raise AttributeError(f"module 'beampipe_ca' has no attribute {name!r}")


__all__ = [
    "CaError",
    "CaSignalBackend",
    "CaTimeoutError",
    "Reading",
    "bulk_get",
    "bulk_get_async",
    "bulk_read",
    "bulk_read_async",
    "ca_signal_r",
    "ca_signal_rw",
    "ca_signal_rw_rbv",
    "ca_signal_w",
    "ca_signal_x",
    "caget",
    "caget_async",
    "connect",
    "connect_async",
]
