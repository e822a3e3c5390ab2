"""A pva-only control layer for the routing tests."""

from __future__ import annotations

from typing import Any

from bp_fake_layer import FakeLayerCalled, caget, get_dispatcher, release_pvs, setup, thread_class

__all__ = ["caget", "get_dispatcher", "release_pvs", "setup", "thread_class"]

name = "bp-fake-pva"
protocols = ("pva",)


class FakePvaCalled(FakeLayerCalled):
    """Proof the pva layer, not the ca one, got the name."""


def get_pv(pvname: str, *args: Any, **kwargs: Any) -> Any:
    raise FakePvaCalled(pvname)


def caput(pvname: str, *args: Any, **kwargs: Any) -> Any:
    raise FakePvaCalled(pvname)
