"""The Lightning trainer every training stage of MinD-Vis runs with.

* :class:`TrainerConfig`, the trainer part of a stage's configuration (devices, nodes, strategy, precision,
  accumulation, clipping, logging, checkpointing), and :func:`build_trainer`, which turns it into a
  ``lightning.Trainer`` with a progress bar, a CSV log (``metrics.csv`` in the run folder, always), optional
  TensorBoard or Weights & Biases loggers (imported only when asked for), and :class:`ModelCheckpoint`
  writing ``checkpoints/last.ckpt`` plus the best checkpoint through
  :class:`~mindvis.train.run_folder.AtomicCheckpointIO`.
* :func:`fit`, which reports a checkpoint Lightning cannot restore as a :class:`~mindvis.errors.CheckpointError`,
  and :func:`compile_for_training` (``--compile``: in-place ``torch.compile`` of a module's heavy parts).

The rest of a stage's plumbing has its own modules: :mod:`mindvis.train.run_folder` (``config.json`` and the
checkpoints), :mod:`mindvis.train.callbacks` (the loggers, the weight export, the epoch lines),
:mod:`mindvis.train.optim` (parameter groups, learning-rate schedule, AdamW) and
:mod:`mindvis.train.processes` (global rank 0 before the trainer exists, seeding).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from mindvis.errors import CheckpointError, ConfigError
from mindvis.train.callbacks import (
    LOGGER_KINDS,
    CheckpointedMetricsLog,
    EpochSummary,
    ExportPretrained,
    LoggerKind,
    make_loggers,
)
from mindvis.train.run_folder import CHECKPOINT_DIR, LAST_CHECKPOINT, AtomicCheckpointIO

_logger = logging.getLogger(__name__)

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
# Compilation
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------


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
        export: add :class:`~mindvis.train.callbacks.ExportPretrained` (the module needs ``export_pretrained``).
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
    "TrainerConfig",
    "build_trainer",
    "compile_for_training",
    "compiler_missing",
    "fit",
    "parse_devices",
    "resolve_precision",
]
