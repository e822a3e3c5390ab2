"""The few OS and CPU primitives the transport needs, with no compiler at install time.

* ``fence()``: a full hardware memory barrier.  Python has none, and the protocol
  needs one where a store must be visible before a later load (the lease
  handshake, the sleep/wake handshake) and, on aarch64, between the payload and
  the sequence word.  We map one page, write four bytes of machine code into it
  (x86-64 ``mfence; ret``, aarch64 ``dmb ish; ret``), flip it to read+execute and
  call it through ctypes without releasing the GIL (~0.1 us).  On x86-64 (TSO)
  stores are not reordered with stores nor loads with loads, so only the
  store->load case needs the fence; ``store_fence()``/``load_fence()`` are no-ops
  there and ``dmb ish`` on aarch64.
* ``futex_wait``/``futex_wake``: the shared (not PRIVATE) futex on a 32-bit word of
  the MAP_SHARED segment, keyed by inode+offset so it works across processes.
* OFD record locks (``F_OFD_SETLK``): owned by an open file description, released
  by the kernel when the process dies (SIGKILL included) and conflicting even
  between two descriptions in one process.  They are how producers and readers
  prove they are alive, and how a reader claims a registry record exclusively.

8-byte loads and stores go through ``memoryview.cast("Q")`` on 8-byte aligned
addresses, which CPython compiles to single aligned ``mov``/``ldr``/``str``:
single-copy atomic on both architectures.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import platform
import struct
from collections.abc import Callable

__all__ = [
    "PAGE",
    "WEAK_ORDER",
    "fence",
    "futex_syscall",
    "futex_wait",
    "futex_wait_args",
    "futex_wake",
    "futex_wake_args",
    "load_fence",
    "lock_held_by_other",
    "release_fence",
    "store_fence",
    "try_lock",
    "unlock",
]

PAGE = mmap.PAGESIZE
_MACHINE = platform.machine().lower()
_X86 = _MACHINE in ("x86_64", "amd64")
_ARM64 = _MACHINE in ("aarch64", "arm64")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.restype = ctypes.c_int


def _make_fence() -> Callable[[], None]:
    if _X86:
        code = b"\x0f\xae\xf0\xc3"  # mfence ; ret
    elif _ARM64:
        code = struct.pack("<II", 0xD5033BBF, 0xD65F03C0)  # dmb ish ; ret
    else:  # pragma: no cover - documented limit
        raise ImportError(f"beampipe-shm supports x86-64 and aarch64, not {platform.machine()}")
    page = mmap.mmap(-1, PAGE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    page.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    if _libc.mprotect(addr, PAGE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:  # pragma: no cover
        err = ctypes.get_errno()
        raise ImportError(
            "beampipe-shm needs one executable page for its memory-fence stub and the kernel "
            f"refused it (mprotect: {os.strerror(err)})"
        )
    if _ARM64:  # pragma: no cover - the page may have held other code: sync the i-cache
        try:
            gcc = ctypes.CDLL(ctypes.util.find_library("gcc_s") or "libgcc_s.so.1")
            gcc.__clear_cache(ctypes.c_void_p(addr), ctypes.c_void_p(addr + len(code)))
        except (OSError, AttributeError):
            pass
    func = ctypes.PYFUNCTYPE(None)(addr)
    func._keep = page  # type: ignore[attr-defined]  # the page lives as long as the stub
    return func


fence: Callable[[], None] = _make_fence()


def _noop() -> None:
    return None


#: whether loads and stores need fences between them (aarch64): hot loops test this flag
#: instead of calling a no-op fence on x86-64
WEAK_ORDER = _ARM64
store_fence: Callable[[], None] = fence if _ARM64 else _noop
load_fence: Callable[[], None] = fence if _ARM64 else _noop
#: before a store that hands memory back (a lease cleared after reading the slot): earlier
#: loads must complete first.  x86-64 never moves a store before an earlier load.
release_fence: Callable[[], None] = fence if _ARM64 else _noop

_SYS_FUTEX = 202 if _X86 else 98
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def futex_wait(addr: int, expected: int, timeout: float) -> None:
    """Sleep while the 32-bit word at ``addr`` equals ``expected``, at most ``timeout`` s.

    Returns on wake-up, timeout, signal or if the value already differs; the
    caller re-checks its condition in every case (spurious wake-ups are fine).
    """
    ts = _Timespec(int(timeout), int((timeout % 1.0) * 1e9))
    _libc.syscall(
        _SYS_FUTEX,
        ctypes.c_void_p(addr),
        _FUTEX_WAIT,
        ctypes.c_uint32(expected & 0xFFFFFFFF),
        ctypes.byref(ts),
        None,
        0,
    )


#: the raw syscall and the argument tuple of one futex wait: for a waiter that must not pay
#: even a Python frame's return on its way back from the kernel (the blocked read_into)
futex_syscall: Callable[..., int] = _libc.syscall


def futex_wait_args(addr: int, expected: int, timeout: float) -> tuple[object, ...]:
    """``futex_syscall(*futex_wait_args(...))`` is ``futex_wait(...)`` without the wrapper."""
    ts = _Timespec(int(timeout), int((timeout % 1.0) * 1e9))
    return (
        _SYS_FUTEX,
        ctypes.c_void_p(addr),
        _FUTEX_WAIT,
        ctypes.c_uint32(expected & 0xFFFFFFFF),
        ctypes.byref(ts),  # (keeps ts alive)
        None,
        0,
    )


def futex_wake_args(addr: int) -> tuple[object, ...]:
    """``futex_syscall(*futex_wake_args(addr))`` is ``futex_wake(addr)``; the tuple never
    changes, so a producer makes it once."""
    return (_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0)


def futex_wake(addr: int) -> int:
    """Wake every process sleeping on the 32-bit word at ``addr``."""
    return int(
        _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0)
    )


# struct flock on LP64 Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (+ padding) = 32 bytes on x86-64 and aarch64.
_FLOCK = "hhxxxxqqixxxx"


def _flock(kind: int, start: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, start, 1, 0)


def try_lock(fd: int, byte: int) -> bool:
    """Take an exclusive OFD lock on one byte of ``fd``; False if someone else holds it."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, byte))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def unlock(fd: int, byte: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, byte))


def lock_held_by_other(fd: int, byte: int) -> bool:
    """Whether another open file description (any process) holds a lock on ``byte``."""
    res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
    return bool(struct.unpack(_FLOCK, res)[0] != fcntl.F_UNLCK)
