"""Demo step "20-pva": a detector image and a table over pvAccess, read through this backend.

The demo IOC has no areaDetector, so the step serves what one would: an
NTNDArray (bitshuffle-lz4 compressed if the codec is installed, as
NDPluginCodec sends it) and an NTTable from p4p's in-process Server, then
reads them, the IOC's own records over QSRV, and an ophyd-async signal,
all through beampipe-pva.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import numpy as np
from ophyd_async.core import Array1D, SignalR, Table

__all__ = ["Peaks", "step"]


class Peaks(Table):
    """What a peak-finder publishes as an NTTable, typed for ophyd-async."""

    x: Array1D[np.float64]
    y: Array1D[np.float64]
    height: Array1D[np.int32]


def _image() -> np.ndarray:
    """A 512x640 uint16 frame with a Gaussian spot, like a beam on a camera."""
    y, x = np.mgrid[0:512, 0:640]
    spot = 3000 * np.exp(-(((x - 400) ** 2) + ((y - 200) ** 2)) / (2 * 25.0**2))
    return (spot + 100).astype(np.uint16)


def _ndarray_value(image: np.ndarray) -> tuple[Any, str]:
    from p4p.nt import NTNDArray

    value = NTNDArray().wrap(image, attrib={"ColorMode": 0, "AcquireTime": 0.05})
    value["uniqueId"] = 1234
    now = time.time()
    value["dataTimeStamp.secondsPastEpoch"] = int(now)
    value["dataTimeStamp.nanoseconds"] = int((now % 1) * 1e9)
    try:
        import bitshuffle
    except ImportError:
        return value, "none"
    packed = bitshuffle.compress_lz4(image.reshape(-1)).view(np.uint8)
    value["value"] = ("ubyteValue", packed)
    value["codec.name"] = "bslz4"
    value["codec.parameters"] = 3  # NDUInt16
    value["compressedSize"] = packed.nbytes
    value["uncompressedSize"] = image.nbytes
    return value, "bslz4"


def step(ctx: Any) -> None:
    from p4p.nt import NTTable
    from p4p.server import Server
    from p4p.server.raw import SharedPV

    import beampipe_pva
    from beampipe_pva import NDArrayFrame, PvaSignalBackend

    image = _image()
    prefix = f"BPDEMO{secrets.token_hex(3).upper()}:"
    image_value, _codec = _ndarray_value(image)
    table_type = NTTable([("x", "d"), ("y", "d"), ("height", "i")])
    table_value = table_type.wrap([{"x": 400.0, "y": 200.0, "height": 3100}])
    server = Server(
        providers=[
            {
                prefix + "image1:ArrayData": SharedPV(initial=image_value),
                prefix + "peaks": SharedPV(initial=table_value),
            }
        ]
    )
    try:
        names = [
            prefix + "image1:ArrayData",
            prefix + "peaks",
            ctx.ioc.pv("mot"),
            ctx.ioc.pv("det"),
        ]
        t0 = time.perf_counter()
        values = beampipe_pva.bulk_get(names, timeout=5.0)
        elapsed = 1e3 * (time.perf_counter() - t0)
        missing = [n for n, v in values.items() if v is None]
        if missing:
            raise SystemExit(f"demo failed: beampipe-pva could not read {missing}")
        ctx.report("pva", f"bulk_get of {len(names)} PVs (2 servers) in {elapsed:.1f} ms")
        frame = values[names[0]]
        assert isinstance(frame, NDArrayFrame)
        if not np.array_equal(frame.data, image):
            raise SystemExit("demo failed: the decoded image differs from the one served")
        iy, ix = np.unravel_index(int(np.argmax(frame.data)), frame.shape)
        ctx.report(
            "pva",
            f"image uniqueId {frame.unique_id}: {frame.shape} {frame.dtype}, codec "
            f"{frame.codec or 'none'}, attributes {sorted(frame.attributes)}, "
            f"peak {int(frame.data.max())} at x={ix} y={iy}",
        )
        ctx.report("pva", f"QSRV mot = {values[names[2]]:.3f}, det = {values[names[3]]:.2f}")

        async def read_table() -> Peaks:
            peaks = SignalR(PvaSignalBackend(Peaks, names[1], names[1]), name="peaks")
            await peaks.connect(timeout=5)
            return await peaks.get_value()

        peaks = asyncio.run(read_table())
        ctx.report(
            "pva",
            f"NTTable as ophyd-async {type(peaks).__name__}: "
            + ", ".join(
                f"x={x:.0f} y={y:.0f} h={h}"
                for x, y, h in zip(peaks.x, peaks.y, peaks.height, strict=True)
            ),
        )
        ctx.results["pva_image_shape"] = frame.shape
        ctx.results["pva_peaks"] = len(peaks.x)
    finally:
        server.stop()
        beampipe_pva.close_context()
