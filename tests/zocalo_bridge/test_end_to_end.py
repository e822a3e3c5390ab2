"""RunEngine scan -> ZocaloCallback -> BeampipeDispatcher -> BeampipeFrameAnalysis -> ZocaloResults.

Everything real: RabbitMQ on loopback, the services as ``zocalo.service -s``
subprocesses, bluesky's RunEngine, an ophyd-async device awaiting the results.
"""

from __future__ import annotations

import json
import secrets
import threading
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
import pytest
from bluesky.plans import count, scan
from bluesky.utils import FailedStatus
from ophyd.sim import SynAxis, SynSignal
from ophyd_async.plan_stubs import ensure_connected

from beampipe_zocalo import (
    DocumentForwarder,
    PikaPublisher,
    ReliableSender,
    ResultsListener,
    TriggerRule,
    ZocaloCallback,
    ZocaloResults,
    ZocaloResultsError,
    ZocaloResultsTimeout,
    frame_analysis_recipe,
)

from .conftest import wait_consumers

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SHAPE = (12, 32)


def spot(x: float) -> np.ndarray:
    """A Gaussian spot whose column centroid is 8 + x: the analysis must find it there."""
    rows, cols = np.indices(SHAPE, dtype=float)
    return 100.0 * np.exp(-((cols - 8.0 - x) ** 2 + (rows - 5.0) ** 2) / 2.0)


def frame_rule(analysis_queue: str, tag: str) -> TriggerRule:
    return TriggerRule(
        name="frames",
        on=("event",),
        custom_recipe=frame_analysis_recipe(analysis_queue),
        parameters={"frame": "event.data.cam", "ispyb_dcid": "start.ispyb_dcid"},
        match={"bptest": tag},
    )


def run_engine_read(run_engine: Any, device: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def plan() -> Any:
        out.update((yield from bps.read(device)))
        for sig in (device.run_uid,):
            out[sig.name] = {"value": (yield from bps.rd(sig))}

    run_engine(plan())
    return out


def make_devices() -> tuple[SynAxis, SynSignal]:
    motor = SynAxis(name="mot")
    cam = SynSignal(func=lambda: spot(motor.readback.get()), name="cam")
    return motor, cam


def test_scan_triggers_recipe_and_plan_gets_results(
    run_engine: Any, backend: Any, services: Any, tmp_path: Path
) -> None:
    """The whole path, on RabbitMQ and on the broker-less SHM transport alike."""
    processing, analysis = backend.name("processing"), backend.name("analysis")
    args = backend.service_args
    dispatcher = services("BeampipeDispatcher", args, processing_queue=processing)
    analyser = services("BeampipeFrameAnalysis", args, analysis_queue=analysis)
    backend.wait_ready(processing, dispatcher, "dispatching requests from")
    backend.wait_ready(analysis, analyser, "frame analysis on")

    tag = secrets.token_hex(4)
    listener = ResultsListener(backend.factory, queue=backend.name("results")).start()
    sender = ReliableSender(backend.publisher(), fallback=tmp_path / "fallback.jsonl")
    try:
        cb = ZocaloCallback(
            [frame_rule(analysis, tag)], sender, queue=processing, reply_to=listener.queue
        )
        results = ZocaloResults(listener, cb, rules=["frames"], timeout=30, name="zocalo")
        run_engine(ensure_connected(results))
        motor, cam = make_devices()
        readings: list[dict[str, Any]] = []

        def plan() -> Any:
            yield from scan([cam], motor, -2, 2, 5, md={"ispyb_dcid": 1234, "bptest": tag})
            # dodal's pattern: results read in a later run that triggers nothing itself.
            yield from count([results])

        token = run_engine.subscribe(cb)
        try:
            run_engine(plan(), lambda n, d: readings.append(d) if n == "event" else None)
        finally:
            run_engine.unsubscribe(token)
        assert sender.flush(10)
        assert sender.stats.sent == 5 and sender.stats.to_fallback == 0

        (event,) = [d for d in readings if "zocalo-count" in d["data"]]
        assert event["data"]["zocalo-count"] == 5
        np.testing.assert_allclose(event["data"]["zocalo-centroid_x"], [6, 7, 8, 9, 10], atol=1e-6)
        np.testing.assert_allclose(event["data"]["zocalo-centroid_y"], [5] * 5, atol=1e-6)
        assert listener.duplicates == 0 and not listener.rejected
        assert not (tmp_path / "fallback.jsonl").exists()

        # A second run's trigger waits for *its* results, never the first run's.
        first_run = cb.last_triggered
        run_engine(scan([cam], motor, 0, 1, 2, md={"ispyb_dcid": 5, "bptest": tag}), cb)
        assert cb.last_triggered not in (None, first_run)
        run_engine(bps.trigger(results, wait=True))
        reading = run_engine_read(run_engine, results)
        assert reading["zocalo-count"]["value"] == 2
        np.testing.assert_allclose(reading["zocalo-centroid_x"]["value"], [8, 9], atol=1e-6)
        assert reading["zocalo-run_uid"]["value"] == cb.last_triggered
    finally:
        listener.close()
        sender.close()
        dispatcher.stop()
        analyser.stop()


def test_results_timeout_names_run_and_queue(run_engine: Any, broker: Any, queues: Any) -> None:
    """No services running: trigger() fails after the timeout with a reason, it does not hang."""
    listener = ResultsListener(broker=broker, queue=queues("results")).start()
    sender = ReliableSender(PikaPublisher(broker))
    try:
        processing = queues("processing")
        cb = ZocaloCallback(
            [frame_rule(queues("analysis"), "t")], sender, queue=processing, reply_to=listener.queue
        )
        results = ZocaloResults(listener, cb, timeout=1.0, name="zocalo")
        run_engine(ensure_connected(results))
        motor, cam = make_devices()
        run_engine(scan([cam], motor, 0, 1, 2, md={"ispyb_dcid": 1, "bptest": "t"}), cb)
        with pytest.raises(FailedStatus) as info:
            run_engine(bps.trigger(results, wait=True))
        cause = info.value.__cause__
        assert isinstance(cause, ZocaloResultsTimeout)
        assert cb.last_triggered in str(cause) and listener.queue in str(cause)
        assert "0 of 2 results" in str(cause)
        assert sender.flush(10) and sender.stats.sent == 2
        # The requests are on the broker, intact, with zocalo.go headers.
        msgs = queues.get_all(processing, expect=2)
        assert len(msgs) == 2
        for props, body in msgs:
            assert props.headers["zocalo.go.user"] and props.headers["zocalo.go.host"]
            msg = json.loads(body)
            assert msg["parameters"]["ispyb_dcid"] == 1
            assert msg["parameters"]["beampipe_reply_to"] == listener.queue
            assert np.asarray(msg["parameters"]["frame"]).shape == SHAPE
    finally:
        listener.close()
        sender.close()


def test_document_forwarder_and_trigger_service(
    run_engine: Any, broker: Any, queues: Any, services: Any, tmp_path: Path
) -> None:
    """Rules applied away from the RunEngine: documents -> BeampipeDocumentTrigger -> requests."""
    docs, processing = queues("documents"), queues("processing")
    tag = secrets.token_hex(4)
    rules_file = tmp_path / "rules.json"
    rules_file.write_text(
        json.dumps(
            [
                {
                    "name": "xia2",
                    "recipes": ["example-xia2"],
                    "on": ["start", "end"],
                    "match": {"bptest": tag},
                    "parameters": {
                        "ispyb_dcid": "start.ispyb_dcid",
                        "n_frames": {"path": "stop.num_events.primary", "default": None},
                    },
                },
            ]
        )
    )
    trigger = services(
        "BeampipeDocumentTrigger",
        documents_queue=docs,
        processing_queue=processing,
        rules=str(rules_file),
    )
    wait_consumers(queues, docs, service=trigger)
    sender = ReliableSender(PikaPublisher(broker))
    try:
        fwd = DocumentForwarder(sender, queue=docs)
        motor, cam = make_devices()
        run_engine(scan([cam], motor, 0, 1, 3, md={"ispyb_dcid": 77, "bptest": tag}), fwd)
        assert sender.flush(10)
        msgs = queues.get_all(processing, expect=2, timeout=20)
        bodies = sorted((json.loads(b) for _, b in msgs), key=lambda m: m["parameters"]["event"])
        assert [m["parameters"]["event"] for m in bodies] == ["end", "start"]
        assert all(m["recipes"] == ["example-xia2"] for m in bodies)
        assert bodies[0]["parameters"]["n_frames"] == 3
        assert bodies[1]["parameters"]["n_frames"] is None
        assert {m["parameters"]["ispyb_dcid"] for m in bodies} == {77}
        # The user who ran the scan, not the service account, is in the headers.
        assert all(p.headers["zocalo.go.user"] for p, _ in msgs)
    finally:
        sender.close()
        trigger.stop()


class _Tracker:
    """Stands in for the callback: says which run and trigger ids to wait for."""

    def __init__(self, reply_to: str) -> None:
        self.reply_to = reply_to
        self.last_triggered: str | None = None
        self.sent: dict[str, list[str]] = {}

    def expected(self, run_uid: str) -> list[str]:
        return self.sent.get(run_uid, [])


def _result(run: str, tid: str, value: float) -> bytes:
    payload = {"beampipe_run_uid": run, "beampipe_trigger_id": tid, "results": {"sum": value}}
    return json.dumps({"payload": payload, "recipe": {}, "recipe-pointer": 2}).encode()


def test_results_are_per_run_deduplicated_and_never_stale(
    run_engine: Any, broker: Any, queues: Any
) -> None:
    from beampipe_zocalo import go_headers

    listener = ResultsListener(broker=broker, queue=queues("results")).start()
    try:
        tracker = _Tracker(listener.queue)
        results = ZocaloResults(listener, tracker, fields=["sum"], timeout=10, name="z")
        run_engine(ensure_connected(results))
        # Run A's results (stale by the time run B is awaited), run B's with a duplicate
        # (at-least-once delivery), and garbage: none may confuse run B's reading.
        for body in (
            _result("A", "A/r/end", 1.0),
            _result("B", "B/r/event/1", 2.0),
            _result("B", "B/r/event/1", 2.0),
            b"garbage",
        ):
            queues.publish_raw(listener.queue, body, go_headers())
        tracker.sent = {"A": ["A/r/end"], "B": ["B/r/event/1", "B/r/event/2"]}
        tracker.last_triggered = "B"
        late = threading.Timer(
            0.5,
            queues.publish_raw,
            (listener.queue, _result("B", "B/r/event/2", 3.0), go_headers()),
        )
        late.start()
        try:
            run_engine(bps.trigger(results, wait=True))  # awaits B/r/event/2 in the RE's loop
        finally:
            late.join()
        reading = run_engine_read(run_engine, results)
        np.testing.assert_array_equal(reading["z-sum"]["value"], [2.0, 3.0])
        assert reading["z-run_uid"]["value"] == "B"
        assert listener.duplicates == 1
        assert len(listener.rejected) == 1 and "garbage" in listener.rejected[0]
        with pytest.raises(ZocaloResultsError, match="reply_to"):
            ZocaloResults(listener, _Tracker("elsewhere"))
    finally:
        listener.close()


def test_two_listeners_in_one_process_keep_their_own_results(broker: Any, queues: Any) -> None:
    """workflows 3.3 shares subscription callbacks between transports of one process."""
    from beampipe_zocalo import go_headers

    a = ResultsListener(broker=broker, queue=queues("a")).start()
    b = ResultsListener(broker=broker, queue=queues("b")).start()
    try:
        got = threading.Event()
        a.on_result = lambda run, tid: got.set()
        queues.publish_raw(a.queue, _result("RA", "RA/r/end", 1.0), go_headers())
        assert got.wait(10)
        assert list(a.results("RA")) == ["RA/r/end"] and b.results("RA") == {}
    finally:
        a.close()
        b.close()


def test_rules_run_in_a_service_and_results_still_come_back(
    run_engine: Any, backend: Any, services: Any, tmp_path: Path
) -> None:
    """DocumentForwarder -> BeampipeDocumentTrigger -> Dispatcher -> FrameAnalysis -> plan."""
    docs_q, processing = backend.name("documents"), backend.name("processing")
    analysis = backend.name("analysis")
    tag = secrets.token_hex(4)
    rule = frame_rule(analysis, tag)
    rules_file = tmp_path / "rules.json"
    rules_file.write_text(
        json.dumps(
            [
                {
                    "name": rule.name,
                    "on": list(rule.on),
                    "custom_recipe": rule.custom_recipe,
                    "parameters": {"frame": "event.data.cam", "ispyb_dcid": "start.ispyb_dcid"},
                    "match": {"bptest": tag},
                }
            ]
        )
    )
    args = backend.service_args
    svcs = [
        services(
            "BeampipeDocumentTrigger",
            args,
            documents_queue=docs_q,
            processing_queue=processing,
            rules=str(rules_file),
        ),
        services("BeampipeDispatcher", args, processing_queue=processing),
        services("BeampipeFrameAnalysis", args, analysis_queue=analysis),
    ]
    for svc, q, line in zip(
        svcs,
        (docs_q, processing, analysis),
        ("rule(s); documents from", "dispatching requests from", "frame analysis on"),
        strict=True,
    ):
        backend.wait_ready(q, svc, line)
    listener = ResultsListener(backend.factory, queue=backend.name("results")).start()
    sender = ReliableSender(backend.publisher())
    try:
        # Same rules on the RunEngine side, only so the device knows what to wait for.
        fwd = DocumentForwarder(sender, queue=docs_q, rules=[rule], reply_to=listener.queue)
        results = ZocaloResults(listener, fwd, timeout=30, name="zocalo")
        run_engine(ensure_connected(results))
        motor, cam = make_devices()
        readings: list[dict[str, Any]] = []
        run_engine(scan([cam], motor, -1, 1, 3, md={"ispyb_dcid": 3, "bptest": tag}), fwd)
        run_engine(count([results]), lambda n, d: readings.append(d) if n == "event" else None)
        assert readings[0]["data"]["zocalo-count"] == 3
        np.testing.assert_allclose(readings[0]["data"]["zocalo-centroid_x"], [7, 8, 9], atol=1e-6)
        assert sender.stats.sent == 5  # start, 3 events, stop: documents, not requests
    finally:
        listener.close()
        sender.close()


def test_frames_by_reference_through_a_shm_frame_stream(
    run_engine: Any, backend: Any, services: Any
) -> None:
    """The trigger carries a frame id; the analysis copies the frame out of a beampipe_shm ring."""
    shm = pytest.importorskip("beampipe_shm")
    processing, analysis = backend.name("processing"), backend.name("analysis")
    args = backend.service_args
    dispatcher = services("BeampipeDispatcher", args, processing_queue=processing)
    analyser = services("BeampipeFrameAnalysis", args, analysis_queue=analysis)
    backend.wait_ready(processing, dispatcher, "dispatching requests from")
    backend.wait_ready(analysis, analyser, "frame analysis on")
    stream = f"bpzf{secrets.token_hex(4)}"
    recipe = frame_analysis_recipe(analysis)
    recipe["1"]["parameters"] = {
        "frame_stream": stream,
        "frame_id": "{frame_id}",
        "run_uid": "{beampipe_run_uid}",
        "trigger_id": "{beampipe_trigger_id}",
    }
    rule = TriggerRule(
        name="frames",
        on=["event"],
        custom_recipe=recipe,
        parameters={"frame_id": "event.seq_num"},
    )
    producer = shm.Producer(stream, [shm.StreamSpec("cam", np.float64, SHAPE)], slots=16)
    listener = ResultsListener(backend.factory, queue=backend.name("results")).start()
    sender = ReliableSender(backend.publisher())
    try:
        frames = shm.FrameCallback(producer, "cam")
        cb = ZocaloCallback([rule], sender, queue=processing, reply_to=listener.queue)
        results = ZocaloResults(listener, cb, timeout=30, name="zocalo")
        run_engine(ensure_connected(results))
        motor, cam = make_devices()
        readings: list[dict[str, Any]] = []

        def slow_scan() -> Any:
            # The SHM ring keeps only the newest frames: give the services time per frame.
            def per_step(detectors: Any, step: Any, pos_cache: Any) -> Any:
                yield from bps.one_nd_step(detectors, step, pos_cache)
                yield from bps.sleep(0.5)

            yield from scan([cam], motor, -2, 2, 5, per_step=per_step)

        run_engine(slow_scan(), {"all": [frames, cb]})  # frames published before triggers
        run_engine(count([results]), lambda n, d: readings.append(d) if n == "event" else None)
        assert frames.published == 5
        np.testing.assert_allclose(
            readings[0]["data"]["zocalo-centroid_x"], [6, 7, 8, 9, 10], atol=1e-6
        )
        # Only ids went over the wire, not pixels.
        assert all("frame" not in t.message["parameters"] for t in cb.triggers)
    finally:
        listener.close()
        sender.close()
        producer.close()


def test_shm_frame_source_finds_waits_for_or_dead_letters_a_frame() -> None:
    shm = pytest.importorskip("beampipe_shm")
    from beampipe_zocalo import FrameNotReady, MalformedMessage, ShmFrameSource

    stream = f"bpzf{secrets.token_hex(4)}"
    source = ShmFrameSource(wait=0.3)
    with pytest.raises(FrameNotReady, match="no frame stream"):
        source.get(stream, 1, "r", None)
    producer = shm.Producer(stream, [shm.StreamSpec("cam", np.float64, (2, 3))], slots=4)
    try:
        for i in range(1, 6):
            producer.publish({"cam": np.full((2, 3), float(i))}, frame_id=i, attrs={"run": "r"})
        np.testing.assert_array_equal(source.get(stream, 5, "r", "cam"), np.full((2, 3), 5.0))
        with pytest.raises(MalformedMessage, match="frame 1 of run r is no longer in stream"):
            source.get(stream, 1, "r", None)
        with pytest.raises(FrameNotReady, match="frame 9 of run r not in stream"):
            source.get(stream, 9, "r", None)
    finally:
        producer.close()
