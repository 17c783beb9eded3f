"""Run every CPU benchmark in sequence (``make bench``), or a short version of each (``make bench-quick``).

Each benchmark prints its own table and writes JSON under ``benchmarks/results/``; this script only runs them
one after another (never in parallel: they measure time) and prints how long each took.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

FULL = [
    ["bench_mbm.py", "--variants", "tiny,small,large"],
    ["bench_stage_b.py", "--sizes", "tiny,small,label2img"],
    ["bench_sampling.py", "--sizes", "tiny", "small"],
    ["bench_eval.py"],
]
QUICK = [
    ["bench_mbm.py", "--variants", "tiny,small", "--quick"],
    ["bench_stage_b.py", "--sizes", "tiny,small", "--quick"],
    ["bench_sampling.py", "--sizes", "tiny", "--quick"],
    ["bench_eval.py", "--sizes", "64", "--items", "20"],
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--quick", action="store_true", help="a short version of each benchmark (about 2 minutes)"
    )
    args = ap.parse_args()
    failed = []
    for cmd in QUICK if args.quick else FULL:
        print(f"\n=== {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / cmd[0]), *cmd[1:]])
        print(f"=== {cmd[0]}: exit {rc}, {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(cmd[0])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
