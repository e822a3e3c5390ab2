"""A real EPICS IOC for tests: EPICS base's softIoc (with QSRV) from epicscorelibs, on loopback.

Tests run against the real thing rather than mocks because the bugs that
matter (reconnects, paced searches, monitor ordering) live in libca and the
server, not in our Python.  Each IOC gets a random PV prefix so tests, and
parallel test runs, never see each other's PVs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

__all__ = ["LOOPBACK_ENV", "Ioc", "IocError", "pin_epics_to_loopback"]

#: Client and server sides of CA and PVA, pinned to loopback so tests never leave the host.
LOOPBACK_ENV: Mapping[str, str] = {
    "EPICS_CA_ADDR_LIST": "127.0.0.1",
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_PVA_ADDR_LIST": "127.0.0.1",
    "EPICS_PVA_AUTO_ADDR_LIST": "NO",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
}
_READY = "iocRun: All initialization complete"


class IocError(RuntimeError):
    """The IOC did not start, or died; the message carries the tail of its log."""


#: How many IOCs one process may run at once, each on its own CA port.
CA_SLOTS = 8
_slots_base: int | None = None
_slots_used: set[int] = set()


def pin_epics_to_loopback(
    environ: dict[str, str] | None = None, *, private_ports: bool = True
) -> None:
    """Point every EPICS client and server in this process (and its children) at loopback.

    With ``private_ports`` this process also gets its own block of CA ports and
    its own PVA port, and every :class:`Ioc` it starts takes one of them.  Two
    CA servers on one UDP port only work with broadcast, which loopback lacks:
    a unicast search reaches only the first server bound, so without this a
    second IOC, or another test run on the same host, would be invisible.
    Must run before the first CA or PVA context is created (they read the
    environment once); the pytest plugin calls it at configure time.
    """
    global _slots_base
    env = os.environ if environ is None else environ
    env.update(LOOPBACK_ENV)
    if not private_ports:
        return
    if _slots_base is None:
        _slots_base = _free_port_block(CA_SLOTS + 1)
    ca_ports = range(_slots_base, _slots_base + CA_SLOTS)
    env["EPICS_CA_SERVER_PORT"] = str(ca_ports[0])
    env["EPICS_CA_ADDR_LIST"] = " ".join(f"127.0.0.1:{p}" for p in ca_ports)
    pva = str(_slots_base + CA_SLOTS)
    env["EPICS_PVA_BROADCAST_PORT"] = env["EPICS_PVAS_BROADCAST_PORT"] = pva
    env["EPICS_PVA_ADDR_LIST"] = f"127.0.0.1:{pva}"


def _free_port_block(n: int) -> int:
    """A run of ``n`` ports free for UDP and TCP on loopback right now."""
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - n)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    s = socket.socket(socket.AF_INET, kind)
                    socks.append(s)
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise IocError("no free block of loopback ports for the test IOCs")


def _take_slot() -> int | None:
    if _slots_base is None:
        return None
    for k in range(CA_SLOTS):
        if k not in _slots_used:
            _slots_used.add(k)
            return k
    raise IocError(f"more than {CA_SLOTS} IOCs at once in one process; stop one first")


class Ioc:
    """One softIoc subprocess serving a database over CA and PVA; restartable with the same PVs."""

    def __init__(
        self,
        db: str | Path,
        *,
        prefix: str | None = None,
        macros: Mapping[str, str] | None = None,
        pva: bool = True,
        startup_timeout: float = 30.0,
    ) -> None:
        self.db = Path(db)
        if not self.db.is_file():
            raise IocError(f"IOC database {self.db} does not exist")
        self.prefix = prefix if prefix is not None else f"BP{secrets.token_hex(4).upper()}:"
        self.macros = {"P": self.prefix, **(macros or {})}
        self.pva = pva
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._logdir = tempfile.TemporaryDirectory(prefix="beampipe-ioc-")
        self.log_path = Path(self._logdir.name) / "ioc.log"
        self.starts = 0
        self._slot: int | None = None

    def pv(self, suffix: str) -> str:
        """The full name of one of this IOC's PVs."""
        return f"{self.prefix}{suffix}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> Ioc:
        """Start the IOC and return once iocInit has finished."""
        if self.running:
            raise IocError(f"IOC {self.prefix} is already running (pid {self.pid})")
        env = {**os.environ, **LOOPBACK_ENV}
        if self._slot is None:
            self._slot = _take_slot()
        if self._slot is not None and _slots_base is not None:
            env["EPICS_CA_SERVER_PORT"] = str(_slots_base + self._slot)
        macros = ",".join(f"{k}={v}" for k, v in self.macros.items())
        module = "pvxslibs.ioc" if self.pva and _has_pvxs() else "epicscorelibs.ioc"
        cmd = [sys.executable, "-u", "-m", module, "-m", macros, "-d", str(self.db)]
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        finally:
            log.close()
        self.starts += 1
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            text = self._log_since(offset)
            if _READY in text:
                return self
            if self._proc.poll() is not None:
                raise IocError(f"IOC {self.prefix} exited at start:\n{text[-2000:]}")
            time.sleep(0.02)
        self.stop()
        raise IocError(
            f"IOC {self.prefix} not ready after {self.startup_timeout}s:\n"
            + self._log_since(offset)[-2000:]
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the IOC: EOF on its shell first, then SIGTERM, then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def kill(self) -> None:
        """Kill the IOC with SIGKILL, the way a crash or a power cut would end it."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            self._proc = None

    def freeze(self, timeout: float = 5.0) -> None:
        """Stop the IOC with SIGSTOP, a hung IOC: its circuits stay up, nothing answers.

        Returns once every thread of it is stopped: ``kill`` returns before that,
        and a request sent in between could still be answered on a loaded machine.
        """
        pid = self.pid
        if pid is None:
            raise RuntimeError(f"{self!r} is not running")
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while not _all_stopped(pid):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self!r}: not stopped {timeout:g} s after SIGSTOP")
            time.sleep(0.001)

    def thaw(self) -> None:
        """Let a frozen IOC run again (SIGCONT)."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)

    def restart(self, down_for: float = 0.0) -> Ioc:
        """Stop and start again with the same prefix and database, as a rebooted IOC would."""
        self.stop()
        if down_for:
            time.sleep(down_for)
        return self.start()

    def log(self) -> str:
        """Everything the IOC printed, across restarts."""
        return self._log_since(0)

    def close(self) -> None:
        """Stop for good and give back the CA port."""
        self.stop()
        if self._slot is not None:
            _slots_used.discard(self._slot)
            self._slot = None
        self._logdir.cleanup()

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Ioc:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"Ioc({self.db.name!r}, prefix={self.prefix!r}, {state})"


def _all_stopped(pid: int) -> bool:
    """Every thread of ``pid`` is in the stopped state (``T`` in its /proc stat)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True  # gone: nothing answers either
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except (FileNotFoundError, IndexError):
            continue  # a thread that exited meanwhile
        if state not in ("T", "t"):
            return False
    return True


def _has_pvxs() -> bool:
    # pvxslibs' QSRV2 is the maintained server; epicscorelibs' own QSRV is the fallback.
    try:
        import pvxslibs  # noqa: F401
    except ImportError:
        return False
    return True
