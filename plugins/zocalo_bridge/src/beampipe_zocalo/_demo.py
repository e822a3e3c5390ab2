"""Demo step "40-zocalo": a scan over the demo IOC's motor triggers per-frame zocalo
processing, and the plan reads the results back through ZocaloResults.

Broker-less on the SHM transport when beampipe-shm is installed (the one-host
default), else on RabbitMQ if one answers; ``BEAMPIPE_DEMO_ZOCALO=pika|shm`` chooses.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pika

from ._callback import ZocaloCallback
from ._queues import BrokerParams, delete_queues
from ._results import ResultsListener, ZocaloResults
from ._rules import TriggerRule
from ._sender import PikaPublisher, ReliableSender, TransportPublisher
from ._services import frame_analysis_recipe
from ._transport import GuardedPikaTransport
from ._wire import dlq_name

SHAPE = (16, 32)


def _spot(x: float) -> np.ndarray:
    rows, cols = np.indices(SHAPE, dtype=float)
    return 100.0 * np.exp(-((cols - 12.0 - 2 * x) ** 2 + (rows - 8.0) ** 2) / 4.0)


def _reachable(b: BrokerParams) -> bool:
    try:
        with socket.create_connection((b.host, b.port), timeout=1):
            return True
    except OSError:
        return False


def _have_shm() -> bool:
    try:
        importlib.import_module("beampipe_shm").ShmTransport  # noqa: B018
    except (ImportError, AttributeError):
        return False
    return True


def _wait_line(log: Path, line: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while line not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"demo failed: zocalo service not ready:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)


def step(ctx: Any) -> None:
    from bluesky.plans import count, scan
    from ophyd import EpicsSignal
    from ophyd.sim import SynSignal
    from ophyd_async.plan_stubs import ensure_connected

    broker = BrokerParams(
        os.environ.get("BEAMPIPE_AMQP_HOST", "127.0.0.1"),
        int(os.environ.get("BEAMPIPE_AMQP_PORT", "5672")),
    )
    ns = f"bpdemo{secrets.token_hex(3)}"
    kind = os.environ.get("BEAMPIPE_DEMO_ZOCALO") or ("shm" if _have_shm() else "pika")
    factory: Any
    if kind == "shm":
        shm: Any = importlib.import_module("beampipe_shm")

        def factory() -> Any:
            return shm.ShmTransport(namespace=ns)

        transport_args = ["-t", "ShmTransport", "--shm-namespace", ns]
        publisher: Any = TransportPublisher(factory)
        where = f"ShmTransport namespace {ns} (no broker)"
    else:
        if not _reachable(broker):
            ctx.report("zocalo", f"skipped: no RabbitMQ at {broker} and beampipe-shm missing")
            return

        def factory() -> Any:
            return GuardedPikaTransport(broker=broker)

        transport_args = [
            "-t",
            "GuardedPikaTransport",
            "--rabbit-host",
            broker.host,
            "--rabbit-port",
            str(broker.port),
        ]
        publisher = PikaPublisher(broker)
        where = str(broker)
    processing, analysis, replies = f"{ns}.processing", f"{ns}.analysis", f"{ns}.results"
    procs: list[subprocess.Popen[bytes]] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEAMPIPE_ZOCALO_")}
    env.pop("ZOCALO_CONFIG", None)
    env.update(BEAMPIPE_ZOCALO_PROCESSING_QUEUE=processing, BEAMPIPE_ZOCALO_ANALYSIS_QUEUE=analysis)
    zs = str(Path(sys.executable).with_name("zocalo.service"))
    listener = sender = None
    logs: list[Path] = []
    try:
        t0 = time.perf_counter()
        logs = []
        for name in ("BeampipeDispatcher", "BeampipeFrameAnalysis"):
            log = Path(tempfile.gettempdir()) / f"{ns}-{name}.log"
            logs.append(log)
            with open(log, "wb") as fh:
                procs.append(
                    subprocess.Popen(
                        [zs, "-s", name, *transport_args],
                        env=env,
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        _wait_line(logs[0], "dispatching requests from", procs[0])
        _wait_line(logs[1], "frame analysis on", procs[1])
        ctx.report(
            "zocalo",
            f"zocalo.service -s BeampipeDispatcher / BeampipeFrameAnalysis up "
            f"in {time.perf_counter() - t0:.1f} s on {where}",
        )
        recipe = frame_analysis_recipe(analysis)
        rule = TriggerRule(
            name="frames",
            on=["event"],
            custom_recipe=recipe,
            parameters={"frame": "event.data.cam", "ispyb_dcid": "start.ispyb_dcid"},
        )
        listener = ResultsListener(factory, queue=replies).start()
        sender = ReliableSender(publisher)
        cb = ZocaloCallback([rule], sender, queue=processing, reply_to=listener.queue)
        results = ZocaloResults(
            listener, cb, fields=["sum", "centroid_x"], timeout=60, name="zocalo"
        )
        RE = ctx.run_engine
        RE(ensure_connected(results))
        mot = EpicsSignal(ctx.ioc.pv("mot"), name="mot")
        mot.wait_for_connection(timeout=10)
        cam = SynSignal(func=lambda: _spot(mot.get()), name="cam")
        rows: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        RE(scan([cam], mot, -3, 5, 9, md={"ispyb_dcid": 1}), cb)
        RE(count([results]), lambda n, d: rows.append(d) if n == "event" else None)
        dt = time.perf_counter() - t0
        data = rows[0]["data"]
        cx = np.asarray(data["zocalo-centroid_x"])
        ctx.report(
            "zocalo",
            f"scan of 9 frames -> 9 recipes -> 9 results back in the plan "
            f"in {dt:.2f} s (sender: {sender.stats.sent} confirmed)",
        )
        for m, c in zip(np.linspace(-3, 5, 9), cx, strict=True):
            ctx.report("zocalo", f"    mot = {m:5.1f}   frame centroid_x = {c:6.2f} px")
        if not np.allclose(cx, 12 + 2 * np.linspace(-3, 5, 9), atol=1e-3):
            raise SystemExit("demo failed: centroids from zocalo do not follow the motor")
        ctx.results["zocalo_centroids"] = cx.tolist()
    finally:
        if listener is not None:
            listener.close()
        if sender is not None:
            sender.close()
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        for log in logs:
            log.unlink(missing_ok=True)
        if kind == "shm":
            importlib.import_module("beampipe_shm").ShmTransport.remove_store(ns)
        else:
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                conn = pika.BlockingConnection(broker.pika())
                names = [q for n in (processing, analysis) for q in (n, dlq_name(n))]
                delete_queues(conn, names)
                conn.close()
