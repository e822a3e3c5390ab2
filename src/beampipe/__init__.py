"""beampipe: fast, well-connected bluesky/ophyd plugins around one sans-I/O batching engine.

The public API plugins may use is exactly what ``__all__`` lists; the
``_modules`` behind it are private and import-linter keeps plugins out of them.
"""

from __future__ import annotations

from typing import Any

from ._batching import Batch, Delivery, Failed, Ok, Outcome, Planner, Ticket
from ._coalesce import BatchIO, Coalescer
from ._registry import (
    ASYNC_BACKEND_GROUP,
    CONTROL_LAYER_EXPORTS,
    CONTROL_LAYER_GROUP,
    Plugin,
    PluginError,
    available,
    import_ophyd,
    protocol_of,
    reset,
    use,
)

__all__ = [
    "ASYNC_BACKEND_GROUP",
    "CONTROL_LAYER_EXPORTS",
    "CONTROL_LAYER_GROUP",
    "SIGNAL_BACKEND_API",
    "Batch",
    "BatchIO",
    "BatchedSignalBackend",
    "Coalescer",
    "Delivery",
    "Failed",
    "Ok",
    "Outcome",
    "Planner",
    "Plugin",
    "PluginError",
    "Ticket",
    "available",
    "import_ophyd",
    "missing_backend_methods",
    "protocol_of",
    "reset",
    "signal_backend_abstract_api",
    "unwrap",
    "use",
]

# ophyd-async takes a second to import: only pay for it when a backend is wanted.
_LAZY = {
    "BatchedSignalBackend",
    "SIGNAL_BACKEND_API",
    "missing_backend_methods",
    "signal_backend_abstract_api",
    "unwrap",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import _backend

        return getattr(_backend, name)
    raise AttributeError(f"module 'beampipe' has no attribute {name!r}")
