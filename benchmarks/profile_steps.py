"""Where the time goes: ``torch.profiler`` tables of the stage A and stage B training steps and a sampling step.

Profiles, after one warm-up step each, at the reference sizes:

* ``mbm``: one training step of the ``large`` masked brain model (291 patches, batch 8), as ``bench_mbm.py``
  times it;
* ``stage_b``: one cond-only (``original`` preset) stage-B training step at ``label2img`` size, batch 2, as
  ``bench_stage_b.py`` times it;
* ``unet``: one UNet call at ``label2img`` size for 1 fMRI x 5 samples (one sampler step).

For each, the operators with the most self CPU (or CUDA) time are written as a table
(``benchmarks/results/profile-<what>-<time>.md``) and as JSON, with their share of the step. ``--bf16`` and
``--channels-last`` profile those variants.

Run: ``python benchmarks/profile_steps.py [--what mbm,stage_b,unet] [--rows 25]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info, wait_for_low_load, write_results  # noqa: E402


def _mbm_step(device: str, bf16: bool, batch: int):
    from bench_mbm import build_training_step

    _model, _config, step = build_training_step("large", device, "bf16" if bf16 else "fp32", batch, "default")
    return step


def _stage_b_step(device: str, bf16: bool, channels_last: bool, batch: int):
    import torch

    from bench_stage_b import build

    module, opt, params, data, _ = build(
        "label2img", "original", batch, device, "channels_last" if channels_last else "contiguous"
    )

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = module.training_step(data, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()

    return step


def _unet_step(device: str, bf16: bool, channels_last: bool, batch: int):
    import torch

    from bench_sampling import build_pipeline

    pipe = build_pipeline("label2img", torch.device(device), torch.float32, channels_last=channels_last)
    m = pipe.model
    C, h, w = m.latent_shape
    fmri = torch.randn(1, pipe.num_voxels, device=device)
    with torch.no_grad():
        cond = m.condition(fmri).index(torch.zeros(batch, dtype=torch.long, device=device))
    x = torch.randn(batch, C, h, w, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.full((batch,), 501, dtype=torch.long, device=device)

    @torch.inference_mode()
    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            m.eps(x, t, cond)

    return step


def profile(step, device: str, rows: int) -> tuple[list[dict[str, Any]], float]:
    """Run ``step`` once under the profiler; the top operators by self time and the step's wall time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=False) as prof:
        t = time.perf_counter()
        step()
        if device == "cuda":
            import torch

            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(
        prof.key_averages(), key=lambda e: getattr(e, key.replace("_total", "_total"), 0), reverse=True
    )
    total = sum(getattr(e, key) for e in events) or 1.0
    out = []
    for e in events[:rows]:
        out.append(
            {
                "op": e.key,
                "calls": e.count,
                "self_ms": getattr(e, key) / 1e3,
                "share": getattr(e, key) / total,
            }
        )
    return out, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", default="mbm,stage_b,unet")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mbm-batch", type=int, default=8)
    ap.add_argument("--stage-b-batch", type=int, default=2)
    ap.add_argument("--unet-batch", type=int, default=5)
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--max-wait", type=float, default=0)
    args = ap.parse_args()
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    wait_for_low_load(args.max_load, args.max_wait)
    for what in [w.strip() for w in args.what.split(",") if w.strip()]:
        if what == "mbm":
            step = _mbm_step(args.device, args.bf16, args.mbm_batch)
        elif what == "stage_b":
            step = _stage_b_step(args.device, args.bf16, args.channels_last, args.stage_b_batch)
        elif what == "unet":
            step = _unet_step(args.device, args.bf16, args.channels_last, args.unet_batch)
        else:
            raise SystemExit(f"unknown --what {what!r}")
        top, wall = profile(step, args.device, args.rows)
        variant = ("bf16" if args.bf16 else "fp32") + ("-channels_last" if args.channels_last else "")
        table = format_table(
            [[r["op"][:60], r["calls"], f"{r['self_ms']:.1f}", f"{r['share']:.1%}"] for r in top],
            ["operator", "calls", "self ms", "share"],
        )
        info = machine_info(args.device)
        head = f"{what} ({variant}), one step {wall:.2f} s under the profiler; {info['cpu']}, {info['torch_threads']} threads, load {info['load_average_1_5_15']}\n\n"
        print(head + table + "\n", flush=True)
        write_results(
            f"profile-{what}-{variant}",
            {"benchmark": "profile_steps", "what": what, "variant": variant, "step_wall_s": wall, "machine": info, "top": top},
            head + table,
        )  # fmt: skip
        del step
    return 0


if __name__ == "__main__":
    sys.exit(main())
