"""A dependency-free smoke run of the frame transport, for another architecture.

Used to exercise the aarch64 code paths (the ``dmb ish`` fence stub, ``SYS_futex`` = 98,
``struct flock`` layout, OFD locks) under qemu-user in a Debian arm64 chroot, where the test
suite's dependencies are not installed::

    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-numpy bookworm ROOT
    cp -r plugins/shm_transport/src/beampipe_shm tests/shm_transport/shm_smoke.py ROOT/src/
    mount -t tmpfs tmpfs ROOT/dev/shm
    chroot ROOT python3 /src/shm_smoke.py

(qemu-user runs the guest on the host's memory model, so this checks the code paths, not
aarch64's weak ordering.)
"""

import multiprocessing as mp
import os
import platform
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from beampipe_shm import NameInUse, Producer, Reader, StreamSpec, _sys, inspect


def child(name: str, q: Any) -> None:
    r = Reader(name, mode="every", wait=10, spin=0.0)
    q.put("ready")
    got = []
    for _ in range(200):
        f = r.read(timeout=5)
        if f is None:
            break
        got.append((f.seq, bool((f["img"] == f.seq).all()), f.missed))
        f.release()
    r.send_control(3, b"bye")
    q.put(got)
    r.close()


def main() -> int:
    print("machine", platform.machine(), "weak-order fences:", _sys.store_fence is _sys.fence)
    _sys.fence()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    name = f"smoke-{os.getpid()}"
    spec = [StreamSpec("img", "int64", (64, 64))]
    p = Producer(name, spec, slots=4)
    try:
        Producer(name, spec)
        raise AssertionError("NameInUse not raised")
    except NameInUse:
        pass
    c = ctx.Process(target=child, args=(name, q))
    c.start()
    assert q.get(timeout=60) == "ready"
    time.sleep(0.5)
    for i in range(200):
        with p.frame() as f:
            f["img"][...] = f.seq
        if i % 50 == 0:
            time.sleep(0.2)  # let the reader fall asleep on the futex
    got = q.get(timeout=120)
    c.join(30)
    seqs = [s for s, _, _ in got]
    assert got, "no frame arrived"
    assert all(ok for _, ok, _ in got), "a torn frame was delivered"
    assert seqs == sorted(seqs), "frames out of order"
    assert len(got) + sum(m for *_, m in got) == 200 - seqs[0] + 1 + got[0][2]
    assert [m.data for m in p.poll_control()] == [b"bye"]
    assert inspect(name).readers == []
    p.close()
    assert not os.path.exists(f"/dev/shm/bp.{name}")
    print(f"ok: {len(got)} frames whole and in order, {sum(m for *_, m in got)} missed (counted)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
