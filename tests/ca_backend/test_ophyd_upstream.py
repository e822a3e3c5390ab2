"""A subset of ophyd's own signal tests (ophyd/tests/test_signal.py), run on the beampipe-ca layer.

ophyd's tests are imported as they ship; only their fixtures are provided here: ophyd's
caproto test IOCs started on this process's CA ports, and the control layer set to
beampipe-ca instead of ophyd's pyepics/caproto parametrisation.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest
from ophyd.tests.test_signal import (  # noqa: F401 - collected by pytest from here
    alarm_status_signal,
    bool_enum_signal,
    nv_signal,
    pair_signal,
    path_signal,
    ro_signal,
    rw_signal,
    set_severity_signal,
    test_describe,
    test_enum_strs,
    test_epics_signal_derived_nv,
    test_epics_signal_derived_ro,
    test_epicssignal_alarm_status,
    test_epicssignal_get_in_callback,
    test_epicssignal_novalidation,
    test_epicssignal_readonly,
    test_epicssignal_readwrite,
    test_epicssignal_readwrite_limits,
    test_epicssignal_sub_setpoint,
    test_epicssignal_waveform,
    test_epicssignalro_alarm_status,
    test_hints,
    test_no_connection,
    test_posix_paths,
    test_setpoint,
    test_windows_paths,
)

import beampipe

from .conftest import caproto_ioc


@pytest.fixture(autouse=True)
def _beampipe_ca_layer():
    beampipe.use("beampipe-ca", ophyd_async=False)
    import ophyd

    assert "beampipe-ca" in ophyd.get_cl().name
    yield
    # Some of ophyd's tests leave signals for the garbage collector; release them while
    # the layer that made them is still installed (the core's routing layer resolves the
    # layer at release time, see the report).
    import gc

    gc.collect()
    beampipe.reset()


@pytest.fixture
def cleanup():
    """ophyd's own ``cleanup`` fixture: destroy what the test registered."""
    items = []

    class Cleaner:
        def add(self, item):
            items.append(item)

    yield Cleaner()
    for item in items:
        item.destroy()


@pytest.fixture(scope="module")
def prefix():
    return str(uuid.uuid4())[:8] + ":"


# Module scope (ophyd's are per test): one IOC start per module keeps this file ~10 s.
@pytest.fixture(scope="module")
def signal_test_ioc(prefix, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("signal_ioc")
    pvs = {
        key: f"{prefix}{key}"
        for key in (
            "read_only", "read_write", "pair_set", "pair_rbv", "waveform", "bool_enum",
            "alarm_status", "set_severity", "path",
        )
    }  # fmt: skip
    with caproto_ioc("ophyd.tests.signal_ioc", prefix, pvs["read_only"], tmp_path / "sig.log"):
        yield SimpleNamespace(prefix=prefix, name="test_signal IOC", pvs=pvs, type="caproto")


@pytest.fixture(scope="module")
def fake_motor_ioc(prefix, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fake_motor_ioc")
    pvs = {
        key: f"{prefix}{key}"
        for key in ("setpoint", "readback", "moving", "actuate", "stop", "step_size")
    }
    with caproto_ioc("ophyd.tests.fake_motor_ioc", prefix, pvs["setpoint"], tmp_path / "m.log"):
        yield SimpleNamespace(prefix=prefix, name="Fake motor IOC", pvs=pvs, type="caproto")
