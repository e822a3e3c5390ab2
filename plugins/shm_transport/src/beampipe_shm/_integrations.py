"""Get detector frames from ophyd-async and bluesky into a stream, with no glue code.

Two entry points, because frames reach Python two ways:

* ``SignalFramePublisher`` subscribes to any ophyd-async array signal (an
  NTNDArray monitor from the PVA plugin, an areaDetector ArrayData waveform, a
  soft signal) and publishes every update as a frame, with the signal's
  timestamp.  A value that is a frame object with an ndarray ``.data`` (such as
  an NTNDArray decoded to a frame) contributes that array, and its integer
  ``unique_id`` becomes the frame id.  It runs in the signal's callback, so
  frames go out as they arrive, whether or not a plan is reading the detector.
* ``FrameCallback`` is a RunEngine document callback: every event (and event
  page) that carries an array for its key becomes a frame, numbered by the
  event's ``seq_num`` and tagged with the run uid, so a live consumer sees
  exactly the frames of the scan.

Neither raises into ophyd-async's or bluesky's machinery: a frame that does not
fit the schema is logged and counted in ``.failed``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import ShmError
from ._layout import StreamSpec
from ._producer import Producer

if TYPE_CHECKING:
    from ophyd_async.core import SignalR

__all__ = ["FrameCallback", "SignalFramePublisher", "publish_frame", "publish_signal"]

log = logging.getLogger("beampipe_shm")


def _pixels(value: Any) -> np.ndarray[Any, Any]:
    """The array in a signal value: the value itself, or an NTNDArray-like frame's ``.data``."""
    if isinstance(value, np.ndarray):
        return value
    data = getattr(value, "data", None)
    return np.asarray(data if isinstance(data, np.ndarray) else value)


def publish_frame(
    producer: Producer,
    value: Any,
    *,
    stream: str | None = None,
    timestamp: float | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> int | None:
    """Publish one detector frame: an ndarray, or an NTNDArray-like frame object.

    A frame object (``beampipe_pva.NDArrayFrame`` from ``bulk_get`` or a monitor)
    gives its ``.data``; its integer ``unique_id`` becomes the frame id and its
    ``timestamp`` (the detector's dataTimeStamp) the frame timestamp unless
    ``timestamp`` is given, so a reader sees the detector's numbering, not ours.
    Returns the frame's sequence number, or None if every slot was leased (the
    drop is counted in ``producer.dropped``).  Raises what ``Producer.publish``
    raises (``SchemaMismatch``, ``FrameTooLarge``), naming the stream.
    """
    names = producer.schema.names
    if stream is None:
        if len(names) != 1:
            raise ValueError(f"stream {producer.name!r} has streams {names}: say which one")
        stream = names[0]
    uid = getattr(value, "unique_id", None)
    if timestamp is None:
        ts = getattr(value, "timestamp", None)
        timestamp = float(ts) if isinstance(ts, int | float) and ts else None
    return producer.publish(
        {stream: _pixels(value)},
        frame_id=uid if isinstance(uid, int) and not isinstance(uid, bool) else None,
        timestamp=timestamp,
        attrs=attrs or None,
    )


class SignalFramePublisher:
    """Publish each update of an ophyd-async array signal to a stream.

    ``start()`` subscribes and, like any ophyd-async subscription, must run in the
    signal's event loop (in a coroutine, or ``call_in_bluesky_event_loop``);
    ``stop()`` unsubscribes.  ``published`` counts frames that went out, ``failed``
    those that could not.
    """

    def __init__(
        self,
        signal: SignalR[Any],
        producer: Producer,
        stream: str | None = None,
        *,
        attrs: Mapping[str, Any] | None = None,
        skip_initial: bool = True,
    ) -> None:
        self.signal = signal
        self.producer = producer
        names = producer.schema.names
        if stream is None:
            if len(names) != 1:
                raise ValueError(
                    f"stream {producer.name!r} has streams {names}: say which one gets "
                    f"{signal.name!r}"
                )
            stream = names[0]
        if stream not in names:
            raise ValueError(f"stream {producer.name!r} has no array {stream!r} (has {names})")
        self.stream = stream
        self.attrs = dict(attrs or {})
        self.published = 0
        self.failed = 0
        self._skip = skip_initial
        self._started = False

    def _on_reading(self, readings: Mapping[str, Mapping[str, Any]]) -> None:
        if self._skip:  # ophyd-async replays the current value on subscribe
            self._skip = False
            return
        try:
            reading = readings[self.signal.name]
            publish_frame(
                self.producer,
                reading["value"],
                stream=self.stream,
                timestamp=float(reading.get("timestamp", 0.0)) or None,
                attrs=self.attrs,
            )
            self.published += 1
        except (ShmError, KeyError, ValueError, TypeError) as exc:
            self.failed += 1
            log.error(
                "stream %r: frame from %s not published: %s",
                self.producer.name,
                self.signal.name,
                exc,
            )

    def start(self) -> SignalFramePublisher:
        if not self._started:
            self._started = True
            self.signal.subscribe_reading(self._on_reading)
        return self

    def stop(self) -> None:
        if self._started:
            self._started = False
            self.signal.clear_sub(self._on_reading)

    def __enter__(self) -> SignalFramePublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def publish_signal(
    signal: SignalR[Any],
    name: str,
    *,
    units: str | None = None,
    slots: int = 4,
    max_readers: int = 16,
    attrs: Mapping[str, Any] | None = None,
) -> tuple[Producer, SignalFramePublisher]:
    """Create a stream shaped like ``signal``'s current value and start publishing it.

    The stream has one array named after the signal.  Returns the producer (close
    it when done) and the started publisher (``stop()`` it first).
    """
    value = _pixels(await signal.get_value())
    if value.dtype.hasobject or value.ndim == 0:
        raise ValueError(f"signal {signal.name!r} does not hold a numeric array: {value!r}")
    stream = signal.name or "data"
    if units is None:
        desc = (await signal.describe()).get(signal.name, {})
        units = str(desc.get("units") or "")
    spec = StreamSpec(stream, value.dtype, value.shape, units=units or "")
    producer = Producer(
        name,
        [spec],
        slots=slots,
        max_readers=max_readers,
        attrs={"source": signal.source, **(attrs or {})},
    )
    return producer, SignalFramePublisher(signal, producer, stream).start()


class FrameCallback:
    """A RunEngine callback: ``RE.subscribe(FrameCallback(producer, "det_image"))``.

    Events whose ``data`` holds ``key`` as an array are published with
    ``frame_id = seq_num`` and the run uid in the frame attributes.
    """

    def __init__(self, producer: Producer, key: str, stream: str | None = None) -> None:
        self.producer = producer
        self.key = key
        self.stream = stream or producer.schema.names[0]
        if self.stream not in producer.schema.names:
            raise ValueError(f"stream {producer.name!r} has no array {self.stream!r}")
        self.run_uid: str | None = None
        self.published = 0
        self.failed = 0

    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        if name == "start":
            self.run_uid = doc.get("uid")
        elif name == "event":
            self._publish(doc["data"], doc["seq_num"], doc.get("timestamps", {}))
        elif name == "event_page":
            data, ts = doc["data"], doc.get("timestamps", {})
            for i, seq in enumerate(doc["seq_num"]):
                self._publish(
                    {k: v[i] for k, v in data.items()},
                    seq,
                    {k: v[i] for k, v in ts.items()},
                )

    def _publish(self, data: Mapping[str, Any], seq_num: int, ts: Mapping[str, float]) -> None:
        if self.key not in data:
            return
        try:
            self.producer.publish(
                {self.stream: np.asarray(data[self.key])},
                frame_id=int(seq_num),
                timestamp=ts.get(self.key),
                attrs={"run": self.run_uid, "seq_num": int(seq_num)},
            )
            self.published += 1
        except (ShmError, ValueError, TypeError) as exc:
            self.failed += 1
            log.error(
                "stream %r: event %s of run %s not published: %s",
                self.producer.name,
                seq_num,
                self.run_uid,
                exc,
            )
