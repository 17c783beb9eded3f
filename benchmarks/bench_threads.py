"""CPU threading settings: OpenMP's wait policy and the thread count, for a small-kernel and a large-kernel job.

torch's CPU kernels run in OpenMP parallel regions. With GNU OpenMP's default (active) wait policy, threads
spin between regions; when the cores are shared with other processes, a spinning or descheduled thread
stalls every region, which hurts models made of many small operations most. This benchmark runs the same
work in fresh processes under each setting, alternating the settings round by round (so load changes hit
them alike), and reports the median time per call:

* ``unet-small``: one UNet call of the ``small`` preset, 1 fMRI x 5 samples (many small kernels);
* ``mbm-small``: one training step of the ``small`` masked brain model, batch 16 (medium matmuls).

Settings: ``OMP_WAIT_POLICY`` unset (GNU OpenMP's default: spin 300k iterations, then sleep) / ``PASSIVE`` /
``GOMP_SPINCOUNT=10000`` (a short spin), with 2 threads, and 1 thread.
Results depend on how busy the machine is; the load average is recorded with them.

Run: ``python benchmarks/bench_threads.py [--rounds 3] [--calls 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, format_table, load_average, machine_info, run_child, write_results  # noqa: E402

SETTINGS = {
    "default wait, 2 threads": ({}, 2),
    "PASSIVE wait, 2 threads": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2),
    "spin 10k then sleep, 2 threads": ({"GOMP_SPINCOUNT": "10000"}, 2),
    "1 thread": ({}, 1),
}


def worker(job: str, threads: int, calls: int) -> None:
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(threads)
    if job == "unet-small":
        from bench_sampling import build_pipeline

        pipe = build_pipeline("small", torch.device("cpu"), torch.float32)
        m = pipe.model
        C, h, w = m.latent_shape
        with torch.inference_mode():
            cond = m.condition(torch.randn(1, pipe.num_voxels)).index(torch.zeros(5, dtype=torch.long))
        x, t = torch.randn(5, C, h, w), torch.full((5,), 501, dtype=torch.long)

        def fn() -> None:
            with torch.inference_mode():
                m.eps(x, t, cond)

    elif job == "mbm-small":
        from bench_mbm import build_training_step

        _m, _c, fn = build_training_step("small", "cpu", "fp32", 16)
    else:
        raise SystemExit(f"unknown job {job}")
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    emit({"job": job, "threads": threads, "times_s": times, "median_s": statistics.median(times)})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", default="unet-small,mbm-small")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=5, help="timed calls per process (after one warm-up call)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.threads, args.calls)
        return 0
    loads = [load_average()]
    medians: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for job in args.jobs.split(","):
            names = list(SETTINGS)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                env, threads = SETTINGS[name]
                env = {
                    "OMP_WAIT_POLICY": None,
                    "BENCH_KEEP_OMP_DEFAULTS": "1",
                    **env,
                    "OMP_NUM_THREADS": str(threads),
                }
                res = run_child(__file__, ["--worker", job, "--threads", str(threads), "--calls", str(args.calls)],
                                env=env)  # fmt: skip
                if "error" in res:
                    print(f"{job} {name}: FAILED {res['error']}", flush=True)
                    continue
                medians.setdefault((job, name), []).append(res["median_s"])
                print(f"round {r} {job:10s} {name:24s} {res['median_s'] * 1e3:8.1f} ms", flush=True)
        loads.append(load_average())
    rows = []
    out = []
    for job in args.jobs.split(","):
        base = statistics.median(medians.get((job, "default wait, 2 threads"), [float("nan")]))
        for name in SETTINGS:
            v = medians.get((job, name))
            if not v:
                continue
            med = statistics.median(v)
            rows.append(
                [job, name, f"{med * 1e3:.1f}", " ".join(f"{x * 1e3:.0f}" for x in v), f"{base / med:.2f}"]
            )
            out.append(
                {
                    "job": job,
                    "setting": name,
                    "median_s": med,
                    "round_medians_s": v,
                    "speedup_vs_default": base / med,
                }
            )
    table = format_table(rows, ["job", "setting", "ms per call (median)", "per round", "x default"])
    info = machine_info("cpu")
    foot = f"{info['cpu']}, {info['cpu_count']} cores; load average during the run: {loads}"
    print("\n" + table + "\n" + foot)
    if not args.no_save:
        payload = {"benchmark": "bench_threads", "machine": info, "loads": loads, "results": out}
        print(f"wrote {write_results('bench_threads-cpu', payload, table + chr(10) + foot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
