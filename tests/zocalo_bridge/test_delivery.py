"""Nothing lost: fallback file + replay when the broker stays away; a broker restart mid-scan."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bluesky.plans import count, scan
from ophyd_async.plan_stubs import ensure_connected

from beampipe_zocalo import (
    BrokerParams,
    PikaPublisher,
    ReliableSender,
    ResultsListener,
    TriggerRule,
    ZocaloCallback,
    ZocaloResults,
)

from .conftest import VENV_BIN, wait_consumers
from .test_end_to_end import frame_rule, make_devices

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when we return: nothing listens


def test_broker_down_goes_to_fallback_and_replay_resends(
    run_engine: Any, broker: Any, queues: Any, tmp_path: Path
) -> None:
    processing = queues("processing")
    fallback = tmp_path / "spool" / "zocalo-fallback.jsonl"
    dead = BrokerParams("127.0.0.1", closed_port())
    rule = TriggerRule(
        name="xia2", recipes=["example-xia2"], parameters={"ispyb_dcid": "start.ispyb_dcid"}
    )
    with ReliableSender(PikaPublisher(dead), fallback=fallback, retry_for=0.3) as sender:
        cb = ZocaloCallback([rule], sender, queue=processing)
        run_engine(count([], num=1, md={"ispyb_dcid": 9}), cb)  # start + end
        assert sender.flush(15)
        assert sender.stats.to_fallback == 2 and sender.stats.sent == 0
    lines = [json.loads(ln) for ln in fallback.read_text().splitlines()]
    assert [json.loads(r["body"])["parameters"]["event"] for r in lines] == ["start", "end"]
    assert all(r["headers"]["zocalo.go.user"] and r["queue"] == processing for r in lines)

    proc = subprocess.run(
        [
            str(VENV_BIN / "beampipe-zocalo-replay"),
            str(fallback),
            "--host",
            broker.host,
            "--port",
            str(broker.port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "replayed 2 message(s)" in proc.stdout
    assert fallback.read_text() == ""
    got = queues.get_all(processing, expect=2)
    assert [json.loads(b)["parameters"]["ispyb_dcid"] for _, b in got] == [9, 9]
    assert all(p.headers["zocalo.go.host"] for p, _ in got)


@pytest.mark.timeout(240)
def test_broker_restart_mid_scan_loses_nothing(
    run_engine: Any, rabbitmq: Any, broker: Any, queues: Any, services: Any, tmp_path: Path
) -> None:
    processing, analysis = queues("processing"), queues("analysis")
    svcs = [
        services("BeampipeDispatcher", processing_queue=processing),
        services("BeampipeFrameAnalysis", analysis_queue=analysis),
    ]
    wait_consumers(queues, processing, service=svcs[0])
    wait_consumers(queues, analysis, service=svcs[1])

    listener = ResultsListener(broker=broker, queue=queues("results")).start()
    fallback = tmp_path / "fallback.jsonl"
    sender = ReliableSender(PikaPublisher(broker), fallback=fallback, retry_for=120)
    restarted = threading.Event()
    restarter: list[threading.Thread] = []

    def restart_at_event_3(name: str, doc: dict[str, Any]) -> None:
        if name == "event" and doc["seq_num"] == 3 and not restarter:
            # Down before the scan goes on (rabbitmqctl takes seconds to act: a restart
            # merely begun here let the rest of the scan's sends land before it, now and
            # then), back up while the scan keeps sending.
            rabbitmq.stop()
            t = threading.Thread(target=lambda: (rabbitmq.start(), restarted.set()))
            restarter.append(t)
            t.start()

    # zocalo.service exits when its connection drops (workflows cannot resume
    # acknowledged subscriptions); a supervisor restarts it, as on a beamline.
    stop_supervising = threading.Event()

    def supervise() -> None:
        while not stop_supervising.wait(0.5):
            for svc in svcs:
                if not svc.alive():
                    svc.start()

    supervisor = threading.Thread(target=supervise, name="test-supervisor")
    supervisor.start()
    try:
        cb = ZocaloCallback(
            [frame_rule(analysis, "restart")], sender, queue=processing, reply_to=listener.queue
        )
        results = ZocaloResults(listener, cb, rules=["frames"], timeout=150, name="zocalo")
        run_engine(ensure_connected(results))
        motor, cam = make_devices()
        n = 10

        def slow_scan() -> Any:
            # Keep events coming while the broker is away.
            import bluesky.plan_stubs as bps

            def per_step(detectors: Any, step: Any, pos_cache: Any) -> Any:
                yield from bps.one_nd_step(detectors, step, pos_cache)
                yield from bps.sleep(0.3)

            yield from scan(
                [cam],
                motor,
                0,
                n - 1,
                n,
                per_step=per_step,
                md={"ispyb_dcid": 1, "bptest": "restart"},
            )
            yield from count([results])

        readings: list[dict[str, Any]] = []
        run_engine(
            slow_scan(),
            {"all": [cb, restart_at_event_3], "event": lambda n_, d: readings.append(d)},
        )
        (event,) = [d for d in readings if "zocalo-count" in d["data"]]
        assert restarted.wait(120)
        assert event["data"]["zocalo-count"] == n
        np.testing.assert_allclose(
            event["data"]["zocalo-centroid_x"], 8.0 + np.arange(n), atol=1e-6
        )
        assert sender.stats.to_fallback == 0 and sender.stats.sent == n
        assert sender.stats.retries >= 1  # it really was cut off
        assert not listener.rejected
        assert sum(s.starts for s in svcs) >= 3  # at least one service was restarted
    finally:
        for t in restarter:
            t.join(120)
        stop_supervising.set()
        supervisor.join()
        listener.close()
        sender.close()


def test_sender_never_blocks_and_never_drops_when_its_queue_is_full(tmp_path: Path) -> None:
    fallback = tmp_path / "fb.jsonl"
    dead = BrokerParams("127.0.0.1", closed_port())
    sender = ReliableSender(PikaPublisher(dead), fallback=fallback, retry_for=1.0, max_pending=1)
    try:
        t0 = time.monotonic()
        for i in range(5):
            sender.send("q", {"i": i}, {"h": 1})
        assert time.monotonic() - t0 < 0.5  # the caller (a RunEngine) never waits on a broker
        assert sender.flush(30)
    finally:
        sender.close()
    kept = sorted(
        json.loads(json.loads(ln)["body"])["i"] for ln in fallback.read_text().splitlines()
    )
    assert kept == [0, 1, 2, 3, 4]
    assert sender.stats.to_fallback == 5
    with ReliableSender(PikaPublisher(dead)) as other, pytest.raises(ValueError, match="headers"):
        other.send("q", {}, {})
