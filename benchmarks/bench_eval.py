"""Pixel-metric evaluation time: vectorised mindvis.eval versus a per-pair double loop (the original's approach).

Measured side by side in one run, on seeded random images (timings do not depend on content):

* ``vectorised``: :mod:`mindvis.eval.metrics` — PCC/MSE/SSIM similarity tensors ``[N, S, N]`` for all pairs,
  2-way identification against all others, n-way identification by 1000 trials, NSD PixCorr and SSIM at 425 px;
* ``loop``: one metric call per (reconstruction, ground-truth) pair with numpy / scikit-image, as the original
  MinD-Vis ``pair_wise_score`` does. It is timed on a subset of items (``--loop-items``) and the per-pair
  cost is scaled to the full ``N x S x N`` pairs.

Default: 50 test images x 5 samples at 64 px and 256 px. Wall-clock and process CPU times are reported
(the CPU time is the fairer number on a shared machine). The JSON goes to
``benchmarks/results/bench_eval-<time>.json``.

Usage::

    python benchmarks/bench_eval.py
    python benchmarks/bench_eval.py --sizes 64 --items 50 --samples 5 --loop-items 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def vectorised(recons: np.ndarray, gt: np.ndarray, trials: int) -> dict[str, tuple[float, float]]:
    from mindvis.eval import metrics as M

    times = {}
    mats, wall, cpu = _timed(
        lambda: {
            "pcc": M.pcc_matrix(recons, gt),
            "mse": M.mse_matrix(recons, gt),
            "ssim": M.ssim_matrix(recons, gt),
        }
    )
    times["pcc+mse+ssim matrices"] = (wall, cpu)
    rng = np.random.default_rng(0)

    def ident():
        for key, m in mats.items():
            s = -m if key == "mse" else m
            M.two_way_identification(s)
            M.n_way_identification(s, min(50, len(gt)), trials, rng)

    _, wall, cpu = _timed(ident)
    times["2-way + n-way identification"] = (wall, cpu)
    _, wall, cpu = _timed(lambda: M.nsd_pixel_metrics(recons, gt))
    times["NSD PixCorr + SSIM (425 px)"] = (wall, cpu)
    return times


def loop_per_pair(recons: np.ndarray, gt: np.ndarray) -> tuple[float, float, int]:
    """Per-pair double loop over (reconstruction, ground truth) with scikit-image SSIM; returns time per pair."""
    from skimage.metrics import structural_similarity

    n, s = recons.shape[:2]
    pairs = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        for k in range(s):
            pred = recons[i, k]
            for j in range(n):
                other = gt[j]
                a, b = pred.astype(np.float64), other.astype(np.float64)
                np.mean((a / 255 - b / 255) ** 2)
                np.corrcoef(a.ravel(), b.ravel())
                structural_similarity(pred, other, channel_axis=-1, data_range=255)
                pairs += 1
    return (time.perf_counter() - t0) / pairs, (time.process_time() - c0) / pairs, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--loop-items", type=int, default=6, help="items timed with the per-pair loop")
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows, record = [], []
    for size in args.sizes:
        gt = rng.integers(0, 256, (args.items, size, size, 3), dtype=np.uint8)
        recons = rng.integers(0, 256, (args.items, args.samples, size, size, 3), dtype=np.uint8)
        times = vectorised(recons, gt, args.trials)
        total_wall = sum(w for w, _ in times.values())
        total_cpu = sum(c for _, c in times.values())
        m = args.loop_items
        per_wall, per_cpu, pairs = loop_per_pair(recons[:m], gt[:m])
        full_pairs = args.items * args.samples * args.items
        pixel_wall = times["pcc+mse+ssim matrices"][0] + times["2-way + n-way identification"][0]
        pixel_cpu = times["pcc+mse+ssim matrices"][1] + times["2-way + n-way identification"][1]
        for name, (w, c) in times.items():
            rows.append((f"{size}px", name, w, c, ""))
        rows.append((f"{size}px", "vectorised total", total_wall, total_cpu, ""))
        loop_wall, loop_cpu = per_wall * full_pairs, per_cpu * full_pairs
        rows.append(
            (
                f"{size}px",
                f"per-pair loop MSE+PCC+SSIM (from {pairs} pairs, scaled)",
                loop_wall,
                loop_cpu,
                f"{loop_cpu / max(pixel_cpu, 1e-9):.0f}x CPU vs vectorised pairwise",
            )
        )
        record.append(
            {
                "size": size,
                "items": args.items,
                "samples": args.samples,
                "trials": args.trials,
                "vectorised_s": {k: {"wall": w, "cpu": c} for k, (w, c) in times.items()},
                "vectorised_pairwise_s": {"wall": pixel_wall, "cpu": pixel_cpu},
                "loop_per_pair_s": {"wall": per_wall, "cpu": per_cpu, "pairs_timed": pairs},
                "loop_scaled_s": {"wall": loop_wall, "cpu": loop_cpu, "pairs": full_pairs},
                "speedup_cpu": loop_cpu / max(pixel_cpu, 1e-9),
            }
        )
    print(
        f"\n{args.items} test images x {args.samples} samples; torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'size':>6}  {'step':<58} {'wall s':>9} {'cpu s':>9}  note")
    for size, name, w, c, note in rows:
        print(f"{size:>6}  {name:<58} {w:9.2f} {c:9.2f}  {note}")
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"bench_eval-{stamp}.json"
    payload = {
        "benchmark": "bench_eval",
        "created": stamp,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "results": record,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
