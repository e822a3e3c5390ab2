"""Finds beampipe plugins by entry point and installs them into ophyd and ophyd-async.

Neither ophyd nor ophyd-async discovers control layers on its own: ophyd's
``set_cl`` knows pyepics, caproto and dummy, and ophyd-async picks its CA/PVA
backend from a module-level function.  This module is the one place that
knows how to swap those in, so plugins only declare entry points.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ASYNC_BACKEND_GROUP",
    "CONTROL_LAYER_EXPORTS",
    "CONTROL_LAYER_GROUP",
    "Plugin",
    "PluginError",
    "available",
    "protocol_of",
    "reset",
    "use",
]

logger = logging.getLogger("beampipe")

CONTROL_LAYER_GROUP = "ophyd.control_layers"
ASYNC_BACKEND_GROUP = "ophyd_async.backends"
#: What ophyd's ``set_cl`` copies from a shim module; a control layer must provide all of it.
CONTROL_LAYER_EXPORTS = (
    "setup",
    "caput",
    "caget",
    "get_pv",
    "thread_class",
    "name",
    "release_pvs",
    "get_dispatcher",
)
#: ophyd's own layers, which ophyd's ``set_cl`` handles itself.
OPHYD_BUILTIN_LAYERS = frozenset({"any", "pyepics", "caproto", "dummy"})


class PluginError(LookupError):
    """A plugin name that is not installed, or an entry point that does not fit its group."""


@dataclass(frozen=True)
class Plugin:
    """One installed plugin: its name, what it offers, and the distribution it came from."""

    name: str
    control_layer: str | None
    async_backend: str | None
    dist: str | None


def _group(group: str) -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=group)}


def available() -> dict[str, Plugin]:
    """Every installed plugin by name, with the entry points it registers."""
    layers, backends = _group(CONTROL_LAYER_GROUP), _group(ASYNC_BACKEND_GROUP)
    out: dict[str, Plugin] = {}
    for name in sorted(layers.keys() | backends.keys()):
        layer, backend = layers.get(name), backends.get(name)
        ep = layer or backend
        assert ep is not None
        out[name] = Plugin(
            name,
            layer.value if layer else None,
            backend.value if backend else None,
            ep.dist.name if ep.dist else None,
        )
    return out


# -- ophyd ---------------------------------------------------------------------
def import_ophyd() -> types.ModuleType:
    """Import ophyd even when OPHYD_CONTROL_LAYER names a plugin ophyd itself would reject."""
    if "ophyd" in sys.modules:
        return sys.modules["ophyd"]
    wanted = os.environ.get("OPHYD_CONTROL_LAYER")
    if wanted is None or wanted.lower() in OPHYD_BUILTIN_LAYERS:
        return importlib.import_module("ophyd")
    # ophyd's import-time set_cl() would raise on a plugin name: let it pick
    # its placeholder layer, then put the variable back for whoever reads it next.
    os.environ["OPHYD_CONTROL_LAYER"] = "dummy"
    try:
        return importlib.import_module("ophyd")
    finally:
        os.environ["OPHYD_CONTROL_LAYER"] = wanted


def protocol_of(pvname: str) -> str:
    """The scheme a PV name asks for: ``pva://x`` is pva, ``ca://x`` and bare ``x`` are ca."""
    scheme, sep, _ = pvname.partition("://")
    return scheme if sep else "ca"


# protocol -> (plugin name, layer module); the ophyd-side twin of _async_overrides.
_layers: dict[str, tuple[str, Any]] = {}


class _RoutingLayer(types.SimpleNamespace):
    """ophyd.cl when plugins are installed: sends each PV name to the layer for its scheme.

    ophyd talks to one control layer; users mix ``ca://``/bare and ``pva://``
    names in one Device.  PV-level calls (get_pv, caget, caput, release_pvs)
    go to the layer that owns the name's protocol; process-wide ones
    (dispatcher, thread class, setup) come from the CA-side layer, which is
    the layer ophyd had before when no plugin took CA.
    """

    def __init__(self, fallback: Any) -> None:
        primary = _layers["ca"][1] if "ca" in _layers else fallback
        routed = {"get_pv", "caget", "caput", "release_pvs"}  # methods below, not attributes
        super().__init__(
            **{k: getattr(primary, k) for k in CONTROL_LAYER_EXPORTS if k not in routed}
        )
        self.name = "+".join(sorted({n for n, _ in _layers.values()})) or primary.name
        self._fallback = fallback

    def _layer_for(self, pvname: str) -> Any:
        proto = protocol_of(pvname)
        if proto in _layers:
            return _layers[proto][1]
        if proto == "ca" and self._fallback is not None:
            return self._fallback
        raise ValueError(
            f"{pvname}: no installed control layer serves {proto}:// "
            f"(installed: {sorted(_layers) or 'none'}); beampipe.use() the plugin for it"
        )

    def get_pv(self, pvname: str, *args: Any, **kwargs: Any) -> Any:
        layer = self._layer_for(pvname)
        pv = layer.get_pv(pvname, *args, **kwargs)
        # Remember who made it: release must reach that layer even after use()/reset()
        # changed the routing (ophyd releases PVs from finalizers, at any time).
        with contextlib.suppress(AttributeError):
            pv._beampipe_layer = layer
        return pv

    def caget(self, pvname: str, *args: Any, **kwargs: Any) -> Any:
        return self._layer_for(pvname).caget(pvname, *args, **kwargs)

    def caput(self, pvname: str, *args: Any, **kwargs: Any) -> Any:
        return self._layer_for(pvname).caput(pvname, *args, **kwargs)

    def release_pvs(self, *pvs: Any) -> None:
        for pv in pvs:
            layer = getattr(pv, "_beampipe_layer", None)
            if layer is None:
                layer = self._layer_for(getattr(pv, "pvname", ""))
            layer.release_pvs(pv)


def _install_control_layer(name: str, layer: Any) -> None:
    missing = [attr for attr in CONTROL_LAYER_EXPORTS if not hasattr(layer, attr)]
    if missing:
        raise PluginError(
            f"control layer {name!r} ({layer!r}) lacks what ophyd needs: {', '.join(missing)}"
        )
    protocols = tuple(getattr(layer, "protocols", ("ca",)))
    if not protocols or not set(protocols) <= {"ca", "pva"}:
        raise PluginError(f"control layer {name!r} declares protocols {protocols!r}")
    ophyd = import_ophyd()
    layer.setup(ophyd.logger)
    current = getattr(ophyd, "cl", None)
    fallback = current._fallback if isinstance(current, _RoutingLayer) else current
    if "ca" in protocols:
        fallback = None
    for proto in protocols:
        _layers[proto] = (name, layer)
    ophyd.cl = _RoutingLayer(fallback)  # type: ignore[attr-defined]  # as ophyd.set_cl does
    logger.info("ophyd control layer %s now serves %s://", name, "://, ".join(protocols))


# -- ophyd-async -----------------------------------------------------------------
_async_overrides: dict[str, type] = {}
_original_backend_type: Callable[..., type] | None = None
# ophyd-async imports get_signal_backend_type by name into these modules.
_ASYNC_PATCH_SITES = ("ophyd_async.epics.core._signal", "ophyd_async.epics.core._epics_connector")


def _routed_backend_type(protocol: Any) -> type:
    override = _async_overrides.get(getattr(protocol, "value", protocol))
    if override is not None:
        return override
    assert _original_backend_type is not None
    return _original_backend_type(protocol)


def _install_async_backend(name: str, backend: Any) -> None:
    global _original_backend_type
    from ophyd_async.epics.core._util import EpicsSignalBackend

    protocol = getattr(backend, "protocol", None)
    if not (isinstance(backend, type) and issubclass(backend, EpicsSignalBackend)):
        raise PluginError(f"ophyd-async backend {name!r} must be an EpicsSignalBackend subclass")
    if protocol not in ("ca", "pva"):
        raise PluginError(f"ophyd-async backend {name!r} must declare protocol 'ca' or 'pva'")
    modules = [importlib.import_module(m) for m in _ASYNC_PATCH_SITES]
    if _original_backend_type is None:
        _original_backend_type = getattr(modules[0], "get_signal_backend_type")  # noqa: B009
    for module in modules:
        setattr(module, "get_signal_backend_type", _routed_backend_type)  # noqa: B010
    _async_overrides[protocol] = backend
    logger.info("ophyd-async %s:// signals now use %s", protocol, name)


def use(name: str, *, ophyd: bool = True, ophyd_async: bool = True) -> Plugin:
    """Install a registered plugin as ophyd's control layer and/or ophyd-async's backend.

    Devices built afterwards use it; devices that already exist keep what they have.
    """
    if not isinstance(name, str) or not name:
        raise PluginError(f"plugin name must be a non-empty string, got {name!r}")
    plugins = available()
    plugin = plugins.get(name)
    if plugin is None:
        raise PluginError(
            f"no beampipe plugin named {name!r} is installed; "
            f"installed: {sorted(plugins) or 'none'}"
        )
    if ophyd and plugin.control_layer:
        _install_control_layer(name, _group(CONTROL_LAYER_GROUP)[name].load())
    if ophyd_async and plugin.async_backend:
        _install_async_backend(name, _group(ASYNC_BACKEND_GROUP)[name].load())
    return plugin


def reset() -> None:
    """Give ophyd-async its own backends back and ophyd the layer its environment names."""
    if _original_backend_type is not None:
        for module_name in _ASYNC_PATCH_SITES:
            module = sys.modules.get(module_name)
            if module is not None:
                setattr(module, "get_signal_backend_type", _original_backend_type)  # noqa: B010
    _async_overrides.clear()
    _layers.clear()
    if "ophyd" in sys.modules:
        wanted = os.environ.get("OPHYD_CONTROL_LAYER", "any")
        if wanted.lower() in OPHYD_BUILTIN_LAYERS:
            sys.modules["ophyd"].set_cl(wanted.lower())
        else:
            use(wanted, ophyd_async=False)
