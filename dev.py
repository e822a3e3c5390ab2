#!/usr/bin/env python3
"""One entry point for a fresh machine: builds .venv with the workspace, then runs a job.

    python3 dev.py demo        # embedded IOC + bluesky scan over the beampipe plugins
    python3 dev.py test        # lint, format, types, layer contracts, then the test suite
    python3 dev.py bench [ca|pva|shm|zocalo|...]   # side-by-side benchmarks

Only the standard library is used here, so nothing needs installing first.
The venv is rebuilt when any pyproject.toml changes (a hash is kept in it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("BEAMPIPE_VENV", ROOT / ".venv"))
PLUGINS = ["ca_backend", "pva_backend", "shm_transport", "zocalo_bridge"]
BIN = VENV / "bin"
PY = BIN / "python"


def _say(msg: str) -> None:
    print(f"[dev] {msg}", flush=True)


def _run(*cmd: str | Path, check: bool = True, **kw: object) -> int:
    _say(" ".join(str(c) for c in cmd))
    rc = subprocess.call([str(c) for c in cmd], cwd=ROOT, **kw)  # type: ignore[call-overload]
    if check and rc:
        _say(f"failed with exit code {rc}: {' '.join(str(c) for c in cmd)}")
        sys.exit(rc)
    return rc


def _plugin_dirs() -> list[Path]:
    return [
        ROOT / "plugins" / p for p in PLUGINS if (ROOT / "plugins" / p / "pyproject.toml").exists()
    ]


def setup() -> None:
    """Create or refresh .venv with the core, every plugin (editable) and the pinned dev tools."""
    digest = hashlib.sha256()
    for f in [ROOT / "pyproject.toml", *(d / "pyproject.toml" for d in _plugin_dirs())]:
        digest.update(f.read_bytes())
    stamp = VENV / ".beampipe-stamp"
    if PY.exists() and stamp.exists() and stamp.read_text() == digest.hexdigest():
        return
    if not PY.exists():
        _say(f"creating {VENV}")
        venv.create(VENV, with_pip=True)
    _run(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    editables: list[str] = ["-e", ".[dev]"]
    for d in _plugin_dirs():
        editables += ["-e", str(d.relative_to(ROOT))]
    _run(PY, "-m", "pip", "install", "--quiet", *editables)
    stamp.write_text(digest.hexdigest())


def _ensure_broker() -> None:
    """Start the local RabbitMQ if it is installed and down, as DEVELOPERS.md says to."""
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
        return
    except OSError:
        pass
    server = shutil.which("rabbitmq-server")
    if server is None:
        _say("no RabbitMQ here: broker tests will skip (and fail under CI=true)")
        return
    _say("RabbitMQ is down: starting it with rabbitmq-server -detached")
    subprocess.call([server, "-detached"])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
            return
        except OSError:
            time.sleep(1)
    _say("RabbitMQ did not come up within 90 s")


def test(args: list[str]) -> None:
    _run(BIN / "ruff", "check", ".")
    _run(BIN / "ruff", "format", "--check", ".")
    _run(BIN / "mypy")
    _run(BIN / "lint-imports")
    _ensure_broker()
    rc = _run(PY, "-m", "pytest", *args, check=False)
    if rc == 5:
        _say("pytest collected no tests: that is a failure here")
        sys.exit(1)
    sys.exit(rc)


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("setup", "demo", "test", "bench"):
        print(__doc__)
        sys.exit(2)
    job, rest = argv[0], argv[1:]
    setup()
    if job == "demo":
        sys.exit(_run(PY, "-m", "beampipe.demo", *rest, check=False))
    if job == "test":
        test(rest)
    if job == "bench":
        sys.exit(_run(PY, "benchmarks/run.py", *rest, check=False))


if __name__ == "__main__":
    main(sys.argv[1:])
