"""ophyd-epicsrs as a benchmark peer, measured in its own venv on the caller's IOC.

ophyd-epicsrs (a Rust CA + PVA client with a bulk ``bulk_get``) pins ``ophyd==1.6.*``,
which cannot share the dev venv (ophyd 1.11), so it lives in ``benchmarks/.venv-epicsrs``
and runs as a subprocess (``epicsrs_worker.py``) that inherits the caller's EPICS
environment: the beampipe test IOCs listen on private CA/PVA ports, and a peer that
searched the defaults would measure nothing.

Use from a benchmark (``benchmarks/`` is on ``sys.path`` when a bench runs as a script)::

    from peers import epicsrs as epicsrs_peer

    python = epicsrs_peer.ensure_venv()
    if isinstance(python, str):
        print(f"  ophyd-epicsrs skipped: {python}")
    else:
        out = epicsrs_peer.measure({"bulk_scalars": {"names": names}}, repeats=40)
        seconds = out["rows"]["bulk_scalars"]["seconds"]      # one per repetition
        # out["errors"] maps a row that could not be measured to the reason

Row specs (``names``: full PV names; ``name_sets``: one list of never-seen names per
repetition, so their repetition count is ``len(name_sets)``):

==========================  ============================================  =================
row                         spec keys                                     result keys
==========================  ============================================  =================
single_get                  names (first used)                            seconds
bulk_scalars                names                                         seconds, n
bulk_waveforms              names, min_elements (optional)                seconds, n
connect_new                 name_sets                                     seconds, n
ophyd_device_connect_read   name_sets                                     seconds (connect),
                                                                          read_seconds,
                                                                          failures, attempts
ophyd_async_device          name_sets, reads (default 10), datatype       seconds (connect),
                            ("float" | "int" | "str")                     read_seconds
pva_single_get              names                                         seconds
pva_bulk_scalars            names                                         seconds, n
pva_bulk_waveforms          names, min_elements (optional)                seconds, n
pva_connect_new             name_sets                                     seconds, n
pva_ophyd_async_device      as ophyd_async_device                         as it
==========================  ============================================  =================

Every row spec may also set ``repeats`` and ``timeout`` (seconds for one connect or read).
Every result has ``api`` (the epicsrs call timed).  A row stops repeating early (never
below one) when it has run ``row_budget`` seconds; rows not started before the whole
budget is spent are reported in ``errors``.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PACKAGES",
    "READ_ROWS",
    "ROWS",
    "SET_ROWS",
    "VENV",
    "WORKER",
    "PeerError",
    "ensure_venv",
    "measure",
]

HERE = Path(__file__).resolve().parent
VENV = HERE.parent / ".venv-epicsrs"
WORKER = HERE / "epicsrs_worker.py"
#: Pinned so numbers from different days compare; bump deliberately (and re-measure).
PACKAGES = ("ophyd-epicsrs==0.13.0", "numpy")
READ_ROWS = frozenset(
    {
        "single_get",
        "bulk_scalars",
        "bulk_waveforms",
        "pva_single_get",
        "pva_bulk_scalars",
        "pva_bulk_waveforms",
    }
)
SET_ROWS = frozenset(
    {
        "connect_new",
        "ophyd_device_connect_read",
        "ophyd_async_device",
        "pva_connect_new",
        "pva_ophyd_async_device",
    }
)
ROWS = READ_ROWS | SET_ROWS
_INSTALL_TIMEOUT = 600.0
# Variables that would point the venv's interpreter at the caller's packages.
_DROP_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")


class PeerError(RuntimeError):
    """The worker process failed as a whole (crash, timeout, garbled output)."""


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _installed(python: Path) -> str | None:
    """None when the venv has the pinned packages, else why not."""
    if not python.exists():
        return f"{python} does not exist"
    want = dict(p.split("==", 1) for p in PACKAGES if "==" in p)
    code = (
        "import json, importlib.metadata as m, ophyd_epicsrs, ophyd_epicsrs.ophyd_async;"
        f"print(json.dumps({{d: m.version(d) for d in {sorted(want)!r}}}))"
    )
    try:
        out = subprocess.run(
            [str(python), "-I", "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env=_child_env(None),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} does not run: {exc}"
    if out.returncode != 0:
        return f"ophyd-epicsrs does not import in {python}: {_tail(out.stderr)}"
    have = json.loads(out.stdout)
    wrong = {d: have.get(d) for d, v in want.items() if have.get(d) != v}
    return f"wrong versions installed: {wrong}, want {want}" if wrong else None


def ensure_venv(venv: Path = VENV) -> Path | str:
    """The venv's python, creating and installing it on first use; or why it cannot be.

    A str return is a reason for the caller to print before skipping the peer (no
    network, no wheel for this platform...).  Safe to call from two benches at once: a
    lock file inside the venv directory serialises the install.
    """
    python = _python(venv)
    if _installed(python) is None:
        return python
    venv.mkdir(parents=True, exist_ok=True)
    with (venv / ".beampipe-install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed(python) is None:  # another process finished it while we waited
            return python
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PACKAGES],
        ]
        deadline = time.monotonic() + _INSTALL_TIMEOUT
        for cmd in steps:
            left = deadline - time.monotonic()
            try:
                out = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=left, env=_child_env(None)
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"cannot build {venv}: {' '.join(cmd[:4])}...: {exc}"
            if out.returncode != 0:
                return f"cannot build {venv}: {' '.join(cmd[:4])}... failed: " + _tail(
                    out.stderr or out.stdout
                )
        problem = _installed(python)
    return problem if problem is not None else python


def measure(
    rows: Mapping[str, Mapping[str, Any]],
    env: Mapping[str, str] | None = None,
    repeats: int = 20,
    *,
    timeout: float = 90.0,
    op_timeout: float = 10.0,
    row_budget: float = 18.0,
    python: Path | str | None = None,
) -> dict[str, Any]:
    """Run ``rows`` in the epicsrs venv against the IOCs this process can see.

    ``env`` is laid over ``os.environ`` for the worker (the EPICS_* variables, e.g.
    from ``beampipe.testing.pin_epics_to_loopback``, are inherited as they are).
    ``repeats`` is the timed repetitions of read rows; set rows repeat once per name
    set.  ``timeout`` bounds the whole worker (killed after it), ``op_timeout`` one
    connect or read, ``row_budget`` one row's repetitions.

    Returns ``{"rows": {row: result}, "errors": {row: reason}, "versions": {...},
    "python": path}``.  A row that fails (a read without a value, a connect that did not
    complete) is in ``errors`` and nowhere else; the other rows still run.  Raises
    ``ValueError`` for a bad spec and :class:`PeerError` when the worker itself fails,
    naming the row it was running.
    """
    spec = _validate(rows, repeats, timeout, op_timeout, row_budget)
    if python is None:
        got = ensure_venv()
        if isinstance(got, str):
            raise PeerError(f"ophyd-epicsrs venv unavailable: {got}")
        python = got
    try:
        proc = subprocess.Popen(
            [str(python), "-I", str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_child_env(env),
        )
    except OSError as exc:
        raise PeerError(f"cannot start the ophyd-epicsrs worker with {python}: {exc}") from exc
    timed_out = False
    try:
        stdout, stderr = proc.communicate(json.dumps(spec), timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:  # an exception other than the timeout: never leave it
            proc.kill()
            proc.wait()
    return _collect(spec, stdout, stderr, proc.returncode, timed_out, timeout, python)


def _validate(
    rows: Mapping[str, Mapping[str, Any]],
    repeats: int,
    timeout: float,
    op_timeout: float,
    row_budget: float,
) -> dict[str, Any]:
    if not rows:
        raise ValueError("measure: no rows given")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"measure: repeats must be a positive int, got {repeats!r}")
    if not 0 < op_timeout <= timeout or not 0 < row_budget <= timeout:
        raise ValueError("measure: need 0 < op_timeout, row_budget <= timeout")
    clean: dict[str, Any] = {}
    for name, row in rows.items():
        if name not in ROWS:
            raise ValueError(f"measure: unknown row {name!r}; known rows: {sorted(ROWS)}")
        key = "names" if name in READ_ROWS else "name_sets"
        value = row.get(key)
        if name in READ_ROWS:
            ok = _names_ok(value)
        else:
            ok = isinstance(value, Sequence) and bool(value) and all(map(_names_ok, value))
        if not ok:
            kind = "PV names" if key == "names" else "lists of PV names (one per repetition)"
            raise ValueError(f"measure: row {name!r} needs {key!r}: a non-empty list of {kind}")
        out = dict(row)
        out[key] = list(value or ()) if key == "names" else [list(s) for s in value or ()]
        clean[name] = out
    # The worker's own budget ends before ours, so it can report unrun rows itself.
    return {
        "rows": clean,
        "repeats": repeats,
        "timeout": op_timeout,
        "row_budget": row_budget,
        "budget": max(timeout - op_timeout - 5.0, row_budget),
    }


def _names_ok(value: object) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and bool(value)
        and all(isinstance(n, str) and n for n in value)
    )


def _collect(
    spec: dict[str, Any],
    stdout: str,
    stderr: str,
    returncode: int | None,
    timed_out: bool,
    timeout: float,
    python: Path | str,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    versions: dict[str, Any] = {}
    running: str | None = None
    done = False
    for line in stdout.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PeerError(
                f"ophyd-epicsrs worker wrote a non-JSON line {line[:200]!r}"
                + (f" during row {running!r}" if running else "")
            ) from exc
        if "hello" in msg:
            versions = msg["hello"]
        elif "start" in msg:
            running = msg["start"]
        elif "row" in msg:
            running = None
            if "error" in msg:
                errors[msg["row"]] = msg["error"]
            else:
                results[msg["row"]] = msg["result"]
        elif msg.get("done"):
            done = True
    if not done:
        where = f"during row {running!r}" if running else "outside any row"
        why = f"timed out after {timeout:.0f} s" if timed_out else f"exited {returncode}"
        partial = f"; rows finished: {sorted(results)}" if results else ""
        raise PeerError(
            f"ophyd-epicsrs worker {why} {where}{partial}; stderr tail:\n{_tail(stderr)}"
        )
    missing = [r for r in spec["rows"] if r not in results and r not in errors]
    for r in missing:
        errors[r] = "the worker reported nothing for this row"
    return {"rows": results, "errors": errors, "versions": versions, "python": str(python)}


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    if extra:
        env.update(extra)
    return env


def _tail(text: str, n: int = 1500) -> str:
    text = (text or "").strip()
    return text[-n:] if len(text) > n else text
