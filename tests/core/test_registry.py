"""The registry, the startup hook and the ophyd/ophyd-async installs, with a test plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated as A

import pytest
from ophyd_async.core import SignalR
from ophyd_async.epics.core import EpicsDevice, PvSuffix

import beampipe

FAKE = Path(__file__).with_name("fake_plugin")


class FakeDevice(EpicsDevice):
    x: A[SignalR[float], PvSuffix("x")]


def make_dist(where: Path, name: str, entry_points: dict[str, dict[str, str]]) -> None:
    """Write a minimal dist-info so importlib.metadata finds its entry points."""
    info = where / f"{name.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def fake_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    make_dist(
        tmp_path,
        "bp-fake-dist",
        {
            beampipe.CONTROL_LAYER_GROUP: {
                "bp-fake": "bp_fake_layer",
                "bp-fake-pva": "bp_fake_pva_layer",
            },
            beampipe.ASYNC_BACKEND_GROUP: {
                "bp-fake": "bp_fake_backend:FakeCaBackend",
                "bp-broken": "bp_fake_backend:NotABackend",
            },
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(FAKE))
    yield tmp_path
    beampipe.reset()


def test_available_lists_the_plugin_and_what_it_offers(fake_plugin: Path) -> None:
    plugins = beampipe.available()
    assert plugins["bp-fake"] == beampipe.Plugin(
        "bp-fake", "bp_fake_layer", "bp_fake_backend:FakeCaBackend", "bp-fake-dist"
    )
    assert plugins["bp-broken"].control_layer is None


def test_use_installs_the_control_layer_into_ophyd(fake_plugin: Path) -> None:
    import bp_fake_layer  # type: ignore[import-not-found]
    import ophyd
    from ophyd import EpicsSignal

    beampipe.use("bp-fake", ophyd_async=False)
    assert ophyd.cl.name == "bp-fake"
    assert bp_fake_layer.setup_calls, "the layer's setup(logger) must run"
    with pytest.raises(bp_fake_layer.FakeLayerCalled, match="BPFAKE:x"):
        EpicsSignal("BPFAKE:x", name="x")


def test_pva_names_go_to_the_pva_layer_and_the_rest_stay_where_they_were(
    fake_plugin: Path,
) -> None:
    import bp_fake_layer
    import bp_fake_pva_layer  # type: ignore[import-not-found]
    import ophyd
    from ophyd import EpicsSignal

    ophyd.set_cl("pyepics")
    beampipe.use("bp-fake-pva")
    with pytest.raises(bp_fake_pva_layer.FakePvaCalled, match="pva://BPFAKE:x"):
        EpicsSignal("pva://BPFAKE:x", name="x")
    # Bare names still reach the layer ophyd had before.
    bare = EpicsSignal("BPFAKE:y", name="y")
    assert type(bare._read_pv).__module__ == "ophyd._pyepics_shim"
    bare.destroy()
    beampipe.use("bp-fake")
    assert ophyd.cl.name == "bp-fake+bp-fake-pva"
    with pytest.raises(bp_fake_layer.FakeLayerCalled) as caught:
        EpicsSignal("ca://BPFAKE:z", name="z")
    assert not isinstance(caught.value, bp_fake_pva_layer.FakePvaCalled)
    with pytest.raises(bp_fake_pva_layer.FakePvaCalled):
        ophyd.cl.caput("pva://BPFAKE:x", 1)


def test_a_pv_is_released_by_the_layer_that_made_it_even_after_reset(fake_plugin: Path) -> None:
    import bp_fake_pva_layer
    import ophyd

    released: list[object] = []

    class Pv:
        pvname = "pva://BPFAKE:x"

    def get_pv(pvname: str, *args: object, **kwargs: object) -> Pv:
        return Pv()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bp_fake_pva_layer, "get_pv", get_pv)
        mp.setattr(bp_fake_pva_layer, "release_pvs", lambda *pvs: released.extend(pvs))
        beampipe.use("bp-fake-pva")
        routing = ophyd.cl
        pv = routing.get_pv("pva://BPFAKE:x")
        beampipe.reset()  # pva:// has no layer now, but the PV still knows its maker
        routing.release_pvs(pv)
    assert released == [pv]


def test_protocol_of() -> None:
    assert beampipe.protocol_of("pva://A:b") == "pva"
    assert beampipe.protocol_of("ca://A:b") == "ca"
    assert beampipe.protocol_of("A:b") == "ca"


def test_use_routes_ophyd_async_ca_signals_and_reset_restores(fake_plugin: Path) -> None:
    from bp_fake_backend import FakeCaBackend  # type: ignore[import-not-found]
    from ophyd_async.epics.core import epics_signal_r

    beampipe.use("bp-fake", ophyd=False)
    assert isinstance(epics_signal_r(float, "ca://BPFAKE:x")._connector.backend, FakeCaBackend)
    assert isinstance(epics_signal_r(float, "BPFAKE:x")._connector.backend, FakeCaBackend)
    pva = epics_signal_r(float, "pva://BPFAKE:x")._connector.backend
    assert not isinstance(pva, FakeCaBackend), "pva:// must stay with ophyd-async's own backend"
    beampipe.reset()
    assert not isinstance(epics_signal_r(float, "ca://BPFAKE:x")._connector.backend, FakeCaBackend)


def test_epics_device_uses_the_installed_backend(fake_plugin: Path) -> None:
    from bp_fake_backend import FakeCaBackend

    beampipe.use("bp-fake", ophyd=False)
    assert isinstance(FakeDevice("ca://BPFAKE:").x._connector.backend, FakeCaBackend)


def test_unknown_and_ill_formed_plugins_fail_clearly(fake_plugin: Path) -> None:
    with pytest.raises(beampipe.PluginError, match="no beampipe plugin named 'nope'"):
        beampipe.use("nope")
    with pytest.raises(beampipe.PluginError, match=r"bp-broken.*EpicsSignalBackend"):
        beampipe.use("bp-broken")
    with pytest.raises(beampipe.PluginError, match="non-empty"):
        beampipe.use("")


def _python(
    code: str, env_extra: dict[str, str], fake_root: Path
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPHYD_CONTROL_LAYER", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join([str(fake_root), str(FAKE)])
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_startup_hook_lets_plain_import_ophyd_use_a_plugin(fake_plugin: Path) -> None:
    out = _python(
        "import ophyd; print(ophyd.cl.name)", {"OPHYD_CONTROL_LAYER": "bp-fake"}, fake_plugin
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "bp-fake"


def test_startup_hook_switched_off_leaves_ophyd_alone(fake_plugin: Path) -> None:
    out = _python(
        "import ophyd",
        {"OPHYD_CONTROL_LAYER": "bp-fake", "BEAMPIPE_STARTUP_HOOK": "0"},
        fake_plugin,
    )
    assert out.returncode != 0
    assert "unknown control_layer" in out.stderr


def test_startup_hook_is_inert_for_ophyds_own_layers_and_unknown_names(fake_plugin: Path) -> None:
    code = "import sys, ophyd; print(ophyd.cl.name, '_beampipe_startup' in sys.modules)"
    out = _python(code, {"OPHYD_CONTROL_LAYER": "dummy"}, fake_plugin)
    assert out.stdout.split() == ["dummy", "True"]
    out = _python(code, {}, fake_plugin)
    assert out.stdout.split()[1] == "False", "no variable: the hook is not even imported"
    out = _python("import ophyd", {"OPHYD_CONTROL_LAYER": "not-installed"}, fake_plugin)
    assert "unknown control_layer" in out.stderr
