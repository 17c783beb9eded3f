"""Shared pieces of the benchmarks: the reference figures, machine description, timing and result files.

The reference is the original MinD-Vis implementation measured on a 2-core Xeon (AVX-512 and AMX), fp32,
2 threads, at the paper's sizes. Because this machine differs, every benchmark reports two ratios:

* the absolute ratio, ours / reference (mixes hardware and software);
* the MFU-normalised ratio: (our rate / our fp32 matmul rate measured in the same run) divided by
  (reference rate / 247 GFLOP/s, the reference machine's fp32 matmul rate), i.e. how the software compares
  on equal matmul hardware.

Result files: ``benchmarks/results/<name>-<device>-<UTC time>.json`` plus the printed table as ``.md``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# GNU OpenMP's default (spinning) wait makes torch many times slower when other processes share the cores,
# and passive waiting costs 30-40 % when they do not (bench_threads.py measures both). So the benchmarks wait
# passively only when the machine is busy at start (1-minute load above half the cores), unless
# OMP_WAIT_POLICY is set already; machine_info() records the policy used. It must be set before torch loads
# OpenMP, so every script imports this module before torch.
if os.environ.get("BENCH_KEEP_OMP_DEFAULTS") != "1" and "OMP_WAIT_POLICY" not in os.environ:
    try:
        if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
            os.environ["BENCH_OMP_PASSIVE_BECAUSE_BUSY"] = f"{os.getloadavg()[0]:.2f}"
    except OSError:  # pragma: no cover - no load average
        pass

#: Figures of the original implementation on its 2-core Xeon (fp32, 2 threads, paper sizes).
REFERENCE: dict[str, Any] = {
    "machine": "2-core Intel Xeon with AVX-512 and AMX, fp32, 2 threads",
    "fp32_matmul_gflops": 247.0,
    "bf16_matmul_gflops": 655.0,
    # stage A: MBM `large` (1024 x 24, decoder 512 x 8), 291 patches, batch 8, full training step
    "mbm_large_batch": 8,
    "mbm_large_samples_per_s": 1.64,
    "mbm_large_fraction_of_fp32_matmul": 0.62,
    # stage B: cond-only finetune (train_cond_stage_only), label2img UNet, 256 px images, batch 2
    "stage_b_batch": 2,
    "stage_b_samples_per_s": 0.115,
    # sampling: one PLMS step (one UNet call) for 1 fMRI x 5 samples at label2img size
    "plms_step_1x5_s": 6.2,
    "one_fmri_min": 26.0,
    "test_set_h": 22.0,
    "test_set_items": 50,
    "samples_per_item": 5,
}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU flags that matter for matmul speed (AVX-512, bf16, AMX), as ``/proc/cpuinfo`` lists them."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "avx512_fp16")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:  # pragma: no cover
        pass
    return []


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What ran the benchmark: CPU/GPU, core count, torch threads and version, load average now."""
    import torch

    info: dict[str, Any] = {
        "device": device,
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15": load_average(),
        "env": {
            k: os.environ[k]
            for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")
            if k in os.environ
        },  # fmt: skip
        "time_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def wait_for_low_load(max_load: float, max_wait_s: float) -> float:
    """Sleep (up to ``max_wait_s``) until the 1-minute load average is at most ``max_load``; returns it."""
    deadline = time.monotonic() + max_wait_s
    load = load_average()[0] if load_average() else 0.0
    warned = False
    while load > max_load and time.monotonic() < deadline:
        if not warned:
            print(f"load average {load:.2f} > {max_load}: waiting up to {max_wait_s:.0f} s", file=sys.stderr)
            warned = True
        time.sleep(10)
        load = load_average()[0]
    if load > max_load:
        print(f"warning: measuring under load {load:.2f}; timings will be low", file=sys.stderr)
    return load


def sync_fn(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1, device: str = "cpu") -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (device synchronised)."""
    sync = sync_fn(device)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def interleaved(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 1,
    device: str = "cpu",
    prepare: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, list[float]]:
    """Time several variants of one computation side by side: each round calls every variant once (in an order
    rotated from round to round), so a change in machine load hits all variants alike.

    ``prepare[name]``, when given, runs untimed before each call of ``name`` (e.g. to switch a shared model's
    dtype or memory layout). Returns the ``rounds`` durations (seconds) of each variant, after ``warmup``
    untimed calls of each.
    """
    sync = sync_fn(device)
    names = list(fns)
    prepare = prepare or {}
    for _ in range(warmup):
        for name in names:
            if name in prepare:
                prepare[name]()
            fns[name]()
    sync()
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if name in prepare:
                prepare[name]()
                sync()
            t = time.perf_counter()
            fns[name]()
            sync()
            out[name].append(time.perf_counter() - t)
    return out


#: Name of the matmul entry timed among interleaved variants.
MATMUL = "(fp32 matmul)"


def matmul_fn(
    device: str, dtype_name: str = "fp32", n: int = 2048, min_s: float = 0.3
) -> tuple[Callable[[], Any], float]:
    """A callable running ``k`` ``n x n`` matmuls (about ``min_s`` seconds) and its FLOP count, to time among
    the variants of :func:`interleaved`, so the matmul rate used for MFU sees the same machine load."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = sync_fn(device)
    a @ b
    sync()
    t = time.perf_counter()
    a @ b
    sync()
    k = max(1, int(min_s / max(time.perf_counter() - t, 1e-6)))

    def fn() -> None:
        for _ in range(k):
            a @ b

    return fn, 2.0 * n**3 * k


def summary(times: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a list of durations (seconds)."""
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "n": len(times),
    }


def matmul_rate(device: str, dtype_name: str, n: int, repeats: int = 7) -> dict[str, float]:
    """FLOP/s of an ``n x n @ n x n`` matmul: the median and the best of ``repeats`` timed products.

    Each timed sample multiplies often enough to last at least 50 ms.
    """
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = sync_fn(device)
    for _ in range(2):
        a @ b
    sync()
    reps = 1
    while True:  # calibrate
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        if time.perf_counter() - t >= 0.05 or reps >= 1 << 12:
            break
        reps *= 2
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        rates.append(reps * 2 * n**3 / (time.perf_counter() - t))
    return {"median": statistics.median(rates), "best": max(rates), "n": n}


def stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def write_results(name: str, payload: dict[str, Any], table: str, out_dir: Path | None = None) -> Path:
    """Write ``<name>-<stamp>.json`` and the printed table as ``.md`` (both atomically); returns the JSON path."""
    from mindvis.utils.io import atomic_write, write_json

    out_dir = RESULTS if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{name}-{stamp()}"
    path = base.with_suffix(".json")
    write_json(path, payload)
    with atomic_write(base.with_suffix(".md"), "w") as fh:
        fh.write(table.rstrip() + "\n")
    return path


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def run_child(
    script: str, args: Sequence[str], timeout: float | None = None, env: dict | None = None
) -> dict:
    """Run ``python script *args`` in a fresh process; parse its last ``RESULT {json}`` line.

    Returns ``{"error": ...}`` (the tail of stderr) when the child fails.
    """
    import subprocess

    src = str(Path(__file__).resolve().parents[1] / "src")
    full_env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k, v in (env or {}).items():  # None removes a variable
        if v is None:
            full_env.pop(k, None)
        else:
            full_env[k] = v
    try:
        proc = subprocess.run(
            [sys.executable, script, *args], capture_output=True, text=True, env=full_env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-4:]
    return {"error": " | ".join(tail) or f"exit {proc.returncode}"}


def emit(result: dict) -> None:
    """Print a child's result line for :func:`run_child`."""
    print("RESULT " + json.dumps(result), flush=True)


def peak_rss_mb() -> float:
    """This process's peak resident set (MB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mem_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])
    return out


class MemWatch:
    """Peak VmRSS / RssAnon / RssFile of this process over a block (sampled every 10 ms)."""

    def __enter__(self) -> MemWatch:
        self.start = _mem_kb()
        self.peak = dict(self.start)
        self._stop = threading.Event()

        def watch() -> None:
            while not self._stop.is_set():
                for k, v in _mem_kb().items():
                    self.peak[k] = max(self.peak.get(k, 0), v)
                time.sleep(0.01)

        self._t = threading.Thread(target=watch, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        for k, v in _mem_kb().items():
            self.peak[k] = max(self.peak.get(k, 0), v)
