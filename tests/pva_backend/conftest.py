"""Real servers for the PVA backend tests: QSRV in a softIoc, and p4p's own in-process Server."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from p4p import Value
from p4p.nt import NTEnum, NTNDArray, NTScalar, NTTable
from p4p.server import Server
from p4p.server.raw import SharedPV

import beampipe_pva

DB = Path(__file__).with_name("pva_test.db")

TABLE_TYPE = NTTable([("name", "s"), ("x", "d"), ("count", "i")])
TABLE_ROWS = [
    {"name": "a", "x": 1.5, "count": 1},
    {"name": "b", "x": 2.5, "count": 2},
    {"name": "c", "x": -3.0, "count": 3},
]
IMAGE = (np.arange(48 * 64, dtype=np.uint16) * 7).reshape(48, 64)
ND_UINT16 = 3  # areaDetector NDDataType_t for NDUInt16


def ndarray_value(
    pixels: np.ndarray,
    *,
    unique_id: int = 1,
    dims: list[int] | None = None,
    codec: str = "",
    payload: np.ndarray | None = None,
    attributes: dict[str, Any] | None = None,
) -> Value:
    """An NTNDArray as areaDetector would send it; ``dims`` and ``payload`` may lie on purpose."""
    v = NTNDArray().wrap(pixels, attrib=attributes or {"ColorMode": 0})
    v["uniqueId"] = unique_id
    v["dataTimeStamp.secondsPastEpoch"] = 1_700_000_000
    v["dataTimeStamp.nanoseconds"] = 500_000_000
    if dims is not None:
        v["dimension"] = [
            {"size": n, "offset": 0, "fullSize": n, "binning": 1, "reverse": False}
            for n in reversed(dims)
        ]
    if codec:
        assert payload is not None
        v["value"] = ("ubyteValue", payload)
        v["codec.name"] = codec
        v["codec.parameters"] = ND_UINT16
        v["compressedSize"] = payload.nbytes
        v["uncompressedSize"] = pixels.nbytes
    return v


CODEC_MODULES = {"lz4": "lz4.block", "bslz4": "bitshuffle", "blosc": "blosc"}


def require_codec(codec: str) -> None:
    """The codec's package, or a skip (a failure under CI, where the extra must be installed)."""
    import importlib
    import os

    try:
        importlib.import_module(CODEC_MODULES[codec])
    except ImportError as exc:
        msg = f"{codec} codec needs {exc.name}: pip install 'beampipe-pva[codecs]'"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def compress(codec: str, pixels: np.ndarray) -> np.ndarray:
    data = np.ascontiguousarray(pixels)
    if codec == "lz4":
        import lz4.block

        return np.frombuffer(lz4.block.compress(data.tobytes(), store_size=False), np.uint8)
    if codec == "bslz4":
        import bitshuffle

        return bitshuffle.compress_lz4(data.reshape(-1)).view(np.uint8)
    if codec == "blosc":
        import blosc

        return np.frombuffer(blosc.compress(data.tobytes(), typesize=2), np.uint8)
    raise ValueError(codec)


class PvaServer:
    """p4p's Server with SharedPVs under a random prefix; ``pv(suffix)`` gives full names."""

    def __init__(self) -> None:
        self.prefix = f"BPS{secrets.token_hex(4).upper()}:"
        self.pvs: dict[str, SharedPV] = {}
        self.server: Server | None = None

    def pv(self, suffix: str) -> str:
        return self.prefix + suffix

    def add(self, suffix: str, initial: Value) -> SharedPV:
        shared = SharedPV(initial=initial)
        self.pvs[self.pv(suffix)] = shared
        return shared

    def start(self) -> PvaServer:
        self.server = Server(providers=[dict(self.pvs)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def pva_server() -> Iterator[PvaServer]:
    """p4p's Server with NTTable, NTEnum, NTScalar, NTNDArray (plain, compressed, malformed)."""
    srv = PvaServer()
    srv.add("table", TABLE_TYPE.wrap(TABLE_ROWS))
    srv.add("enum", NTEnum().wrap({"index": 1, "choices": ["Low", "High", "Auto"]}))
    srv.add("badenum", NTEnum().wrap({"index": 7, "choices": ["Low", "High"]}))
    srv.add("scalar", NTScalar("d").wrap(3.25))
    srv.add("image", ndarray_value(IMAGE, unique_id=17, attributes={"Gain": 2.5}))
    srv.add("badshape", ndarray_value(IMAGE, dims=[50, 64]))
    for codec in ("lz4", "bslz4", "blosc"):
        try:
            payload = compress(codec, IMAGE)
        except ImportError:
            continue  # test_compressed_ndarray says so (skips locally, fails under CI)
        srv.add(f"image_{codec}", ndarray_value(IMAGE, unique_id=5, codec=codec, payload=payload))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def ioc(ioc_factory: Any) -> Any:
    return ioc_factory(DB)


@pytest.fixture(autouse=True)
def _fresh_context() -> Iterator[None]:
    """Each test starts on a new client context, so no channel outlives the server it came from."""
    yield
    beampipe_pva.close_context()
