"""How the masked brain model's training step scales, and that HCP-scale pretraining data is streamed.

1. Sequence length: training-step time of one MBM variant (default ``large``, batch 2) against the voxel count,
   from 1024 voxels (64 patches) through the paper's 4656 (291) to NSD subject 1's nsdgeneral 15,724 voxels,
   wrap-padded to 15,728 (983 patches). The analytic FLOP count of ``bench_mbm.py`` gives the achieved rate;
   attention is quadratic in the patch count, the rest linear.
2. Batch size: step time and samples/s of the same variant at 291 patches for batches 1 ... 16.
3. Streaming: a synthetic pretraining corpus of 136,000 samples x 4656 voxels (2.5 GB float32, the paper's
   HCP + GOD scale) is written to a temporary ``.npy`` file in chunks and read back for one epoch by the real
   loader (:class:`mindvis.data.pretrain.MBMDataset`, memory-mapped, in the trainer's shuffled order). The
   process's resident memory is sampled every 10 ms and split into anonymous memory (what the process owns)
   and file-backed pages (the page cache of the mapped file, which the kernel drops under pressure). The file
   is deleted afterwards.

Both sweeps are plotted to ``benchmarks/results/bench_scaling-<time>.png``; numbers go to JSON and ``.md``.

Run: ``python benchmarks/bench_scaling.py [--variant large] [--quick] [--skip-stream]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    MemWatch,
    format_table,
    machine_info,
    matmul_rate,
    stamp,
    summary,
    wait_for_low_load,
    write_results,
)

NSD_SUBJ1_VOXELS = 15724  # nsdgeneral, subject 1
PATCH = 16


def padded(voxels: int, patch: int = PATCH) -> int:
    return -(-voxels // patch) * patch


def time_step(variant: str, num_voxels: int, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """Median training-step time (forward, backward, clipping, AdamW) of ``variant`` at ``num_voxels``."""
    from bench_mbm import build_training_step, model_flops_per_sample

    _model, config, step = build_training_step(variant, "cpu", "fp32", batch, num_voxels=num_voxels)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    s = summary(times)
    flops = model_flops_per_sample(config)
    return {
        "variant": variant,
        "num_voxels": num_voxels,
        "num_patches": config.num_patches,
        "batch": batch,
        "step_s": s,
        "samples_per_s": batch / s["median_s"],
        "gflop_per_sample": flops["total"] / 1e9,
        "attention_share_of_flops": flops["attention_core"] / flops["total"],
        "achieved_gflops": batch * flops["total"] / 1e9 / s["median_s"],
    }


# ----------------------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------------------


def stream_corpus(
    samples: int, voxels: int, batch: int, max_batches: int | None, workdir: Path
) -> dict[str, Any]:
    """Write a ``[samples, voxels]`` float32 memmap in chunks, then iterate it with the real loader."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from mindvis.data.pretrain import MBMDataset
    from mindvis.data.sampler import EpochShuffleSampler

    size = samples * voxels * 4
    free = shutil.disk_usage(workdir).free
    if size > 3e9 or size > 0.5 * free:
        raise SystemExit(
            f"refusing to write {size / 1e9:.2f} GB to {workdir} ({free / 1e9:.1f} GB free; limit 3 GB)"
        )
    tmp = Path(tempfile.mkdtemp(prefix="mindvis-stream-", dir=workdir))
    path = tmp / "voxels.npy"
    try:
        with MemWatch() as w_write:
            t0 = time.perf_counter()
            arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(samples, voxels))
            rng = np.random.default_rng(0)
            chunk = 4096
            for a in range(0, samples, chunk):
                arr[a : a + chunk] = rng.standard_normal((min(chunk, samples - a), voxels), dtype=np.float32)
                arr.flush()
            del arr
            write_s = time.perf_counter() - t0
        ds = MBMDataset(path)
        loader = DataLoader(ds, batch_size=batch, sampler=EpochShuffleSampler(len(ds), seed=0), num_workers=0)
        n_batches = len(loader) if max_batches is None else min(max_batches, len(loader))
        seen = 0
        checksum = 0.0
        with MemWatch() as w_read:
            t0 = time.perf_counter()
            for i, b in enumerate(loader):
                if i >= n_batches:
                    break
                x = b["fmri"]
                seen += x.shape[0]
                checksum += float(x[:, :8].sum())
            read_s = time.perf_counter() - t0
        assert isinstance(x, torch.Tensor)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mb = lambda kb: kb / 1024  # noqa: E731
    return {
        "samples": samples,
        "voxels": voxels,
        "file_gb": size / 1e9,
        "write_s": write_s,
        "batch": batch,
        "batches_read": n_batches,
        "samples_read": seen,
        "read_s": read_s,
        "samples_per_s": seen / read_s,
        "order": "EpochShuffleSampler (random permutation, as in training)",
        "write_peak_mb": {k: mb(v) for k, v in w_write.peak.items()},
        "read_start_mb": {k: mb(v) for k, v in w_read.start.items()},
        "read_peak_mb": {k: mb(v) for k, v in w_read.peak.items()},
        "anon_growth_during_read_mb": mb(w_read.peak.get("RssAnon", 0) - w_read.start.get("RssAnon", 0)),
        "deleted": not path.exists(),
    }


# ----------------------------------------------------------------------------------------------------------


def plot(seq: list[dict], bat: list[dict], path: Path, variant: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    L = [r["num_patches"] for r in seq]
    ax.plot(L, [r["step_s"]["median_s"] for r in seq], "o-", label="step time (s)")
    ax.set_xlabel("patches (voxels / 16)")
    ax.set_ylabel("step time, s")
    ax.set_title(f"MBM {variant}, batch {seq[0]['batch']}: vs sequence length" if seq else "")
    for r in seq:
        ax.annotate(f"{r['num_voxels']} vox", (r["num_patches"], r["step_s"]["median_s"]), fontsize=7,
                    textcoords="offset points", xytext=(3, -10))  # fmt: skip
    ax2 = ax.twinx()
    ax2.plot(L, [r["achieved_gflops"] for r in seq], "s--", color="C1", label="GFLOP/s")
    ax2.set_ylabel("achieved GFLOP/s", color="C1")
    ax = axes[1]
    B = [r["batch"] for r in bat]
    ax.plot(B, [r["samples_per_s"] for r in bat], "o-", label="samples/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples/s")
    ax.set_title(f"MBM {variant}, {bat[0]['num_patches'] if bat else ''} patches: vs batch")
    ax2 = ax.twinx()
    ax2.plot(B, [r["step_s"]["median_s"] for r in bat], "s--", color="C1")
    ax2.set_ylabel("step time, s", color="C1")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default=None, help="MBM variant (default large; quick: small)")
    ap.add_argument("--voxels", default=None, help="comma list (default 1024,2048,4656,8192,15728)")
    ap.add_argument("--seq-batch", type=int, default=2, help="batch of the sequence-length sweep")
    ap.add_argument("--batches", default=None, help="comma list (default 1,2,4,8,16)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--stream-samples", type=int, default=136_000)
    ap.add_argument("--stream-voxels", type=int, default=4656)
    ap.add_argument("--stream-batch", type=int, default=100, help="the pretraining batch size")
    ap.add_argument("--stream-batches", type=int, default=None, help="batches to read (default: one epoch)")
    ap.add_argument(
        "--stream-dir", default=None, help="where the temporary file goes (default: the temp dir)"
    )
    ap.add_argument("--skip-stream", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--quick", action="store_true", help="small variant, 3 points per sweep, 20k-sample stream"
    )
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--max-wait", type=float, default=0)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    load_before = wait_for_low_load(args.max_load, args.max_wait)
    variant = args.variant or ("small" if args.quick else "large")
    voxels = [
        int(v)
        for v in (args.voxels or ("1024,4656,15728" if args.quick else "1024,2048,4656,8192,15728")).split(
            ","
        )
    ]
    batches = [int(b) for b in (args.batches or ("1,4,16" if args.quick else "1,2,4,8,16")).split(",")]
    if args.quick:
        args.stream_samples = min(args.stream_samples, 20_000)
    seq, bat, stream = [], [], None
    rate = matmul_rate("cpu", "fp32", 2048)["median"]
    if not args.skip_steps:
        for v in voxels:
            r = time_step(variant, padded(v), args.seq_batch, args.steps, args.warmup)
            seq.append(r)
            print(f"{variant} {r['num_voxels']:6d} voxels ({r['num_patches']:4d} patches) batch {r['batch']}: "
                  f"step {r['step_s']['median_s']:.3f} s, {r['achieved_gflops']:.1f} GFLOP/s, "
                  f"attention {r['attention_share_of_flops']:.0%} of FLOPs", flush=True)  # fmt: skip
        for b in batches:
            r = time_step(variant, 4656, b, args.steps, args.warmup)
            bat.append(r)
            print(f"{variant} 4656 voxels batch {b:3d}: step {r['step_s']['median_s']:.3f} s, "
                  f"{r['samples_per_s']:.3f} samples/s, {r['achieved_gflops']:.1f} GFLOP/s", flush=True)  # fmt: skip
    if not args.skip_stream:
        workdir = Path(args.stream_dir or tempfile.gettempdir())
        stream = stream_corpus(
            args.stream_samples, args.stream_voxels, args.stream_batch, args.stream_batches, workdir
        )
        print(f"stream: {stream['samples']} x {stream['voxels']} ({stream['file_gb']:.2f} GB) read in "
              f"{stream['read_s']:.1f} s ({stream['samples_per_s']:.0f} samples/s); peak RSS "
              f"{stream['read_peak_mb'].get('VmRSS', 0):.0f} MB, of which anonymous "
              f"{stream['read_peak_mb'].get('RssAnon', 0):.0f} MB (+{stream['anon_growth_during_read_mb']:.0f} MB "
              f"while reading), file-backed {stream['read_peak_mb'].get('RssFile', 0):.0f} MB", flush=True)  # fmt: skip
    rate_after = matmul_rate("cpu", "fp32", 2048)["median"]
    info = machine_info("cpu")
    info["load_average_before_waiting"] = load_before
    tables = []
    if seq:
        tables.append(format_table(
            [[r["num_voxels"], r["num_patches"], r["batch"], f"{r['step_s']['median_s']:.3f}", f"{r['samples_per_s']:.3f}",
              f"{r['gflop_per_sample']:.1f}", f"{r['attention_share_of_flops']:.0%}", f"{r['achieved_gflops']:.1f}",
              f"{r['achieved_gflops'] * 2e9 / (rate + rate_after):.0%}"] for r in seq],
            ["voxels", "patches", "batch", "step s", "samples/s", "GFLOP/smp", "attention FLOPs", "GFLOP/s", "of fp32 mm"],
        ))  # fmt: skip
    if bat:
        tables.append(format_table(
            [[r["batch"], f"{r['step_s']['median_s']:.3f}", f"{r['samples_per_s']:.3f}", f"{r['achieved_gflops']:.1f}",
              f"{r['achieved_gflops'] * 2e9 / (rate + rate_after):.0%}"] for r in bat],
            ["batch", "step s", "samples/s", "GFLOP/s", "of fp32 mm"],
        ))  # fmt: skip
    if stream:
        p, s0 = stream["read_peak_mb"], stream["read_start_mb"]
        tables.append(format_table(
            [[f"{stream['samples']} x {stream['voxels']}", f"{stream['file_gb']:.2f}", stream["samples_read"],
              f"{stream['read_s']:.1f}", f"{stream['samples_per_s']:.0f}", f"{p.get('VmRSS', 0):.0f}",
              f"{s0.get('RssAnon', 0):.0f} -> {p.get('RssAnon', 0):.0f}", f"{s0.get('RssFile', 0):.0f} -> {p.get('RssFile', 0):.0f}"]],
            ["corpus", "file GB", "samples read", "s", "samples/s", "peak RSS MB", "anonymous MB (start -> peak)",
             "file-backed MB (start -> peak)"],
        ))  # fmt: skip
    foot = (f"{info['cpu']}, {info['torch_threads']} threads, load {info['load_average_1_5_15']}; "
            f"fp32 2048 matmul {rate / 1e9:.0f} -> {rate_after / 1e9:.0f} GFLOP/s")  # fmt: skip
    text = "\n\n".join(tables) + "\n\n" + foot
    print("\n" + text)
    if not args.no_save:
        png = None
        if seq or bat:
            RESULTS.mkdir(parents=True, exist_ok=True)
            png = RESULTS / f"bench_scaling-{stamp()}.png"
            plot(seq, bat, png, variant)
            print(f"wrote {png}")
        payload = {"benchmark": "bench_scaling", "machine": info, "variant": variant, "sequence": seq, "batch": bat,
                   "stream": stream, "fp32_matmul_gflops": [rate / 1e9, rate_after / 1e9], "plot": None if png is None else png.name}  # fmt: skip
        print(f"wrote {write_results('bench_scaling-cpu', payload, text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
