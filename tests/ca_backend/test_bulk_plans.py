"""A bulk read's plan (its channels sorted by kind and type, ready ctypes arguments) and polling.

A plan is reused while no channel of the context changed; an IOC that reboots
with other record types must be read with the new types, not through a plan
made for the old ones.  Polling for replies must not run past the caller's
timeout, and a bad budget in the environment is refused by name.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import beampipe_ca
from beampipe_ca._libca import CaError, _spin_budget, context

from .test_faults import RECONNECT

OLD = """
record(ao, "$(P)x") { field(VAL, "1.5") }
record(ao, "$(P)y") { field(VAL, "2") }
record(waveform, "$(P)w") { field(FTVL, "DOUBLE") field(NELM, "4") }
"""
NEW = """
record(stringin, "$(P)x") { field(VAL, "now a string") }
record(longin, "$(P)y") { field(VAL, "7") }
record(waveform, "$(P)w") { field(FTVL, "LONG") field(NELM, "4") }
"""


def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_a_reboot_with_other_record_types_is_read_with_the_new_types(ioc_factory, tmp_path):
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    old.write_text(OLD)
    new.write_text(NEW)
    ioc = ioc_factory(old)
    x, y, w = names = [ioc.pv("x"), ioc.pv("y"), ioc.pv("w")]
    import epics  # (writes the waveform)

    epics.caput(w, [1.0, 2.0, 3.0], wait=True, timeout=10)
    got = beampipe_ca.bulk_get(names, timeout=10)
    assert got[x] == 1.5 and got[y] == 2.0 and type(got[y]) is float
    assert got[w].tolist() == [1.0, 2.0, 3.0]
    ctx = context()
    plan = ctx.plan(names)
    assert plan.ready and len(plan.runs) == 1 and plan.arrays  # doubles in records, arrays
    assert ctx.plan(names) is plan  # reused while nothing changed

    ioc.stop()
    _until(lambda: not any(ctx.channel(n).up for n in names), 10, "the disconnects")
    assert beampipe_ca.bulk_get(names, timeout=0.2) == dict.fromkeys(names)
    ioc.db = new
    ioc.start()

    def all_back() -> bool:
        return all(v is not None for v in beampipe_ca.bulk_get(names, timeout=1).values())

    _until(all_back, RECONNECT, "the reconnects")
    epics.caput(w, [4, 5], wait=True, timeout=10, connection_timeout=10)

    got = beampipe_ca.bulk_get(names, timeout=10)
    assert got[x] == "now a string"
    assert got[y] == 7 and type(got[y]) is int
    assert got[w].dtype == np.int32 and got[w].tolist() == [4, 5]
    assert ctx.plan(names) is not plan


def test_polling_for_replies_stops_at_the_callers_timeout(ioc_factory, tmp_path, monkeypatch):
    db = tmp_path / "hung.db"
    db.write_text("".join(f'record(ao, "$(P)s{i}") {{ field(VAL, "{i}") }}\n' for i in range(8)))
    hung = ioc_factory(db)
    names = [hung.pv(f"s{i}") for i in range(8)]
    assert beampipe_ca.bulk_get(names, timeout=10) == {n: float(i) for i, n in enumerate(names)}
    ctx = context()
    monkeypatch.setattr(ctx, "spin", 1.0)  # the most BEAMPIPE_CA_SPIN_US allows
    hung.freeze()  # the circuit stays up; no reply comes
    try:
        t0 = time.monotonic()
        got = beampipe_ca.bulk_get(names, timeout=0.3)
        took = time.monotonic() - t0
    finally:
        hung.thaw()
    assert got == dict.fromkeys(names)
    assert took < 0.8, f"a 0.3 s read took {took:.2f} s"


@pytest.mark.parametrize("raw", ["fast", "-1", "2e6"])
def test_a_bad_spin_budget_is_refused_by_name(raw, monkeypatch):
    monkeypatch.setenv("BEAMPIPE_CA_SPIN_US", raw)
    with pytest.raises(CaError, match="BEAMPIPE_CA_SPIN_US"):
        _spin_budget()


def test_the_spin_budget_is_read_in_microseconds(monkeypatch):
    monkeypatch.setenv("BEAMPIPE_CA_SPIN_US", "250")
    assert _spin_budget() == pytest.approx(250e-6)
    monkeypatch.setenv("BEAMPIPE_CA_SPIN_US", "0")
    assert _spin_budget() == 0.0


def test_names_checked_once_are_still_checked_for_a_new_list():
    good = ["BP:OK:a", "BP:OK:b"]
    from beampipe_ca._bulk import _names

    assert _names(good) == good
    assert _names(good) is _names(tuple(good))  # the same list, checked once
    with pytest.raises(ValueError, match="invalid PV names"):
        _names([*good, ""])
    with pytest.raises(ValueError, match="invalid PV names"):
        _names([*good, ["unhashable"]])
