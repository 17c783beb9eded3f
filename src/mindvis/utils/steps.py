"""Resumable multi-step runs: each step writes into its own folder and is marked done only when complete.

A step is skipped on a rerun when its marker exists and records the same input fingerprint. A step that was
interrupted has no marker, so it runs again from its start (or resumes from its own checkpoints, if the
step supports that). Markers are written atomically.

:func:`provenance` is what every run folder records about where it came from: package versions and the git
commit of the mindvis source (when it is a git checkout).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mindvis.utils.io import read_json, remove_stale_temps, write_json

_logger = logging.getLogger(__name__)


#: Packages whose versions a run folder records.
RECORDED_PACKAGES = (
    "mindvis",
    "torch",
    "torchvision",
    "diffusers",
    "timm",
    "lightning",
    "numpy",
    "scipy",
    "scikit-image",
    "torchmetrics",
)


def package_versions() -> dict[str, str]:
    """Python's version and the installed versions of :data:`RECORDED_PACKAGES`."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in RECORDED_PACKAGES:
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the git checkout holding the mindvis source, or ``None``."""
    src = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], capture_output=True, text=True, timeout=10, cwd=src, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def provenance() -> dict[str, Any]:
    """What a run folder records about its software: ``versions`` and ``git`` (see :func:`git_state`)."""
    return {"versions": package_versions(), "git": git_state()}


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable object (configs, file hashes of inputs)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class StepResult:
    name: str
    skipped: bool
    seconds: float
    outputs: dict[str, Any]


class StepRunner:
    """Run named steps inside ``run_dir``; ``run_dir/steps/<name>.json`` marks a finished step.

    A marker counts when it is readable, records the same input fingerprint and, if the step's outputs name a
    ``folder``, that folder still exists. Temporary files that a killed earlier attempt left in the run folder
    are removed when the runner is created.

    Args:
        run_dir: the run folder.
        on_start: optional callback ``(index, total, name)`` called before each step (for progress display).
    """

    def __init__(
        self,
        run_dir: str | Path,
        total: int | None = None,
        on_start: Callable[[int, int | None, str], None] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.total = total
        self.on_start = on_start
        self.results: list[StepResult] = []
        (self.run_dir / "steps").mkdir(parents=True, exist_ok=True)
        removed = remove_stale_temps(self.run_dir, recursive=True)  # leftovers of a killed earlier attempt
        if removed:
            _logger.info("removed %d temporary file(s) left by an interrupted run", len(removed))

    def marker(self, name: str) -> Path:
        return self.run_dir / "steps" / f"{name}.json"

    def is_done(self, name: str, inputs: Any) -> dict[str, Any] | None:
        path = self.marker(name)
        if not path.exists():
            return None
        try:
            rec = read_json(path)
        except Exception:  # a damaged marker means the step is not done
            return None
        if not isinstance(rec, dict) or rec.get("fingerprint") != fingerprint(inputs):
            return None
        outputs = rec.get("outputs")
        folder = outputs.get("folder") if isinstance(outputs, dict) else None
        if folder and not Path(folder).exists():  # the step's output was removed since: redo it
            _logger.info("step %s: its output %s is gone, running it again", name, folder)
            return None
        return rec

    def run(self, name: str, inputs: Any, fn: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        """Run ``fn`` unless step ``name`` is already done with the same ``inputs``; return its outputs."""
        if self.on_start:
            self.on_start(len(self.results), self.total, name)
        rec = self.is_done(name, inputs)
        if rec is not None:
            _logger.info("step %s: already done, skipped", name)
            self.results.append(StepResult(name, True, 0.0, rec.get("outputs", {})))
            return rec.get("outputs", {})
        t0 = time.perf_counter()
        outputs = fn() or {}
        dt = time.perf_counter() - t0
        write_json(
            self.marker(name),
            {
                "step": name,
                "fingerprint": fingerprint(inputs),
                "seconds": round(dt, 2),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "outputs": outputs,
            },
        )
        _logger.info("step %s: done in %.1f s", name, dt)
        self.results.append(StepResult(name, False, dt, outputs))
        return outputs
