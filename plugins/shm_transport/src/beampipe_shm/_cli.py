"""``beampipe-shm``: look at streams from a shell (what is running, who reads, who lags)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ._errors import StreamNotFound
from ._inspect import inspect, list_streams

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beampipe-shm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_inspect = sub.add_parser("inspect", help="schema, counters, rate and readers of a stream")
    p_inspect.add_argument("name")
    p_inspect.add_argument("--json", action="store_true", help="machine-readable output")
    p_inspect.add_argument(
        "--watch", type=float, metavar="SECONDS", help="repeat every SECONDS until Ctrl-C"
    )
    sub.add_parser("list", help="streams present in /dev/shm")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for name in list_streams():
            try:
                info = inspect(name)
                print(f"{name}\t{info.state}\tpid {info.producer_pid}\t{info.frames} frames")
            except StreamNotFound as exc:
                print(f"{name}\t? ({exc})")
        return 0
    while True:
        try:
            info = inspect(args.name)
        except StreamNotFound as exc:
            print(f"beampipe-shm: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(info.to_dict(), indent=2) if args.json else info.format(), flush=True)
        if not args.watch:
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
