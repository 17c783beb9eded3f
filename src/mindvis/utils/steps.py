"""Resumable multi-step runs: each step writes into its own folder and is marked done only when complete.

A step is skipped on a rerun when its marker exists and records the same input fingerprint. A step that was
interrupted has no marker, so it runs again from its start (or resumes from its own checkpoints, if the
step supports that). Markers are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mindvis.utils.io import read_json, write_json

_logger = logging.getLogger(__name__)


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
        if rec.get("fingerprint") != fingerprint(inputs):
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
