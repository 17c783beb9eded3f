"""Training throughput of the masked brain model (MinD-Vis stage A) at the paper's sequence length.

For each variant (tiny, small, large = the paper's 1024 x 24 encoder) at 4656 voxels (291 patches of 16), this
times full training steps as the trainer runs them: masked forward, loss, backward, gradient-norm clipping at
0.8 and an AdamW step, in fp32 and (on GPUs) under bf16 autocast. It reports:

* samples/s (timed steps only, after warmup; the device is synchronised before reading the clock);
* peak memory: on GPUs the peak allocated by torch during the timed steps; on CPUs the peak resident set of a
  fresh process that ran only that measurement (so it includes the interpreter and torch, ~0.3-0.5 GB);
* the achieved FLOP rate: model FLOPs per sample (counted analytically from the architecture: every matrix
  product of the patch embedding, the attention projections, the attention itself, the MLPs, the decoder
  embedding and the prediction head, x3 for forward + backward (x2 for the patch embedding, whose input needs
  no gradient); norms, softmax and the optimizer left out; the non-attention part equals torch's
  FlopCounterMode count exactly)
  times samples/s, as a fraction of the FLOP rate of a large fp32 matmul measured in the same run (the
  bf16 matmul rate is measured too, and bf16 training is also compared with it).

Run: ``python benchmarks/bench_mbm.py [--variants tiny,small,large] [--steps N] [--quick]``. A table is printed
and the figures are written to ``benchmarks/results/bench_mbm-<device>-<time>.json``.
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
NUM_VOXELS = 4656  # 291 patches of 16, the paper's GOD subject 3 after wrap padding


def model_flops_per_sample(config: Any, mask_ratio: float = 0.75) -> dict[str, float]:
    """Matmul FLOPs of one training sample (forward x3), split by part. ``config`` is an MBMConfig."""
    L, p = config.num_patches, config.patch_size
    keep = int(L * (1 - mask_ratio))

    def blocks(tokens: int, width: int, depth: int, mlp_ratio: float) -> float:
        hidden = int(width * mlp_ratio)
        per_block = (
            2 * tokens * width * 3 * width  # qkv
            + 2 * 2 * tokens * tokens * width  # q k^T and attn v
            + 2 * tokens * width * width  # proj
            + 2 * 2 * tokens * width * hidden  # fc1 + fc2
        )
        return depth * per_block

    fwd = {
        "patch_embed": 2 * L * p * config.embed_dim,
        "encoder": blocks(1 + keep, config.embed_dim, config.depth, config.mlp_ratio),
        "decoder_embed": 2 * (1 + keep) * config.embed_dim * config.decoder_embed_dim,
        "decoder": blocks(1 + L, config.decoder_embed_dim, config.decoder_depth, config.mlp_ratio),
        "decoder_pred": 2 * (1 + L) * config.decoder_embed_dim * p,
    }
    out = {k: 3.0 * v for k, v in fwd.items()}
    out["patch_embed"] = 2.0 * fwd["patch_embed"]  # no gradient w.r.t. the input voxels
    out["total"] = sum(out.values())
    return out


def matmul_rate(device: str, dtype_name: str, n: int, seconds: float = 1.0) -> float:
    """FLOP/s of an ``n x n @ n x n`` matmul, best of repeated timed batches."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    reps, best = 1, 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        dt = time.perf_counter() - t
        best = max(best, reps * 2 * n**3 / dt)
        if dt < 0.05:
            reps *= 2
    return best


def train_throughput(variant: str, device: str, precision: str, batch: int, steps: int, warmup: int) -> dict:
    """Time ``steps`` training steps of ``variant`` after ``warmup`` untimed ones."""
    import torch

    from mindvis.models.mbm import MBM_VARIANTS, MaskedBrainModel
    from mindvis.train.common import param_groups_weight_decay

    torch.manual_seed(0)
    config = MBM_VARIANTS[variant](NUM_VOXELS)
    model = MaskedBrainModel(config).to(device).train()
    opt = torch.optim.AdamW(
        param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=(device == "cuda") or None
    )
    x = torch.randn(batch, NUM_VOXELS, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            loss = model(x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.8)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - t
    flops = model_flops_per_sample(config)
    result = {
        "variant": variant,
        "precision": precision,
        "batch_size": batch,
        "steps": steps,
        "seconds": seconds,
        "samples_per_s": batch * steps / seconds,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "num_patches": config.num_patches,
        "gflop_per_sample": flops["total"] / 1e9,
        "flop_split": {k: v / flops["total"] for k, v in flops.items() if k != "total"},
    }
    result["achieved_tflops"] = result["samples_per_s"] * flops["total"] / 1e12
    if device == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        result["memory_kind"] = "torch peak allocated"
    else:
        result["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        result["memory_kind"] = "process peak RSS"
    return result


def _child(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    res = train_throughput(args.variant, args.device, args.precision, args.batch, args.steps, args.warmup)
    print("RESULT " + json.dumps(res))


def _run_child(
    variant: str, device: str, precision: str, batch: int, steps: int, warmup: int, threads: int
) -> dict:
    cmd = [
        sys.executable, __file__, "--child", "--variant", variant, "--device", device, "--precision", precision,
        "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads),
    ]  # fmt: skip
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"variant": variant, "precision": precision, "batch_size": batch, "error": " | ".join(tail)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="tiny,small,large")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument(
        "--precision", default=None, help="fp32, bf16 or both (default: both on GPUs, fp32 on CPUs)"
    )
    ap.add_argument(
        "--batch", type=int, default=None, help="batch size (default: 100 on GPUs, per variant on CPUs)"
    )
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on GPUs, 3 on CPUs)")
    ap.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default: 5 on GPUs, 1 on CPUs)"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPUs (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    ap.add_argument(
        "--matmul-n", type=int, default=None, help="matmul size (default 8192 on GPUs, 2048 on CPUs)"
    )
    ap.add_argument("--no-save", action="store_true", help="do not write the JSON")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    precisions = (
        ["fp32", "bf16"]
        if (args.precision or ("both" if gpu else "fp32")) == "both"
        else [args.precision or "fp32"]
    )
    steps = args.steps or ((5 if args.quick else 20) if gpu else (1 if args.quick else 3))
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    cpu_batch = {"tiny": 32, "small": 16, "large": 4}
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.matmul_n or (8192 if gpu else 2048)
    rates = {"fp32": matmul_rate(device, "fp32", n)}
    try:
        rates["bf16"] = matmul_rate(device, "bf16", n)
    except RuntimeError as exc:  # pragma: no cover - bf16 matmul unsupported
        print(f"bf16 matmul unavailable: {exc}", file=sys.stderr)
    rows = []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        for precision in precisions:
            batch = args.batch or (100 if gpu else cpu_batch.get(variant, 8))
            if gpu:
                try:
                    res = train_throughput(variant, device, precision, batch, steps, warmup)
                except torch.OutOfMemoryError as exc:
                    res = {
                        "variant": variant,
                        "precision": precision,
                        "batch_size": batch,
                        "error": str(exc)[:200],
                    }
                torch.cuda.empty_cache()
            else:
                res = _run_child(variant, device, precision, batch, steps, warmup, args.threads)
            if "error" not in res:
                res["fraction_of_fp32_matmul"] = res["achieved_tflops"] * 1e12 / rates["fp32"]
                if "bf16" in rates:
                    res["fraction_of_bf16_matmul"] = res["achieved_tflops"] * 1e12 / rates["bf16"]
            rows.append(res)
            print(_row(res), flush=True) if len(rows) > 1 else print(_header() + "\n" + _row(res), flush=True)

    info = {
        "benchmark": "bench_mbm",
        "num_voxels": NUM_VOXELS,
        "device": device,
        "device_name": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_n": n,
        "matmul_tflops": {k: v / 1e12 for k, v in rates.items()},
        "steps": steps,
        "warmup": warmup,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": rows,
    }
    print(
        f"\n{device} ({info['device_name']}): fp32 matmul {rates['fp32'] / 1e12:.3f} TFLOP/s"
        + (f", bf16 matmul {rates['bf16'] / 1e12:.3f} TFLOP/s" if "bf16" in rates else "")
        + f" ({n} x {n})"
    )
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"bench_mbm-{device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, path)
        print(f"wrote {path}")


def _header() -> str:
    cols = ("variant", "prec", "batch", "params M", "GFLOP/smp", "samples/s", "TFLOP/s", "of fp32 mm", "of bf16 mm",
            "peak GB")  # fmt: skip
    return "  ".join(f"{c:>10}" for c in cols)


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['variant']:>10}  {r['precision']:>10}  {r['batch_size']:>10}  error: {r['error']}"
    vals = (
        r["variant"],
        r["precision"],
        r["batch_size"],
        f"{r['params_M']:.1f}",
        f"{r['gflop_per_sample']:.2f}",
        f"{r['samples_per_s']:.1f}",
        f"{r['achieved_tflops']:.3f}",
        f"{r['fraction_of_fp32_matmul']:.1%}",
        f"{r.get('fraction_of_bf16_matmul', float('nan')):.1%}",
        f"{r['peak_memory_gb']:.2f}",
    )
    return "  ".join(f"{v:>10}" for v in vals)


if __name__ == "__main__":
    main()
