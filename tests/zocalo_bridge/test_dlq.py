"""Malformed and failing messages end in dlq.<queue> with the reason; the services live on."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from beampipe_zocalo import go_headers

from .conftest import wait_consumers
from .test_end_to_end import analysis_recipe

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def recipe_message(analysis: str, reply_to: str, frame: Any) -> dict[str, Any]:
    recipe = analysis_recipe(analysis)
    recipe["1"]["parameters"] = {"frame": frame, "run_uid": "r", "trigger_id": f"r/x/{frame}"}
    recipe["2"]["queue"] = reply_to
    return {
        "recipe": recipe,
        "recipe-pointer": 1,
        "recipe-path": [],
        "environment": {},
        "payload": None,
    }


def dead_letters(queues: Any, q: str, n: int, timeout: float = 20) -> list[dict[str, Any]]:
    got = queues.get_all(f"dlq.{q}", expect=n, timeout=timeout)
    return [json.loads(body) for _, body in got]


def test_malformed_messages_go_to_the_dlq_with_reasons(queues: Any, services: Any) -> None:
    processing, analysis, replies = queues("processing"), queues("analysis"), queues("replies")
    dispatcher = services("BeampipeDispatcher", processing_queue=processing)
    analyser = services("BeampipeFrameAnalysis", analysis_queue=analysis)
    wait_consumers(queues, processing, service=dispatcher)
    wait_consumers(queues, analysis, service=analyser)
    recipe_header = {**go_headers(), "workflows-recipe": True}

    queues.publish_raw(analysis, b'{"recipe": {}}', None)  # no headers at all
    queues.publish_raw(analysis, b"not json {", go_headers())
    queues.publish_raw(analysis, b'{"payload": 1}', recipe_header)  # no recipe
    queues.publish_raw(
        analysis, json.dumps(recipe_message(analysis, replies, [1, 2])).encode(), recipe_header
    )  # 1-D frame
    reasons = [d["reason"] for d in dead_letters(queues, analysis, 4)]
    assert reasons == [
        "published without headers",
        "body is not JSON: Expecting value: line 1 column 1 (char 0)",
        "missing recipe: body has no 'recipe'",
        "frame must be a non-empty 2-D array, got shape (2,)",
    ]

    queues.publish_raw(processing, b'{"parameters": {}}', go_headers())
    queues.publish_raw(processing, b'{"recipes": ["xia2"]}', go_headers())
    queues.publish_raw(
        processing, json.dumps({"custom_recipe": {"start": []}}).encode(), go_headers()
    )
    dl = dead_letters(queues, processing, 3)
    assert dl[0]["reason"].startswith("missing recipe")
    assert "no recipe directory is configured" in dl[1]["reason"]
    assert "recipe cannot be built" in dl[2]["reason"]
    assert dl[1]["original_body"] == '{"recipes": ["xia2"]}'
    assert dl[1]["original_headers"]["zocalo.go.user"]

    # Both services survived all of it and still do their job.
    queues.declare(replies)
    queues.publish_raw(
        analysis, json.dumps(recipe_message(analysis, replies, [[0, 2]])).encode(), recipe_header
    )
    ((_, body),) = queues.get_all(replies, timeout=20)
    assert json.loads(body)["payload"]["results"]["centroid_x"] == 1.0
    assert dispatcher.alive() and analyser.alive()
    assert queues.depth(analysis)[0] == 0 and queues.depth(processing)[0] == 0


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
    (dl,) = dead_letters(queues, analysis, 1)
    assert dl["reason"].startswith("failed 3 time(s), last: PublishRefused"), dl["reason"]
    assert "gone" in dl["reason"]
    assert dl["original_headers"]["x-delivery-count"] == 2
    assert time.monotonic() - t0 < 15
    assert analyser.alive()
