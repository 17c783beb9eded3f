"""Training throughput and peak memory of MinD-Vis stage B (the double-conditioned LDM finetune).

Sizes: ``tiny``, ``small`` and ``label2img`` (the original's 401 M-parameter UNet, VQ-f4 at 256 px = 64 x 64 x 3
latents, and the paper's 1024 x 24 fMRI encoder at 4656 voxels). Trainable presets: ``original`` (what the
original's ``train_cond_stage_only`` trains: the fMRI encoder, the conditioner, every cross-attention layer
and its norm; the reference's "cond-only" step) and ``full`` (the whole UNet as well).

Each row runs in a fresh process and times complete training steps as :class:`mindvis.train.ldm.StageBModule`
runs them: VQ encoding of the images (no gradient), fMRI encoder and conditioner, UNet epsilon loss,
backward, gradient-norm clipping at 0.5 and an AdamW step. Reported:

* the median step time of ``--steps`` timed steps after ``--warmup``; samples/s = batch / median;
* peak memory (GPU: torch's peak allocated; CPU: the process's peak resident set, interpreter included);
* FLOPs per sample of the step, counted by ``torch.utils.flop_counter`` on one batch-1 step with the math
  attention kernel (so attention is counted), the achieved rate, and its fraction of a large matmul measured
  in the same run;
* at ``label2img`` with batch 2: the ratio to the reference 0.115 samples/s, absolute and MFU-normalised
  (ours / our fp32 matmul rate, over 0.115 / 247 GFLOP/s).

Variants measured side by side: ``--precisions fp32,bf16`` (``torch.autocast`` to bfloat16, fp32 master
weights) and ``--memory-formats contiguous,channels_last`` (UNet, autoencoder and images in channels-last).

Weights are random (throughput does not depend on them). Run:
``python benchmarks/bench_stage_b.py [--sizes tiny,small,label2img] [--steps N] [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REFERENCE,
    emit,
    fmt,
    format_table,
    machine_info,
    matmul_rate,
    peak_rss_mb,
    run_child,
    summary,
    sync_fn,
    wait_for_low_load,
    write_results,
)

NUM_VOXELS = 4656  # GOD subject 3 after wrap padding: 291 patches of 16
ENCODERS = {"tiny": "tiny", "small": "small", "label2img": "large"}


def build(size: str, preset: str, batch: int, device: str, memory_format: str, seed: int = 0):
    """The stage-B module, its optimizer, its trainable parameters and one seeded batch."""
    import torch

    from mindvis.models.ldm import ldm_preset
    from mindvis.models.mbm import MBM_VARIANTS, FMRIEncoder
    from mindvis.train.config import StageBConfig
    from mindvis.train.ldm import StageBModule
    from mindvis.train.prior import build_class_prior
    from mindvis.train.stage_b_model import build_stage_b_model

    torch.manual_seed(seed)
    ldm = ldm_preset(size, time_cond=False)
    prior = build_class_prior(ldm, 10)
    encoder = FMRIEncoder(MBM_VARIANTS[ENCODERS[size]](NUM_VOXELS))
    cfg = StageBConfig(trainable=preset, batch_size=batch)
    model = build_stage_b_model(prior, encoder, cfg)
    del prior
    module = StageBModule(model, cfg).to(device)
    module.train()
    if memory_format == "channels_last":
        model.unet.to(memory_format=torch.channels_last)
        model.vq.to(memory_format=torch.channels_last)
    opt = module.configure_optimizers()
    params = [p for p in module.parameters() if p.requires_grad]
    res = ldm.vq.resolution
    gen = torch.Generator().manual_seed(seed + 1)
    fmri = torch.randn(batch, NUM_VOXELS, generator=gen).to(device)
    images = (torch.rand(batch, 3, res, res, generator=gen) * 2 - 1).to(device)
    if memory_format == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    return module, opt, params, {"fmri": fmri, "image": images}, ldm


def count_step_flops(size: str, preset: str, device: str) -> float:
    """FLOPs of one batch-1 training step (forward + backward), attention included (math kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    module, _opt, _params, batch, _ldm = build(size, preset, 1, device, "contiguous")
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = module.training_step(batch, 0)
        loss.backward()
    return float(counter.get_total_flops())


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process."""
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    flops = count_step_flops(args.size, args.preset, device) if args.count_flops else None
    module, opt, params, batch, ldm = build(args.size, args.preset, args.batch, device, args.memory_format)
    bf16 = args.precision == "bf16"
    sync = sync_fn(device)

    def step() -> float:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = module.training_step(batch, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        return float(loss.detach())

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    s = summary(times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()
    out = {
        "size": args.size,
        "preset": args.preset,
        "precision": args.precision,
        "memory_format": args.memory_format,
        "device": device,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "warmup_s": warmup_s,
        "threads": torch.get_num_threads(),
        "step_s": s,
        "step_times_s": times,
        "samples_per_s": args.batch / s["median_s"],
        "peak_memory_mb": peak,
        "peak_memory_kind": "torch max allocated (GPU)" if device == "cuda" else "process peak RSS (CPU)",
        "trainable_params": module.num_trainable,
        "total_params": module.num_total,
        "image_size": ldm.vq.resolution,
        "latent": list(module.model.latent_shape),
        "encoder": ENCODERS[args.size],
    }
    if flops is not None:
        out["gflop_per_sample"] = flops / 1e9
        out["achieved_gflops"] = out["samples_per_s"] * flops / 1e9
    return out


def side_by_side(
    size: str, preset: str, batch: int, specs: list[str], rounds: int, device: str
) -> list[dict]:
    """Interleaved timing of stage-B step variants on one shared model.

    ``specs``: ``precision[+cl][+vqbf16][+fused]``: ``bf16`` autocasts the whole step; ``cl`` puts the UNet, the
    autoencoder and the images in channels-last; ``vqbf16`` autocasts only the (frozen, no-gradient) VQ encoding
    of the images; ``fused`` uses the fused AdamW kernel. The step is :meth:`StageBModule.training_step`'s
    computation (encode, condition, epsilon loss) plus backward, clipping at 0.5 and AdamW.
    """
    import torch

    from _common import MATMUL, interleaved, matmul_fn

    module, opt_default, params, data, _ldm = build(size, preset, batch, device, "contiguous")
    m = module.model
    opts = {"default": opt_default}
    state = {"format": torch.contiguous_format}

    def set_format(fmt: Any) -> None:
        if state["format"] != fmt:
            m.unet.to(memory_format=fmt)
            m.vq.to(memory_format=fmt)
            state["format"] = fmt

    images = {torch.contiguous_format: data["image"],
              torch.channels_last: data["image"].contiguous(memory_format=torch.channels_last)}  # fmt: skip

    def make(spec: str):  # noqa: ANN202
        parts = spec.split("+")
        bf16, vq_bf16 = parts[0] == "bf16", "vqbf16" in parts or parts[0] == "bf16"
        fmt = torch.channels_last if "cl" in parts else torch.contiguous_format
        kind = "fused" if "fused" in parts else "default"
        if kind not in opts:
            opts[kind] = torch.optim.AdamW(params, lr=module.config.lr, weight_decay=module.config.weight_decay,
                                           fused=True)  # fmt: skip
        opt = opts[kind]

        def step() -> None:
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=vq_bf16):
                x0 = m.encode_images(images[fmt]).float()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                cond = m.condition(data["fmri"])
                t = torch.randint(0, m.num_timesteps, (x0.shape[0],), device=x0.device)
                loss = m.p_losses(x0, cond, t).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()

        return step, (lambda: set_format(fmt))

    made = {spec: make(spec) for spec in specs}
    mm, mm_flops = matmul_fn(device, "fp32", 8192 if device == "cuda" else 2048)
    times = interleaved({**{k: v[0] for k, v in made.items()}, MATMUL: mm}, rounds, warmup=1, device=device,
                        prepare={k: v[1] for k, v in made.items()})  # fmt: skip
    matmul_rate_in_loop = mm_flops / summary(times[MATMUL])["median_s"]
    rows = []
    for spec in specs:
        sm = summary(times[spec])
        rows.append({"size": size, "preset": preset, "spec": spec, "batch": batch, "step_s": sm,
                     "step_times_s": times[spec], "samples_per_s": batch / sm["median_s"],
                     "fp32_matmul_gflops_in_loop": matmul_rate_in_loop / 1e9})  # fmt: skip
    for r in rows:
        r["speedup_vs_first"] = r["samples_per_s"] / rows[0]["samples_per_s"]
        r["speedup_per_round"] = sorted(
            b / t for b, t in zip(times[rows[0]["spec"]], times[r["spec"]], strict=True)
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,small,label2img")
    ap.add_argument(
        "--presets", default=None, help="comma list (default: original,full; label2img: original)"
    )
    ap.add_argument(
        "--precisions", default=None, help="fp32,bf16 (default: both at label2img, fp32 otherwise)"
    )
    ap.add_argument(
        "--memory-formats",
        default=None,
        help="contiguous,channels_last (default: both at label2img, contiguous otherwise)",
    )
    ap.add_argument("--batch", type=int, default=5, help="batch of tiny/small (the original's GOD batch: 5)")
    ap.add_argument(
        "--label2img-batch", type=int, default=None, help="batch at label2img (default: the reference's 2)"
    )
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--label2img-steps", type=int, default=3, help="timed steps at label2img on CPUs")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default 2 on CPUs, the reference's)"
    )
    ap.add_argument("--quick", action="store_true", help="2 timed steps after 1 warmup, contiguous fp32 only")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--max-wait", type=float, default=0)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument(
        "--side-by-side",
        default=None,
        metavar="SPECS",
        help="only an interleaved comparison at the last --sizes entry, preset original, e.g. "
        "fp32,fp32+cl,bf16,bf16+cl,fp32+vqbf16 (precision[+cl][+vqbf16][+fused])",
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --side-by-side")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--memory-format", default="contiguous", help=argparse.SUPPRESS)
    ap.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        emit(worker(args))
        return 0
    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    device = "cuda" if gpu else "cpu"
    threads = args.threads if args.threads is not None else (0 if gpu else 2)
    if threads:
        torch.set_num_threads(threads)
    load_before = wait_for_low_load(args.max_load, args.max_wait)
    if args.side_by_side:
        return _side_by_side_main(args, device, threads)
    if args.quick:
        args.steps, args.warmup, args.label2img_steps = 2, 1, 2
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    rates_before = {p: matmul_rate(device, p, 8192 if gpu else 2048) for p in ("fp32", "bf16")}
    rows = []
    for size in split(args.sizes):
        big = size == "label2img"
        batch = (
            (args.label2img_batch or (args.batch if gpu else REFERENCE["stage_b_batch"]))
            if big
            else args.batch
        )
        steps = args.label2img_steps if (big and not gpu) else args.steps
        presets = split(args.presets) if args.presets else (["original"] if big else ["original", "full"])
        precisions = (
            split(args.precisions)
            if args.precisions
            else (["fp32", "bf16"] if big and not args.quick else ["fp32"])
        )
        formats = (
            split(args.memory_formats)
            if args.memory_formats
            else (["contiguous", "channels_last"] if big and not args.quick else ["contiguous"])
        )
        for preset in presets:
            counted = False
            for precision in precisions:
                for mf in formats:
                    cargs = ["--worker", "--size", size, "--preset", preset, "--batch", str(batch), "--steps",
                             str(steps), "--warmup", str(args.warmup), "--threads", str(threads), "--precision",
                             precision, "--memory-format", mf]  # fmt: skip
                    if args.cpu:
                        cargs.append("--cpu")
                    if not args.no_flops and not counted:
                        cargs.append("--count-flops")
                    r = run_child(__file__, cargs, timeout=args.timeout)
                    r.update({k: v for k, v in dict(size=size, preset=preset, batch=batch, precision=precision,
                                                       memory_format=mf).items() if k not in r})  # fmt: skip
                    if "gflop_per_sample" in r:
                        counted = True
                    rows.append(r)
                    if "error" in r:
                        print(f"{size:10s} {preset:9s} {precision} {mf}: FAILED: {r['error']}", flush=True)
                    else:
                        s = r["step_s"]
                        print(
                            f"{size:10s} {preset:9s} {precision} {mf:13s} batch {batch:3d}  "
                            f"{r['samples_per_s']:8.3f} samples/s  step {s['median_s']:.3f} s "
                            f"(min {s['min_s']:.3f}, max {s['max_s']:.3f})  peak {r['peak_memory_mb']:7.0f} MB",
                            flush=True,
                        )
    rates_after = {p: matmul_rate(device, p, 8192 if gpu else 2048) for p in ("fp32", "bf16")}
    rates = {p: (rates_before[p]["median"] + rates_after[p]["median"]) / 2 for p in rates_before}
    ref = REFERENCE
    # FLOPs per sample do not depend on precision or memory format: share the count within (size, preset)
    for r in rows:
        if "error" in r:
            continue
        if "gflop_per_sample" not in r:
            src = next((x for x in rows if x.get("size") == r["size"] and x.get("preset") == r["preset"]
                        and "gflop_per_sample" in x), None)  # fmt: skip
            if src is not None:
                r["gflop_per_sample"] = src["gflop_per_sample"]
                r["achieved_gflops"] = r["samples_per_s"] * src["gflop_per_sample"]
        if "achieved_gflops" in r:
            r["fraction_of_fp32_matmul"] = r["achieved_gflops"] * 1e9 / rates["fp32"]
            r["fraction_of_bf16_matmul"] = r["achieved_gflops"] * 1e9 / rates["bf16"]
        if r["size"] == "label2img" and r["preset"] == "original" and r["batch"] == ref["stage_b_batch"]:
            r["vs_reference_abs"] = r["samples_per_s"] / ref["stage_b_samples_per_s"]
            ref_per_flops = ref["stage_b_samples_per_s"] / (ref["fp32_matmul_gflops"] * 1e9)
            r["vs_reference_mfu_normalised"] = (r["samples_per_s"] / rates["fp32"]) / ref_per_flops
        base = next((x for x in rows if "error" not in x and x["size"] == r["size"] and x["preset"] == r["preset"]
                     and x["precision"] == "fp32" and x["memory_format"] == "contiguous"), None)  # fmt: skip
        if base is not None:
            r["speedup_vs_fp32_contiguous"] = r["samples_per_s"] / base["samples_per_s"]
    ratios = {}
    for size in split(args.sizes):
        by = {r["preset"]: r for r in rows if r["size"] == size and "error" not in r
              and r["precision"] == "fp32" and r["memory_format"] == "contiguous"}  # fmt: skip
        if "original" in by and "full" in by:
            ratios[size] = {
                "speed_original_over_full": by["original"]["samples_per_s"] / by["full"]["samples_per_s"],
                "memory_original_over_full": by["original"]["peak_memory_mb"] / by["full"]["peak_memory_mb"],
            }
    header = ["size", "preset", "prec", "memory format", "batch", "step s (med)", "min-max", "samples/s",
              "GFLOP/smp", "GFLOP/s", "of fp32 mm", "x fp32 contig", "x ref abs", "x ref MFU-norm", "peak MB",
              "trainable M / total M"]  # fmt: skip
    trows = []
    for r in rows:
        if "error" in r:
            trows.append([r["size"], r["preset"], r["precision"], r["memory_format"], r["batch"],
                          "error: " + r["error"][:60]] + [""] * (len(header) - 6))  # fmt: skip
            continue
        s = r["step_s"]
        trows.append([
            r["size"], r["preset"], r["precision"], r["memory_format"], r["batch"], f"{s['median_s']:.3f}",
            f"{s['min_s']:.3f}-{s['max_s']:.3f}", f"{r['samples_per_s']:.4g}", fmt(r.get("gflop_per_sample"), ".1f"),
            fmt(r.get("achieved_gflops"), ".1f"), fmt(r.get("fraction_of_fp32_matmul"), ".1%"),
            fmt(r.get("speedup_vs_fp32_contiguous"), ".2f"), fmt(r.get("vs_reference_abs"), ".2f"),
            fmt(r.get("vs_reference_mfu_normalised"), ".2f"), f"{r['peak_memory_mb']:.0f}",
            f"{r['trainable_params'] / 1e6:.1f} / {r['total_params'] / 1e6:.1f}",
        ])  # fmt: skip
    info = machine_info(device)
    info["load_average_before_waiting"] = load_before
    table = format_table(trows, header)
    if ratios:
        table += "\n\n" + format_table(
            [[k, f"{v['speed_original_over_full']:.2f}", f"{v['memory_original_over_full']:.2f}"] for k, v in ratios.items()],
            ["size", "speed original / full", "peak memory original / full"],
        )  # fmt: skip
    mm = " ".join(
        f"{p} {rates_before[p]['median'] / 1e9:.0f} -> {rates_after[p]['median'] / 1e9:.0f}" for p in rates
    )
    foot = (
        f"\n{info.get('gpu', info['cpu'])}, {info['torch_threads']} threads, load {info['load_average_1_5_15']}; "
        f"matmul GFLOP/s (median, before -> after): {mm}\n"
        f"reference: {ref['stage_b_samples_per_s']} samples/s (cond-only, label2img, batch {ref['stage_b_batch']}, "
        f"{ref['fp32_matmul_gflops']:.0f} GFLOP/s fp32 machine)"
    )
    print("\n" + table + foot)
    if not args.no_save:
        payload = {
            "benchmark": "bench_stage_b",
            "machine": info,
            "reference": ref,
            "num_voxels": NUM_VOXELS,
            "matmul_gflops_used": {k: v / 1e9 for k, v in rates.items()},
            "results": rows,
            "ratios": ratios,
            "note": "random weights; CPU peak memory is the peak RSS of a fresh process per measurement",
        }
        path = write_results(f"bench_stage_b-{device}", payload, table + "\n" + foot)
        print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


def _side_by_side_main(args: argparse.Namespace, device: str, threads: int) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    size = args.sizes.split(",")[-1].strip()
    preset = (args.presets or "original").split(",")[0]
    batch = (
        (args.label2img_batch or (args.batch if device == "cuda" else REFERENCE["stage_b_batch"]))
        if size == "label2img"
        else args.batch
    )
    specs = [x.strip() for x in args.side_by_side.split(",") if x.strip()]
    flops = None if args.no_flops else count_step_flops(size, preset, device)
    rows = side_by_side(size, preset, batch, specs, args.rounds, device)
    rate = rows[0]["fp32_matmul_gflops_in_loop"] * 1e9  # timed among the variants: the same load
    ref = REFERENCE
    for r in rows:
        if flops is not None:
            r["gflop_per_sample"] = flops / 1e9
            r["achieved_gflops"] = r["samples_per_s"] * flops / 1e9
            r["fraction_of_fp32_matmul"] = r["achieved_gflops"] * 1e9 / rate
        if size == "label2img" and preset == "original" and batch == ref["stage_b_batch"]:
            r["vs_reference_abs"] = r["samples_per_s"] / ref["stage_b_samples_per_s"]
            r["vs_reference_mfu_normalised"] = (r["samples_per_s"] / rate) / (
                ref["stage_b_samples_per_s"] / (ref["fp32_matmul_gflops"] * 1e9)
            )
    info = machine_info(device)
    table = format_table(
        [[r["spec"], f"{r['step_s']['median_s']:.3f}", f"{r['step_s']['min_s']:.3f}-{r['step_s']['max_s']:.3f}",
          f"{r['samples_per_s']:.4f}", fmt(r.get("achieved_gflops"), ".1f"), fmt(r.get("fraction_of_fp32_matmul"), ".0%"),
          f"{r['speedup_vs_first']:.2f}", " ".join(f"{v:.2f}" for v in r["speedup_per_round"]),
          fmt(r.get("vs_reference_abs"), ".2f"), fmt(r.get("vs_reference_mfu_normalised"), ".2f")] for r in rows],
        ["variant", "step s (med)", "min-max", "samples/s", "GFLOP/s", "of fp32 mm", f"x {specs[0]}", "x per round",
         "x ref abs", "x ref MFU-norm"],
    )  # fmt: skip
    head = (f"stage B {size} {preset}, batch {batch}, {args.rounds} interleaved rounds"
            + (f", {flops / 1e9:.0f} GFLOP/sample" if flops else "")
            + f"; {info.get('gpu', info['cpu'])}, {info['torch_threads']} threads, load {info['load_average_1_5_15']}; "
            f"fp32 matmul {rate / 1e9:.0f} GFLOP/s (timed among the variants)\n\n")  # fmt: skip
    print(head + table)
    if not args.no_save:
        payload = {"benchmark": "bench_stage_b --side-by-side", "machine": info, "reference": ref,
                   "fp32_matmul_gflops_in_loop": rate / 1e9, "results": rows}  # fmt: skip
        print(f"wrote {write_results(f'bench_stage_b-side_by_side-{device}', payload, head + table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
