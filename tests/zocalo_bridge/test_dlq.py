"""Malformed and failing messages end in dlq.<queue> with the reason; the services live on."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from beampipe_zocalo import frame_analysis_recipe, go_headers

from .conftest import wait_consumers

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def recipe_message(analysis: str, reply_to: str, frame: Any) -> dict[str, Any]:
    recipe = frame_analysis_recipe(analysis)
    recipe["1"]["parameters"] = {"frame": frame, "run_uid": "r", "trigger_id": f"r/x/{frame}"}
    recipe["2"]["queue"] = reply_to
    return {
        "recipe": recipe,
        "recipe-pointer": 1,
        "recipe-path": [],
        "environment": {},
        "payload": None,
    }


def dead_letters(backend: Any, q: str, n: int, timeout: float = 20) -> list[dict[str, Any]]:
    return [json.loads(body) for _, body in backend.drain(f"dlq.{q}", n, timeout)]


def test_malformed_messages_go_to_the_dlq_with_reasons(backend: Any, services: Any) -> None:
    processing, analysis = backend.name("processing"), backend.name("analysis")
    replies = backend.name("replies")
    args = backend.service_args
    dispatcher = services("BeampipeDispatcher", args, processing_queue=processing)
    analyser = services("BeampipeFrameAnalysis", args, analysis_queue=analysis)
    backend.wait_ready(processing, dispatcher, "dispatching requests from")
    backend.wait_ready(analysis, analyser, "frame analysis on")
    recipe_header = {**go_headers(), "workflows-recipe": True}

    expected = []
    if backend.kind == "pika":  # an AMQP message can lack headers altogether
        backend.publish_raw(analysis, b'{"recipe": {}}', None)
        expected.append("published without headers")
    backend.publish_raw(analysis, b"not json {", go_headers())
    backend.publish_raw(analysis, b'{"payload": 1}', recipe_header)  # no recipe
    backend.publish_raw(
        analysis, json.dumps(recipe_message(analysis, replies, [1, 2])).encode(), recipe_header
    )  # 1-D frame
    expected += [
        "body is not JSON: Expecting value: line 1 column 1 (char 0)",
        "missing recipe: body has no 'recipe'",
        "frame must be a non-empty 2-D array, got shape (2,)",
    ]
    reasons = [d["reason"] for d in dead_letters(backend, analysis, len(expected))]
    assert reasons == expected

    backend.publish_raw(processing, b'{"parameters": {}}', go_headers())
    backend.publish_raw(processing, b'{"recipes": ["xia2"]}', go_headers())
    backend.publish_raw(
        processing, json.dumps({"custom_recipe": {"start": []}}).encode(), go_headers()
    )
    dl = dead_letters(backend, processing, 3)
    assert dl[0]["reason"].startswith("missing recipe")
    assert "no recipe directory is configured" in dl[1]["reason"]
    assert "recipe cannot be built" in dl[2]["reason"]
    assert dl[1]["original_body"] == '{"recipes": ["xia2"]}'
    assert dl[1]["original_headers"]["zocalo.go.user"]

    # Both services survived all of it and still do their job.
    if backend.queues is not None:
        backend.queues.declare(replies)
    backend.publish_raw(
        analysis, json.dumps(recipe_message(analysis, replies, [[0, 2]])).encode(), recipe_header
    )
    ((_, body),) = backend.drain(replies, 1)
    assert json.loads(body)["payload"]["results"]["centroid_x"] == 1.0
    assert dispatcher.alive() and analyser.alive()


def test_failing_send_is_retried_a_bounded_number_of_times(queues: Any, services: Any) -> None:
    """The reply queue is gone: rw.send fails, the message is redelivered 3 times, then parked."""
    analysis = queues("analysis")
    analyser = services("BeampipeFrameAnalysis", analysis_queue=analysis, delivery_limit="3")
    wait_consumers(queues, analysis, service=analyser)
    t0 = time.monotonic()
    queues.publish_raw(
        analysis,
        json.dumps(recipe_message(analysis, queues("gone"), [[1]])).encode(),
        {**go_headers(), "workflows-recipe": True},
    )
    (dl,) = [json.loads(b) for _, b in queues.get_all(f"dlq.{analysis}", expect=1, timeout=20)]
    assert dl["reason"].startswith("failed 3 time(s), last: PublishRefused"), dl["reason"]
    assert "gone" in dl["reason"]
    assert dl["original_headers"]["x-delivery-count"] == 2
    assert time.monotonic() - t0 < 15
    assert analyser.alive()
