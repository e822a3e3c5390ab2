"""EpicsMotor on the beampipe-ca control layer against caproto's fake motor-record IOC."""

from __future__ import annotations

import time

import pytest

import beampipe


@pytest.fixture
def motor(motor_record_ioc):
    beampipe.use("beampipe-ca", ophyd_async=False)
    from ophyd import EpicsMotor

    m = EpicsMotor(motor_record_ioc, name="m")
    m.wait_for_connection(timeout=20)
    yield m
    m.destroy()
    beampipe.reset()


def test_moves_return_only_when_done(motor):
    """A move's status finishes only with DMOV = 1 and the readback at the target."""
    for target in (0.5, 0.8, 0.2):
        t0 = time.monotonic()
        status = motor.set(target)
        status.wait(20)
        assert status.success
        assert motor.motor_done_move.get(use_monitor=False) == 1
        assert motor.position == pytest.approx(target, abs=1e-3)
        assert time.monotonic() - t0 > 0.1  # it actually moved at 1 mm/s


def test_back_to_back_moves(motor):
    """ophyd #757/#782: a set right after a finished one must not see stale DMOV."""
    motor.move(1.0, wait=True)
    for target in (1.05, 1.1, 1.15, 1.2):
        motor.move(target, wait=True, timeout=20)
        assert motor.user_readback.get(use_monitor=False) == pytest.approx(target, abs=1e-3)
        assert motor.motor_done_move.get(use_monitor=False) == 1


def test_motor_metadata(motor):
    desc = motor.describe()["m"]
    assert desc["precision"] == 3
    assert motor.high_limit_travel.get() == 10.0
    assert motor.low_limit_travel.get() == 0.0
    assert motor.motor_egu.get() == motor.user_readback.describe()["m"]["units"]


def test_slow_readback_callback_still_sees_rbv_before_dmov(motor):
    """A slow RBV subscriber delays DMOV's delivery, never reorders it (one lane per Device).

    With per-PV delivery the DMOV = 1 event would overtake the queued RBV
    updates and the move would finish with a stale ``position``.
    """
    seen: list[tuple[str, float]] = []

    def slow_rbv(value, **_kw):
        time.sleep(0.2)  # slower than the IOC's RBV updates: they queue up behind it
        seen.append(("rbv", value))

    motor.user_readback.subscribe(slow_rbv, run=False)
    motor.motor_done_move.subscribe(lambda value, **_kw: seen.append(("dmov", value)), run=False)
    for target in (2.0, 2.3):
        del seen[:]
        motor.move(target, wait=True, timeout=20)
        assert motor.position == pytest.approx(target, abs=1e-3)
        deadline = time.monotonic() + 5
        while ("dmov", 1) not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
        done_at = seen.index(("dmov", 1))
        rbvs = [v for kind, v in seen[:done_at] if kind == "rbv"]
        assert rbvs and rbvs[-1] == pytest.approx(target, abs=1e-3)
    motor.user_readback.clear_sub(slow_rbv)
