"""The README's first command, end to end: embedded IOC, bluesky scan, every plugin's demo step."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys


def test_demo_runs_the_whole_path_and_says_what_it_did() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    out = subprocess.run(
        [sys.executable, "-m", "beampipe.demo"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[core] peak det = 1000.0 at mot = 1.00" in out.stdout
    for step in importlib.metadata.entry_points(group="beampipe.demo"):
        assert f"- {step.name} " in out.stdout, f"demo step {step.name} did not run"
    assert out.stdout.rstrip().endswith("beampipe demo: done")
