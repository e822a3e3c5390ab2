"""A detector image from PVA to another process over shared memory, with the real parts.

p4p's Server serves an NTNDArray (as areaDetector's PVA plugin would), the PVA
plugin reads it (``beampipe_pva.bulk_get`` -> ``NDArrayFrame``), the SHM
integration hook (``beampipe_shm.publish_frame``) publishes each image, and a
reader in its own process receives every frame and saves what it got; the test
compares pixels, shape, dtype and the detector's frame numbers.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

beampipe_pva = pytest.importorskip("beampipe_pva")
beampipe_shm = pytest.importorskip("beampipe_shm")
from p4p.nt import NTNDArray  # noqa: E402
from p4p.server import Server  # noqa: E402
from p4p.server.raw import SharedPV  # noqa: E402

SHAPE = (48, 80)  # rows x columns, not square: a transposed image would not match
N_FRAMES = 5

READER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from beampipe_shm import Reader, StreamSpec

    name, dtype, shape, n, outdir = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), \\
        int(sys.argv[4]), sys.argv[5]
    expect = [StreamSpec("image", dtype, tuple(shape))]
    r = Reader(name, mode="every", start="oldest", expect=expect, wait=20.0)
    print(json.dumps({"event": "ready"}), flush=True)
    got = []
    deadline = time.monotonic() + 30
    while len(got) < n and time.monotonic() < deadline:
        f = r.read(timeout=0.5)
        if f is None:
            continue
        with f:
            a = f["image"]
            np.save(f"{outdir}/{f.frame_id}.npy", a)
            got.append({"seq": f.seq, "id": f.frame_id, "missed": f.missed,
                        "shape": list(a.shape), "dtype": a.dtype.str, "ts": f.timestamp,
                        "readonly": not a.flags.writeable})
    print(json.dumps({"event": "done", "frames": got, "torn": r.stats.torn}), flush=True)
    r.close()
    """
)


def _ndarray(pixels: np.ndarray, unique_id: int) -> object:
    v = NTNDArray().wrap(pixels, attrib={"ColorMode": 0})
    v["uniqueId"] = unique_id
    v["dataTimeStamp.secondsPastEpoch"] = 1_700_000_000 + unique_id
    v["dataTimeStamp.nanoseconds"] = 250_000_000
    return v


def _image(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 65535, SHAPE, dtype=np.uint16)


def test_ntndarray_from_pva_reaches_another_process_through_shm(tmp_path: Path) -> None:
    pv_name = f"BPSHM{secrets.token_hex(4).upper()}:image"
    shared = SharedPV(initial=_ndarray(_image(0), 100))
    server = Server(providers=[{pv_name: shared}])
    stream = f"pva{os.getpid()}-{uuid.uuid4().hex[:8]}"
    producer = None
    proc = None
    try:
        first = beampipe_pva.bulk_get([pv_name], timeout=5.0)[pv_name]
        assert isinstance(first, beampipe_pva.NDArrayFrame), first
        assert first.shape == SHAPE and first.unique_id == 100
        producer = beampipe_shm.Producer(
            stream, [beampipe_shm.StreamSpec("image", first.dtype, first.shape)], slots=8
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                READER,
                stream,
                first.dtype.str,
                json.dumps(list(SHAPE)),
                str(N_FRAMES),
                str(tmp_path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the reader gives up after 20 s
        assert json.loads(line or "{}").get("event") == "ready", proc.stderr.read()  # type: ignore[union-attr]

        sent = {}
        for i in range(1, N_FRAMES + 1):
            uid = 100 + i
            pixels = _image(i)
            shared.post(_ndarray(pixels, uid))
            deadline = time.monotonic() + 5
            frame = None
            while time.monotonic() < deadline:  # the GET after a post may see the old value
                frame = beampipe_pva.bulk_get([pv_name], timeout=5.0)[pv_name]
                if frame is not None and frame.unique_id == uid:
                    break
                time.sleep(0.01)
            assert frame is not None and frame.unique_id == uid, frame
            assert np.array_equal(frame.data, pixels)
            seq = beampipe_shm.publish_frame(producer, frame)
            assert seq == i
            sent[uid] = (pixels, frame.timestamp)

        out, err = proc.communicate(timeout=40)
        assert proc.returncode == 0, err
        done = json.loads(out.strip().splitlines()[-1])
        assert done["event"] == "done"
        frames = done["frames"]
        assert [f["id"] for f in frames] == sorted(sent), frames
        assert [f["seq"] for f in frames] == list(range(1, N_FRAMES + 1))
        assert all(f["missed"] == 0 for f in frames)
        for f in frames:
            pixels, ts = sent[f["id"]]
            assert f["shape"] == list(SHAPE)
            assert np.dtype(f["dtype"]) == np.dtype(np.uint16)
            assert f["readonly"]
            assert f["ts"] == pytest.approx(ts)
            got = np.load(tmp_path / f"{f['id']}.npy")
            assert got.shape == SHAPE
            assert np.array_equal(got, pixels), f"frame {f['id']} pixels differ"
        assert producer.dropped == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        if producer is not None:
            producer.close()
        beampipe_pva.close_context()
        server.stop()
