"""The "20-pva" demo step against the demo IOC, as `python -m beampipe.demo` runs it."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import pytest

from beampipe.demo import DEMO_DB, DemoContext


def test_demo_step_reads_image_and_table(ioc_factory: Any) -> None:
    (entry,) = [
        ep for ep in importlib.metadata.entry_points(group="beampipe.demo") if ep.name == "20-pva"
    ]
    lines: list[str] = []

    class Ctx(DemoContext):
        def report(self, section: str, line: str) -> None:
            lines.append(f"[{section}] {line}")

    ctx = Ctx(ioc=ioc_factory(DEMO_DB), run_engine=None)
    entry.load()(ctx)
    assert ctx.results["pva_image_shape"] == (512, 640)
    assert ctx.results["pva_peaks"] == 1
    assert any("peak 3100 at x=400 y=200" in line for line in lines), lines
    assert any("NTTable as ophyd-async Peaks" in line for line in lines), lines


def test_put_to_unknown_pv_fails_naming_it(ioc_factory: Any) -> None:
    import beampipe_pva

    ioc = ioc_factory(DEMO_DB)
    with pytest.raises(beampipe_pva.PutError, match="nope"):
        beampipe_pva.put_value(ioc.pv("nope"), 1.0, timeout=0.5)
    with pytest.raises(ValueError, match="timeout"):
        beampipe_pva.put_value(ioc.pv("mot"), 1.0, timeout=-1)
