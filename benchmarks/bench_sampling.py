"""Sampling throughput of the MinD-Vis reconstruction pipeline: images per second and peak memory.

Compares, side by side in one run:

* samplers: PLMS 250 steps (the original's), DDIM 50, DPM-Solver++ 25;
* batching: all fMRI items and samples in one batch (ours) versus one fMRI item at a time with its samples
  as the batch (the original's loop);
* model sizes: ``tiny``, ``small`` and ``label2img`` (the real size: about 400 M UNet parameters; on a CPU it
  runs with very few steps, see ``--label2img-steps``).

Models have random weights (throughput does not depend on them). Each configuration is timed after a warm-up
call; ``--repeat k`` keeps the fastest of k runs, which filters out load from other processes. Peak memory is
the CUDA allocator's peak on a GPU, and the peak resident set size above the level before the run on a CPU
(sampled every 5 ms). So that freed tensors leave the resident set at once, the script
re-executes itself with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB (every large block is then mapped
and unmapped with its tensor). The JSON goes to ``benchmarks/results/bench_sampling-<time>.json``.

Usage::

    python benchmarks/bench_sampling.py                       # everything, default sizes
    python benchmarks/bench_sampling.py --quick               # fewer items, steps scaled down 10x
    python benchmarks/bench_sampling.py --sizes tiny small --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

NOMINAL_STEPS = {"plms": 250, "ddim": 50, "dpmsolver++": 25}
VOXELS = {"tiny": 256, "small": 1024, "label2img": 4656}


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or resident set size sampled by a thread (CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # pragma: no cover - not Linux
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._rss()
            self._stop = threading.Event()
            self._max = self._base

            def watch() -> None:
                while not self._stop.is_set():
                    self._max = max(self._max, self._rss())
                    time.sleep(0.005)

            self._thread = threading.Thread(target=watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._max, self._rss()) - self._base


def build_pipeline(size: str, device: torch.device, dtype: torch.dtype):
    from mindvis.models.ldm import DCLDM, ldm_preset
    from mindvis.models.mbm import FMRIEncoder, mbm_large_patch16, mbm_small, mbm_tiny
    from mindvis.pipeline import MindVisPipeline

    enc_cfg = {"tiny": mbm_tiny, "small": mbm_small, "label2img": mbm_large_patch16}[size](VOXELS[size])
    torch.manual_seed(0)
    with torch.device(device):
        model = DCLDM.for_fmri(ldm_preset(size), FMRIEncoder(enc_cfg))
    with torch.no_grad():  # keep the random model's latents at a sane scale
        model.unet.conv_out.weight.mul_(0.05)
    return MindVisPipeline(model).to(device, None if dtype == torch.float32 else dtype)


def run_one(
    pipe,
    fmri: np.ndarray,
    sampler: str,
    steps: int,
    samples: int,
    mode: str,
    batch_cap: int | None,
    device: torch.device,
) -> dict:
    def call() -> None:
        if mode == "batched":
            pipe(
                fmri,
                num_samples=samples,
                num_inference_steps=steps,
                sampler=sampler,
                seed=0,
                batch_size=batch_cap,
                progress=False,
                return_latents=False,
            )
        else:
            for i in range(len(fmri)):
                pipe(
                    fmri[i : i + 1],
                    num_samples=samples,
                    num_inference_steps=steps,
                    sampler=sampler,
                    seed=i,
                    progress=False,
                    return_latents=False,
                )

    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    n_images = len(fmri) * samples
    from mindvis.sampling import model_calls

    calls_per_latent = model_calls(sampler, steps)
    return {
        "seconds": seconds,
        "images": n_images,
        "images_per_s": n_images / seconds,
        "unet_calls": calls_per_latent * (1 if mode == "batched" else len(fmri)),
        "peak_mem_mb": mem.peak_bytes / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sizes", nargs="+", default=["tiny", "small", "label2img"], choices=["tiny", "small", "label2img"]
    )
    ap.add_argument("--samplers", nargs="+", default=list(NOMINAL_STEPS), choices=list(NOMINAL_STEPS))
    ap.add_argument("--items", type=int, default=4, help="fMRI items (tiny/small)")
    ap.add_argument("--samples", type=int, default=5, help="images per item (the original's 5)")
    ap.add_argument("--label2img-items", type=int, default=2)
    ap.add_argument(
        "--label2img-steps",
        type=int,
        default=2,
        help="steps at the label2img size on a CPU (every sampler); 0 keeps the nominal steps",
    )
    ap.add_argument("--quick", action="store_true", help="2 items, nominal steps divided by 10")
    ap.add_argument("--batch-cap", type=int, default=None, help="max latents per UNet call when batched")
    ap.add_argument(
        "--repeat", type=int, default=1, help="time each configuration this often, keep the fastest"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    if argv is None and "MALLOC_MMAP_THRESHOLD_" not in os.environ and sys.platform.startswith("linux"):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    big_steps_on_cpu = device.type == "cpu" and args.label2img_steps > 0

    rows = []
    for size in args.sizes:
        items = args.label2img_items if size == "label2img" else (2 if args.quick else args.items)
        pipe = build_pipeline(size, device, dtype)
        n_unet = sum(p.numel() for p in pipe.model.unet.parameters())
        fmri = np.random.default_rng(0).standard_normal((items, VOXELS[size])).astype(np.float32)
        pipe(fmri[:1], num_samples=1, num_inference_steps=1, sampler="ddim", progress=False)  # warm-up
        for sampler in args.samplers:
            steps = NOMINAL_STEPS[sampler]
            if size == "label2img" and big_steps_on_cpu:
                steps = args.label2img_steps
            elif args.quick:
                steps = max(1, steps // 10)
            for mode in ("batched", "one_at_a_time"):
                runs = [
                    run_one(pipe, fmri, sampler, steps, args.samples, mode, args.batch_cap, device)
                    for _ in range(max(1, args.repeat))
                ]
                r = min(runs, key=lambda x: x["seconds"])
                r["peak_mem_mb"] = max(x["peak_mem_mb"] for x in runs)
                r["repeats"] = len(runs)
                r.update(
                    size=size,
                    unet_params_m=round(n_unet / 1e6, 2),
                    sampler=sampler,
                    steps=steps,
                    nominal_steps=NOMINAL_STEPS[sampler],
                    mode=mode,
                    items=items,
                    samples=args.samples,
                )
                rows.append(r)
                print(
                    f"{size:9s} {sampler:11s} {steps:4d} steps {mode:13s} {r['images_per_s']:9.3f} img/s "
                    f"{r['seconds']:8.2f} s  peak {r['peak_mem_mb']:8.1f} MiB",
                    flush=True,
                )
        del pipe

    # ratios, measured side by side in this run
    def find(size: str, sampler: str, mode: str) -> dict | None:
        return next((r for r in rows if (r["size"], r["sampler"], r["mode"]) == (size, sampler, mode)), None)

    for r in rows:
        other = find(r["size"], r["sampler"], "one_at_a_time")
        r["speedup_vs_one_at_a_time"] = r["images_per_s"] / other["images_per_s"] if other else None
        plms = find(r["size"], "plms", r["mode"])
        r["speedup_vs_plms"] = r["images_per_s"] / plms["images_per_s"] if plms else None
        # estimate for the nominal step count: the whole measured time (decode included) scaled by the UNet-call
        # ratio, so it is a lower bound on images/s
        if r["steps"] != r["nominal_steps"]:
            from mindvis.sampling import model_calls

            scale = model_calls(r["sampler"], r["nominal_steps"]) / model_calls(r["sampler"], r["steps"])
            r["est_images_per_s_at_nominal_steps"] = r["images_per_s"] / scale
        else:
            r["est_images_per_s_at_nominal_steps"] = None

    print()
    hdr = (
        f"{'size':9s} {'sampler':11s} {'steps':>5s} {'mode':13s} {'img/s':>9s} {'x batch':>8s} "
        f"{'x PLMS':>7s} {'peak MiB':>9s} {'est>= img/s@nom':>18s}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        sb = f"{r['speedup_vs_one_at_a_time']:.2f}" if r["speedup_vs_one_at_a_time"] else "-"
        sp = f"{r['speedup_vs_plms']:.2f}" if r["speedup_vs_plms"] else "-"
        est = (
            f"{r['est_images_per_s_at_nominal_steps']:.4f}" if r["est_images_per_s_at_nominal_steps"] else "-"
        )
        print(
            f"{r['size']:9s} {r['sampler']:11s} {r['steps']:5d} {r['mode']:13s} {r['images_per_s']:9.3f} "
            f"{sb:>8s} {sp:>7s} {r['peak_mem_mb']:9.1f} {est:>18s}"
        )

    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "argv": sys.argv[1:] if argv is None else argv,
    }
    from mindvis.utils.io import write_json

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = args.out / f"bench_sampling-{stamp}.json"
    write_json(path, {"environment": env, "results": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
