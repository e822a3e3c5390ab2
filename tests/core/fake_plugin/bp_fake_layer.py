"""A control layer for the registry tests: ophyd's dummy layer under another name."""

from __future__ import annotations

from typing import Any

from ophyd import _dummy_shim as _dummy

name = "bp-fake"
thread_class = _dummy.thread_class
caget = _dummy.caget
caput = _dummy.caput
release_pvs = _dummy.release_pvs
get_dispatcher = _dummy.get_dispatcher
setup_calls: list[Any] = []
get_pv_calls: list[str] = []


def setup(logger: Any) -> None:
    setup_calls.append(logger)
    _dummy.setup(logger)


class FakeLayerCalled(Exception):
    """Proof that ophyd asked this layer, not another, for a PV."""


def get_pv(pvname: str, *args: Any, **kwargs: Any) -> Any:
    get_pv_calls.append(pvname)
    raise FakeLayerCalled(pvname)
