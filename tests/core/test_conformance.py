"""ophyd-async's SignalBackend ABC moves between releases: fail loudly, naming the change."""

from __future__ import annotations

import importlib.metadata

import pytest

import beampipe


def test_signal_backend_abc_is_the_one_we_were_written_against() -> None:
    installed = beampipe.signal_backend_abstract_api()
    version = importlib.metadata.version("ophyd-async")
    added = {k: v for k, v in installed.items() if k not in beampipe.SIGNAL_BACKEND_API}
    removed = {k: v for k, v in beampipe.SIGNAL_BACKEND_API.items() if k not in installed}
    changed = {
        k: (beampipe.SIGNAL_BACKEND_API[k], v)
        for k, v in installed.items()
        if k in beampipe.SIGNAL_BACKEND_API and beampipe.SIGNAL_BACKEND_API[k] != v
    }
    assert not (added or removed or changed), (
        f"ophyd-async {version} changed SignalBackend: added {added}, removed {removed}, "
        f"changed {changed}; update beampipe.SIGNAL_BACKEND_API and every plugin backend"
    )


@pytest.mark.parametrize(
    "ep",
    importlib.metadata.entry_points(group=beampipe.ASYNC_BACKEND_GROUP),
    ids=lambda ep: ep.name,
)
def test_every_installed_backend_implements_the_whole_abc(
    ep: importlib.metadata.EntryPoint,
) -> None:
    backend = ep.load()
    assert beampipe.missing_backend_methods(backend) == []
    assert backend.protocol in ("ca", "pva")


def test_missing_methods_are_named() -> None:
    assert beampipe.missing_backend_methods(beampipe.BatchedSignalBackend) == [
        "connect",
        "get_datakey",
        "get_reading",
        "get_setpoint",
        "get_value",
        "put",
        "set_callback",
    ]
