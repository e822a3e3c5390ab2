"""Declarative trigger rules: which bluesky documents become which zocalo requests.

A beamline writes rules once (in Python or as JSON) and the same rules run in
the RunEngine process (:class:`ZocaloCallback`) or away from it (the
``BeampipeDocumentTrigger`` service), so where the trigger logic runs is a
deployment choice, not a rewrite.  Everything here is pure: no I/O, no clock,
so trigger ids are deterministic and a redelivered document yields the same
ids (receivers de-duplicate on them).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "Param",
    "RuleError",
    "RunRouter",
    "Trigger",
    "TriggerRule",
    "Value",
    "load_rules",
    "triggers_for",
    "unpack_event_page",
]

Kind = Literal["start", "end", "event"]
_KINDS: tuple[str, ...] = ("start", "end", "event")
# Which documents a parameter may read, per trigger kind.
_ROOTS: dict[str, frozenset[str]] = {
    "start": frozenset({"start"}),
    "end": frozenset({"start", "stop"}),
    "event": frozenset({"start", "event"}),
}
_MISSING: Any = object()


class RuleError(ValueError):
    """A rule is malformed, or a run lacks a field a rule needs."""


@dataclass(frozen=True)
class Param:
    """Take a value from a document: ``Param("start.ispyb_dcid")``, ``Param("event.data.det")``.

    The path is ``<document>.<key>.<key>...`` with document one of start/stop/event;
    without a ``default`` a run that lacks the field is an error, not a silent gap.
    """

    path: str
    default: Any = _MISSING

    def __post_init__(self) -> None:
        root, _, rest = self.path.partition(".")
        if root not in ("start", "stop", "event") or not rest:
            raise RuleError(
                f"parameter path {self.path!r} must be 'start.<key>', 'stop.<key>' or "
                "'event.<key>' (dots descend into nested dicts)"
            )

    @property
    def root(self) -> str:
        return self.path.partition(".")[0]

    @property
    def has_default(self) -> bool:
        return self.default is not _MISSING


@dataclass(frozen=True)
class Value:
    """A literal parameter, e.g. ``Value("i03")``."""

    value: Any


def _dig(doc: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = doc
    for key in dotted.split("."):
        if isinstance(cur, Mapping) and key in cur:
            cur = cur[key]
        else:
            return _MISSING
    return cur


@dataclass(frozen=True)
class TriggerRule:
    """One zocalo request per matching run (``start``/``end``) or per event of a stream.

    ``match`` selects runs by their start document (dotted keys; a list value
    means "any of"), so a sub-plan that opens its own run with e.g.
    ``md={"subplan": "grid"}`` gets its own start/end triggers.
    """

    name: str
    recipes: Sequence[str] = ()
    on: Sequence[str] = ("start", "end")
    parameters: Mapping[str, Any] = field(default_factory=dict)
    match: Mapping[str, Any] = field(default_factory=dict)
    stream: str = "primary"
    custom_recipe: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise RuleError(f"rule name must be a non-empty string without '/', got {self.name!r}")
        if isinstance(self.recipes, str):
            raise RuleError(f"rule {self.name!r}: recipes must be a list, not the string")
        object.__setattr__(self, "recipes", tuple(self.recipes))
        if not self.recipes and not self.custom_recipe:
            raise RuleError(f"rule {self.name!r} names no recipe and has no custom_recipe")
        on = (self.on,) if isinstance(self.on, str) else tuple(self.on)
        bad = [k for k in on if k not in _KINDS]
        if bad or not on:
            raise RuleError(f"rule {self.name!r}: 'on' must be a subset of {_KINDS}, got {on}")
        object.__setattr__(self, "on", on)
        params: dict[str, Param | Value] = {}
        for key, spec in dict(self.parameters).items():
            p = Param(spec) if isinstance(spec, str) else spec
            if not isinstance(p, (Param, Value)):
                raise RuleError(f"rule {self.name!r}: parameter {key!r} is {spec!r}")
            if isinstance(p, Param) and not p.has_default:
                for kind in on:
                    if p.root not in _ROOTS[kind]:
                        raise RuleError(
                            f"rule {self.name!r}: parameter {key!r} reads {p.path!r} but the "
                            f"rule fires on {kind!r}, where only {sorted(_ROOTS[kind])} exist; "
                            "give it a default or split the rule"
                        )
            params[key] = p
        object.__setattr__(self, "parameters", params)
        object.__setattr__(self, "match", dict(self.match))

    def matches(self, start: Mapping[str, Any]) -> bool:
        for key, want in self.match.items():
            got = _dig(start, key)
            if isinstance(want, list) and not isinstance(got, list):
                if got not in want:
                    return False
            elif got != want:
                return False
        return True

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> TriggerRule:
        """The JSON form: parameters are ``"start.x"`` paths, ``{"path":..,"default":..}``
        or ``{"value": ...}`` literals."""
        known = {"name", "recipes", "on", "parameters", "match", "stream", "custom_recipe"}
        unknown = set(spec) - known
        if unknown:
            raise RuleError(f"rule {spec.get('name')!r}: unknown keys {sorted(unknown)}")
        params: dict[str, Param | Value | str] = {}
        for key, p in dict(spec.get("parameters", {})).items():
            if isinstance(p, str):
                params[key] = Param(p)
            elif isinstance(p, Mapping) and "value" in p:
                params[key] = Value(p["value"])
            elif isinstance(p, Mapping) and "path" in p:
                params[key] = Param(p["path"], p.get("default", _MISSING))
            else:
                raise RuleError(f"rule {spec.get('name')!r}: parameter {key!r} is {p!r}")
        return cls(
            name=spec.get("name", ""),
            recipes=spec.get("recipes", ()),
            on=spec.get("on", ("start", "end")),
            parameters=params,
            match=spec.get("match", {}),
            stream=spec.get("stream", "primary"),
            custom_recipe=spec.get("custom_recipe"),
        )


def load_rules(source: str | Path | Sequence[Mapping[str, Any]]) -> list[TriggerRule]:
    """Rules from a JSON file (a list of rule objects) or from already-parsed dicts."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            specs = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RuleError(f"cannot read trigger rules from {path}: {exc}") from exc
    else:
        specs = list(source)
    if not isinstance(specs, list):
        raise RuleError("trigger rules must be a JSON list of rule objects")
    rules = [TriggerRule.from_dict(s) for s in specs]
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise RuleError(f"duplicate rule names in {names}")
    return rules


@dataclass(frozen=True)
class Trigger:
    """One processing request: where it came from and the message to send."""

    trigger_id: str
    run_uid: str
    rule: str
    kind: str
    message: dict[str, Any]


def _resolve(rule: TriggerRule, key: str, spec: Param | Value, docs: Mapping[str, Any]) -> Any:
    if isinstance(spec, Value):
        return spec.value
    doc = docs.get(spec.root)
    value = _MISSING if doc is None else _dig(doc, spec.path.partition(".")[2])
    if value is _MISSING:
        if spec.has_default:
            return spec.default
        uid = docs["start"].get("uid", "?")
        raise RuleError(
            f"rule {rule.name!r} needs {spec.path!r} for parameter {key!r}, "
            f"but run {uid} has no such field"
        )
    return value


def _build(
    rule: TriggerRule,
    kind: str,
    docs: Mapping[str, Any],
    suffix: str,
    reply_to: str | None,
) -> Trigger:
    run_uid = docs["start"]["uid"]
    trigger_id = f"{run_uid}/{rule.name}/{kind}{suffix}"
    params = {k: _resolve(rule, k, spec, docs) for k, spec in rule.parameters.items()}
    # dodal/mx-bluesky convention: the request says which part of the run it is.
    params.setdefault("event", kind)
    params["beampipe_run_uid"] = run_uid
    params["beampipe_trigger_id"] = trigger_id
    params.setdefault("guid", trigger_id.replace("/", "-"))
    if reply_to:
        params["beampipe_reply_to"] = reply_to
    message: dict[str, Any] = {"recipes": list(rule.recipes), "parameters": params}
    if rule.custom_recipe:
        message["custom_recipe"] = dict(rule.custom_recipe)
    return Trigger(trigger_id, run_uid, rule.name, kind, message)


def triggers_for(
    rules: Iterable[TriggerRule],
    name: str,
    doc: Mapping[str, Any],
    *,
    start: Mapping[str, Any],
    stream: str | None = None,
    reply_to: str | None = None,
) -> list[Trigger]:
    """The requests one document causes, given its run's start document (and stream)."""
    out: list[Trigger] = []
    for rule in rules:
        if not rule.matches(start):
            continue
        if name == "start" and "start" in rule.on:
            out.append(_build(rule, "start", {"start": start}, "", reply_to))
        elif name == "stop" and "end" in rule.on:
            out.append(_build(rule, "end", {"start": start, "stop": doc}, "", reply_to))
        elif name == "event" and "event" in rule.on and stream == rule.stream:
            seq = f"/{doc.get('seq_num', doc.get('uid'))}"
            out.append(_build(rule, "event", {"start": start, "event": doc}, seq, reply_to))
    return out


def unpack_event_page(page: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for i, uid in enumerate(page["uid"]):
        yield {
            "uid": uid,
            "descriptor": page["descriptor"],
            "seq_num": page["seq_num"][i],
            "time": page["time"][i],
            "data": {k: v[i] for k, v in page["data"].items()},
            "timestamps": {k: v[i] for k, v in page["timestamps"].items()},
            "filled": {k: v[i] for k, v in page.get("filled", {}).items()},
        }


class RunRouter:
    """Follows interleaved runs (nested sub-plans, several RunEngines' runs) by uid.

    ``feed(name, doc)`` returns the triggers that document causes and remembers
    which trigger ids each run produced, which is how the results device knows
    what to wait for.
    """

    def __init__(self, rules: Iterable[TriggerRule], reply_to: str | None = None) -> None:
        self.rules = list(rules)
        self.reply_to = reply_to
        self._starts: dict[str, dict[str, Any]] = {}
        self._streams: dict[str, tuple[str, str]] = {}  # descriptor uid -> (run uid, stream)
        self.sent: OrderedDict[str, list[str]] = OrderedDict()  # run uid -> trigger ids
        self.last_triggered: str | None = None
        self.keep_runs = 1000

    def context(self, name: str, doc: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
        """The start document and stream a document belongs to (KeyError if unknown)."""
        if name == "start":
            return dict(doc), None
        if name == "descriptor":
            return self._starts[doc["run_start"]], doc.get("name")
        if name == "stop":
            return self._starts[doc["run_start"]], None
        if name in ("event", "event_page"):
            run_uid, stream = self._streams[doc["descriptor"]]
            return self._starts[run_uid], stream
        raise KeyError(name)

    def feed(self, name: str, doc: Mapping[str, Any]) -> list[Trigger]:
        if name == "start":
            self._starts[doc["uid"]] = dict(doc)
        elif name == "descriptor":
            self._streams[doc["uid"]] = (doc["run_start"], doc.get("name", "primary"))
            return []
        elif name == "event_page":
            return [t for ev in unpack_event_page(doc) for t in self.feed("event", ev)]
        elif name not in ("stop", "event"):
            return []
        try:
            start, stream = self.context(name, doc)
        except KeyError:
            return []  # a run that started before we subscribed: nothing to map from
        triggers = triggers_for(
            self.rules, name, doc, start=start, stream=stream, reply_to=self.reply_to
        )
        if triggers:
            run_uid = start["uid"]
            self.sent.setdefault(run_uid, []).extend(t.trigger_id for t in triggers)
            self.sent.move_to_end(run_uid)
            while len(self.sent) > self.keep_runs:
                self.sent.popitem(last=False)
            self.last_triggered = run_uid
        if name == "stop":
            self._starts.pop(doc["run_start"], None)
            for d in [d for d, (r, _) in self._streams.items() if r == doc["run_start"]]:
                del self._streams[d]
        return triggers

    def expected(self, run_uid: str) -> list[str]:
        return list(self.sent.get(run_uid, ()))
