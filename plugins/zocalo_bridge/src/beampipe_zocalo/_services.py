"""The bridge's zocalo services, started by ``zocalo.service -s <Name>``.

* ``BeampipeDocumentTrigger``: bluesky documents (from DocumentForwarder) ->
  processing requests, by the same rules the RunEngine callback uses.
* ``BeampipeDispatcher``: zocalo's Dispatcher on a configurable queue, with
  the checks it lacks (malformed requests are dead-lettered with a reason,
  the queues a recipe sends to are declared before anything is sent).
* ``BeampipeFrameAnalysis``: a recipe step computing per-frame statistics
  (sum, centroid, max) and sending them on with ``rw.send``.

All three acknowledge only after their work (including sends) is done, send
what they cannot process to ``dlq.<queue>`` with the reason, and bound
redeliveries of what fails for other reasons.

Settings come from the environment (``BEAMPIPE_ZOCALO_<NAME>``) or the zocalo
configuration's storage section (``beampipe.<name>``), so the same services
run unchanged on a workstation and across hosts.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import workflows
import workflows.recipe
from workflows.services.common_service import CommonService
from workflows.transport.pika_transport import PikaTransport
from zocalo.service.dispatcher import Dispatcher

from ._callback import DOCUMENTS_QUEUE
from ._frames import ShmFrameSource
from ._rules import RuleError, TriggerRule, load_rules, triggers_for
from ._transport import NO_HEADERS, prepare_queue
from ._wire import (
    PROCESSING_QUEUE,
    MalformedMessage,
    dead_letter,
    dlq_name,
    dumps,
    go_headers,
    validate_recipe_request,
)

__all__ = [
    "ANALYSIS_QUEUE",
    "BeampipeDispatcher",
    "BeampipeDocumentTrigger",
    "BeampipeFrameAnalysis",
    "frame_statistics",
]

ANALYSIS_QUEUE = "beampipe.frame_analysis"
Handler = Callable[[Any, Mapping[str, Any], Any], None]


def frame_statistics(frame: Any) -> dict[str, float]:
    """Sum, intensity-weighted centroid (x = column, y = row) and maximum of a 2-D frame."""
    try:
        a = np.asarray(frame, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MalformedMessage(f"frame is not numeric: {exc}") from None
    if a.ndim != 2 or a.size == 0:
        raise MalformedMessage(f"frame must be a non-empty 2-D array, got shape {a.shape}")
    total = float(a.sum())
    if total != 0.0 and np.isfinite(total):
        ys, xs = np.indices(a.shape)
        cx, cy = float((xs * a).sum() / total), float((ys * a).sum() / total)
    else:
        cx = cy = float("nan")
    return {
        "sum": total,
        "centroid_x": cx,
        "centroid_y": cy,
        "max": float(a.max()),
        "rows": float(a.shape[0]),
        "cols": float(a.shape[1]),
    }


class _GuardedTransport:
    """The service's transport, but every subscription callback goes through the guard.

    Passed to ``workflows.recipe.wrap_subscribe``, so recipe unwrapping, the
    RecipeWrapper and ``rw.send`` stay workflows' own.
    """

    def __init__(self, transport: Any, guard: Callable[[str, Callable[..., Any]], Any]) -> None:
        self._t = transport
        self._guard = guard

    def subscribe(self, channel: str, callback: Callable[..., Any], **kwargs: Any) -> int:
        kwargs["disable_mangling"] = True  # the guard decodes, so bad JSON is ours to report
        return int(self._t.subscribe(channel, self._guard(channel, callback), **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


class _BridgeService(CommonService):
    _logger_name = "beampipe_zocalo.service"
    stats: dict[str, int]
    _transport: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stats = {"processed": 0, "dead_lettered": 0, "requeued": 0}

    def _setting(self, name: str, default: Any = None) -> Any:
        env = os.environ.get(f"BEAMPIPE_ZOCALO_{name.upper()}")
        if env:
            return env
        storage = getattr(self.config, "storage", None) or {}
        return storage.get(f"beampipe.{name}", default)

    @property
    def delivery_limit(self) -> int:
        return int(self._setting("delivery_limit", 5))

    def _ensure(self, queue: str, *, create: bool = True) -> None:
        if prepare_queue(self._transport, queue, create=create, delivery_limit=self.delivery_limit):
            return
        if isinstance(self._transport, PikaTransport):
            self.log.warning(
                "plain PikaTransport: queue %s not checked and sends not confirmed; "
                "start with -t GuardedPikaTransport",
                queue,
            )

    def _subscribe_guarded(
        self,
        queue: str,
        handler: Handler,
        *,
        recipe: bool,
        ack_on_success: bool = True,
        prefetch: int = 1,
    ) -> int:
        """Subscribe with manual acks; ``handler(rw, header, payload)`` runs only on sane input."""
        self._ensure(queue)
        self._ensure(dlq_name(queue))

        def guard(channel: str, unwrap: Callable[[Any, Any], Any]) -> Callable[[Any, Any], None]:
            def on_message(header: Mapping[str, Any], raw: Any) -> None:
                self._guarded(channel, header, raw, unwrap, recipe, ack_on_success)

            return on_message

        return int(
            workflows.recipe.wrap_subscribe(
                _GuardedTransport(self._transport, guard),
                queue,
                handler,
                acknowledgement=True,
                prefetch_count=prefetch,
                allow_non_recipe_messages=not recipe,
                log_extender=self.extend_log,
            )
        )

    def _decode(self, header: Mapping[str, Any], raw: Any, recipe: bool) -> Any:
        if header.get(NO_HEADERS):
            raise MalformedMessage("published without headers")
        if isinstance(raw, (bytes, bytearray)):
            raw = raw.decode("utf-8", errors="replace")
        if isinstance(raw, str):
            try:
                message = json.loads(raw)
            except ValueError as exc:
                raise MalformedMessage(f"body is not JSON: {exc}") from None
        else:
            message = raw  # a transport that hands over objects (e.g. SHM)
        if recipe:
            if header.get("workflows-recipe") not in (True, "True", "true", 1):
                raise MalformedMessage("missing recipe: no 'workflows-recipe' header")
            if not isinstance(message, dict) or "recipe" not in message:
                raise MalformedMessage("missing recipe: body has no 'recipe'")
            try:
                pointer = int(message["recipe-pointer"])
                workflows.recipe.Recipe(message["recipe"])[pointer]
            except (KeyError, TypeError, ValueError) as exc:
                raise MalformedMessage(f"missing recipe: bad recipe or pointer ({exc!r})") from None
        return message

    def _guarded(
        self,
        queue: str,
        header: Mapping[str, Any],
        raw: Any,
        unwrap: Callable[[Any, Any], Any],
        recipe: bool,
        ack_on_success: bool,
    ) -> None:
        try:
            message = self._decode(header, raw, recipe)
            unwrap(header, message)
        except MalformedMessage as exc:
            self._dead_letter(queue, header, raw, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - any failure of the work: bounded retry
            deliveries = int(header.get("x-delivery-count") or 0) + 1
            if deliveries >= self.delivery_limit or (
                header.get("redelivered") and "x-delivery-count" not in header and deliveries >= 2
            ):
                self._dead_letter(queue, header, raw, f"failed {deliveries} time(s), last: {exc!r}")
            else:
                self.log.warning(
                    "processing failed (%r); requeued (delivery %d of %d)",
                    exc,
                    deliveries,
                    self.delivery_limit,
                )
                self.stats["requeued"] += 1
                self._transport.nack(header, requeue=True)
            return
        self.stats["processed"] += 1
        if ack_on_success:
            self._transport.ack(header)

    def _dead_letter(self, queue: str, header: Mapping[str, Any], raw: Any, reason: str) -> None:
        dlq = dlq_name(queue)
        self.log.error("message on %s dead-lettered to %s: %s", queue, dlq, reason)
        try:
            self._transport.raw_send(
                dlq,
                dumps(dead_letter(queue, reason, header, raw)),
                headers=go_headers(**{"beampipe.dlq_reason": reason[:200]}),
            )
        except Exception:
            # Could not park it: let the broker keep it (its delivery limit still applies).
            self.log.exception("could not dead-letter; requeueing")
            self._transport.nack(header, requeue=True)
            return
        self.stats["dead_lettered"] += 1
        self._transport.ack(header)


class BeampipeDocumentTrigger(_BridgeService):
    """Runs the RunEngine callback's trigger rules on forwarded bluesky documents."""

    _service_name = "BeampipeDocumentTrigger"

    def initializing(self) -> None:
        rules_path = self._setting("rules")
        if not rules_path:
            raise RuleError(
                "BeampipeDocumentTrigger needs rules: set BEAMPIPE_ZOCALO_RULES=<rules.json> "
                "or beampipe.rules in the zocalo configuration"
            )
        self.rules: list[TriggerRule] = load_rules(rules_path)
        self.out_queue = self._setting("processing_queue", PROCESSING_QUEUE)
        self.in_queue = self._setting("documents_queue", DOCUMENTS_QUEUE)
        self._ensure(self.out_queue)
        self._subscribe_guarded(self.in_queue, self.on_document, recipe=False, prefetch=1)
        self.log.info(
            "%d rule(s); documents from %s -> requests to %s",
            len(self.rules),
            self.in_queue,
            self.out_queue,
        )

    def on_document(self, rw: Any, header: Mapping[str, Any], env: Any) -> None:
        if not isinstance(env, dict):
            raise MalformedMessage("document envelope is not a JSON object")
        name, doc, start = env.get("name"), env.get("doc"), env.get("start")
        if name not in ("start", "stop", "event"):
            raise MalformedMessage(f"unsupported document name {name!r}")
        if not isinstance(doc, dict) or not isinstance(start, dict) or "uid" not in start:
            raise MalformedMessage("envelope needs 'doc' and 'start' objects with a run uid")
        try:
            triggers = triggers_for(
                self.rules,
                name,
                doc,
                start=start,
                stream=env.get("stream"),
                reply_to=env.get("reply_to"),
            )
        except RuleError as exc:
            raise MalformedMessage(str(exc)) from None
        origin = {k: header[k] for k in ("zocalo.go.user", "zocalo.go.host") if k in header}
        for trig in triggers:
            headers = go_headers(**{"beampipe.trigger_id": trig.trigger_id})
            headers.update(origin)  # the user who ran the scan, not the service account
            self._transport.send(self.out_queue, trig.message, headers=headers)


class BeampipeDispatcher(_BridgeService, Dispatcher):
    """zocalo's Dispatcher, on a configurable queue and without its silent failure modes."""

    _service_name = "BeampipeDispatcher"
    _logger_name = "beampipe_zocalo.dispatcher"

    def initializing(self) -> None:
        self.recipe_basepath = self._setting("recipe_dir")
        self._logbook = None
        self.message_filters = {
            "load_custom_recipe": self.filter_load_custom_recipe,
            "load_recipes_from_files": self.filter_load_recipes_from_files,
            "apply_parameters": self.filter_apply_parameters,
        }
        # zocalo's 'not ready yet' path re-sends with delay=, which needs a broker plugin.
        self.ready_for_processing = {}
        self.in_queue = self._setting("processing_queue", PROCESSING_QUEUE)
        self._known_queues: set[str] = set()
        self._subscribe_guarded(
            self.in_queue, self.dispatch, recipe=False, ack_on_success=False, prefetch=1
        )
        self.log.info(
            "dispatching requests from %s (recipes in %s)", self.in_queue, self.recipe_basepath
        )

    def dispatch(self, rw: Any, header: Mapping[str, Any], message: Any) -> None:
        validate_recipe_request(message)
        if message.get("recipes") and not self.recipe_basepath:
            raise MalformedMessage(
                f"request names recipes {message['recipes']} but no recipe directory is "
                "configured (BEAMPIPE_ZOCALO_RECIPE_DIR)"
            )
        # Build the recipe once to check it; Dispatcher.process builds it again.
        trial = copy.deepcopy(dict(message))
        params = trial.setdefault("parameters", {})
        params.setdefault("guid", "check")
        trial["recipe"] = workflows.recipe.Recipe()
        try:
            for f in self.message_filters.values():
                trial, params = f(trial, params)
        except Exception as exc:  # noqa: BLE001 - zocalo's filters raise anything
            raise MalformedMessage(f"recipe cannot be built: {exc}") from None
        reply_to = params.get("beampipe_reply_to")
        for key, step in trial["recipe"].recipe.items():
            if key in ("start", "error") or not isinstance(step, dict):
                continue
            queue = step.get("queue")
            if not queue or queue in self._known_queues:
                continue
            if "{" in queue:
                raise MalformedMessage(f"recipe step {key} queue {queue!r} has an unset parameter")
            try:
                # A reply queue must already exist (its owner made it); others we declare.
                self._ensure(queue, create=queue != reply_to)
            except LookupError as exc:
                raise MalformedMessage(str(exc)) from None
            self._known_queues.add(queue)
        try:
            Dispatcher.process(self, rw, header, message)
        except Exception:
            # Dispatcher.process acks and sends inside a transaction; if it failed half
            # way, roll back so the guard's nack (outside any transaction) is allowed.
            for txn in list(getattr(self._transport, "_CommonTransport__transactions", ())):
                with contextlib.suppress(Exception):
                    self._transport.transaction_abort(txn)
            raise


def frame_analysis_recipe(analysis_queue: str = ANALYSIS_QUEUE) -> dict[str, Any]:
    """The recipe that sends one frame to BeampipeFrameAnalysis and its result back to the plan.

    A ``TriggerRule(custom_recipe=...)`` fills ``frame`` from the event and the
    ``beampipe_*`` parameters from the run, so ZocaloResults can match the answer
    to the trigger that asked for it.
    """
    return {
        "1": {
            "service": "BeampipeFrameAnalysis",
            "queue": analysis_queue,
            "parameters": {
                "frame": "{$REPLACE:frame}",
                "run_uid": "{beampipe_run_uid}",
                "trigger_id": "{beampipe_trigger_id}",
            },
            "output": 2,
        },
        "2": {"queue": "{beampipe_reply_to}"},
        "start": [[1, []]],
    }


class BeampipeFrameAnalysis(_BridgeService):
    """A recipe step: statistics of one frame, sent on with ``rw.send``.

    The frame is an array in the step parameters (``frame``) or payload, or, on the
    detector's host, a reference into a beampipe_shm stream (``frame_stream``,
    ``frame_id``, ``run_uid``, optional ``frame_array``).
    """

    _service_name = "BeampipeFrameAnalysis"

    def initializing(self) -> None:
        self.frames = ShmFrameSource(wait=float(self._setting("frame_wait", 5.0)))
        self.in_queue = self._setting("analysis_queue", ANALYSIS_QUEUE)
        self._subscribe_guarded(self.in_queue, self.analyse, recipe=True, prefetch=4)
        self.log.info("frame analysis on %s", self.in_queue)

    def analyse(self, rw: Any, header: Mapping[str, Any], payload: Any) -> None:
        step = rw.recipe_step or {}
        if "output" not in step:
            raise MalformedMessage("recipe step has no output: the results would go nowhere")
        params = step.get("parameters") or {}
        frame = params.get("frame")
        if frame is None and isinstance(payload, dict):
            frame = payload.get("frame")
        if frame is None and params.get("frame_stream"):
            try:
                frame_id = int(params["frame_id"])
            except (KeyError, TypeError, ValueError):
                raise MalformedMessage("frame_stream given without an integer frame_id") from None
            frame = self.frames.get(
                str(params["frame_stream"]),
                frame_id,
                params.get("run_uid"),
                params.get("frame_array"),
            )
        if frame is None:
            raise MalformedMessage(
                "no frame: give 'frame' (an array) or 'frame_stream' + 'frame_id' in the step "
                "parameters, or 'frame' in the payload"
            )
        stats = frame_statistics(frame)
        rw.send(
            {
                "beampipe_run_uid": params.get("run_uid"),
                "beampipe_trigger_id": params.get("trigger_id"),
                "results": stats,
                "service": self._service_name,
                "host": socket.gethostname(),
            }
        )
