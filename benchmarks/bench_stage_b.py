"""Training throughput and peak memory of MinD-Vis stage B (the double-conditioned LDM finetune).

For each model size (``tiny``, ``small``, ``label2img`` = the original's 401 M-parameter UNet, VQ-f4 at 256 px and
the paper's 1024 x 24 fMRI encoder at 4656 voxels) and each trainable preset (``original``: encoder, conditioner,
cross-attention and its norm; ``full``: the whole UNet as well), this times complete training steps as
:class:`mindvis.train.ldm.StageBModule` runs them: VQ encoding of the images (no gradient), the fMRI encoder and
conditioner, the UNet epsilon loss, backward, gradient-norm clipping at 0.5 and an AdamW step.

* samples/s over the timed steps (after warmup; CUDA is synchronised before reading the clock);
* peak memory: on GPUs the peak allocated by torch during the timed steps; on CPUs the peak resident set of a
  fresh process that ran only that measurement (it includes the interpreter and the libraries, about 0.4 GB);
* trainable and total parameter counts; the ratio original / full is printed per size.

Weights are random (throughput does not depend on them). Run:
``python benchmarks/bench_stage_b.py [--sizes tiny,small,label2img] [--steps N] [--batch B] [--quick]``.
A table is printed and the figures are written to ``benchmarks/results/bench_stage_b-<device>-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
NUM_VOXELS = 4656  # GOD subject 3 after wrap padding: 291 patches of 16
ENCODERS = {"tiny": "tiny", "small": "small", "label2img": "large"}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process: build the model, warm up, time ``args.steps`` training steps."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    from mindvis.models.ldm import ldm_preset
    from mindvis.models.mbm import MBM_VARIANTS, FMRIEncoder
    from mindvis.train.ldm import StageBConfig, StageBModule, build_stage_b_model
    from mindvis.train.prior import build_class_prior

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    ldm = ldm_preset(args.size, time_cond=False)
    prior = build_class_prior(ldm, 10)
    encoder = FMRIEncoder(MBM_VARIANTS[ENCODERS[args.size]](NUM_VOXELS))
    cfg = StageBConfig(trainable=args.preset, batch_size=args.batch)
    model = build_stage_b_model(prior, encoder, cfg)
    del prior
    module = StageBModule(model, cfg).to(device)
    module.train()
    opt = module.configure_optimizers()
    params = [p for p in module.parameters() if p.requires_grad]
    res = ldm.vq.resolution
    gen = torch.Generator().manual_seed(1)
    fmri = torch.randn(args.batch, NUM_VOXELS, generator=gen).to(device)
    images = (torch.rand(args.batch, 3, res, res, generator=gen) * 2 - 1).to(device)
    batch = {"fmri": fmri, "image": images}
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device == "cuda" and args.bf16
        else torch.autocast("cpu", enabled=False)
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> float:
        with autocast:
            loss = module.training_step(batch, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "size": args.size,
        "preset": args.preset,
        "device": device,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "precision": "bf16-mixed" if device == "cuda" and args.bf16 else "32",
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "samples_per_s": args.batch * args.steps / seconds,
        "s_per_step": seconds / args.steps,
        "peak_memory_mb": peak / 2**20,
        "peak_memory_kind": "torch max allocated (GPU)" if device == "cuda" else "process peak RSS (CPU)",
        "trainable_params": module.num_trainable,
        "total_params": module.num_total,
        "image_size": res,
        "latent": list(model.latent_shape),
        "encoder": ENCODERS[args.size],
    }


def run_one(size: str, preset: str, batch: int, steps: int, warmup: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--size",
        size,
        "--preset",
        preset,
        "--batch",
        str(batch),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--threads",
        str(args.threads),
    ]
    if args.cpu:
        cmd.append("--cpu")
    if args.bf16:
        cmd.append("--bf16")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"size": size, "preset": preset, "batch": batch, "error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,small,label2img")
    ap.add_argument("--presets", default="original,full")
    ap.add_argument("--batch", type=int, default=5, help="batch of tiny/small (the original's GOD batch: 5)")
    ap.add_argument(
        "--label2img-batch",
        type=int,
        default=None,
        help="batch at label2img size (default: --batch on GPUs, 1 on CPUs)",
    )
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="2 steps after 1 warmup")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on GPUs")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import torch

    if args.quick:
        args.steps, args.warmup = 2, 1
    gpu = torch.cuda.is_available() and not args.cpu
    rows = []
    for size in args.sizes.split(","):
        big = size == "label2img"
        batch = (args.label2img_batch or (args.batch if gpu else 1)) if big else args.batch
        steps = args.steps if (gpu or not big) else min(args.steps, 2)
        warmup = args.warmup if (gpu or not big) else 1
        for preset in args.presets.split(","):
            r = run_one(size, preset, batch, steps, warmup, args)
            rows.append(r)
            if "error" in r:
                print(f"{size:10s} {preset:9s} FAILED: {r['error']}", flush=True)
            else:
                print(
                    f"{size:10s} {preset:9s} batch {batch:3d}  {r['samples_per_s']:9.3f} samples/s  "
                    f"{r['s_per_step']:8.3f} s/step  peak {r['peak_memory_mb']:9.0f} MB  trainable "
                    f"{r['trainable_params'] / 1e6:8.2f} M of {r['total_params'] / 1e6:8.2f} M",
                    flush=True,
                )
    ratios = {}
    for size in args.sizes.split(","):
        by = {r["preset"]: r for r in rows if r["size"] == size and "error" not in r}
        if "original" in by and "full" in by:
            ratios[size] = {
                "speed_original_over_full": by["original"]["samples_per_s"] / by["full"]["samples_per_s"],
                "memory_original_over_full": by["original"]["peak_memory_mb"] / by["full"]["peak_memory_mb"],
            }
    print("\nsize        speed original/full   peak memory original/full")
    for size, r in ratios.items():
        print(f"{size:10s}  {r['speed_original_over_full']:18.2f}x  {r['memory_original_over_full']:24.2f}x")
    device = (
        torch.cuda.get_device_name(0)
        if gpu
        else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    )
    out = {
        "benchmark": "bench_stage_b",
        "device": device,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "num_voxels": NUM_VOXELS,
        "results": rows,
        "ratios": ratios,
        "note": "random weights; CPU peak memory is the peak RSS of a fresh process per measurement; on CPUs "
        "label2img runs at batch 1 with 1 warmup and at most 2 timed steps unless told otherwise",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if gpu else "cpu"
    path = RESULTS / f"bench_stage_b-{tag}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
