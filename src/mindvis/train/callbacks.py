"""The loggers and callbacks that :func:`mindvis.train.common.build_trainer` gives every stage.

* :func:`make_loggers`: :class:`CSVMetricsLogger` (``metrics.csv`` in the run folder, never deleted, cut to
  the checkpoint's rows on ``--resume``), plus TensorBoard or Weights & Biases (imported only when asked for).
* :class:`CheckpointedMetricsLog`: keeps ``metrics.csv`` in step with the checkpoints, so that a resumed run's
  log equals an uninterrupted one.
* :class:`ExportPretrained`: our weights format for the final (``model/``) and the best (``best/``) model,
  written by :func:`export_weights`.
* :class:`EpochSummary`: one log line per epoch.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from mindvis.errors import ConfigError
from mindvis.train.processes import is_primary_process
from mindvis.train.run_folder import BEST_WEIGHTS_DIR, FINAL_WEIGHTS_DIR, METRICS_NAME
from mindvis.utils.io import atomic_dir, atomic_write

_logger = logging.getLogger(__name__)

LoggerKind = Literal["csv", "tensorboard", "wandb", "none"]
LOGGER_KINDS: tuple[str, ...] = ("csv", "tensorboard", "wandb", "none")


class CSVMetricsLogger(Logger):
    """Metrics as one CSV file (``metrics.csv``), one row per logging call, columns ``epoch, step, ...``.

    Unlike Lightning's CSVLogger it never deletes an existing file: a resumed run (``resume_step`` given) keeps
    the rows up to the checkpoint's step (rows from after it, lost with the interrupted epoch, are dropped) and
    continues; :class:`CheckpointedMetricsLog` then cuts the file to exactly the rows the checkpoint recorded.
    Every save rewrites the file atomically (the rows are held in memory anyway), so a kill or a full disk
    never leaves a half-written row.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        super().__init__()
        self.path = Path(path)
        self._rows: list[dict[str, Any]] = []
        self._keys: list[str] = []
        self._pending: list[dict[str, Any]] = []
        self._dirty = False
        # the epoch-end row written ahead of a checkpoint (see log_epoch_end_early), until Lightning logs it
        self._early: dict[str, Any] | None = None
        if resume_step is not None and self.path.is_file() and is_primary_process():
            with open(self.path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                self._keys = list(reader.fieldnames or [])
                for row in reader:
                    try:
                        if int(float(row.get("step") or 0)) <= resume_step:
                            self._rows.append(row)
                    except ValueError:
                        continue
            self._write_all()

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @property
    def log_dir(self) -> str:
        return str(self.path.parent)

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    @property
    def rows_written(self) -> int:
        """Rows in the file on disk (pending rows not included)."""
        return len(self._rows)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None  # the run's config.json holds them

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = self._row(metrics, step)
        early = self._early
        if early is not None:
            if _same_row(early, row):
                # Lightning's own epoch-end row, already written ahead of the checkpoint: complete it in place
                self._early = None
                if any(k not in early or not _same_value(early[k], v) for k, v in row.items()):
                    early.update(row)
                    self._dirty = True
                return
            if row["step"] > early["step"]:
                self._early = None
        self._pending.append(row)

    @rank_zero_only
    def log_epoch_end_early(self, metrics: Mapping[str, Any], step: int) -> None:
        """Write now the epoch-end row that Lightning will log after the epoch's checkpoint is saved.

        A run resumed from that checkpoint does not log it again, so it must be on disk before the checkpoint;
        the row that Lightning logs later with the same values is merged into this one instead of added.
        """
        row = self._row(metrics, step)
        if self._early is not None and _same_row(self._early, row):
            return  # a second checkpoint of the same moment (the best one besides last.ckpt)
        self._pending.append(row)
        self.save()
        self._early = row

    def _row(self, metrics: Mapping[str, Any], step: int | None) -> dict[str, Any]:
        row: dict[str, Any] = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        row["step"] = step if step is not None else len(self._rows) + len(self._pending)
        return row

    @rank_zero_only
    def keep_rows(self, count: int) -> None:
        """Cut the log to its first ``count`` rows (those a checkpoint being resumed recorded)."""
        self._early = None
        if 0 <= count < len(self._rows):
            del self._rows[count:]
            self._dirty = True
            self.save()

    @rank_zero_only
    def save(self) -> None:
        if not self._pending and not self._dirty:
            return
        rows, self._pending = self._pending, []
        keys = self._keys
        new_keys = [k for r in rows + (self._rows if self._dirty else []) for k in r if k not in keys]
        if new_keys:
            seen = dict.fromkeys(keys + new_keys)
            fixed = [k for k in ("epoch", "step") if k in seen]
            self._keys = fixed + sorted(k for k in seen if k not in fixed)
        self._rows.extend(rows)
        try:
            self._write_all()
        except BaseException:
            # not on disk: keep the rows pending so that the next save writes them
            del self._rows[len(self._rows) - len(rows) :]
            self._pending[:0] = rows
            self._keys = keys
            self._dirty = True
            raise
        self._dirty = False

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()

    def _write_all(self) -> None:
        with atomic_write(self.path, "w") as fh:
            writer = csv.DictWriter(fh, fieldnames=self._keys)
            writer.writeheader()
            writer.writerows(self._rows)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _same_row(early: Mapping[str, Any], row: Mapping[str, Any]) -> bool:
    """Whether ``row`` is the epoch-end row written early as ``early`` (same epoch, same values; the step may
    differ only if it was predicted wrongly)."""
    return all(k in row and _same_value(v, row[k]) for k, v in early.items() if k != "step")


def _pending_epoch_end_metrics(trainer: pl.Trainer) -> tuple[dict[str, Any], int] | None:
    """The row (metrics, step) that Lightning will log at the end of the epoch being checkpointed now, or
    ``None`` when no such row is still to come (not training, not at the end of an epoch, nothing to log).

    Lightning logs it in ``FitLoop.on_advance_end`` after ``on_train_epoch_end``, where checkpoints are saved,
    with the step ``epoch_loop._batches_that_stepped - 1``; a checkpoint of the end of an epoch (saved in
    ``on_train_epoch_end``, or in ``on_validation_end``/``on_train_batch_end`` of its last batch) restarts in
    the next epoch, so a run resumed from it never logs that row.
    """
    if trainer.state.fn != "fit" or trainer.sanity_checking or not trainer.loggers:
        return None
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    progress = fit_loop.epoch_progress.current
    if progress.completed >= progress.started or not epoch_loop._num_ready_batches_reached():
        return None
    metrics = dict(epoch_loop._results.metrics(False)["log"])
    if not metrics:
        return None
    step = epoch_loop._batches_that_stepped - 1
    if progress.processed < progress.started and not epoch_loop._should_accumulate():
        step += 1  # still inside the last batch, whose step has not been counted yet
    if "step" in metrics:
        step = int(metrics.pop("step"))
    else:
        metrics.setdefault("epoch", trainer.current_epoch)
    return metrics, step


class CheckpointedMetricsLog(Callback):
    """Keep ``metrics.csv`` in step with the checkpoints, so that a resumed run's log equals an uninterrupted one.

    Before a checkpoint is written, every row logged so far is put on disk, with the epoch-end row that
    Lightning logs only after the checkpoint (see :func:`_pending_epoch_end_metrics`), and the checkpoint
    records how many rows the log then holds (``mindvis_metrics_rows``). Resuming cuts the log to those rows.
    """

    CHECKPOINT_KEY = "mindvis_metrics_rows"

    def __init__(self, log: CSVMetricsLogger):
        self.metrics_log = log

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        pending = _pending_epoch_end_metrics(trainer)  # on every rank: synced metrics are computed together
        if pending is not None:
            self.metrics_log.log_epoch_end_early(*pending)
        self.metrics_log.save()
        checkpoint[self.CHECKPOINT_KEY] = self.metrics_log.rows_written

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        count = checkpoint.get(self.CHECKPOINT_KEY)
        if isinstance(count, int) and not isinstance(count, bool):
            self.metrics_log.keep_rows(count)


def make_loggers(
    kind: LoggerKind, run_dir: Path, resume_step: int | None = None, wandb_project: str = "mindvis"
) -> list:
    """The loggers for ``kind``: the CSV logger, plus TensorBoard or W&B when asked (lazily imported).

    Raises:
        ConfigError: the optional package is not installed.
    """
    if kind == "none":
        return []
    loggers: list[Any] = [CSVMetricsLogger(run_dir / METRICS_NAME, resume_step)]
    if kind == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "--logger tensorboard needs the tensorboard package (pip install 'mindvis[tensorboard]')",
                    field="logger",
                ) from None
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    elif kind == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--logger wandb needs the wandb package (pip install 'mindvis[wandb]')", field="logger"
            ) from None
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(project=wandb_project, save_dir=str(run_dir), name=run_dir.name))
    return loggers


class ExportPretrained(Callback):
    """Save our weights format: ``best/`` whenever ``monitor`` improves, ``model/`` at the end of training.

    Runs on global rank 0 only. The LightningModule must have ``export_pretrained(directory)``.
    """

    def __init__(self, run_dir: str | os.PathLike, monitor: str | None, mode: Literal["min", "max"] = "max"):
        self.run_dir = Path(run_dir)
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor is None or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if self._better(value):
            self.best = value
            if trainer.is_global_zero:
                export_weights(pl_module, self.run_dir / BEST_WEIGHTS_DIR)
                _logger.info(
                    "best %s = %.4f at epoch %d: saved %s",
                    self.monitor,
                    value,
                    trainer.current_epoch,
                    self.run_dir / BEST_WEIGHTS_DIR,
                )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exported = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            export_weights(pl_module, self.run_dir / FINAL_WEIGHTS_DIR)
        self._exported = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resuming from the checkpoint of the last epoch (a run stopped after writing it but before the export)
        # skips the training loop and with it on_train_end: export here instead.
        if getattr(self, "_exported", True) or not _training_finished(trainer):
            return
        if trainer.is_global_zero:
            export_weights(pl_module, self.run_dir / FINAL_WEIGHTS_DIR)
            _logger.info("training was already complete in the checkpoint: exported %s", FINAL_WEIGHTS_DIR)
        self._exported = True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")


class EpochSummary(Callback):
    """Log one line per epoch (epoch, steps, the epoch's metrics, seconds), for logs and runs without a bar.
    Validation figures appear only on the epochs that validated, so a line never repeats old ones."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self._validated = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        validated, self._validated = self._validated, False
        if not trainer.is_global_zero:
            return
        shown: dict[str, str] = {}
        for key, value in sorted(trainer.callback_metrics.items()):
            if key.endswith("_step") or getattr(value, "numel", lambda: 1)() != 1:
                continue
            if key.startswith("val/") and not validated:
                continue
            name = key.removesuffix("_epoch")
            if name.startswith("lr-"):  # one learning rate is enough (the groups share the schedule)
                name = "lr"
            shown.setdefault(name, f"{name} {float(value):.4g}")
        _logger.info(
            "epoch %d/%d (step %d, %.1f s): %s",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            trainer.global_step,
            time.perf_counter() - self._t0,
            ", ".join(shown.values()),
        )


def _training_finished(trainer: pl.Trainer) -> bool:
    """Whether the fit loop has reached ``max_epochs`` or ``max_steps``."""
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs:
        return True
    max_steps = trainer.max_steps
    return max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps


def export_weights(pl_module: Any, directory: Path) -> Path:
    """Write ``pl_module.export_pretrained`` into ``directory`` as a whole: built beside it, then swapped in."""
    with atomic_dir(directory, overwrite=True) as tmp:
        pl_module.export_pretrained(tmp)
    return directory


__all__ = [
    "LOGGER_KINDS",
    "CSVMetricsLogger",
    "CheckpointedMetricsLog",
    "EpochSummary",
    "ExportPretrained",
    "LoggerKind",
    "export_weights",
    "make_loggers",
]
