"""The run folder of a training stage, and reading its checkpoints.

A run folder holds ``config.json`` (:data:`RUN_CONFIG_NAME`, the resolved configuration as plain JSON, never a
pickle), ``metrics.csv`` (:data:`METRICS_NAME`), ``checkpoints/`` with ``last.ckpt`` (and the best checkpoint
when one is kept), and the exported weights of the final (``model/``) and the best (``best/``) model.

* :func:`write_run_config` / :func:`read_run_config`: ``config.json``, with the command line, package versions
  and git commit of the run.
* :func:`find_resume_checkpoint` and :func:`read_checkpoint_progress`: ``--resume`` refuses a missing,
  truncated or corrupt checkpoint before anything is written; :func:`check_resume_settings` refuses settings
  that differ from those the run was started with.
* :class:`AtomicCheckpointIO`: Lightning writes every checkpoint through it, whole or not at all.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mindvis.config import flatten
from mindvis.errors import CheckpointError, ConfigError
from mindvis.safeload import load_torch_file
from mindvis.utils.io import atomic_write, read_json, remove_stale_temps, write_json
from mindvis.utils.steps import provenance

RUN_CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.csv"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
FINAL_WEIGHTS_DIR = "model"
BEST_WEIGHTS_DIR = "best"
RUN_FORMAT_VERSION = 1


def write_run_config(run_dir: str | os.PathLike, stage: str, config: Mapping[str, Any], **extra: Any) -> Path:
    """Write ``config.json`` of a run folder: stage, the resolved configuration (seed included), command line,
    package versions and the git commit (see :func:`mindvis.utils.steps.provenance`).

    Temporary files that a killed earlier attempt left anywhere in the run folder are removed first.
    """
    path = Path(run_dir) / RUN_CONFIG_NAME
    remove_stale_temps(run_dir, recursive=True)  # half-written leftovers of a killed earlier attempt
    previous = None
    if path.is_file():
        try:
            previous = read_json(path)
        except Exception:  # noqa: BLE001 - a damaged old file is simply replaced
            previous = None
    doc: dict[str, Any] = {
        "_kind": "mindvis-run",
        "_format_version": RUN_FORMAT_VERSION,
        "stage": stage,
        "config": dict(config),
        **extra,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        **provenance(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if isinstance(previous, dict):
        doc["created"] = previous.get("created", doc["created"])
        doc["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(path, doc)
    return path


def read_run_config(run_dir: str | os.PathLike, stage: str | None = None) -> dict[str, Any]:
    """Read a run folder's ``config.json``; returns the whole document.

    Raises:
        ConfigError: missing or malformed file, or a run of another stage.
    """
    path = Path(run_dir) / RUN_CONFIG_NAME
    if not path.is_file():
        raise ConfigError("not a mindvis run folder (no config.json)", path=run_dir)
    try:
        doc = read_json(path)
    except Exception as exc:  # DataError from read_json
        raise ConfigError(getattr(exc, "detail", str(exc)), path=path) from None
    if (
        not isinstance(doc, dict)
        or doc.get("_kind") != "mindvis-run"
        or not isinstance(doc.get("config"), dict)
    ):
        raise ConfigError("not a mindvis run configuration", path=path)
    if stage is not None and doc.get("stage") != stage:
        raise ConfigError(f"this run is stage {doc.get('stage')!r}, not {stage!r}", path=path, field="stage")
    return doc


def check_resume_settings(
    run_dir: str | os.PathLike, stage: str, config: Mapping[str, Any], may_change: frozenset[str]
) -> None:
    """Refuse to resume the run in ``run_dir`` with settings other than those it was started with.

    ``config`` is what :func:`write_run_config` would write now; every setting (dotted key) must equal the
    saved one, except those in ``may_change`` (e.g. epochs, which a resumed run may extend; an entry ending in
    ``.`` names every key under it). A run folder without ``config.json`` has nothing to compare.

    Raises:
        ConfigError: naming the first setting that differs, its saved value and the given one.
    """
    if not (Path(run_dir) / RUN_CONFIG_NAME).is_file():
        return
    saved = flatten(read_run_config(run_dir, stage)["config"])
    new = flatten(json.loads(json.dumps(dict(config), default=str)))  # as the file holds it
    for key in sorted(set(saved) | set(new)):
        if saved.get(key) == new.get(key) or key in may_change:
            continue
        if any(p.endswith(".") and key.startswith(p) for p in may_change):
            continue
        raise ConfigError(
            f"cannot change {key} when resuming (the run was started with {saved.get(key)!r}, now "
            f"{new.get(key)!r}); start a new run instead",
            path=Path(run_dir) / RUN_CONFIG_NAME,
            field=key,
        )


def find_resume_checkpoint(run_dir: str | os.PathLike) -> Path:
    """``run_dir/checkpoints/last.ckpt``.

    Raises:
        CheckpointError: there is none.
    """
    path = Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT
    if not path.is_file():
        raise CheckpointError("nothing to resume: no checkpoints/last.ckpt in this run folder", path=run_dir)
    return path


def read_checkpoint_progress(path: str | os.PathLike) -> dict[str, int]:
    """Check that a Lightning checkpoint is complete and readable; return its ``epoch`` and ``global_step``.

    Every member's CRC is verified, then the pickle is read by :func:`mindvis.safeload.load_torch_file`,
    memory-mapped (tensors are not read).

    Raises:
        CheckpointError: missing, empty, truncated or corrupt file, or not a Lightning checkpoint.
    """
    path = Path(path)
    ckpt = load_torch_file(path, mmap=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "epoch" not in ckpt:
        raise CheckpointError("not a Lightning training checkpoint (no state_dict/epoch)", path=path)
    return {"epoch": int(ckpt["epoch"]), "global_step": int(ckpt.get("global_step", 0))}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file, fsynced, and moved into place with ``os.replace``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("storage_options is not supported")
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        path = Path(path)
        remove_stale_temps(path.parent)  # what a killed run left while writing checkpoints
        with atomic_write(path, "wb") as fh:
            fh.write(buf.getbuffer())


__all__ = [
    "BEST_WEIGHTS_DIR",
    "CHECKPOINT_DIR",
    "FINAL_WEIGHTS_DIR",
    "LAST_CHECKPOINT",
    "METRICS_NAME",
    "RUN_CONFIG_NAME",
    "RUN_FORMAT_VERSION",
    "AtomicCheckpointIO",
    "find_resume_checkpoint",
    "read_checkpoint_progress",
    "read_run_config",
    "write_run_config",
]
