"""Sampling speed of the MinD-Vis reconstruction pipeline, against the reference's PLMS-250 figures.

Three parts, each measured side by side in one run:

1. ``--sizes tiny small``: whole pipeline calls for every sampler setting (PLMS 250 = the original's, DDIM 50,
   DPM-Solver++ 25 / 20 / 10), all fMRI items and samples in one batch (ours) versus one fMRI item at a time
   with its 5 samples as the batch (the original's loop): images/s and peak memory.
2. ``--label2img``: the real size (about 400 M UNet parameters, 64 x 64 x 3 latents, 256 px images). A full
   PLMS-250 run does not fit a CPU benchmark, so its parts are timed (median of ``--repeat``): the fMRI
   conditioning, one UNet call for 1 fMRI x 5 samples (= one sampler step; the reference: 6.2 s), one UNet
   call for a larger batch (batched generation), and the VQ decoding of 5 images; each in fp32 and bf16
   weights, contiguous and channels-last. One fMRI's time is then conditioning + calls x step + decoding, and
   the 50-item GOD test set's time follows; an end-to-end call with 2 DPM-Solver++ steps checks the sum.
   Ratios: absolute (reference 26 min per fMRI, 22 h per test set) and MFU-normalised (our time x our fp32
   matmul rate / 247 GFLOP/s, the reference machine's).
3. ``--quality DIR``: equal quality. With a trained class-conditional prior (``mindvis train-prior`` or the demo's
   ``prior/pipeline``), every sampler setting generates the same labels from the same seeds; the images are
   compared with PLMS-250's (mean absolute difference in 0-255 levels, PSNR) and, with ``--classifier DIR``,
   classified (accuracy against the requested label).

Models in parts 1-2 have random weights (speed does not depend on them). Peak memory is the CUDA allocator's
peak on a GPU, and the resident set above the level before the run on a CPU (sampled every 5 ms; the script
re-executes itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave the resident set at once).

Usage::

    python benchmarks/bench_sampling.py                       # tiny + small + label2img
    python benchmarks/bench_sampling.py --quick               # tiny, 2 items, steps / 10, no label2img
    python benchmarks/bench_sampling.py --sizes --label2img --quality runs/<demo>/prior/pipeline
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# isort: off
from _common import (  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)
    REFERENCE,
    RESULTS,
    fmt,
    format_table,
    machine_info,
    matmul_rate,
    summary,
    wait_for_low_load,
    write_results,
)
import numpy as np  # noqa: E402
import torch  # noqa: E402

# isort: on

#: (sampler, steps) settings compared; PLMS 250 is the original's.
SETTINGS: list[tuple[str, int]] = [("plms", 250), ("ddim", 50), ("dpmsolver++", 25), ("dpmsolver++", 20), ("dpmsolver++", 10)]  # fmt: skip
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


def build_pipeline(size: str, device: torch.device, dtype: torch.dtype, channels_last: bool = False):  # noqa: ANN201
    """A random-weight fMRI pipeline of ``size`` (the encoder matches: tiny, small, large)."""
    from mindvis.models.ldm import DCLDM, ldm_preset
    from mindvis.models.mbm import FMRIEncoder, mbm_large_patch16, mbm_small, mbm_tiny
    from mindvis.pipeline import MindVisPipeline

    enc_cfg = {"tiny": mbm_tiny, "small": mbm_small, "label2img": mbm_large_patch16}[size](VOXELS[size])
    torch.manual_seed(0)
    with torch.device(device):
        model = DCLDM.for_fmri(ldm_preset(size), FMRIEncoder(enc_cfg))
    with torch.no_grad():  # keep the random model's latents at a sane scale
        model.unet.conv_out.weight.mul_(0.05)
    return MindVisPipeline(model).to(
        device,
        None if dtype == torch.float32 else dtype,
        memory_format=torch.channels_last if channels_last else None,
    )


# ----------------------------------------------------------------------------------------------------------
# Part 1: whole calls, batched vs one fMRI at a time
# ----------------------------------------------------------------------------------------------------------


def run_call(pipe, fmri: np.ndarray, sampler: str, steps: int, samples: int, mode: str, device) -> dict:
    def call() -> None:
        if mode == "batched":
            pipe(fmri, num_samples=samples, num_inference_steps=steps, sampler=sampler, seed=0,
                 progress=False, return_latents=False)  # fmt: skip
        else:
            for i in range(len(fmri)):
                pipe(fmri[i : i + 1], num_samples=samples, num_inference_steps=steps, sampler=sampler,
                     seed=i, progress=False, return_latents=False)  # fmt: skip

    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images": len(fmri) * samples, "images_per_s": len(fmri) * samples / seconds,
            "peak_mem_mb": mem.peak_bytes / 2**20}  # fmt: skip


def part_whole_calls(args, device, dtype) -> list[dict]:
    from mindvis.sampling import model_calls

    rows = []
    for size in args.sizes:
        items = 2 if args.quick else args.items
        pipe = build_pipeline(size, device, dtype)
        fmri = np.random.default_rng(0).standard_normal((items, VOXELS[size])).astype(np.float32)
        pipe(fmri[:1], num_samples=1, num_inference_steps=1, sampler="ddim", progress=False)  # warm-up
        for sampler, nominal in SETTINGS:
            steps = max(1, nominal // 10) if args.quick else nominal  # quick: 25, 5, 2, 2, 1
            for mode in ("batched", "one_at_a_time"):
                runs = [
                    run_call(pipe, fmri, sampler, steps, args.samples, mode, device)
                    for _ in range(args.repeat)
                ]
                r = min(runs, key=lambda x: x["seconds"])
                r.update(size=size, sampler=sampler, steps=steps, nominal_steps=nominal, mode=mode, items=items,
                         samples=args.samples, repeats=len(runs), unet_calls=model_calls(sampler, steps),
                         peak_mem_mb=max(x["peak_mem_mb"] for x in runs))  # fmt: skip
                rows.append(r)
                print(f"{size:6s} {sampler:11s} {steps:4d} steps {mode:13s} {r['images_per_s']:9.3f} img/s "
                      f"{r['seconds']:8.2f} s  peak {r['peak_mem_mb']:8.1f} MiB", flush=True)  # fmt: skip
        del pipe
    for r in rows:
        other = next((o for o in rows if (o["size"], o["sampler"], o["nominal_steps"], o["mode"])
                      == (r["size"], r["sampler"], r["nominal_steps"], "one_at_a_time")), None)  # fmt: skip
        plms = next(
            (o for o in rows if (o["size"], o["sampler"], o["mode"]) == (r["size"], "plms", r["mode"])), None
        )
        r["speedup_vs_one_at_a_time"] = r["images_per_s"] / other["images_per_s"] if other else None
        r["speedup_vs_plms"] = r["images_per_s"] / plms["images_per_s"] if plms else None
    return rows


# ----------------------------------------------------------------------------------------------------------
# Part 2: label2img parts and the test-set estimate
# ----------------------------------------------------------------------------------------------------------


def _vq_search_unblocked(vq, z: torch.Tensor) -> torch.Tensor:
    """The codebook search as it was before blocking (one ``[M, K]`` distance matrix), for comparison."""
    emb = vq.quantize.embedding.weight
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    d = (
        (flat**2).sum(dim=1, keepdim=True)
        + (emb**2).sum(dim=1)
        - 2 * torch.einsum("bd,dn->bn", flat, emb.t())
    )
    return torch.argmin(d, dim=1)


def vq_search_comparison(size: str, device, rounds: int = 3) -> dict[str, Any]:
    """Blocked float32 codebook search (:func:`mindvis.models.ldm.vq_quantize`) against the unblocked one, for
    decoding 5 images: time (interleaved), peak anonymous memory, and whether the codes agree."""
    from _common import MemWatch, interleaved
    from mindvis.models.ldm import build_vq, ldm_preset, vq_quantize

    torch.manual_seed(0)
    cfg = ldm_preset(size).vq
    vq = build_vq(cfg).to(device).eval()
    n = REFERENCE["samples_per_item"]
    z = torch.randn(n, cfg.embed_dim, cfg.latent_size, cfg.latent_size, device=device)
    fns = {
        "unblocked (before)": lambda: _vq_search_unblocked(vq, z),
        "blocked (after)": lambda: vq_quantize(vq, z).indices,
    }
    out: dict[str, Any] = {
        "vectors": int(z.numel() // z.shape[1]),
        "codes": int(vq.quantize.embedding.weight.shape[0]),
    }
    with torch.inference_mode():
        same = bool(torch.equal(fns["unblocked (before)"]().view(-1), fns["blocked (after)"]().view(-1)))
        times = interleaved(fns, rounds, warmup=1, device=device.type)
        for name, fn in fns.items():
            with MemWatch() as w:
                fn()
            out[name] = {
                **summary(times[name]),
                "peak_anon_growth_mb": (w.peak.get("RssAnon", 0) - w.start.get("RssAnon", 0)) / 1024,
            }
    out["same_codes"] = same
    print(f"VQ codebook search, {n} x {cfg.latent_size}^2 vectors x {out['codes']} codes: "
          + "; ".join(f"{k} {out[k]['median_s'] * 1e3:.0f} ms, +{out[k]['peak_anon_growth_mb']:.0f} MB" for k in fns)
          + f"; same codes: {same}", flush=True)  # fmt: skip
    return out


def part_label2img(args, device) -> dict[str, Any]:
    """Conditioning, UNet calls (1 fMRI x 5 samples, and ``--label2img-batch``) and VQ decoding at label2img
    size, each timed interleaved across the weight/layout variants of one shared pipeline."""
    from _common import interleaved
    from mindvis.sampling import model_calls

    S = REFERENCE["samples_per_item"]
    B = args.label2img_batch
    variants = [v.strip() for v in args.label2img_variants.split(",") if v.strip()]
    vq_search = vq_search_comparison(args.big_size, device)
    pipe = build_pipeline(args.big_size, device, torch.float32)
    m = pipe.model
    C, h, w = m.latent_shape
    fmri = torch.from_numpy(
        np.random.default_rng(0).standard_normal((1, VOXELS[args.big_size])).astype(np.float32)
    )
    with torch.inference_mode():
        cond1 = m.condition(fmri.to(device))
    current: dict[Any, Any] = {}

    def setting(variant: str):  # noqa: ANN202
        dtype = torch.bfloat16 if variant.startswith("bf16") else torch.float32
        fmt = torch.channels_last if variant.endswith("channels_last") else torch.contiguous_format

        def prepare() -> None:
            if current.get("variant") != variant:
                pipe.to(dtype=dtype, memory_format=fmt)
                current.update(variant=variant, fmri=fmri.to(device, dtype))
                for b in (S, B):
                    x = torch.randn(b, C, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
                    cond = cond1.index(torch.zeros(b, dtype=torch.long, device=device)).to(dtype=dtype)
                    current[b] = (x, torch.full((b,), 501, dtype=torch.long, device=device), cond)

        return prepare

    prepare = {v: setting(v) for v in variants}
    results: dict[str, dict[str, Any]] = {v: {} for v in variants}
    kinds = [("cond_1", lambda: m.condition(current["fmri"]), args.repeat),
             (f"unet_{S}", lambda: m.eps(*current[S]), args.repeat),
             (f"decode_{S}", lambda: m.decode_latents(current[S][0]), max(1, args.repeat - 1))]  # fmt: skip
    if B > S:
        kinds.insert(2, (f"unet_{B}", lambda: m.eps(*current[B]), max(1, args.repeat - 1)))
    with torch.inference_mode():
        for kind, fn, rounds in kinds:
            times = interleaved(
                {v: fn for v in variants}, rounds, warmup=1, device=device.type, prepare=prepare
            )
            for v in variants:
                results[v][kind] = {**summary(times[v]), "times_s": times[v]}
            print(f"label2img {kind:10s} " + "  ".join(f"{v} {results[v][kind]['median_s']:.3f} s" for v in variants),
                  flush=True)  # fmt: skip
        for v in variants:
            results[v].setdefault(f"unet_{B}", None)
    if args.e2e_variant in variants:
        v = args.e2e_variant
        prepare[v]()
        t0 = time.perf_counter()
        pipe(fmri.numpy(), num_samples=S, num_inference_steps=2, sampler="dpmsolver++", seed=0, progress=False,
             return_latents=False)  # fmt: skip
        e2e = time.perf_counter() - t0
        p = results[v]
        pred = p["cond_1"]["median_s"] + 2 * p[f"unet_{S}"]["median_s"] + p[f"decode_{S}"]["median_s"]
        p["end_to_end_dpm2"] = {"measured_s": e2e, "predicted_s": pred}
        print(f"label2img {v}: end-to-end 1 fMRI x {S}, DPM-Solver++ 2 steps: {e2e:.2f} s (sum of parts {pred:.2f} s)",
              flush=True)  # fmt: skip
    n_items = REFERENCE["test_set_items"]
    est = []
    for variant, p in results.items():
        for sampler, steps in SETTINGS:
            calls = model_calls(sampler, steps)
            one = p["cond_1"]["median_s"] + calls * p[f"unet_{S}"]["median_s"] + p[f"decode_{S}"]["median_s"]
            row = {"variant": variant, "sampler": sampler, "steps": steps, "unet_calls": calls,
                   "one_fmri_s": one, "test_set_one_at_a_time_s": n_items * one}  # fmt: skip
            if p.get(f"unet_{B}"):
                per_latent = p[f"unet_{B}"]["median_s"] / B
                row["test_set_batched_s"] = (n_items * p["cond_1"]["median_s"] + calls * per_latent * n_items * S
                                             + n_items * p[f"decode_{S}"]["median_s"])  # fmt: skip
            est.append(row)
    return {
        "size": args.big_size,
        "parts": results,
        "estimates": est,
        "batch_for_batched": B,
        "vq_search": vq_search,
    }


# ----------------------------------------------------------------------------------------------------------
# Part 3: quality against PLMS-250 with a trained class prior
# ----------------------------------------------------------------------------------------------------------


def part_quality(args, device) -> dict[str, Any]:
    from mindvis.pipeline import MindVisPipeline

    pipe = MindVisPipeline.from_pretrained(args.quality, device=device)
    if pipe.model.is_fmri_conditioned:
        raise SystemExit(
            "--quality needs a class-conditional prior pipeline (e.g. <demo run>/prior/pipeline)"
        )
    n_classes = int(pipe.model.conditioner.config.n_classes)
    labels = np.repeat(np.arange(n_classes), args.quality_per_class)
    clf = None
    if args.classifier:
        from mindvis.eval.classifier import BenchmarkClassifier

        clf = BenchmarkClassifier.load(args.classifier)
    settings = [("plms", 250)] + [s for s in SETTINGS if s != ("plms", 250)]
    # bf16-unet: UNet and conditioner in bfloat16, the image decoder (and its codebook search) in float32;
    # bf16: every network in bfloat16. Cast in this order, so no variant starts from rounded weights.
    variants = ["fp32"] + (["bf16-unet", "bf16"] if args.quality_bf16 else [])
    ref_img = None
    rows = []
    for vname in variants:
        if vname == "bf16-unet":
            for mod in (pipe.model.unet, pipe.model.conditioner, pipe.model.fmri_encoder):
                if mod is not None:
                    mod.to(torch.bfloat16)
        elif vname == "bf16":
            pipe.to(dtype=torch.bfloat16)
        for sampler, steps in settings:
            t0 = time.perf_counter()
            out = pipe(labels=labels, num_samples=1, num_inference_steps=steps, sampler=sampler, seed=123,
                       progress=False, return_latents=False)  # fmt: skip
            secs = time.perf_counter() - t0
            img = out.images[:, 0].astype(np.float64)  # [N, H, W, 3]
            if ref_img is None:
                ref_img = img
            mad = float(np.abs(img - ref_img).mean())
            mse = float(((img - ref_img) ** 2).mean())
            row = {"precision": vname, "sampler": sampler, "steps": steps, "seconds": secs,
                   "mean_abs_diff_vs_plms250": mad, "psnr_vs_plms250_db": (10 * math.log10(255**2 / mse)) if mse > 0 else None}  # fmt: skip
            if clf is not None:
                pred = clf.predict(out.images[:, 0]).probs.argmax(1)
                row["classifier_accuracy"] = float((pred == labels).mean())
            rows.append(row)
            print(f"quality {vname} {sampler:11s} {steps:4d}: |diff| {mad:6.2f} levels, PSNR "
                  f"{fmt(row['psnr_vs_plms250_db'], '.1f')} dB" + (f", accuracy {row['classifier_accuracy']:.3f}" if clf else "")
                  + f"  ({secs:.1f} s)", flush=True)  # fmt: skip
    return {
        "pipeline": str(args.quality),
        "classifier": args.classifier,
        "images": int(len(labels)),
        "rows": rows,
    }


def find_demo_prior(root: Path) -> tuple[Path | None, Path | None]:
    """The newest ``runs/*/prior/pipeline`` (and its run's classifier) under ``root``, if any."""
    found = sorted(root.glob("runs/*/prior/pipeline/model_index.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        return None, None
    pipe = found[-1].parent
    clf = pipe.parent.parent / "classifier"
    return pipe, (clf if (clf / "config.json").is_file() else None)


# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="*", default=["tiny", "small"], choices=["tiny", "small"])
    ap.add_argument("--items", type=int, default=4, help="fMRI items in part 1")
    ap.add_argument("--samples", type=int, default=5, help="images per item (the original's 5)")
    ap.add_argument("--label2img", action=argparse.BooleanOptionalAction, default=True, help="part 2")
    ap.add_argument("--label2img-variants", default="fp32,fp32-channels_last,bf16,bf16-channels_last")
    ap.add_argument("--label2img-batch", type=int, default=25, help="UNet batch for the batched estimate")
    ap.add_argument(
        "--big-size", default="label2img", choices=["tiny", "small", "label2img"], help="model size of part 2"
    )
    ap.add_argument("--e2e-variant", default="fp32", help="variant checked end to end (empty: none)")
    ap.add_argument(
        "--quality", default=None, help="a class-prior pipeline folder, or 'auto' (newest demo run)"
    )
    ap.add_argument("--classifier", default=None, help="classifier folder for --quality")
    ap.add_argument("--quality-per-class", type=int, default=4)
    ap.add_argument(
        "--quality-bf16", action="store_true", help="also bf16 weights (UNet only, and all) in --quality"
    )
    ap.add_argument("--quick", action="store_true", help="tiny only, 2 items, steps / 10, no label2img")
    ap.add_argument("--repeat", type=int, default=3, help="timings per measurement (median / best kept)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="part 1 weights")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2 on CPUs)")
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--max-wait", type=float, default=0)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    if argv is None and "MALLOC_MMAP_THRESHOLD_" not in os.environ and sys.platform.startswith("linux"):
        os.execve(
            sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        )
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    gpu = device.type == "cuda"
    torch.set_num_threads(args.threads or (torch.get_num_threads() if gpu else 2))
    if args.quick:
        args.sizes, args.label2img, args.repeat = ["tiny"], False, 1
    if args.quality == "auto":
        args.quality, clf = find_demo_prior(Path(__file__).resolve().parents[1])
        args.classifier = args.classifier or (str(clf) if clf else None)
        if args.quality is None:
            print("quality: no demo run with a prior found under runs/; skipped", flush=True)
    load_before = wait_for_low_load(args.max_load, args.max_wait)
    rates_before = {p: matmul_rate(device.type, p, 8192 if gpu else 2048) for p in ("fp32", "bf16")}
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    whole = part_whole_calls(args, device, dtype) if args.sizes else []
    big = part_label2img(args, device) if args.label2img else None
    quality = part_quality(args, device) if args.quality else None
    rates_after = {p: matmul_rate(device.type, p, 8192 if gpu else 2048) for p in ("fp32", "bf16")}
    fp32_rate = (rates_before["fp32"]["median"] + rates_after["fp32"]["median"]) / 2
    norm = fp32_rate / (REFERENCE["fp32_matmul_gflops"] * 1e9)  # our fp32 speed / the reference machine's

    tables = []
    if whole:
        tables.append(format_table(
            [[r["size"], r["sampler"], r["steps"] if r["steps"] == r["nominal_steps"] else f"{r['steps']} (of {r['nominal_steps']})", r["mode"], f"{r['images_per_s']:.3f}", fmt(r["speedup_vs_one_at_a_time"], ".2f"),
              fmt(r["speedup_vs_plms"], ".2f"), f"{r['peak_mem_mb']:.0f}"] for r in whole],
            ["size", "sampler", "steps", "mode", "img/s", "x one-at-a-time", "x PLMS-250", "peak MiB"],
        ))  # fmt: skip
    if big:
        S, B = REFERENCE["samples_per_item"], big["batch_for_batched"]
        prow = []
        for v, p in big["parts"].items():
            step = p[f"unet_{S}"]["median_s"]
            real = big["size"] == "label2img"  # the reference figures are for the label2img size only
            prow.append([v, f"{p['cond_1']['median_s']:.3f}", f"{step:.3f}", fmt(p[f'unet_{B}'] and p[f'unet_{B}']['median_s'] / B * S, '.3f'),
                         f"{p[f'decode_{S}']['median_s']:.3f}", fmt(real and REFERENCE['plms_step_1x5_s'] / step or None, ".2f"),
                         fmt(real and REFERENCE['plms_step_1x5_s'] / (step * norm) or None, ".2f")])  # fmt: skip
        tables.append(format_table(prow, [f"{big['size']} variant", "cond 1 fMRI s", f"UNet step x{S} s", f"per {S} latents at batch {B} s",
                                          f"decode x{S} s", "x ref step abs", "x ref step MFU-norm"]))  # fmt: skip
        erow = []
        for e in big["estimates"] if big["size"] == "label2img" else []:
            one, ts = e["one_fmri_s"], e.get("test_set_batched_s", e["test_set_one_at_a_time_s"])
            e["vs_reference_one_fmri_abs"] = REFERENCE["one_fmri_min"] * 60 / one
            e["vs_reference_test_set_abs"] = REFERENCE["test_set_h"] * 3600 / ts
            e["vs_reference_test_set_mfu_normalised"] = REFERENCE["test_set_h"] * 3600 / (ts * norm)
            erow.append([e["variant"], e["sampler"], e["steps"], e["unet_calls"], f"{one / 60:.2f}",
                         f"{e['test_set_one_at_a_time_s'] / 3600:.2f}", fmt(e.get("test_set_batched_s") and e["test_set_batched_s"] / 3600, ".2f"),
                         f"{e['vs_reference_one_fmri_abs']:.1f}", f"{e['vs_reference_test_set_abs']:.1f}",
                         f"{e['vs_reference_test_set_mfu_normalised']:.1f}"])  # fmt: skip
        vs = big["vq_search"]
        tables.append(format_table(
            [[k, f"{vs[k]['median_s'] * 1e3:.0f}", f"{vs[k]['peak_anon_growth_mb']:.0f}"] for k in ("unblocked (before)", "blocked (after)")],
            [f"VQ codebook search ({vs['vectors']} vectors x {vs['codes']} codes)", "ms (median)", "peak extra MB"],
        ) + f"\nsame codes: {vs['same_codes']}")  # fmt: skip
        if erow:
            tables.append(format_table(erow, ["variant", "sampler", "steps", "UNet calls", "1 fMRI min", "test set h (1 at a time)",
                                              f"test set h (batch {B})", "x ref 1 fMRI", "x ref test set abs", "x ref test set MFU-norm"]))  # fmt: skip
    if quality:
        tables.append(format_table(
            [[r["precision"], r["sampler"], r["steps"], f"{r['mean_abs_diff_vs_plms250']:.2f}", fmt(r["psnr_vs_plms250_db"], ".1f"),
              fmt(r.get("classifier_accuracy"), ".3f"), f"{r['seconds']:.1f}"] for r in quality["rows"]],
            ["weights", "sampler", "steps", "|diff| vs PLMS-250 (0-255)", "PSNR vs PLMS-250 dB", "classifier acc", "s"],
        ))  # fmt: skip
    info = machine_info(device.type)
    info["load_average_before_waiting"] = load_before
    mm = " ".join(
        f"{p} {rates_before[p]['median'] / 1e9:.0f} -> {rates_after[p]['median'] / 1e9:.0f}"
        for p in rates_before
    )
    foot = (f"{info.get('gpu', info['cpu'])}, {info['torch_threads']} threads, load {info['load_average_1_5_15']}; "
            f"matmul GFLOP/s (median, before -> after): {mm}\nreference: PLMS step 1 fMRI x 5 = {REFERENCE['plms_step_1x5_s']} s, "
            f"1 fMRI {REFERENCE['one_fmri_min']} min, test set {REFERENCE['test_set_h']} h ({REFERENCE['fp32_matmul_gflops']:.0f} GFLOP/s fp32 machine)")  # fmt: skip
    text = "\n\n".join(tables) + "\n\n" + foot
    print("\n" + text)
    if not args.no_save:
        payload = {"benchmark": "bench_sampling", "machine": info, "reference": REFERENCE,
                   "matmul_gflops_fp32_used": fp32_rate / 1e9, "whole_calls": whole, "label2img": big,
                   "quality": quality, "argv": sys.argv[1:] if argv is None else argv}  # fmt: skip
        path = write_results(f"bench_sampling-{device.type}", payload, text, RESULTS)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
