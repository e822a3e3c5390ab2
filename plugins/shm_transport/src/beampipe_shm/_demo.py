"""Demo step "30-shm": the detector frames of a scan, streamed live to another process.

A simulated camera (an ophyd-async device) turns each reading of the IOC's
``det`` into a 256x256 image with a spot whose brightness follows it; every
image it produces goes through ``publish_signal`` into a beampipe-shm stream
and a consumer process, reading zero-copy in every-frame mode, reports what it
got.  The step fails if the consumer misses a frame or sees the peak anywhere
but where the IOC puts it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ._reader import Reader

__all__ = ["consume", "step"]

SHAPE = (256, 256)


def _spot(intensity: float) -> np.ndarray[Any, Any]:
    y, x = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    g = np.exp(-((x - 128.0) ** 2 + (y - 100.0) ** 2) / (2 * 12.0**2))
    return np.clip(g * max(intensity, 0.0) * 10, 0, 65535).astype(np.uint16)


def _camera(intensity: Callable[[], float]) -> Any:
    from ophyd_async.core import AsyncStatus, StandardReadable, soft_signal_r_and_setter

    class DemoCamera(StandardReadable):
        """Stands in for an areaDetector: one image per trigger."""

        def __init__(self, name: str = "") -> None:
            with self.add_children_as_readables():
                self.image, self._set_image = soft_signal_r_and_setter(
                    np.ndarray, np.zeros(SHAPE, np.uint16), units="counts"
                )
            super().__init__(name=name)

        @AsyncStatus.wrap
        async def trigger(self) -> None:
            self._set_image(_spot(intensity()))

    return DemoCamera(name="cam")


def step(ctx: Any) -> None:
    from bluesky.plans import scan
    from bluesky.run_engine import call_in_bluesky_event_loop
    from ophyd import EpicsSignal, EpicsSignalRO
    from ophyd_async.core import init_devices

    from ._integrations import publish_signal

    mot = EpicsSignal(ctx.ioc.pv("mot"), name="mot")
    det = EpicsSignalRO(ctx.ioc.pv("det"), name="det")
    mot.wait_for_connection(timeout=10)
    det.wait_for_connection(timeout=10)
    with init_devices():
        cam = _camera(lambda: float(det.get()))
    name = f"demo-{os.getpid()}"
    producer, publisher = call_in_bluesky_event_loop(publish_signal(cam.image, name))
    consumer = subprocess.Popen(
        [sys.executable, "-m", "beampipe_shm._demo", name],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert consumer.stdout is not None
        ready = json.loads(consumer.stdout.readline() or "{}")
        if ready.get("event") != "ready":
            raise SystemExit("demo failed: the shm consumer did not start")
        ctx.report(
            "shm",
            f"stream {name!r} ({SHAPE[0]}x{SHAPE[1]} uint16), consumer pid "
            f"{consumer.pid} reading zero-copy, every frame",
        )
        t0 = time.perf_counter()
        ctx.run_engine(scan([det, cam], mot, -3, 5, 9))
        elapsed = time.perf_counter() - t0
        call_in_bluesky_event_loop(_stop(publisher))
        producer.close()  # ends the consumer's iteration
        out, _ = consumer.communicate(timeout=30)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()
        producer.close()
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]
    frames = [x for x in lines if x.get("event") == "frame"]
    for f in frames:
        ctx.report(
            "shm",
            f"    frame {f['seq']}: sum {f['sum']:>10}  peak {f['max']:>5} at "
            f"{tuple(f['argmax'])}  {f['latency_us']:7.0f} us after publish",
        )
    summary: dict[str, Any] = next((x for x in lines if x.get("event") == "done"), {})
    ctx.report(
        "shm",
        f"scan of 9 points in {elapsed:.2f} s; producer published "
        f"{publisher.published}, consumer got {len(frames)}, missed {summary.get('missed')}",
    )
    if len(frames) != 9 or summary.get("missed") or publisher.failed:
        raise SystemExit("demo failed: the consumer did not get every frame of the scan")
    brightest = max(frames, key=lambda f: f["sum"])
    if brightest["seq"] != 5:  # mot = -3, -2, ..., 5: the 5th point is mot = 1.00
        raise SystemExit("demo failed: the brightest frame is not the one at the peak")
    ctx.report("shm", "brightest frame is point 5 (mot = 1.00), as the IOC's det says")
    ctx.results["shm_frames"] = len(frames)


async def _stop(publisher: Any) -> None:
    publisher.stop()


def consume(name: str) -> None:
    """The live consumer: every frame, zero-copy, one JSON line each."""
    r = Reader(name, mode="every", wait=10.0, start="oldest")
    print(json.dumps({"event": "ready"}), flush=True)
    missed = 0
    for f in r.frames(timeout=30):
        img = f[r.schema.names[0]]
        now = time.monotonic_ns()
        missed += f.missed
        print(
            json.dumps(
                {
                    "event": "frame",
                    "seq": f.seq,
                    "sum": int(img.sum(dtype=np.int64)),
                    "max": int(img.max()),
                    "argmax": [int(i) for i in np.unravel_index(int(img.argmax()), img.shape)],
                    "latency_us": (now - f.publish_ns) / 1e3,
                }
            ),
            flush=True,
        )
        f.release()
    print(json.dumps({"event": "done", "missed": missed, "frames": r.stats.frames}), flush=True)
    r.close()


if __name__ == "__main__":
    consume(sys.argv[1])
