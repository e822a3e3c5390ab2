"""A dependency-free smoke run of the frame transport (layout v2), for another architecture.

Used to exercise the aarch64 code paths (the ``dmb ish`` fence stub, ``SYS_futex`` = 98,
``struct flock`` layout, OFD locks, the weak-order fences of every read path) under
qemu-user in a Debian arm64 chroot, where the test suite's dependencies are not installed::

    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-numpy bookworm ROOT
    mkdir ROOT/src
    cp -r plugins/shm_transport/src/beampipe_shm tests/shm_transport/shm_smoke.py ROOT/src/
    mount -t tmpfs tmpfs ROOT/dev/shm
    chroot ROOT python3 /src/shm_smoke.py      # binfmt_misc with qemu-aarch64 registered (F flag)

It also runs natively (``python3 tests/shm_transport/shm_smoke.py``), where it checks the same
things with the x86-64 stub.  The producer runs in this process; every reader is a separate
(spawned) process, so on the chroot each is its own aarch64 qemu process.  What it checks:

* the platform: ``platform.machine()`` in the producer and in every reader, the machine code
  in the fence page (``dmb ish; ret`` on aarch64), the futex syscall number, fences switched on;
* layout v2: small arrays placed inline after the slot's first cache line, big ones after the
  attributes, and the header's version word;
* stream A (a 512 KiB image and two inline arrays, 4 slots): an every-frame ``read()`` reader
  that keeps its first frame leased to the end (the producer must never rewrite it), an
  every-frame ``read_into(mapping)`` reader (a slot over 256 KiB is copied under a lease), a
  latest-frame reader that holds a lease and is SIGKILLed (the producer reclaims its record
  through the OFD lock), ``NameInUse``, a control message, cleanup of /dev/shm;
* stream B (one inline 32-byte array): an every-frame ``read_into`` reader with ``spin=0``,
  which sleeps on the futex and is woken (the producer's ``FUTEX_WAKE`` returns how many it
  woke), and one with ``spin=5``, which takes every frame in its spin loop without sleeping.

Every frame is checked whole (each array holds values derived from its sequence number), in
order, and every gap is the ``missed`` count the reader reported.  Fences are counted by
wrapping the module's fence functions (the wrapper calls the real stub).

qemu-user (TCG) runs the guest's loads and stores on the host's memory model (x86-64 TSO here),
so this shows the aarch64 code paths, syscall numbers and machine-code stub working, not that
the fences are sufficient under aarch64's weak ordering.
"""

import itertools
import multiprocessing as mp
import os
import platform
import signal
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from beampipe_shm import NameInUse, Producer, Reader, StreamSpec, _sys, inspect
from beampipe_shm import _layout as L
from beampipe_shm import _producer as producer_mod
from beampipe_shm import _reader as reader_mod

ARM64_STUB = struct.pack("<II", 0xD5033BBF, 0xD65F03C0)  # dmb ish ; ret
X86_STUB = b"\x0f\xae\xf0\xc3"  # mfence ; ret
N_A = 200  # frames on stream A
N_B = 400  # frames on stream B
SPEC_A = [
    StreamSpec("img", "int64", (256, 256)),  # 512 KiB: read_into leases the slot
    StreamSpec("pos", "float64", (3,)),
    StreamSpec("cnt", "uint32", (2,)),
]
SPEC_B = [StreamSpec("pos", "float64", (4,))]


def expect_a(seq: int) -> dict[str, np.ndarray[Any, Any]]:
    return {
        "img": np.full((256, 256), seq, np.int64),
        "pos": np.array([seq, seq + 0.5, -seq], np.float64),
        "cnt": np.array([seq & 0xFFFFFFFF, (seq * 7) & 0xFFFFFFFF], np.uint32),
    }


def expect_b(seq: int) -> np.ndarray[Any, Any]:
    return np.array([seq, seq * 0.25, -seq, seq + 1e6], np.float64)


class Counter:
    """Replaces ``module.name`` with a wrapper that counts calls and sums integer results."""

    def __init__(self, module: Any, name: str) -> None:
        self.calls = 0
        self.total = 0
        real: Callable[..., Any] = getattr(module, name)

        def wrapper(*args: Any) -> Any:
            self.calls += 1
            r = real(*args)
            if isinstance(r, int):
                self.total += r
            return r

        setattr(module, name, wrapper)


class FutexCounter:
    """Counts one futex operation in a module by either door: its wrapper (``futex_wait`` /
    ``futex_wake``, the general paths) or the raw ``futex_syscall`` the hot paths call with
    prebuilt arguments (``args[2]`` is the operation: 0 wait, 1 wake)."""

    def __init__(self, module: Any, op: int) -> None:
        self.calls = 0
        self.total = 0  # a wake returns how many waiters it woke
        wrapper_name = ("futex_wait", "futex_wake")[op]
        real_wrapper: Callable[..., Any] | None = getattr(module, wrapper_name, None)
        real_syscall: Callable[..., Any] | None = getattr(module, "futex_syscall", None)

        def count(r: Any) -> Any:
            self.calls += 1
            if isinstance(r, int):
                self.total += r
            return r

        if real_wrapper is not None:
            setattr(module, wrapper_name, lambda *args: count(real_wrapper(*args)))
        if real_syscall is not None:

            def syscall(*args: Any) -> Any:
                r = real_syscall(*args)
                return count(r) if args[2] == op else r

            module.futex_syscall = syscall


def platform_info() -> dict[str, Any]:
    code = bytes(_sys.fence._keep[:8])  # type: ignore[attr-defined]  # the stub's page
    stub = "dmb ish; ret" if code == ARM64_STUB else "mfence; ret" if code[:4] == X86_STUB else "?"
    _sys.fence()  # the stub runs and returns
    return {
        "machine": platform.machine(),
        "stub": stub,
        "weak_order": _sys.WEAK_ORDER and _sys.load_fence is _sys.fence,
        "sys_futex": _sys._SYS_FUTEX,
    }


def whole_a(seq: int, arrays: dict[str, np.ndarray[Any, Any]]) -> bool:
    exp = expect_a(seq)
    return all(np.array_equal(arrays[k], exp[k]) for k in exp)


def reader_child(role: str, name: str, q: Any) -> None:
    # counted in this reader process: sleeps, weak-order fences of the read paths
    waits = FutexCounter(reader_mod, 0)
    fences = {k: Counter(reader_mod, f"{k}_fence") for k in ("load", "release", "store")}
    fences[""] = Counter(reader_mod, "fence")
    info = platform_info()
    if role == "victim":
        r = Reader(name, mode="latest", wait=10)
        q.put(("ready", role, os.getpid(), info))
        f = r.read(timeout=60)
        q.put(("held", role, os.getpid(), None if f is None else f.seq))
        time.sleep(600)  # SIGKILLed here, lease held
        return
    last = N_A if role in ("lease", "into_map") else N_B
    spin = 5.0 if role == "into_spin" else 0.0
    r = Reader(name, mode="every", wait=10, spin=spin)
    q.put(("ready", role, os.getpid(), info))
    got: list[tuple[int, bool, int]] = []
    lat: list[tuple[int, float]] = []
    held_ok = True
    predicted = 0
    if role == "lease":
        held = None
        while not got or got[-1][0] < last:
            f = r.read(timeout=60)
            if f is None:
                break
            got.append((f.seq, whole_a(f.seq, f.arrays), f.missed))
            if held is None:
                held = f  # keep the first frame's lease to the end
            else:
                f.release()
        if held is not None:
            held_ok = held.leased and whole_a(held.seq, held.arrays)
            held.release()
        r.send_control(3, b"bye")
    elif role == "into_map":
        bufs = {s.name: np.zeros(s.shape, s.dtype) for s in SPEC_A}
        while not got or got[-1][0] < last:
            s = r.read_into(bufs, timeout=60)
            if s == 0:
                break
            got.append((s, whole_a(s, bufs), r.last_missed))
    else:  # into_block, into_spin
        buf = np.zeros(4, np.float64)
        slot = -1
        while not got or got[-1][0] < last:
            s = r.read_into(buf, timeout=60)
            if s == 0:
                break
            # the frame sat in the slot of the one before: the slot the reader watches first
            predicted += r._pred_k == slot
            slot = r._pred_k
            lat.append((s, (time.monotonic_ns() - r.last_publish_ns) / 1e9))
            got.append((s, bool(np.array_equal(buf, expect_b(s))), r.last_missed))
    stats = r.stats
    r.close()
    q.put(
        (
            "done",
            role,
            os.getpid(),
            {
                "got": got,
                "lat": lat,
                "held_ok": held_ok,
                "predicted": predicted,
                "waits": waits.calls,
                "fences": {k or "full": c.calls for k, c in fences.items()},
                "torn": stats.torn,
                "missed": stats.missed,
            },
        )
    )


def check_frames(role: str, res: dict[str, Any], last: int) -> str:
    got = res["got"]
    assert got, f"{role}: no frame arrived"
    seqs = [s for s, _, _ in got]
    assert all(ok for _, ok, _ in got), f"{role}: a torn or wrong frame was delivered"
    assert seqs[-1] == last, f"{role}: ended at {seqs[-1]}, not {last}"
    for (a, _, _), (b, _, m) in itertools.pairwise(got):
        assert b > a, f"{role}: frames out of order ({a} then {b})"
        assert b - a - 1 == m, f"{role}: gap {a}->{b} but missed={m}"
    missed = sum(m for *_, m in got[1:])
    return f"{len(got)} frames ({seqs[0]}..{last}) whole and in order, {missed} missed (counted)"


def start(ctx: Any, q: Any, roles: list[str], name: str) -> dict[str, Any]:
    procs = {}
    for role in roles:
        procs[role] = ctx.Process(target=reader_child, args=(role, name, q))
        procs[role].start()
    return procs


def collect(q: Any, kind: str, n: int, timeout: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    while len(out) < n:
        k, role, pid, data = q.get(timeout=timeout)
        assert k == kind, (k, role)
        out[role] = (pid, data)
    return out


def check_platform(who: str, info: dict[str, Any], parent: dict[str, Any]) -> None:
    assert info == parent, f"{who}: platform {info} differs from the producer's {parent}"


def run_a(ctx: Any, q: Any, me: dict[str, Any]) -> None:
    name = f"smoke-a-{os.getpid()}"
    p = Producer(name, SPEC_A, slots=4)
    wakes = FutexCounter(producer_mod, 1)
    try:
        assert p._words[L.H_VERSION] == L.VERSION == 2
        offs = dict(zip([s.name for s in SPEC_A], p.geometry.stream_offsets, strict=True))
        inline = range(L.S_INLINE * 8, L.S_INLINE * 8 + L.INLINE_BYTES)
        assert offs["pos"] in inline and offs["cnt"] in inline, offs
        assert offs["img"] >= 512 and offs["img"] % 4096 == 0, offs
        try:
            Producer(name, SPEC_A)
            raise AssertionError("NameInUse not raised")
        except NameInUse as exc:
            in_use = str(exc)
        assert str(os.getpid()) in in_use, in_use
        procs = start(ctx, q, ["lease", "into_map", "victim"], name)
        for role, (_, info) in collect(q, "ready", 3, 120).items():
            check_platform(role, info, me)
        time.sleep(0.5)
        with p.frame() as f:
            for k, v in expect_a(1).items():
                f[k][...] = v
        _, (vpid, vseq) = collect(q, "held", 1, 60).popitem()
        assert vseq == 1, vseq
        info = inspect(name)
        victim = [ri for ri in info.readers if ri.pid == vpid]
        assert victim and victim[0].alive and victim[0].leases == 1, info.readers
        os.kill(vpid, signal.SIGKILL)
        procs.pop("victim").join(30)
        reclaimed = p.reclaim_dead_readers()
        info = inspect(name)
        assert reclaimed == 1 and info.reclaimed == 1, (reclaimed, info.reclaimed)
        assert vpid not in [ri.pid for ri in info.readers], info.readers
        for seq in range(2, N_A + 1):
            with p.frame() as f:
                for k, v in expect_a(seq).items():
                    f[k][...] = v
            if seq % 40 == 0:
                time.sleep(0.3)  # the readers run dry and sleep on the futex
            elif not 100 <= seq < 120:  # (a burst of 20: the every-frame readers fall behind)
                time.sleep(0.01)
        done = collect(q, "done", 2, 300)
        for c in procs.values():
            c.join(30)
        info = inspect(name)
        assert info.dropped == 0, info.dropped
        assert [m.data for m in p.poll_control()] == [b"bye"]
        assert inspect(name).readers == []
        lease = done["lease"][1]
        assert lease["held_ok"], "the leased first frame was rewritten"
        print(f"A SIGKILLed reader (pid {vpid}, 1 lease): reclaimed via its OFD lock")
        for role, (pid, res) in done.items():
            print(
                f"A {role} (pid {pid}): {check_frames(role, res, N_A)}; futex sleeps "
                f"{res['waits']}, fence calls {res['fences']}, torn reads {res['torn']}"
            )
        print(f"A producer: FUTEX_WAKE calls {wakes.calls}, woke {wakes.total}")
        assert wakes.total > 0, "no reader was woken"
        if me["weak_order"]:  # the aarch64-only fences of each read path ran
            n_into = len(done["into_map"][1]["got"])
            assert done["into_map"][1]["fences"]["release"] >= n_into, "a lease without fence"
            assert lease["fences"]["release"] > 0, "no release fence ran"
            assert lease["fences"]["full"] > 0, "no full fence ran"
    finally:
        p.close()
    assert not os.path.exists(f"/dev/shm/bp.{name}")


def run_b(ctx: Any, q: Any, me: dict[str, Any]) -> None:
    name = f"smoke-b-{os.getpid()}"
    p = Producer(name, SPEC_B, slots=4)
    wakes = FutexCounter(producer_mod, 1)
    try:
        assert p.geometry.stream_offsets == (L.S_INLINE * 8,), p.geometry.stream_offsets
        procs = start(ctx, q, ["into_block", "into_spin"], name)
        for role, (_, info) in collect(q, "ready", 2, 120).items():
            check_platform(role, info, me)
        time.sleep(0.5)
        for seq in range(1, N_B + 1):
            with p.frame() as f:
                f["pos"][...] = expect_b(seq)
            time.sleep(0.2 if seq % 20 == 0 else 0.002)
        done = collect(q, "done", 2, 300)
        for c in procs.values():
            c.join(30)
        assert inspect(name).dropped == 0
        for role, (pid, res) in done.items():
            after_pause = sorted(t for s, t in res["lat"] if s % 20 == 1 and s > 1)
            med = after_pause[len(after_pause) // 2]
            print(
                f"B {role} (pid {pid}): {check_frames(role, res, N_B)}, "
                f"{res['predicted']} in the slot of the frame before; futex sleeps "
                f"{res['waits']}, fence calls {res['fences']}, torn reads {res['torn']}, "
                f"first frame after each 0.2 s pause seen {med * 1e3:.2f} ms (median) "
                f"/ {after_pause[-1] * 1e3:.2f} ms (max) after its publish"
            )
        print(f"B producer: FUTEX_WAKE calls {wakes.calls}, woke {wakes.total}")
        assert done["into_block"][1]["waits"] > 0, "the spin=0 reader never slept"
        assert wakes.total > 0, "the sleeping reader was never woken"
        assert done["into_spin"][1]["waits"] == 0, "the spin=5 reader slept"
        if me["weak_order"]:
            assert all(res["fences"]["load"] > 0 for _, res in done.values()), "no load fence"
    finally:
        p.close()
    assert not os.path.exists(f"/dev/shm/bp.{name}")


def main() -> int:
    me = platform_info()
    print(
        f"machine {me['machine']}, fence stub {me['stub']!r}, SYS_futex {me['sys_futex']}, "
        f"weak-order fences {me['weak_order']}, layout v{L.VERSION}, "
        f"python {sys.version.split()[0]}, numpy {np.__version__}"
    )
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    t0 = time.monotonic()
    run_a(ctx, q, me)
    run_b(ctx, q, me)
    left = [
        n for n in os.listdir("/dev/shm") if n.startswith("bp.smoke-") and str(os.getpid()) in n
    ]
    assert not left, left
    print(f"ok: all checks passed in {time.monotonic() - t0:.1f} s; /dev/shm clean")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
