"""Frames by reference: a recipe step names a beampipe_shm frame stream, not the pixels.

On the detector's host the RunEngine side publishes event frames into a
shared-memory stream (``beampipe_shm.FrameCallback``: frame id = event
``seq_num``, attrs carry the run uid) and the trigger carries only
``frame_stream``/``frame_id``/``run_uid``; ``BeampipeFrameAnalysis`` copies the
frame out of the ring.  A frame the ring has already overwritten is a clear
dead letter, a frame not yet published is waited for.

The beampipe_shm ring keeps the newest frames only (its slots exist for
concurrent leases, not for history), so this works while analysis keeps up with
acquisition; a burst faster than the services dead-letters the frames it lost.
Send the arrays themselves (``frame``) when every frame must be analysed.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

import numpy as np

from ._wire import MalformedMessage

__all__ = ["FrameNotReady", "ShmFrameSource"]


class FrameNotReady(TimeoutError):
    """The frame was not (yet) in the stream: worth a redelivery."""


class ShmFrameSource:
    """Copies one frame, by run and frame id, out of a beampipe_shm stream."""

    def __init__(self, wait: float = 5.0) -> None:
        self.wait = wait

    def get(self, stream: str, frame_id: int, run_uid: str | None, array: str | None) -> np.ndarray:
        try:
            shm: Any = importlib.import_module("beampipe_shm")
        except ImportError:
            raise MalformedMessage(
                f"frame_stream {stream!r} given but beampipe-shm is not installed here"
            ) from None
        try:
            reader = shm.Reader(stream, mode="every", copy=True, start="oldest", wait=self.wait)
        except shm.StreamNotFound:
            raise FrameNotReady(f"no frame stream {stream!r} on this host") from None
        try:
            deadline = time.monotonic() + self.wait
            newest: tuple[str | None, int] | None = None
            while True:
                frame = reader.read(timeout=max(0.0, deadline - time.monotonic()))
                if frame is None:
                    break
                run = frame.attrs.get("run")
                if frame.frame_id == frame_id and (run_uid is None or run == run_uid):
                    name = array or frame.names[0]
                    return np.array(frame[name])
                newest = (run, frame.frame_id)
                if run == run_uid and frame.frame_id > frame_id:
                    raise MalformedMessage(
                        f"frame {frame_id} of run {run_uid} is no longer in stream {stream!r} "
                        f"(the ring holds frame {frame.frame_id} now): analysis fell behind "
                        "acquisition; send the frames themselves if none may be lost"
                    )
            raise FrameNotReady(
                f"frame {frame_id} of run {run_uid} not in stream {stream!r} after "
                f"{self.wait:g} s (newest seen: {newest})"
            )
        finally:
            reader.close()
