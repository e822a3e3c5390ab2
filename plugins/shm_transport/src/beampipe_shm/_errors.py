"""Errors, each naming the stream it is about, so a log line alone says what broke."""

from __future__ import annotations

__all__ = [
    "ControlRingFull",
    "FrameTooLarge",
    "LeaseLimitReached",
    "NameInUse",
    "ReaderLimitReached",
    "SchemaMismatch",
    "ShmError",
    "StreamNotFound",
]


class ShmError(Exception):
    """Base class of every beampipe-shm error."""


class StreamNotFound(ShmError, FileNotFoundError):
    """No live producer publishes this stream (never started, stopped, or crashed)."""


class NameInUse(ShmError, FileExistsError):
    """A live producer already publishes under this name."""


class FrameTooLarge(ShmError, ValueError):
    """A frame (or its attributes) does not fit the slot the schema sized."""


class SchemaMismatch(ShmError, ValueError):
    """The producer's schema is not the one the reader asked for, or data does not match it."""


class ReaderLimitReached(ShmError):
    """Every reader record of the segment is taken by a live reader."""


class LeaseLimitReached(ShmError):
    """The reader holds as many zero-copy frames as it may: release one first."""


class ControlRingFull(ShmError):
    """The producer has not drained this reader's control messages."""
