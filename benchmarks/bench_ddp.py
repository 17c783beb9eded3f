"""Data-parallel scaling of stage A on CPUs: Lightning DDP (gloo) with 2 processes against 1 process.

Both runs train the real :class:`mindvis.train.mbm.MBMModule` (AdamW, warmup-cosine schedule, clipping at 0.8)
through :func:`mindvis.train.common.build_trainer` (the trainer every stage uses; no checkpoints, no logger)
on the same seeded in-memory voxel data served by :class:`mindvis.data.pretrain.MBMDataset` with the
trainer's epoch-shuffled order. Lightning launches the second process itself (``strategy="ddp"``; gloo on
CPUs). The global batch is the same in both runs (strong scaling): 1 process x B with ``--threads`` torch
threads, against 2 processes x B/2 with ``--threads / 2`` each, so both use the same cores.

A callback on rank 0 times every optimizer step (the gradient all-reduce included); the first ``--skip``
steps are left out. Reported: median step time, global samples/s, the speedup and the scaling efficiency
(speedup / number of processes). On a 2-core machine the 2-process run competes with itself for the same two
cores, so the efficiency measures the DDP overhead (gloo all-reduce, duplicated Python work), not extra
hardware; on a multi-GPU or multi-node machine the same command with ``--devices N`` measures real scaling.

Run: ``python benchmarks/bench_ddp.py [--variant tiny] [--global-batch 64] [--steps 40] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, format_table, machine_info, run_child, wait_for_low_load, write_results  # noqa: E402

NUM_VOXELS = 4656


def worker(args: argparse.Namespace) -> None:
    """One training run; Lightning re-executes this command for rank 1 when ``--devices 2``."""
    import logging
    import warnings

    import lightning.pytorch as pl
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from mindvis.data.pretrain import MBMDataset
    from mindvis.data.sampler import EpochShuffleSampler
    from mindvis.models.mbm import MBM_VARIANTS
    from mindvis.train.common import build_trainer
    from mindvis.train.mbm import MBMModule, MBMTrainConfig

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    per_device = args.global_batch // args.devices
    n_samples = per_device * args.devices * args.steps
    data = np.random.default_rng(0).standard_normal((n_samples, NUM_VOXELS)).astype(np.float32)

    class Data(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            ds = MBMDataset(data)
            return DataLoader(ds, batch_size=per_device, sampler=EpochShuffleSampler(len(ds), seed=0))

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self.times.append(time.perf_counter() - self._t)

    trainer_cfg = {"accelerator": "cpu", "devices": args.devices, "strategy": "ddp" if args.devices > 1 else "auto",
                   "precision": "32-true", "logger": "none", "progress_bar": False, "validate_first": False}  # fmt: skip
    config = MBMTrainConfig.for_stage(
        "pretrain", variant=args.variant, epochs=1, batch_size=per_device, data={"god_dir": tempfile.gettempdir()},
        trainer=trainer_cfg,
    )  # fmt: skip
    module = MBMModule(config, MBM_VARIANTS[args.variant](NUM_VOXELS))
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="mindvis-ddp-") as run_dir:
        trainer = build_trainer(
            config.trainer, run_dir, callbacks=[timer], enable_checkpointing=False, export=False
        )
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=Data())
        wall = time.perf_counter() - t0
    if trainer.global_rank != 0:
        return
    timed = timer.times[args.skip :]
    med = statistics.median(timed)
    emit(
        {
            "devices": args.devices,
            "threads_per_process": args.threads,
            "per_device_batch": per_device,
            "global_batch": per_device * args.devices,
            "steps": len(timer.times),
            "timed_steps": len(timed),
            "step_median_s": med,
            "step_min_s": min(timed),
            "step_max_s": max(timed),
            "samples_per_s": per_device * args.devices / med,
            "fit_wall_s": wall,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "backend": getattr(trainer.strategy, "process_group_backend", None),
        }
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="tiny")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of the timing")
    ap.add_argument(
        "--threads", type=int, default=2, help="torch threads of the 1-process run (split in DDP)"
    )
    ap.add_argument("--devices", type=int, default=2, help="processes of the DDP run")
    ap.add_argument("--quick", action="store_true", help="20 steps")
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--max-wait", type=float, default=0)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.steps, args.skip = 20, 4
    if args.global_batch % args.devices:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by --devices {args.devices}")
    load_before = wait_for_low_load(args.max_load, args.max_wait)
    common = ["--worker", "--variant", args.variant, "--global-batch", str(args.global_batch),
              "--steps", str(args.steps), "--skip", str(args.skip)]  # fmt: skip
    runs: list[dict[str, Any]] = []
    for devices in (1, args.devices):
        threads = max(1, args.threads // devices)
        env = {"OMP_NUM_THREADS": str(threads)}
        r = run_child(
            __file__, [*common, "--devices", str(devices), "--threads", str(threads)], args.timeout, env
        )
        r.setdefault("devices", devices)
        runs.append(r)
        if "error" in r:
            print(f"{devices} process(es): FAILED: {r['error']}", flush=True)
        else:
            print(f"{devices} process(es) x {r['threads_per_process']} threads, batch {r['per_device_batch']} each: "
                  f"step {r['step_median_s'] * 1e3:.1f} ms, {r['samples_per_s']:.1f} samples/s "
                  f"({r['strategy']}, backend {r['backend']})", flush=True)  # fmt: skip
    ok = all("error" not in r for r in runs)
    speedup = runs[1]["samples_per_s"] / runs[0]["samples_per_s"] if ok else None
    info = machine_info("cpu")
    info["load_average_before_waiting"] = load_before
    rows = [[r["devices"], r.get("threads_per_process", "-"), r.get("per_device_batch", "-"), r.get("global_batch", "-"),
             f"{r['step_median_s'] * 1e3:.1f}" if "error" not in r else "error", f"{r.get('samples_per_s', 0):.1f}",
             r.get("backend") or "-"] for r in runs]  # fmt: skip
    table = format_table(
        rows,
        [
            "processes",
            "threads each",
            "batch each",
            "global batch",
            "step ms (median)",
            "samples/s",
            "backend",
        ],
    )
    if speedup is not None:
        table += f"\n\nspeedup {speedup:.2f}x with {args.devices} processes, scaling efficiency {speedup / args.devices:.0%}"
    foot = f"MBM {args.variant}, {NUM_VOXELS} voxels; {info['cpu']} ({info['cpu_count']} cores), load {info['load_average_1_5_15']}"
    print("\n" + table + "\n" + foot)
    if not args.no_save:
        payload = {"benchmark": "bench_ddp", "machine": info, "variant": args.variant, "runs": runs,
                   "speedup": speedup, "efficiency": None if speedup is None else speedup / args.devices,
                   "pid": os.getpid()}  # fmt: skip
        print(f"wrote {write_results('bench_ddp-cpu', payload, table + chr(10) + foot)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
