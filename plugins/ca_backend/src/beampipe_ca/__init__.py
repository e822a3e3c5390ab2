"""Batched Channel Access for ophyd and ophyd-async, over epicscorelibs' libca.

Importing this package only points pyepics at epicscorelibs' libca (so the
process has one libca and one CA context); nothing touches the network until
the first call.
"""

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

__all__ = [
    "CaError",
    "CaTimeoutError",
    "Reading",
    "bulk_get",
    "bulk_get_async",
    "bulk_read",
    "bulk_read_async",
    "caget",
    "caget_async",
    "connect",
    "connect_async",
]
