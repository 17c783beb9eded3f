"""Training throughput of the masked brain model (MinD-Vis stage A) against the reference figures.

Each measurement times full training steps as the trainer runs them: masked forward, loss, backward,
gradient-norm clipping at 0.8 and an AdamW step (weight decay 0.05 on matrices, betas 0.9/0.95), at 4656
voxels = 291 patches of 16 (the paper's GOD subject 3 after wrap padding). Variants: ``tiny``, ``small`` and
``large`` (the paper's 1024 x 24 encoder, decoder 512 x 8; on a CPU at batch 8 = the reference's setting).

Reported per row (each row runs in a fresh process, so peak memory is that measurement's alone):

* step time: the median (and min/max) of ``--steps`` timed steps after ``--warmup`` untimed ones;
  samples/s = batch / median step time;
* model FLOPs per sample, counted analytically (every matrix product: patch embedding, attention
  projections, the attention itself, MLPs, decoder embedding, prediction head; x3 for forward + backward,
  x2 for the patch embedding, whose input needs no gradient; norms, softmax and optimizer left out). The
  non-attention part equals ``torch.utils.flop_counter`` exactly (``--check-flops`` verifies it);
* the achieved FLOP rate as a fraction of a large matmul of the same machine, measured in the same run
  (fp32 and bf16), before and after the training rows (the mean is used; the drift shows load changes);
* for ``large``: the ratio to the reference 1.64 samples/s (absolute) and the MFU-normalised ratio
  (ours / our fp32 matmul rate, over 1.64 / 247 GFLOP/s).

Precisions: ``fp32`` and ``bf16`` (``torch.autocast`` to bfloat16; the master weights and the optimizer stay
fp32). Optimizers: ``default`` (what the trainer builds, :func:`mindvis.train.optim.make_adamw`: torch's fused
AdamW kernel on CPUs and GPUs), ``unfused`` (``torch.optim.AdamW``'s own kernel choice, the trainer's before
``make_adamw``), ``fused`` and ``foreach``. ``--compile`` adds ``torch.compile``'d rows (the trainer's
``--compile``).

``--stability N`` instead trains the tiny variant N steps in fp32 and under bf16 autocast from the same
initialisation, data and masks, and compares the loss curves (JSON + PNG).

Run: ``python benchmarks/bench_mbm.py [--variants tiny,small,large] [--precisions fp32,bf16] [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REFERENCE,
    RESULTS,
    emit,
    fmt,
    format_table,
    machine_info,
    matmul_rate,
    peak_rss_mb,
    run_child,
    summary,
    wait_for_low_load,
    write_results,
)

NUM_VOXELS = 4656  # 291 patches of 16, the paper's GOD subject 3 after wrap padding
CPU_BATCH = {"tiny": 32, "small": 16, "large": REFERENCE["mbm_large_batch"]}


def model_flops_per_sample(config: Any, mask_ratio: float | None = None) -> dict[str, float]:
    """Matmul FLOPs of one training sample (forward x3), split by part. ``config`` is an MBMConfig."""
    L, p = config.num_patches, config.patch_size
    keep = config.num_keep(mask_ratio)

    def blocks(tokens: int, width: int, depth: int, mlp_ratio: float, attention: bool = True) -> float:
        hidden = int(width * mlp_ratio)
        per_block = (
            2 * tokens * width * 3 * width  # qkv
            + (2 * 2 * tokens * tokens * width if attention else 0)  # q k^T and attn v
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
    attention = (
        2
        * 2
        * (
            config.depth * (1 + keep) ** 2 * config.embed_dim
            + config.decoder_depth * (1 + L) ** 2 * config.decoder_embed_dim
        )
    )
    out = {k: 3.0 * v for k, v in fwd.items()}
    out["patch_embed"] = 2.0 * fwd["patch_embed"]  # no gradient w.r.t. the input voxels
    out["total"] = sum(out.values())
    out["attention_core"] = 3.0 * attention  # included in encoder/decoder above
    return out


def check_flops(variant: str, batch: int = 2) -> dict[str, float]:
    """Analytic FLOPs against ``torch.utils.flop_counter`` (which does not count CPU fused attention)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mindvis.models.mbm import MBM_VARIANTS, MaskedBrainModel

    torch.manual_seed(0)
    config = MBM_VARIANTS[variant](NUM_VOXELS)
    model = MaskedBrainModel(config)
    x = torch.randn(batch, NUM_VOXELS)
    with FlopCounterMode(display=False) as counter:
        model(x).loss.backward()
    counted = counter.get_total_flops() / batch
    ours = model_flops_per_sample(config)
    return {
        "variant": variant,
        "flop_counter_per_sample": counted,
        "analytic_without_attention_core": ours["total"] - ours["attention_core"],
        "analytic_total": ours["total"],
        "relative_difference": (ours["total"] - ours["attention_core"]) / counted - 1.0,
    }


# ----------------------------------------------------------------------------------------------------------
# One measurement (run in a child process)
# ----------------------------------------------------------------------------------------------------------


def make_optimizer(model: Any, optimizer: str, device: str) -> Any:
    """AdamW as the trainer builds it (``default``: :func:`mindvis.train.optim.make_adamw`, torch's fused kernel
    on CPUs and GPUs), or ``unfused`` (torch's own choice, the for-each kernel), ``fused``, ``foreach``."""
    import torch

    from mindvis.train.optim import make_adamw, param_groups_weight_decay

    groups = param_groups_weight_decay(model, 0.05)
    if optimizer == "default":
        return make_adamw(groups, lr=1e-4, betas=(0.9, 0.95))
    fused = {"unfused": None, "fused": True, "foreach": None}[optimizer]
    foreach = True if optimizer == "foreach" else None
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=fused, foreach=foreach)


def make_step(
    model: Any,
    opt: Any,
    x: Any,
    precision: str,
    attention: str = "fused",
    device: str = "cpu",
    compile_model: bool = False,
):
    """A closure running one training step: forward, loss, backward, clipping at 0.8, optimizer step."""
    from contextlib import nullcontext

    import torch

    forward = torch.compile(model) if compile_model else model
    if attention == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel: Any = lambda: sdpa_kernel(SDPBackend.MATH)  # noqa: E731
    else:
        kernel = nullcontext

    def step() -> float:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16"), kernel():
            loss = forward(x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.8)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def side_by_side(variant: str, batch: int, specs: list[str], rounds: int, device: str = "cpu") -> list[dict]:
    """Interleaved timing of training-step variants of one model (shared weights; one optimizer per kind).

    ``specs``: ``precision[+fused|+unfused][+math][+compile]``, e.g. ``fp32`` (the trainer's default),
    ``fp32+unfused`` (torch's default AdamW kernel), ``fp32+math`` (unfused attention kernel), ``bf16``
    (autocast), ``bf16+compile`` (``torch.compile``).
    """
    import torch

    from _common import MATMUL, interleaved, matmul_fn
    from mindvis.models.mbm import MBM_VARIANTS, MaskedBrainModel

    torch.manual_seed(0)
    config = MBM_VARIANTS[variant](NUM_VOXELS)
    model = MaskedBrainModel(config).to(device).train()
    x = torch.randn(batch, NUM_VOXELS, device=device)
    opts: dict[str, Any] = {}
    fns = {}
    for spec in specs:
        parts = spec.split("+")
        kind = "fused" if "fused" in parts else "unfused" if "unfused" in parts else "default"
        if kind not in opts:
            opts[kind] = make_optimizer(model, kind, device)
        fns[spec] = make_step(model, opts[kind], x, parts[0], "math" if "math" in parts else "fused", device,
                              "compile" in parts)  # fmt: skip
    mm, mm_flops = matmul_fn(device, "fp32", 8192 if device == "cuda" else 2048)
    times = interleaved({**fns, MATMUL: mm}, rounds, warmup=1, device=device)
    flops = model_flops_per_sample(config)["total"]
    rows = []
    for spec in specs:
        s = summary(times[spec])
        rows.append({"variant": variant, "spec": spec, "batch_size": batch, "step_s": s, "step_times_s": times[spec],
                     "samples_per_s": batch / s["median_s"], "achieved_gflops": batch * flops / 1e9 / s["median_s"]})  # fmt: skip
    base = rows[0]
    for r in rows:
        r["speedup_vs_first"] = r["samples_per_s"] / base["samples_per_s"]
        # per-round ratios, so the spread of the speedup is visible too
        ratios = sorted(b / t for b, t in zip(times[base["spec"]], times[r["spec"]], strict=True))
        r["speedup_per_round"] = ratios
    matmul_rate_in_loop = mm_flops / summary(times[MATMUL])["median_s"]
    for r in rows:
        r["fp32_matmul_gflops_in_loop"] = matmul_rate_in_loop / 1e9
    return rows


def build_training_step(
    variant: str,
    device: str,
    precision: str,
    batch: int,
    optimizer: str = "default",
    compile_model: bool = False,
    num_voxels: int = NUM_VOXELS,
    attention: str = "fused",
):
    """Model, optimizer and a closure running one training step as the trainer does.

    ``attention="math"`` forces torch's unfused attention kernel (for comparison with the fused one).
    """
    import torch

    from mindvis.models.mbm import MBM_VARIANTS, MaskedBrainModel

    torch.manual_seed(0)
    config = MBM_VARIANTS[variant](num_voxels)
    model = MaskedBrainModel(config).to(device).train()
    opt = make_optimizer(model, optimizer, device)
    x = torch.randn(batch, num_voxels, device=device)
    step = make_step(model, opt, x, precision, attention, device, compile_model)
    return model, config, step


def train_throughput(
    variant: str,
    device: str,
    precision: str,
    batch: int,
    steps: int,
    warmup: int,
    optimizer: str = "default",
    compile_model: bool = False,
    attention: str = "fused",
) -> dict[str, Any]:
    """Median step time of ``steps`` training steps after ``warmup`` untimed ones."""
    import torch

    from _common import sync_fn

    model, config, step = build_training_step(
        variant, device, precision, batch, optimizer, compile_model, attention=attention
    )
    sync = sync_fn(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    flops = model_flops_per_sample(config)
    s = summary(times)
    result = {
        "variant": variant,
        "precision": precision,
        "optimizer": optimizer,
        "compiled": compile_model,
        "attention": attention,
        "batch_size": batch,
        "steps": steps,
        "warmup": warmup,
        "warmup_s": warmup_s,
        "step_s": s,
        "step_times_s": times,
        "samples_per_s": batch / s["median_s"],
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "num_patches": config.num_patches,
        "gflop_per_sample": flops["total"] / 1e9,
        "flop_split": {k: v / flops["total"] for k, v in flops.items() if k != "total"},
        "threads": torch.get_num_threads(),
    }
    result["achieved_gflops"] = result["samples_per_s"] * flops["total"] / 1e9
    if device == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        result["memory_kind"] = "torch peak allocated"
    else:
        result["peak_memory_gb"] = peak_rss_mb() / 1024
        result["memory_kind"] = "process peak RSS"
    return result


# ----------------------------------------------------------------------------------------------------------
# bf16 stability: fp32 and bf16-autocast loss curves from the same start
# ----------------------------------------------------------------------------------------------------------


def loss_curve(
    precision: str,
    steps: int,
    seed: int = 0,
    num_voxels: int = 512,
    batch: int = 32,
    rank: int = 2,
    lr: float = 3e-3,
) -> list[float]:
    """Train the tiny variant ``steps`` steps on seeded low-rank fMRI-like data; the loss of every step.

    The data (``rank`` smooth spatial maps with random weights, plus noise, standardised) is learnable in a
    few hundred steps: the masked MSE falls from about 1.8 to about 0.37, so the curves compare real learning.
    """
    import torch

    from mindvis.models.mbm import MaskedBrainModel, mbm_tiny
    from mindvis.train.optim import param_groups_weight_decay

    g = torch.Generator().manual_seed(seed)
    n = 2048
    basis = torch.randn(rank, num_voxels, generator=g)
    basis = torch.nn.functional.avg_pool1d(basis[:, None], 9, stride=1, padding=4)[:, 0] * 3  # smooth maps
    data = torch.randn(n, rank, generator=g) @ basis + 0.3 * torch.randn(n, num_voxels, generator=g)
    data = (data - data.mean()) / data.std()
    torch.manual_seed(seed)
    config = mbm_tiny(num_voxels)
    model = MaskedBrainModel(config).train()
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=lr, betas=(0.9, 0.95))
    order = torch.randint(0, n, (steps, batch), generator=g)
    masks = torch.rand(steps, batch, config.num_patches, generator=g)
    losses = []
    for i in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(data[order[i]], noise=masks[i]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.8)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def stability(steps: int, seeds: int, out_dir: Path) -> dict[str, Any]:
    """fp32 vs bf16-autocast loss curves (tiny variant) for ``seeds`` seeds; summary + PNG."""
    import numpy as np

    curves = {p: [loss_curve(p, steps, seed=s) for s in range(seeds)] for p in ("fp32", "bf16")}
    tail = max(10, steps // 6)

    def ema(v: list[float], a: float = 0.9) -> np.ndarray:
        out, m = [], v[0]
        for x in v:
            m = a * m + (1 - a) * x
            out.append(m)
        return np.asarray(out)

    per_seed = []
    for s in range(seeds):
        f, b = curves["fp32"][s], curves["bf16"][s]
        ef, eb = ema(f), ema(b)
        per_seed.append(
            {
                "seed": s,
                "fp32_first": f[0],
                "fp32_final": float(np.mean(f[-tail:])),
                "bf16_final": float(np.mean(b[-tail:])),
                "final_relative_difference": float(np.mean(b[-tail:]) / np.mean(f[-tail:]) - 1),
                "max_relative_gap_of_smoothed_curves": float(np.max(np.abs(eb - ef) / ef)),
                "bf16_nonfinite": int(sum(not math.isfinite(x) for x in b)),
            }
        )
    png = None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for s in range(seeds):
            ax.plot(ema(curves["fp32"][s]), color="C0", alpha=0.8, label="fp32" if s == 0 else None)
            ax.plot(
                ema(curves["bf16"][s]),
                color="C1",
                alpha=0.8,
                ls="--",
                label="bf16 autocast" if s == 0 else None,
            )
        ax.set_xlabel("step")
        ax.set_ylabel("masked MSE (EMA 0.9)")
        ax.set_title(f"MBM tiny, fp32 vs bf16 autocast, {seeds} seeds")
        ax.legend()
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        png = out_dir / "bench_mbm-bf16-stability.png"
        tmp = png.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=110)
        tmp.replace(png)
        plt.close(fig)
    except ImportError:  # pragma: no cover
        pass
    return {"steps": steps, "seeds": seeds, "tail_steps": tail, "per_seed": per_seed, "curves": curves,
            "plot": None if png is None else str(png)}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def _child(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    emit(
        train_throughput(
            args.variant,
            args.device,
            args.precision,
            args.batch,
            args.steps,
            args.warmup,
            args.optimizer,
            args.compile,
            args.attention,
        )  # fmt: skip
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="tiny,small,large")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16")
    ap.add_argument(
        "--optimizers",
        default=None,
        help="comma list of default (the trainer's), unfused, fused, foreach (default: default)",
    )
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd rows")
    ap.add_argument(
        "--attentions", default="fused", help="comma list of fused (SDPA, default) and math (unfused kernel)"
    )
    ap.add_argument("--batch", type=int, default=None, help="batch (default: 100 on GPUs; CPU: 32/16/8)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: GPU 20, CPU 5, large 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: GPU 3, CPU 1)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads on CPUs (default 2, as the reference)"
    )
    ap.add_argument("--matmul-n", type=int, default=None, help="matmul size (default GPU 8192, CPU 2048)")
    ap.add_argument("--quick", action="store_true", help="fewer steps, no large variant unless named")
    ap.add_argument("--check-flops", action="store_true", help="compare the analytic count with torch's")
    ap.add_argument("--stability", type=int, default=0, metavar="N", help="only the bf16 loss-curve check")
    ap.add_argument("--stability-seeds", type=int, default=2)
    ap.add_argument(
        "--side-by-side",
        default=None,
        metavar="SPECS",
        help="only an interleaved comparison of step variants of the last --variants entry, e.g. "
        "fp32,fp32+unfused,fp32+math,bf16,bf16+compile (precision[+fused|+unfused AdamW][+math attention]"
        "[+compile]; no AdamW part = the trainer's)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --side-by-side")
    ap.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-min load average below this")
    ap.add_argument("--max-wait", type=float, default=0, help="seconds to wait for low load (default 0)")
    ap.add_argument("--no-save", action="store_true", help="do not write results")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--optimizer", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--attention", default="fused", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    threads = args.threads if args.threads is not None else (0 if gpu else 2)
    if threads:
        torch.set_num_threads(threads)
    load_before = wait_for_low_load(args.max_load, args.max_wait)

    if args.stability:
        res = stability(args.stability, args.stability_seeds, RESULTS)
        rows = [
            [r["seed"], fmt(r["fp32_first"], ".4f"), fmt(r["fp32_final"], ".4f"), fmt(r["bf16_final"], ".4f"),
             f"{r['final_relative_difference']:+.2%}", f"{r['max_relative_gap_of_smoothed_curves']:.2%}",
             r["bf16_nonfinite"]]
            for r in res["per_seed"]
        ]  # fmt: skip
        table = format_table(
            rows,
            ["seed", "loss step 0", "fp32 final", "bf16 final", "bf16/fp32 - 1", "max EMA gap", "bf16 NaN"],
        )
        table = f"MBM tiny, {res['steps']} steps, final = mean of the last {res['tail_steps']}\n\n" + table
        print(table)
        if not args.no_save:
            path = write_results(
                "bench_mbm-stability",
                {"benchmark": "bench_mbm --stability", "machine": machine_info(device), **res},
                table,
            )
            print(f"wrote {path}")
        return 0

    if args.side_by_side:
        specs = [x.strip() for x in args.side_by_side.split(",") if x.strip()]
        variant = args.variants.split(",")[-1].strip()
        batch = args.batch or (100 if gpu else CPU_BATCH.get(variant, 8))
        rows = side_by_side(variant, batch, specs, args.rounds, device)
        rate = rows[0]["fp32_matmul_gflops_in_loop"] * 1e9  # timed among the variants: the same load
        ref = REFERENCE
        for r in rows:
            r["fraction_of_fp32_matmul"] = r["achieved_gflops"] * 1e9 / rate
            if variant in ("large", "large_patch16") and batch == ref["mbm_large_batch"]:
                r["vs_reference_abs"] = r["samples_per_s"] / ref["mbm_large_samples_per_s"]
                r["vs_reference_mfu_normalised"] = (r["samples_per_s"] / rate) / (
                    ref["mbm_large_samples_per_s"] / (ref["fp32_matmul_gflops"] * 1e9)
                )
        table = format_table(
            [[r["spec"], f"{r['step_s']['median_s']:.3f}", f"{r['step_s']['min_s']:.3f}-{r['step_s']['max_s']:.3f}",
              f"{r['samples_per_s']:.3f}", f"{r['achieved_gflops']:.1f}", f"{r['fraction_of_fp32_matmul']:.0%}",
              f"{r['speedup_vs_first']:.2f}", " ".join(f"{v:.2f}" for v in r["speedup_per_round"]),
              fmt(r.get("vs_reference_abs"), ".2f"), fmt(r.get("vs_reference_mfu_normalised"), ".2f")] for r in rows],
            ["variant", "step s (med)", "min-max", "samples/s", "GFLOP/s", "of fp32 mm", f"x {specs[0]}",
             "x per round", "x ref abs", "x ref MFU-norm"],
        )  # fmt: skip
        info = machine_info(device)
        table = (f"MBM {variant}, batch {batch}, {args.rounds} interleaved rounds; {info.get('gpu', info['cpu'])}, "
                 f"{info['torch_threads']} threads, load {info['load_average_1_5_15']}; fp32 matmul "
                 f"{rate / 1e9:.0f} GFLOP/s (timed among the variants)\n\n" + table)  # fmt: skip
        print(table)
        if not args.no_save:
            payload = {"benchmark": "bench_mbm --side-by-side", "machine": info, "reference": ref,
                       "fp32_matmul_gflops_in_loop": rate / 1e9, "results": rows}  # fmt: skip
            print(f"wrote {write_results(f'bench_mbm-side_by_side-{device}', payload, table)}")
        return 0

    checks = []
    if args.check_flops:
        for v in ("tiny", "small", "large"):
            c = check_flops(v)
            checks.append(c)
            print(
                f"{v}: flop_counter {c['flop_counter_per_sample'] / 1e9:.4f} GFLOP/sample, analytic without the "
                f"attention core {c['analytic_without_attention_core'] / 1e9:.4f} ({c['relative_difference']:+.1e}), "
                f"with it {c['analytic_total'] / 1e9:.4f}"
            )

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    n = args.matmul_n or (8192 if gpu else 2048)
    rates_before = {p: matmul_rate(device, p, n) for p in ("fp32", "bf16")}
    rows: list[dict[str, Any]] = []
    for variant in variants:
        if args.optimizers:
            optimizers = [o.strip() for o in args.optimizers.split(",")]
        else:
            optimizers = ["default"]
        compiles = [False, True] if args.compile else [False]
        attentions = [a.strip() for a in args.attentions.split(",") if a.strip()]
        for precision in precisions:
            for optimizer in optimizers:
                for comp, attn in [(c, a) for c in compiles for a in attentions]:
                    batch = args.batch or (100 if gpu else CPU_BATCH.get(variant, 8))
                    steps = args.steps or (
                        (5 if args.quick else 20)
                        if gpu
                        else (2 if args.quick else (3 if variant == "large" else 5))
                    )
                    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
                    if gpu:
                        try:
                            res = train_throughput(
                                variant, device, precision, batch, steps, warmup, optimizer, comp, attn
                            )
                        except torch.OutOfMemoryError as exc:
                            res = {"error": str(exc)[:200]}
                        torch.cuda.empty_cache()
                    else:
                        cargs = ["--child", "--variant", variant, "--device", device, "--precision", precision,
                                 "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup),
                                 "--threads", str(threads), "--optimizer", optimizer, "--attention", attn] + (["--compile"] if comp else [])  # fmt: skip
                        res = run_child(__file__, cargs)
                    res.setdefault("variant", variant)
                    res.setdefault("precision", precision)
                    res.setdefault("optimizer", optimizer)
                    res.setdefault("compiled", comp)
                    res.setdefault("attention", attn)
                    res.setdefault("batch_size", batch)
                    rows.append(res)
                    print(_line(res), flush=True)
    rates_after = {p: matmul_rate(device, p, n) for p in ("fp32", "bf16")}
    rates = {p: (rates_before[p]["median"] + rates_after[p]["median"]) / 2 for p in rates_before}
    ref = REFERENCE
    ref_mfu = ref["mbm_large_samples_per_s"] / (ref["fp32_matmul_gflops"] * 1e9)  # samples per fp32 FLOP/s
    for r in rows:
        if "error" in r:
            continue
        r["fraction_of_fp32_matmul"] = r["achieved_gflops"] * 1e9 / rates["fp32"]
        r["fraction_of_bf16_matmul"] = r["achieved_gflops"] * 1e9 / rates["bf16"]
        if r["variant"] in ("large", "large_patch16") and r["batch_size"] == ref["mbm_large_batch"]:
            r["vs_reference_abs"] = r["samples_per_s"] / ref["mbm_large_samples_per_s"]
            r["vs_reference_mfu_normalised"] = (r["samples_per_s"] / rates["fp32"]) / ref_mfu
    # side-by-side ratios against the trainer's configuration (default optimizer, fp32, not compiled)
    for r in rows:
        base = next(
            (b for b in rows if "error" not in b and b["variant"] == r["variant"] and b["precision"] == "fp32"
             and b["optimizer"] == "default" and not b["compiled"] and b.get("attention") == "fused"
             and b["batch_size"] == r["batch_size"]),
            None,
        )  # fmt: skip
        if base is not None and "error" not in r:
            r["speedup_vs_fp32_default"] = r["samples_per_s"] / base["samples_per_s"]

    header = ["variant", "prec", "optim", "batch", "GFLOP/smp", "step s (med)", "min-max", "samples/s",
              "GFLOP/s", "of fp32 mm", "of bf16 mm", "x fp32 default", "x ref abs", "x ref MFU-norm", "peak GB"]  # fmt: skip
    table_rows = []
    for r in rows:
        if "error" in r:
            table_rows.append([r["variant"], r["precision"], r["optimizer"], r["batch_size"], "error: " + r["error"][:80]]
                              + [""] * (len(header) - 5))  # fmt: skip
            continue
        s = r["step_s"]
        table_rows.append([
            r["variant"] + (" (compiled)" if r["compiled"] else "") + (" (math attn)" if r.get("attention") == "math" else ""), r["precision"], r["optimizer"], r["batch_size"],
            f"{r['gflop_per_sample']:.2f}", f"{s['median_s']:.3f}", f"{s['min_s']:.3f}-{s['max_s']:.3f}",
            f"{r['samples_per_s']:.3f}", f"{r['achieved_gflops']:.1f}", f"{r['fraction_of_fp32_matmul']:.1%}",
            f"{r['fraction_of_bf16_matmul']:.1%}", fmt(r.get("speedup_vs_fp32_default"), ".2f"),
            fmt(r.get("vs_reference_abs"), ".2f"), fmt(r.get("vs_reference_mfu_normalised"), ".2f"),
            f"{r['peak_memory_gb']:.2f}",
        ])  # fmt: skip
    info = machine_info(device)
    info["load_average_before_waiting"] = load_before
    table = format_table(table_rows, header)
    mm = " ".join(
        f"{p} {rates_before[p]['median'] / 1e9:.0f} -> {rates_after[p]['median'] / 1e9:.0f}"
        for p in rates_before
    )
    foot = (
        f"\n{info.get('gpu', info['cpu'])}, {info['torch_threads']} threads, load {info['load_average_1_5_15']}; "
        f"{n}x{n} matmul GFLOP/s (median, before -> after): {mm}\n"
        f"reference: {ref['mbm_large_samples_per_s']} samples/s at batch {ref['mbm_large_batch']} = "
        f"{ref['mbm_large_fraction_of_fp32_matmul']:.0%} of {ref['fp32_matmul_gflops']:.0f} GFLOP/s fp32 ({ref['machine']})"
    )
    print("\n" + table + foot)
    if not args.no_save:
        payload = {
            "benchmark": "bench_mbm",
            "num_voxels": NUM_VOXELS,
            "machine": info,
            "reference": ref,
            "matmul_n": n,
            "matmul_gflops_before": {k: {kk: vv / 1e9 if kk != "n" else vv for kk, vv in v.items()} for k, v in rates_before.items()},
            "matmul_gflops_after": {k: {kk: vv / 1e9 if kk != "n" else vv for kk, vv in v.items()} for k, v in rates_after.items()},
            "matmul_gflops_used": {k: v / 1e9 for k, v in rates.items()},
            "flop_checks": checks,
            "results": rows,
        }  # fmt: skip
        path = write_results(f"bench_mbm-{device}", payload, table + "\n" + foot)
        print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


def _line(r: dict) -> str:
    head = f"{r['variant']:>6} {r['precision']:>5} {r['optimizer']:>8}{' compiled' if r.get('compiled') else ''} b{r['batch_size']:<4}"
    if "error" in r:
        return f"{head} error: {r['error']}"
    s = r["step_s"]
    return (
        f"{head} step {s['median_s']:.3f} s (min {s['min_s']:.3f}, max {s['max_s']:.3f})  "
        f"{r['samples_per_s']:.3f} samples/s  {r['achieved_gflops']:.1f} GFLOP/s  peak {r['peak_memory_gb']:.2f} GB"
    )


if __name__ == "__main__":
    sys.exit(main())
