"""Lets ``OPHYD_CONTROL_LAYER=<beampipe plugin>`` work for a script that only does ``import ophyd``.

``beampipe-startup.pth`` imports this module at interpreter start only when
``OPHYD_CONTROL_LAYER`` is set.  It stays inert unless that names something
other than ophyd's own layers, and unless ``BEAMPIPE_STARTUP_HOOK`` is unset or
truthy.  Then it watches for the first ``import ophyd``, lets ophyd start on its
placeholder layer, and installs the plugin through ``beampipe.use`` right after.
It imports nothing heavy here: interpreter start-up must stay cheap.
"""

from __future__ import annotations

import os
import sys
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec, PathFinder
from types import ModuleType

_BUILTIN = frozenset({"any", "pyepics", "caproto", "dummy"})
_OFF = frozenset({"0", "no", "false", "off"})


class _OphydLoader(Loader):
    def __init__(self, wrapped: Loader, layer: str) -> None:
        self._wrapped = wrapped
        self._layer = layer

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        from beampipe._registry import CONTROL_LAYER_GROUP, _group, use

        if self._layer not in _group(CONTROL_LAYER_GROUP):
            # Not ours: ophyd reports the unknown name itself.
            self._wrapped.exec_module(module)
            return
        os.environ["OPHYD_CONTROL_LAYER"] = "dummy"
        try:
            self._wrapped.exec_module(module)
        finally:
            os.environ["OPHYD_CONTROL_LAYER"] = self._layer
        use(self._layer, ophyd_async=False)


class _OphydFinder(MetaPathFinder):
    def __init__(self, layer: str) -> None:
        self.layer = layer

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> ModuleSpec | None:
        if fullname != "ophyd":
            return None
        sys.meta_path.remove(self)  # once only
        spec = PathFinder.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _OphydLoader(spec.loader, self.layer)
        return spec


def install() -> bool:
    """Arm the hook if the environment asks for a plugin layer; returns whether it armed."""
    if os.environ.get("BEAMPIPE_STARTUP_HOOK", "1").lower() in _OFF:
        return False
    layer = os.environ.get("OPHYD_CONTROL_LAYER", "")
    if not layer or layer.lower() in _BUILTIN or "ophyd" in sys.modules:
        return False
    if any(isinstance(f, _OphydFinder) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _OphydFinder(layer))
    return True
