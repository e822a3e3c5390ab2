"""RunEngine callbacks: documents in, zocalo processing requests (or forwarded documents) out."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from ._rules import RunRouter, Trigger, TriggerRule, unpack_event_page
from ._wire import PROCESSING_QUEUE, go_headers

__all__ = ["DOCUMENTS_QUEUE", "DocumentForwarder", "RunTracker", "ZocaloCallback"]

log = logging.getLogger("beampipe_zocalo.callback")

#: Where DocumentForwarder publishes and BeampipeDocumentTrigger listens by default.
DOCUMENTS_QUEUE = "beampipe.documents"


class _Sender(Protocol):
    def send(self, queue: str, message: Any, headers: Mapping[str, Any]) -> None: ...


class RunTracker(Protocol):
    """What the results device asks of whoever triggered processing."""

    @property
    def reply_to(self) -> str | None: ...

    @property
    def last_triggered(self) -> str | None: ...

    def expected(self, run_uid: str) -> list[str]: ...


class _Routed:
    """What ZocaloResults asks of whoever applies the rules: the reply queue and trigger ids."""

    _router: RunRouter

    @property
    def reply_to(self) -> str | None:
        return self._router.reply_to

    @property
    def last_triggered(self) -> str | None:
        return self._router.last_triggered

    def expected(self, run_uid: str) -> list[str]:
        return self._router.expected(run_uid)


class ZocaloCallback(_Routed):
    """``RE.subscribe(ZocaloCallback(rules, sender))``: send processing requests per the rules.

    Rules are applied in the RunEngine's thread (a run lacking a required
    field fails at once, naming the rule and field); sending happens on the
    sender's thread, so a slow or absent broker never stalls the scan.
    """

    def __init__(
        self,
        rules: Iterable[TriggerRule],
        sender: _Sender,
        *,
        queue: str = PROCESSING_QUEUE,
        reply_to: str | None = None,
    ) -> None:
        rules = list(rules)
        if not rules:
            raise ValueError("ZocaloCallback needs at least one TriggerRule")
        if not all(isinstance(r, TriggerRule) for r in rules):
            raise TypeError("rules must be TriggerRule objects (see beampipe_zocalo.load_rules)")
        self._router = RunRouter(rules, reply_to=reply_to)
        self._sender = sender
        self.queue = queue
        self.triggers: list[Trigger] = []  # the most recent ones, for inspection
        self._keep = 1000

    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        for trig in self._router.feed(name, doc):
            headers = go_headers(**{"beampipe.trigger_id": trig.trigger_id})
            self._sender.send(self.queue, trig.message, headers)
            self.triggers.append(trig)
            log.info("requested %s for run %s (%s)", trig.rule, trig.run_uid, trig.kind)
        del self.triggers[: -self._keep]


class DocumentForwarder(_Routed):
    """Publish self-contained bluesky documents so trigger rules can run in a service.

    Each message carries the document, its run's start document and its
    stream, so the consuming service needs no memory of earlier messages and
    survives restarts and redeliveries.  Give it the same ``rules`` the service
    runs and it can tell the results device which trigger ids to expect.
    """

    def __init__(
        self,
        sender: _Sender,
        *,
        queue: str = DOCUMENTS_QUEUE,
        rules: Iterable[TriggerRule] = (),
        reply_to: str | None = None,
    ) -> None:
        self._sender = sender
        self.queue = queue
        self._router = RunRouter(rules, reply_to=reply_to)

    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        if name == "event_page":
            for event in unpack_event_page(doc):
                self(name="event", doc=event)
            return
        if name == "start":
            self._router.feed(name, doc)
        if name not in ("start", "stop", "event"):
            self._router.feed(name, doc)  # descriptors: remember stream names
            return
        try:
            start, stream = self._router.context(name, doc)
        except KeyError:
            log.warning("%s document of a run that started before subscribing: not sent", name)
            return
        if name != "start":
            self._router.feed(name, doc)
        envelope = {
            "name": name,
            "doc": doc,
            "start": start,
            "stream": stream,
            "reply_to": self.reply_to,
        }
        self._sender.send(self.queue, envelope, go_headers(**{"beampipe.document": name}))
