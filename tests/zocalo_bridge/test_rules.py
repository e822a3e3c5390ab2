"""Trigger rules, headers and wire format: pure, no broker."""

from __future__ import annotations

import getpass
import json
from typing import Any

import numpy as np
import pytest

from beampipe_zocalo import (
    MalformedMessage,
    Param,
    RuleError,
    RunRouter,
    TriggerRule,
    Value,
    dumps,
    frame_statistics,
    go_headers,
    load_rules,
)
from beampipe_zocalo._wire import dead_letter, validate_recipe_request


def docs(uid: str = "run1", md: dict[str, Any] | None = None, n: int = 2) -> list[tuple[str, dict]]:
    start = {"uid": uid, "time": 0.0, "plan_name": "scan", **(md or {})}
    desc = {"uid": f"{uid}-d", "run_start": uid, "name": "primary", "data_keys": {}}
    events = [
        (
            "event",
            {
                "uid": f"{uid}-e{i}",
                "descriptor": f"{uid}-d",
                "seq_num": i + 1,
                "data": {"det": float(i)},
                "timestamps": {"det": 0.0},
                "time": 0.0,
            },
        )
        for i in range(n)
    ]
    stop = {
        "uid": f"{uid}-s",
        "run_start": uid,
        "exit_status": "success",
        "num_events": {"primary": n},
    }
    return [("start", start), ("descriptor", desc), *events, ("stop", stop)]


def test_start_end_rule_maps_parameters_from_start_metadata() -> None:
    rule = TriggerRule(
        name="xia2",
        recipes=["example-xia2"],
        parameters={
            "ispyb_dcid": "start.ispyb_dcid",
            "n": Param("stop.num_events.primary", 0),
            "beamline": Value("i03"),
            "file": "start.detector.filename",
        },
    )
    router = RunRouter([rule], reply_to="replies")
    out = [
        t
        for name, d in docs(md={"ispyb_dcid": 42, "detector": {"filename": "/d/x.h5"}})
        for t in router.feed(name, d)
    ]
    assert [t.kind for t in out] == ["start", "end"]
    start, end = (t.message for t in out)
    assert start == {
        "recipes": ["example-xia2"],
        "parameters": {
            "ispyb_dcid": 42,
            "n": 0,
            "beamline": "i03",
            "file": "/d/x.h5",
            "event": "start",
            "beampipe_run_uid": "run1",
            "beampipe_trigger_id": "run1/xia2/start",
            "guid": "run1-xia2-start",
            "beampipe_reply_to": "replies",
        },
    }
    assert end["parameters"]["n"] == 2 and end["parameters"]["event"] == "end"
    assert router.expected("run1") == ["run1/xia2/start", "run1/xia2/end"]
    assert router.last_triggered == "run1"


def test_missing_required_field_is_a_clear_error() -> None:
    rule = TriggerRule(name="r", recipes=["x"], on=["start"], parameters={"d": "start.ispyb_dcid"})
    router = RunRouter([rule])
    with pytest.raises(RuleError, match=r"rule 'r' needs 'start.ispyb_dcid'.*run run1"):
        router.feed("start", docs()[0][1])


def test_rule_validation_catches_impossible_parameters() -> None:
    with pytest.raises(RuleError, match=r"reads 'stop\.x' but the rule fires on 'start'"):
        TriggerRule(name="r", recipes=["x"], on=["start"], parameters={"x": "stop.x"})
    with pytest.raises(RuleError, match=r"must be 'start\.<key>'"):
        Param("descriptor.x")
    with pytest.raises(RuleError, match="names no recipe"):
        TriggerRule(name="r")
    with pytest.raises(RuleError, match="subset"):
        TriggerRule(name="r", recipes=["x"], on=["finish"])
    with pytest.raises(RuleError, match="not the string"):
        TriggerRule(name="r", recipes="x")  # type: ignore[arg-type]


def test_per_event_rule_and_subplan_match() -> None:
    per_event = TriggerRule(
        name="spots",
        recipes=["per-image"],
        on=["event"],
        parameters={"det": "event.data.det", "seq": "event.seq_num"},
        match={"subplan": "grid"},
    )
    router = RunRouter([per_event])
    # An outer run with a nested sub-plan run (its own start/stop), interleaved.
    outer, inner = docs("outer", n=1), docs("inner", md={"subplan": "grid"}, n=3)
    stream = [outer[0], outer[1], inner[0], inner[1], outer[2], *inner[2:], outer[3]]
    out = [t for name, d in stream for t in router.feed(name, d)]
    assert [t.trigger_id for t in out] == [f"inner/spots/event/{i}" for i in (1, 2, 3)]
    assert [t.message["parameters"]["det"] for t in out] == [0.0, 1.0, 2.0]
    assert router.expected("outer") == []


def test_event_page_is_unpacked() -> None:
    rule = TriggerRule(name="e", recipes=["x"], on=["event"], parameters={"d": "event.data.det"})
    router = RunRouter([rule])
    (s, start), (_, desc) = docs()[:2]
    router.feed(s, start)
    router.feed("descriptor", desc)
    page = {
        "uid": ["a", "b"],
        "descriptor": desc["uid"],
        "seq_num": [1, 2],
        "time": [0, 0],
        "data": {"det": [5, 6]},
        "timestamps": {"det": [0, 0]},
        "filled": {},
    }
    assert [t.message["parameters"]["d"] for t in router.feed("event_page", page)] == [5, 6]


def test_rules_from_json_file(tmp_path: Any) -> None:
    path = tmp_path / "rules.json"
    path.write_text(
        json.dumps(
            [
                {
                    "name": "a",
                    "recipes": ["r"],
                    "parameters": {
                        "x": "start.x",
                        "y": {"value": 3},
                        "z": {"path": "stop.z", "default": None},
                    },
                }
            ]
        )
    )
    (rule,) = load_rules(path)
    assert rule.parameters == {"x": Param("start.x"), "y": Value(3), "z": Param("stop.z", None)}
    path.write_text(json.dumps([{"name": "a", "recipes": ["r"], "typo": 1}]))
    with pytest.raises(RuleError, match="unknown keys"):
        load_rules(path)
    with pytest.raises(RuleError, match="cannot read"):
        load_rules(tmp_path / "missing.json")


def test_headers_survive_a_container_without_passwd_entry(monkeypatch: Any) -> None:
    def no_user() -> str:
        raise OSError("No username set in the environment")

    monkeypatch.setattr(getpass, "getuser", no_user)
    monkeypatch.delenv("USER", raising=False)
    monkeypatch.delenv("LOGNAME", raising=False)
    headers = go_headers()
    assert headers["zocalo.go.user"].startswith("uid") and headers["zocalo.go.host"]


def test_numpy_goes_on_the_wire_as_json() -> None:
    msg = {"frame": np.arange(6, dtype=np.uint16).reshape(2, 3), "x": np.float32(1.5)}
    assert json.loads(dumps(msg)) == {"frame": [[0, 1, 2], [3, 4, 5]], "x": 1.5}
    with pytest.raises(TypeError, match="cannot send object"):
        dumps({"bad": object()})


def test_recipe_request_validation() -> None:
    validate_recipe_request({"recipes": ["a"], "parameters": {}})
    validate_recipe_request({"custom_recipe": {"1": {}}})
    for bad, why in [
        ("x", "not a JSON object"),
        ({}, "missing recipe"),
        ({"recipes": "a"}, "list of recipe names"),
        ({"recipes": ["a"], "parameters": []}, "must be an object"),
    ]:
        with pytest.raises(MalformedMessage, match=why):
            validate_recipe_request(bad)
    env = dead_letter("q", "why", None, b"\xff")
    assert env["reason"] == "why" and env["original_headers"] == {}


def test_frame_statistics() -> None:
    frame = np.zeros((5, 7))
    frame[1, 4] = 3.0
    frame[3, 4] = 1.0
    stats = frame_statistics(frame)
    assert stats["sum"] == 4.0 and stats["centroid_x"] == 4.0 and stats["centroid_y"] == 1.5
    assert np.isnan(frame_statistics(np.zeros((2, 2)))["centroid_x"])
    with pytest.raises(MalformedMessage, match="2-D"):
        frame_statistics([1, 2, 3])
    with pytest.raises(MalformedMessage, match="not numeric"):
        frame_statistics([["a"]])


def test_a_run_missing_required_metadata_fails_at_its_start(run_engine: Any) -> None:
    from bluesky.plans import count

    from beampipe_zocalo import BrokerParams, PikaPublisher, ReliableSender, ZocaloCallback

    rule = TriggerRule(name="xia2", recipes=["x"], parameters={"d": "start.ispyb_dcid"})
    with ReliableSender(PikaPublisher(BrokerParams(port=1)), retry_for=0) as sender:
        cb = ZocaloCallback([rule], sender)
        with pytest.raises(RuleError, match=r"needs 'start\.ispyb_dcid'"):
            run_engine(count([], num=1), cb)
        assert sender.stats.queued == 0
