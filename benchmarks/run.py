"""Run every CPU benchmark in sequence (``make bench``, about 15 minutes on 2 cores), or a short version of each
(``make bench-quick``, about 2 minutes).

Each benchmark prints its own table and writes JSON + a markdown table under ``benchmarks/results/``; this
script runs them one after another (never in parallel: they measure time), prints how long each took, and
then collects the headline figures against the reference into ``benchmarks/results/summary-<time>.md``.
It waits (up to ``--max-wait`` seconds) for the machine's load to fall below ``--max-load`` first, and records
the load each benchmark ran under.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import REFERENCE, RESULTS, format_table, load_average, machine_info, wait_for_low_load  # noqa: E402

FULL = [
    ["bench_mbm.py", "--variants", "tiny,small,large", "--check-flops"],
    ["bench_mbm.py", "--stability", "150"],
    # the large step with and without torch.compile, interleaved (compiling takes about a minute)
    ["bench_mbm.py", "--variants", "large", "--side-by-side", "fp32,bf16,bf16+compile", "--rounds", "2"],
    ["bench_stage_b.py", "--label2img-steps", "2"],
    # tiny only in part 1 (PLMS-250 at the small size takes about 2 minutes a call); the two label2img
    # variants that bound the range, timed once each
    ["bench_sampling.py", "--sizes", "tiny", "--items", "2", "--repeat", "1", "--e2e-variant", ""]
    + ["--label2img-variants", "fp32,bf16-channels_last", "--label2img-batch", "10"],
    ["bench_scaling.py", "--batches", "1,2,4,8", "--steps", "1"],
    ["bench_ddp.py"],
    ["bench_eval.py", "--sizes", "64", "256", "--threads", "2"],
]
QUICK = [
    ["bench_mbm.py", "--variants", "tiny,small", "--quick"],
    ["bench_mbm.py", "--stability", "60", "--stability-seeds", "1"],
    ["bench_stage_b.py", "--sizes", "tiny,small", "--quick"],
    ["bench_sampling.py", "--quick"],
    ["bench_scaling.py", "--quick", "--skip-steps"],
    ["bench_ddp.py", "--quick"],
    ["bench_eval.py", "--sizes", "64", "--items", "20", "--threads", "2"],
]


def newest(prefix: str, since: float) -> dict[str, Any] | None:
    """The newest ``<prefix>*.json`` written after ``since`` (epoch seconds), parsed."""
    files = [p for p in RESULTS.glob(f"{prefix}*.json") if p.stat().st_mtime >= since]
    if not files:
        return None
    return json.loads(max(files, key=lambda p: p.stat().st_mtime).read_text())


def summarise(since: float) -> str:
    """Headline figures of the benchmarks written after ``since``, against the reference."""
    rows: list[list[str]] = []
    ref = REFERENCE
    mbm = newest("bench_mbm-cpu", since) or newest("bench_mbm-cuda", since)
    if mbm:
        load = mbm["machine"]["load_average_1_5_15"]
        for r in mbm["results"]:
            if "vs_reference_abs" in r:
                rows.append([
                    f"MBM large step, batch {r['batch_size']}, {r['precision']}, AdamW {r['optimizer']}",
                    f"{r['samples_per_s']:.3f} samples/s", f"{ref['mbm_large_samples_per_s']} samples/s",
                    f"{r['vs_reference_abs']:.2f}", f"{r['vs_reference_mfu_normalised']:.2f}",
                    f"{r['fraction_of_fp32_matmul']:.0%} of fp32 mm", str(load),
                ])  # fmt: skip
    sb = newest("bench_stage_b-cpu", since) or newest("bench_stage_b-cuda", since)
    if sb:
        load = sb["machine"]["load_average_1_5_15"]
        for r in sb["results"]:
            if "vs_reference_abs" in r:
                rows.append([
                    f"stage B cond-only step, label2img, batch {r['batch']}, {r['precision']}, {r['memory_format']}",
                    f"{r['samples_per_s']:.4f} samples/s", f"{ref['stage_b_samples_per_s']} samples/s",
                    f"{r['vs_reference_abs']:.2f}", f"{r['vs_reference_mfu_normalised']:.2f}",
                    f"{r.get('fraction_of_fp32_matmul', float('nan')):.0%} of fp32 mm", str(load),
                ])  # fmt: skip
    smp = newest("bench_sampling-cpu", since) or newest("bench_sampling-cuda", since)
    if smp and smp.get("label2img"):
        load = smp["machine"]["load_average_1_5_15"]
        norm = smp["matmul_gflops_fp32_used"] / ref["fp32_matmul_gflops"]
        for v, p in smp["label2img"]["parts"].items():
            step = p["unet_5"]["median_s"]
            rows.append([f"UNet step 1 fMRI x 5, label2img, {v}", f"{step:.2f} s", f"{ref['plms_step_1x5_s']} s",
                         f"{ref['plms_step_1x5_s'] / step:.2f}", f"{ref['plms_step_1x5_s'] / (step * norm):.2f}", "",
                         str(load)])  # fmt: skip
        best = max(smp["label2img"]["estimates"], key=lambda e: e["vs_reference_test_set_abs"])
        plms = [e for e in smp["label2img"]["estimates"] if e["sampler"] == "plms" and e["variant"] == "fp32"]
        for e in plms + [best]:
            ts = e.get("test_set_batched_s", e["test_set_one_at_a_time_s"])
            rows.append([f"50-item test set, {e['sampler']}-{e['steps']}, {e['variant']}", f"{ts / 3600:.2f} h",
                         f"{ref['test_set_h']} h", f"{e['vs_reference_test_set_abs']:.1f}",
                         f"{e['vs_reference_test_set_mfu_normalised']:.1f}", "estimate from timed parts", str(load)])  # fmt: skip
    if not rows:
        return ""
    return format_table(
        rows,
        [
            "what",
            "ours",
            "reference",
            "x ref (absolute)",
            "x ref (MFU-normalised)",
            "note",
            "load 1/5/15 min",
        ],
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="a short version of each benchmark (about 2 minutes)"
    )
    ap.add_argument("--only", default=None, help="comma list of script names to run (e.g. bench_mbm.py)")
    ap.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-minute load average below this")
    ap.add_argument("--max-wait", type=float, default=600, help="seconds to wait for it (then run anyway)")
    args = ap.parse_args()
    since = time.time()
    wait_for_low_load(args.max_load, args.max_wait)
    failed, durations = [], []
    for cmd in QUICK if args.quick else FULL:
        if args.only and cmd[0] not in args.only.split(","):
            continue
        print(f"\n=== {' '.join(cmd)}   (load {load_average()})", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / cmd[0]), *cmd[1:]])
        dt = time.perf_counter() - t0
        durations.append([" ".join(cmd), f"{dt:.0f}", rc])
        print(f"=== {cmd[0]}: exit {rc}, {dt:.0f} s", flush=True)
        if rc != 0:
            failed.append(cmd[0])
    summary = summarise(since)
    info = machine_info("cpu")
    text = (
        f"# mindvis benchmarks ({'quick' if args.quick else 'full'})\n\n{info['cpu']}, {info['cpu_count']} cores, "
        f"torch {info['torch']}, {info['time_utc']}\n\n"
        + (summary + "\n\n" if summary else "")
        + format_table(durations, ["benchmark", "seconds", "exit"])
        + "\n"
    )
    print("\n" + text)
    from _common import stamp
    from mindvis.utils.io import atomic_write

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"summary-{'quick' if args.quick else 'full'}-{stamp()}.md"
    with atomic_write(path, "w") as fh:
        fh.write(text)
    print(f"wrote {path}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
