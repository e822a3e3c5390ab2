"""bluesky <-> zocalo: RunEngine callback, zocalo.service services, an ophyd-async results device.

RunEngine side: :class:`ZocaloCallback` (documents -> ``processing_recipe``
requests by declarative :class:`TriggerRule` s) or :class:`DocumentForwarder`
(documents -> a queue, rules applied by the ``BeampipeDocumentTrigger``
service), both sending through a :class:`ReliableSender` (confirmed, retried,
fallback file).  Results come back into a plan through :class:`ZocaloResults`.
Services (``zocalo.service -s ...``): ``BeampipeDocumentTrigger``,
``BeampipeDispatcher``, ``BeampipeFrameAnalysis``; transport
``GuardedPikaTransport``.
"""

from ._callback import DOCUMENTS_QUEUE, DocumentForwarder, RunTracker, ZocaloCallback
from ._frames import FrameNotReady, ShmFrameSource
from ._queues import BrokerParams, QueueMissing, delete_queues, ensure_queue, queue_exists
from ._results import ResultsListener, ZocaloResults, ZocaloResultsError, ZocaloResultsTimeout
from ._rules import (
    Param,
    RuleError,
    RunRouter,
    Trigger,
    TriggerRule,
    Value,
    load_rules,
    triggers_for,
)
from ._sender import (
    PikaPublisher,
    Publisher,
    ReliableSender,
    SenderStats,
    TransportPublisher,
    replay_fallback,
)
from ._services import (
    ANALYSIS_QUEUE,
    BeampipeDispatcher,
    BeampipeDocumentTrigger,
    BeampipeFrameAnalysis,
    frame_analysis_recipe,
    frame_statistics,
)
from ._transport import NO_HEADERS, GuardedPikaTransport, PublishRefused
from ._wire import PROCESSING_QUEUE, MalformedMessage, dlq_name, dumps, go_headers

__all__ = [
    "ANALYSIS_QUEUE",
    "DOCUMENTS_QUEUE",
    "NO_HEADERS",
    "PROCESSING_QUEUE",
    "BeampipeDispatcher",
    "BeampipeDocumentTrigger",
    "BeampipeFrameAnalysis",
    "BrokerParams",
    "DocumentForwarder",
    "FrameNotReady",
    "GuardedPikaTransport",
    "MalformedMessage",
    "Param",
    "PikaPublisher",
    "PublishRefused",
    "Publisher",
    "QueueMissing",
    "ReliableSender",
    "ResultsListener",
    "RuleError",
    "RunRouter",
    "RunTracker",
    "SenderStats",
    "ShmFrameSource",
    "TransportPublisher",
    "Trigger",
    "TriggerRule",
    "Value",
    "ZocaloCallback",
    "ZocaloResults",
    "ZocaloResultsError",
    "ZocaloResultsTimeout",
    "delete_queues",
    "dlq_name",
    "dumps",
    "ensure_queue",
    "frame_analysis_recipe",
    "frame_statistics",
    "go_headers",
    "load_rules",
    "queue_exists",
    "replay_fallback",
    "triggers_for",
]
