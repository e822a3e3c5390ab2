"""ophyd-async / bluesky hooks and the demo step, against real signals, a real RunEngine and
(for the demo) the real IOC and a consumer process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from beampipe_shm import FrameCallback, Producer, Reader, StreamSpec, publish_signal


@pytest.fixture
def run_engine() -> Any:
    from bluesky import RunEngine

    return RunEngine({}, call_returns_result=False)


def camera(shape: tuple[int, ...]) -> Any:
    from ophyd_async.core import AsyncStatus, StandardReadable, soft_signal_r_and_setter

    class Cam(StandardReadable):
        def __init__(self, name: str = "") -> None:
            self.n = 0
            with self.add_children_as_readables():
                self.image, self._set = soft_signal_r_and_setter(
                    np.ndarray, np.zeros(shape, np.uint16), units="counts"
                )
            super().__init__(name=name)

        @AsyncStatus.wrap
        async def trigger(self) -> None:
            self.n += 1
            self._set(np.full(shape, self.n, np.uint16))

    return Cam


async def test_publish_signal_streams_every_update(shm_name: str) -> None:
    from ophyd_async.core import init_devices

    async with init_devices():
        cam = camera((32, 16))()
    producer, pub = await publish_signal(cam.image, shm_name, attrs={"beamline": "test"})
    try:
        assert producer.schema.streams[0].units == "counts"
        assert producer.schema.attrs["source"] == cam.image.source
        with Reader(shm_name, mode="every", copy=True, start="oldest") as r:
            for _ in range(3):
                await cam.trigger()
            frames = [r.read(timeout=1) for _ in range(3)]
            assert [int(f[cam.image.name][0, 0]) for f in frames if f] == [1, 2, 3]
            assert pub.published == 3
            assert pub.failed == 0
            # a value that does not fit the stream is logged and counted, not raised
            cam._set(np.zeros((4, 4), np.uint16))
            assert pub.failed == 1
            assert r.read(timeout=0) is None
    finally:
        pub.stop()
        producer.close()


def test_frame_callback_publishes_the_scan(shm_name: str, run_engine: Any) -> None:
    from bluesky.plans import count
    from bluesky.run_engine import call_in_bluesky_event_loop
    from ophyd_async.core import init_devices

    with init_devices():
        cam = camera((8, 8))()
    with (
        Producer(shm_name, [StreamSpec("image", "uint16", (8, 8))]) as p,
        Reader(shm_name, mode="every", copy=True) as r,
    ):
        cb = FrameCallback(p, cam.image.name)
        (uid,) = run_engine(count([cam], 4), cb)
        frames = [r.read(timeout=1) for _ in range(4)]
        assert [(f.frame_id, int(f["image"][0, 0])) for f in frames if f] == [
            (1, 1),
            (2, 2),
            (3, 3),
            (4, 4),
        ]
        assert all(f is not None and f.attrs["run"] == uid for f in frames)
        assert cb.failed == 0
    assert call_in_bluesky_event_loop(cam.image.get_value()).shape == (8, 8)


def test_demo_step_streams_the_scan_to_a_consumer(ioc_factory: Any, run_engine: Any) -> None:
    import beampipe
    from beampipe.demo import DemoContext
    from beampipe_shm._demo import step

    ioc = ioc_factory(Path(beampipe.__file__).with_name("demo.db"))
    ctx = DemoContext(ioc=ioc, run_engine=run_engine)
    step(ctx)
    assert ctx.results["shm_frames"] == 9
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"bp.demo-{os.getpid()}")]


def test_ntndarray_like_values_publish_their_pixels_and_unique_id(shm_name: str) -> None:
    """What the PVA plugin's NTNDArray frames look like to the hook: ``.data`` + ``.unique_id``."""
    from dataclasses import dataclass

    from beampipe_shm import SignalFramePublisher

    @dataclass
    class NDFrame:
        data: np.ndarray[Any, Any]
        unique_id: int

    class FakeSignal:  # only what the publisher touches: its name (no subscription here)
        name = "pva-image"

    with (
        Producer(shm_name, [StreamSpec("image", "uint8", (4, 4))]) as p,
        Reader(shm_name, mode="every", copy=True) as r,
    ):
        pub = SignalFramePublisher(FakeSignal(), p, skip_initial=False)  # type: ignore[arg-type]
        pub._on_reading({"pva-image": {"value": NDFrame(np.full((4, 4), 9, np.uint8), 4242)}})
        f = r.read(timeout=1)
        assert f is not None
        assert f.frame_id == 4242
        assert (f["image"] == 9).all()
        assert pub.published == 1
