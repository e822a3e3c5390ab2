"""Run the side-by-side benchmarks: ``python3 dev.py bench [ca|pva|shm|shm_workflows|zocalo]``.

Each ``*_bench.py`` here measures beampipe and the peers a user would pick
instead in one run on the same server, and prints medians and ratios.  They
run one after another (never in parallel: the machine has two cores).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    benches = sorted(HERE.glob("*_bench.py"))
    if argv:
        benches = [b for b in benches if b.name.removesuffix("_bench.py") in argv]
        if not benches:
            names = [b.name.removesuffix("_bench.py") for b in sorted(HERE.glob("*_bench.py"))]
            print(f"no benchmark named {argv}; there are: {names}")
            return 2
    failed = []
    for bench in benches:
        print(f"\n===== {bench.name} =====", flush=True)
        if subprocess.call([sys.executable, str(bench)]) != 0:
            failed.append(bench.name)
    if failed:
        print(f"\nfailed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
