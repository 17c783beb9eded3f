"""Lightning plumbing shared by every training stage of MinD-Vis.

What each stage gets from here:

* :class:`TrainerConfig`, the trainer part of a stage's configuration (devices, nodes, strategy, precision,
  accumulation, clipping, logging, checkpointing), and :func:`build_trainer`, which turns it into a
  ``lightning.Trainer`` with a progress bar, a CSV log (``metrics.csv`` in the run folder, always), optional
  TensorBoard or Weights & Biases loggers (imported only when asked for), and :class:`ModelCheckpoint`
  writing ``checkpoints/last.ckpt`` plus the best checkpoint through :class:`AtomicCheckpointIO`.
* The run folder: :func:`write_run_config` / :func:`read_run_config` (``config.json``, the resolved
  configuration as plain JSON, never a pickle), :func:`find_resume_checkpoint` and
  :func:`read_checkpoint_progress` (``--resume`` refuses a truncated or corrupt checkpoint before anything is
  written), :class:`ExportPretrained` (our weights format for the final and the best model).
* Optimisation helpers used by the original recipes: :func:`param_groups_weight_decay` (no decay on biases,
  norms and other 1-D tensors) and :class:`WarmupCosine` (linear warmup then half-cycle cosine, per
  iteration); :func:`make_adamw` (torch's fused AdamW kernel wherever it applies) and
  :func:`compile_for_training` (``--compile``: in-place ``torch.compile`` of a module's heavy parts).
* Reproducibility: :func:`seed_everything` and :func:`is_primary_process` (global rank 0 before the trainer
  exists, for work such as preparing the output folder); the data loaders of every stage draw their order
  from :class:`mindvis.data.sampler.EpochShuffleSampler`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from mindvis.errors import CheckpointError, ConfigError
from mindvis.safeload import load_torch_file
from mindvis.utils.io import atomic_dir, atomic_write, read_json, remove_stale_temps, write_json
from mindvis.utils.steps import provenance

_logger = logging.getLogger(__name__)

RUN_CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.csv"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
FINAL_WEIGHTS_DIR = "model"
BEST_WEIGHTS_DIR = "best"
RUN_FORMAT_VERSION = 1

LoggerKind = Literal["csv", "tensorboard", "wandb", "none"]
LOGGER_KINDS: tuple[str, ...] = ("csv", "tensorboard", "wandb", "none")
PRECISIONS: tuple[str, ...] = (
    "auto",
    "32-true",
    "32",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "64-true",
    "transformer-engine",
)


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


def parse_devices(value: str | int | Sequence[int]) -> str | int | list[int]:
    """``"auto"``, a count (``"2"``, ``-1`` for all) or a list of device indices (``"0,1"``)."""
    if isinstance(value, bool):
        raise ConfigError(f"expected 'auto', a count or a list like '0,1', got {value!r}", field="devices")
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    text = str(value).strip()
    if text == "auto":
        return "auto"
    try:
        if "," in text:
            return [int(v) for v in text.split(",") if v.strip()]
        return int(text)
    except ValueError:
        raise ConfigError(
            f"expected 'auto', a count or a list like '0,1', got {value!r}", field="devices"
        ) from None


@dataclass
class TrainerConfig:
    """How a stage is run: hardware, precision, logging and checkpointing (not what is learned).

    Args:
        max_epochs: epochs to train.
        accelerator: ``"auto"``, ``"cpu"``, ``"gpu"``/``"cuda"``, ``"mps"``...
        devices: ``"auto"``, a count, or a list of indices (see :func:`parse_devices`).
        num_nodes: machines (each with ``devices`` devices); the output folder must be on a shared filesystem.
        strategy: Lightning strategy: ``"auto"``, ``"ddp"``, ``"ddp_spawn"``, ``"fsdp"``, ``"deepspeed"``...
            With several devices, ``"auto"`` is DDP (gloo on CPUs, NCCL on GPUs).
        precision: ``"auto"`` (bf16 mixed on GPUs that support it, else 16 mixed on GPUs, 32 on CPUs) or a
            Lightning precision (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``...).
        matmul_precision: ``torch.set_float32_matmul_precision`` on GPUs (``"high"`` allows TF32).
        accumulate: gradient accumulation (batches per optimizer step).
        clip_grad: gradient-norm clipping value; ``None`` or 0 disables it.
        val_every_n_epochs: validation frequency (and the checkpoint frequency when validation runs).
        log_every_n_steps: how often step metrics are logged.
        logger: ``"csv"`` (default; ``metrics.csv``), ``"tensorboard"``, ``"wandb"`` (each also writes the CSV)
            or ``"none"`` (no logger at all).
        wandb_project: W&B project name.
        progress_bar: show Lightning's progress bar.
        keep_best: keep the best checkpoint by the monitored metric besides ``last.ckpt``.
        num_sanity_val_steps: validation batches run before training to catch errors early.
        validate_first: run the whole validation once before training starts (new runs only), so that the log
            holds the starting value of every validation metric (at step 0).
        deterministic: ask torch for deterministic algorithms (slower on GPUs).
        compile: ``torch.compile`` the module's heavy parts in place before training (see
            :func:`compile_for_training`); the first steps are slow while the graphs compile.
    """

    max_epochs: int = 1
    accelerator: str = "auto"
    devices: str | int | list[int] = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    matmul_precision: str = "high"
    accumulate: int = 1
    clip_grad: float | None = None
    val_every_n_epochs: int = 1
    log_every_n_steps: int = 50
    logger: LoggerKind = "csv"
    wandb_project: str = "mindvis"
    progress_bar: bool = True
    keep_best: bool = True
    num_sanity_val_steps: int = 0
    validate_first: bool = True
    deterministic: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        self.devices = parse_devices(self.devices)
        for name, minimum in (
            ("max_epochs", 1),
            ("num_nodes", 1),
            ("accumulate", 1),
            ("val_every_n_epochs", 1),
            ("log_every_n_steps", 1),
            ("num_sanity_val_steps", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"expected an integer >= {minimum}, got {value!r}", field=name)
        if self.clip_grad is not None:
            if (
                not isinstance(self.clip_grad, (int, float))
                or not math.isfinite(self.clip_grad)
                or self.clip_grad < 0
            ):
                raise ConfigError(f"expected a number >= 0, got {self.clip_grad!r}", field="clip_grad")
            self.clip_grad = float(self.clip_grad) or None
        if self.logger not in LOGGER_KINDS:
            raise ConfigError(
                f"expected one of {', '.join(LOGGER_KINDS)}, got {self.logger!r}", field="logger"
            )
        if str(self.precision) not in PRECISIONS:
            raise ConfigError(
                f"expected one of {', '.join(PRECISIONS)}, got {self.precision!r}", field="precision"
            )
        self.precision = str(self.precision)
        if self.matmul_precision not in ("highest", "high", "medium"):
            raise ConfigError(
                f"expected highest, high or medium, got {self.matmul_precision!r}", field="matmul_precision"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainerConfig:
        return cls(**_known_fields(cls, data, "trainer"))


def _known_fields(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected an object, got {type(data).__name__}", field=where)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in names)
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}", field=f"{where}.{unknown[0]}")
    return dict(data)


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """Turn ``"auto"`` into a concrete Lightning precision for the hardware that will run."""
    if precision != "auto":
        return "32-true" if precision == "32" else precision

    uses_cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if not uses_cuda:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


# ----------------------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------------------


def is_primary_process() -> bool:
    """True in the process that will be global rank 0 (usable before the trainer is built).

    Reads the launchers' environment: ``RANK`` (torchrun), ``SLURM_PROCID`` when Slurm launched the tasks,
    and otherwise Lightning's own ``NODE_RANK``/``LOCAL_RANK`` (set for the processes it starts).
    """
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        return int(os.environ["SLURM_PROCID"]) == 0
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0)
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return node == 0 and local == 0


def seed_everything(seed: int) -> int:
    """Seed Python, numpy and torch in this process and in data-loader workers (and set ``PL_GLOBAL_SEED``)."""
    return pl.seed_everything(int(seed), workers=True, verbose=False)


# ----------------------------------------------------------------------------------------------------------
# Optimisation helpers
# ----------------------------------------------------------------------------------------------------------


def param_groups_weight_decay(
    module: torch.nn.Module, weight_decay: float, no_decay_names: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Two AdamW parameter groups: no decay for biases, norms and every tensor of at most one dimension, and
    ``weight_decay`` for the rest. Frozen parameters (``requires_grad=False``) are left out.

    The no-decay group comes first, as in the original stage-A optimizer state.
    """
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in no_decay_names:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": float(weight_decay)},
    ]


class WarmupCosine:
    """Learning-rate factor per optimizer step: linear warmup, then half-cycle cosine to ``min_lr``.

    With ``e = step / steps_per_epoch`` (fractional epochs), the learning rate is ``lr * e / warmup`` during
    the warmup and ``min_lr + (lr - min_lr) * (1 + cos(pi * (e - warmup) / (epochs - warmup))) / 2`` after it.
    The factor returned is that value divided by ``lr`` (for ``torch.optim.lr_scheduler.LambdaLR``). A plain
    class, so that its state in a checkpoint is a dict of numbers.
    """

    def __init__(self, lr: float, min_lr: float, warmup_epochs: float, epochs: float, steps_per_epoch: float):
        self.lr = float(lr)
        self.min_lr = float(min_lr)
        self.warmup_epochs = float(warmup_epochs)
        self.epochs = float(epochs)
        self.steps_per_epoch = max(float(steps_per_epoch), 1e-12)

    def lr_at(self, step: int) -> float:
        e = step / self.steps_per_epoch
        if e < self.warmup_epochs:
            return self.lr * e / self.warmup_epochs
        span = max(self.epochs - self.warmup_epochs, 1e-12)
        progress = min(max((e - self.warmup_epochs) / span, 0.0), 1.0)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.lr_at(step) / self.lr if self.lr > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------
# Run folder
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Lightning pieces
# ----------------------------------------------------------------------------------------------------------


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


def make_adamw(params: Any, **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with torch's fused kernel when every parameter allows it (floating point, on a
    CPU or a CUDA device), else the default implementation. Call it after the module is on its device, as
    Lightning's ``configure_optimizers`` is."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, Mapping) else [g])]
    fused = bool(tensors) and all(
        isinstance(p, torch.Tensor) and p.is_floating_point() and p.device.type in ("cpu", "cuda")
        for p in tensors
    )
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def compiler_missing(device_type: str = "cpu") -> str | None:
    """Why ``torch.compile`` cannot build kernels for ``device_type`` here, or ``None`` when it can.

    On a CPU, TorchInductor compiles C++ and needs a compiler (``$CXX``, else ``g++``, ``c++`` or ``clang++``).
    """
    import shutil

    if device_type != "cpu":
        return None
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    if any(shutil.which(n) for n in names):
        return None
    return f"no C++ compiler found ({', '.join(names)}); TorchInductor needs one on a CPU"


def compile_for_training(module: Any, device_type: str = "cpu") -> list[str]:
    """``torch.compile`` the parts of ``module`` named by its ``compile_targets()`` (default: the module), in
    place, so parameter names, checkpoints and exported weights are unchanged.

    Falls back to eager execution with a warning when no compiler is available; a graph that fails to compile
    later runs eagerly too (``torch._dynamo.config.suppress_errors``). Returns the names compiled.
    """
    why = compiler_missing(device_type)
    if why is not None:
        _logger.warning("--compile ignored: %s; training runs eagerly", why)
        return []
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    targets = module.compile_targets() if hasattr(module, "compile_targets") else {"module": module}
    for part in targets.values():
        part.compile()
    _logger.info("torch.compile: %s (the first steps compile the graphs)", ", ".join(targets))
    return list(targets)


def build_trainer(
    config: TrainerConfig,
    run_dir: str | os.PathLike,
    monitor: str | None = None,
    mode: Literal["min", "max"] = "max",
    callbacks: Sequence[Any] = (),
    resume_step: int | None = None,
    enable_checkpointing: bool = True,
    export: bool = True,
) -> pl.Trainer:
    """A ``lightning.Trainer`` for a run folder.

    Args:
        config: hardware, precision, logging and checkpoint settings.
        run_dir: the run folder: ``metrics.csv``, ``checkpoints/`` and (with ``export``) ``model/``, ``best/``.
        monitor: validation metric that picks the best checkpoint (``None``: keep the latest only).
        mode: whether larger (``"max"``) or smaller values of ``monitor`` are better.
        callbacks: more callbacks.
        resume_step: global step of the checkpoint being resumed (the CSV log is cut there).
        enable_checkpointing: write Lightning checkpoints.
        export: add :func:`make_export_callback` (the module needs ``export_pretrained``).
    """
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar

    run_dir = Path(run_dir)
    precision = resolve_precision(config.precision, config.accelerator)
    if torch.cuda.is_available() and config.accelerator in ("auto", "gpu", "cuda"):
        torch.set_float32_matmul_precision(config.matmul_precision)
    cbs: list[Any] = list(callbacks)
    if enable_checkpointing:
        # ``last.ckpt`` after every epoch (Lightning's save_last only refreshes it when a top-k file is written)
        cbs.append(
            ModelCheckpoint(
                dirpath=str(run_dir / CHECKPOINT_DIR),
                filename=Path(LAST_CHECKPOINT).stem,
                monitor=None,
                save_top_k=1,
                every_n_epochs=1,
                enable_version_counter=False,
            )
        )
        if monitor and config.keep_best:
            cbs.append(
                ModelCheckpoint(
                    dirpath=str(run_dir / CHECKPOINT_DIR),
                    filename="best-epoch{epoch:04d}",
                    auto_insert_metric_name=False,
                    monitor=monitor,
                    mode=mode,
                    save_top_k=1,
                    every_n_epochs=1,
                )
            )
    if export:
        cbs.append(ExportPretrained(run_dir, monitor, mode))
    loggers = make_loggers(config.logger, run_dir, resume_step, config.wandb_project)
    if loggers:
        cbs.append(LearningRateMonitor(logging_interval="step"))
        if enable_checkpointing:
            cbs.append(CheckpointedMetricsLog(loggers[0]))
    cbs.append(EpochSummary())
    if config.progress_bar:
        cbs.append(TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 20))
    return pl.Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=precision,
        max_epochs=config.max_epochs,
        accumulate_grad_batches=config.accumulate,
        gradient_clip_val=config.clip_grad,
        gradient_clip_algorithm="norm",
        check_val_every_n_epoch=config.val_every_n_epochs,
        log_every_n_steps=config.log_every_n_steps,
        logger=loggers if loggers else False,
        callbacks=cbs,
        enable_checkpointing=enable_checkpointing,
        enable_progress_bar=config.progress_bar,
        num_sanity_val_steps=config.num_sanity_val_steps,
        deterministic=config.deterministic,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=True,
    )


def fit(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: Any,
    ckpt_path: str | os.PathLike | None = None,
    compile: bool = False,
) -> None:
    """``trainer.fit`` that reports a checkpoint Lightning cannot restore as a :class:`CheckpointError`.

    ``compile``: :func:`compile_for_training` first, for the device the trainer runs on.

    Two Lightning warnings a user cannot act on are silenced: frozen parts (the VQ autoencoder, a frozen
    encoder) are kept in eval mode on purpose, and a deprecation inside Lightning's own pytree helper.
    """
    if compile:
        compile_for_training(
            module, "cpu" if type(trainer.accelerator).__name__ == "CPUAccelerator" else "cuda"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r".*module\(s\) in eval mode at the start of training.*"
            )
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
            trainer.fit(
                module, datamodule=datamodule, ckpt_path=None if ckpt_path is None else str(ckpt_path)
            )
    except (RuntimeError, KeyError) as exc:
        text = str(exc)
        if (
            ckpt_path is not None
            and ("state_dict" in text or "checkpoint" in text.lower())
            and trainer.global_step == 0
        ):
            first = (text.strip().splitlines() or ["no detail"])[0][:200]
            raise CheckpointError(f"cannot resume from this checkpoint ({first})", path=ckpt_path) from None
        raise


__all__ = [
    "BEST_WEIGHTS_DIR",
    "CHECKPOINT_DIR",
    "FINAL_WEIGHTS_DIR",
    "LAST_CHECKPOINT",
    "LOGGER_KINDS",
    "METRICS_NAME",
    "RUN_CONFIG_NAME",
    "TrainerConfig",
    "WarmupCosine",
    "build_trainer",
    "compile_for_training",
    "compiler_missing",
    "export_weights",
    "find_resume_checkpoint",
    "fit",
    "is_primary_process",
    "AtomicCheckpointIO",
    "CSVMetricsLogger",
    "CheckpointedMetricsLog",
    "EpochSummary",
    "ExportPretrained",
    "make_adamw",
    "make_loggers",
    "param_groups_weight_decay",
    "parse_devices",
    "read_checkpoint_progress",
    "read_run_config",
    "resolve_precision",
    "seed_everything",
    "write_run_config",
]
