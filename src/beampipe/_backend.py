"""The base for plugin-provided ophyd-async signal backends, and the contract they must meet.

ophyd-async's SignalBackend ABC still changes between minor releases, so the
abstract API we were written against is recorded here; the conformance test
compares it with the installed ophyd-async and fails, naming the difference,
the day a release moves it.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, TypeVar

from ophyd_async.core import NotConnectedError, SignalBackend, SignalDatatype

# Not re-exported by ophyd_async.epics.core in 0.21; the conformance test guards its location.
from ophyd_async.epics.core._util import EpicsSignalBackend

from ._batching import Failed, Ok, Outcome

__all__ = [
    "SIGNAL_BACKEND_API",
    "BatchedSignalBackend",
    "missing_backend_methods",
    "signal_backend_abstract_api",
    "unwrap",
]

T = TypeVar("T", bound=SignalDatatype)

#: The abstract methods of ophyd_async.core.SignalBackend (0.21) with their parameters.
SIGNAL_BACKEND_API: dict[str, tuple[str, ...]] = {
    "source": ("self", "name", "read"),
    "connect": ("self", "timeout"),
    "put": ("self", "value"),
    "get_datakey": ("self", "source"),
    "get_reading": ("self",),
    "get_value": ("self",),
    "get_setpoint": ("self",),
    "set_callback": ("self", "callback"),
}


def signal_backend_abstract_api(cls: type = SignalBackend) -> dict[str, tuple[str, ...]]:
    """The abstract methods a backend class declares, with parameter names, as installed."""
    out: dict[str, tuple[str, ...]] = {}
    for klass in reversed(cls.__mro__):
        for name, member in vars(klass).items():
            if getattr(member, "__isabstractmethod__", False):
                out[name] = tuple(inspect.signature(member).parameters)
            elif name in out:
                del out[name]
    return out


def missing_backend_methods(cls: type) -> list[str]:
    """Which abstract SignalBackend methods ``cls`` leaves unimplemented."""
    abstract = signal_backend_abstract_api(SignalBackend)
    missing = []
    for name in abstract:
        member = getattr(cls, name, None)
        if member is None or getattr(member, "__isabstractmethod__", False):
            missing.append(name)
    return sorted(missing)


def unwrap(outcome: Outcome[Any], pv: str, protocol: str) -> Any:
    """Turn a batch outcome into a value, or the NotConnectedError ophyd-async expects."""
    if isinstance(outcome, Ok):
        return outcome.value
    assert isinstance(outcome, Failed)
    raise NotConnectedError(f"{protocol}://{pv}: {outcome.reason}")


class BatchedSignalBackend(EpicsSignalBackend[T]):
    """Base for a plugin's ophyd-async backend whose reads go through beampipe's batching.

    Subclasses set ``protocol`` (the ``ca``/``pva`` scheme ophyd-async routes on)
    and implement the SignalBackend methods; the registry only accepts
    subclasses of EpicsSignalBackend, so ``epics_signal_*`` and ``EpicsDevice``
    can build them with the usual ``(datatype, read_pv, write_pv, options)``.
    """

    protocol: ClassVar[str]

    def source(self, name: str, read: bool) -> str:
        return f"{self.protocol}://{self.read_pv if read else self.write_pv}"
