"""What goes on the wire: zocalo headers, JSON that survives numpy, and message checks.

Kept free of any transport so the RunEngine side, the services and the replay
command agree byte for byte on what a trigger and a dead letter look like.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "PROCESSING_QUEUE",
    "MalformedMessage",
    "dead_letter",
    "dlq_name",
    "dumps",
    "go_headers",
    "validate_recipe_request",
]

#: zocalo's convention: the Dispatcher consumes this queue.
PROCESSING_QUEUE = "processing_recipe"


class MalformedMessage(ValueError):
    """A message a service cannot process however often it is redelivered."""


def _user() -> str:
    # getpass.getuser() raises OSError in containers whose uid has no passwd
    # entry (KeyError before Python 3.13); a trigger must not die of that.
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return os.environ.get("USER") or os.environ.get("LOGNAME") or f"uid{os.getuid()}"


def go_headers(**extra: Any) -> dict[str, Any]:
    """The headers zocalo.go puts on a processing request, plus ``extra``.

    Never empty: workflows 3.3's PikaTransport dies on a message without headers.
    """
    headers: dict[str, Any] = {
        "zocalo.go.user": _user(),
        "zocalo.go.host": socket.gethostname(),
    }
    headers.update(extra)
    return headers


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot send {type(obj).__name__} in a zocalo message: {obj!r:.80}")


def dumps(message: Any) -> str:
    """JSON for a message; numpy arrays and scalars become lists and numbers."""
    return json.dumps(message, default=_default, allow_nan=True)


def dlq_name(queue: str) -> str:
    """zocalo's dead-letter naming (zocalo.dlq_check/dlq_reinject look for ``dlq.*``)."""
    return f"dlq.{queue}"


def validate_recipe_request(message: Any) -> Mapping[str, Any]:
    """Check a ``processing_recipe`` request; raise MalformedMessage naming what is wrong."""
    if not isinstance(message, Mapping):
        raise MalformedMessage(f"body is {type(message).__name__}, not a JSON object")
    recipes = message.get("recipes", [])
    if not isinstance(recipes, list) or not all(isinstance(r, str) and r for r in recipes):
        raise MalformedMessage(f"'recipes' must be a list of recipe names, got {recipes!r:.80}")
    if not recipes and not message.get("custom_recipe"):
        raise MalformedMessage("missing recipe: neither 'recipes' nor 'custom_recipe' given")
    params = message.get("parameters", {})
    if not isinstance(params, Mapping):
        raise MalformedMessage(f"'parameters' must be an object, got {type(params).__name__}")
    return message


def dead_letter(
    queue: str, reason: str, headers: Mapping[str, Any] | None, body: Any
) -> dict[str, Any]:
    """The envelope a service puts on ``dlq.<queue>``: the original plus why it failed."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="replace")
    return {
        "reason": reason,
        "queue": queue,
        "time": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "original_headers": {str(k): _jsonable(v) for k, v in (headers or {}).items()},
        "original_body": _jsonable(body),
    }


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value, default=_default)
    except (TypeError, ValueError):
        return repr(value)
    return value
