"""Zero-copy shared-memory frame transport between processes on one host.

A :class:`Producer` declares named array streams (dtype, shape, units) and
writes frames straight into shared-memory slots; any number of :class:`Reader`
processes open the stream by name and get the newest frame (live view) or every
frame in order (analysis), as read-only zero-copy numpy views under a lease or
as copies.  The protocol (slots, sequence numbers, leases, recovery) is in
docs/shm_transport.md.
"""

from ._errors import (
    ControlRingFull,
    FrameTooLarge,
    LeaseLimitReached,
    NameInUse,
    ReaderLimitReached,
    SchemaMismatch,
    ShmError,
    StreamNotFound,
)
from ._inspect import ReaderInfo, StreamInfo, inspect, list_streams
from ._integrations import FrameCallback, SignalFramePublisher, publish_frame, publish_signal
from ._layout import Schema, StreamSpec
from ._producer import ControlMessage, Producer, WritableFrame
from ._reader import Frame, Reader, ReaderStats

__all__ = [
    "ControlMessage",
    "ControlRingFull",
    "Frame",
    "FrameCallback",
    "FrameTooLarge",
    "LeaseLimitReached",
    "NameInUse",
    "Producer",
    "Reader",
    "ReaderInfo",
    "ReaderLimitReached",
    "ReaderStats",
    "Schema",
    "SchemaMismatch",
    "ShmError",
    "SignalFramePublisher",
    "StreamInfo",
    "StreamNotFound",
    "StreamSpec",
    "WritableFrame",
    "inspect",
    "list_streams",
    "publish_frame",
    "publish_signal",
]

# --- broker-less workflows transport (docs/shm_workflows_transport.md) -------------------
# Imported lazily: ``import beampipe_shm`` must not pull in workflows (an optional extra).
_WORKFLOWS_EXPORTS = ("ShmStoreError", "ShmStoreFull", "ShmTransport", "ShmTransportNotConnected")
__all__ += _WORKFLOWS_EXPORTS


def __getattr__(name: str) -> object:
    if name in _WORKFLOWS_EXPORTS:
        from . import _workflows

        return getattr(_workflows, name)
    raise AttributeError(f"module 'beampipe_shm' has no attribute {name!r}")
