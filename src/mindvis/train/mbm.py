"""Lightning training of sparse-coded masked brain modeling (MinD-Vis stage A, Chen et al., CVPR 2023).

Stage A1 (``mindvis pretrain``) trains a :class:`~mindvis.models.mbm.MaskedBrainModel` from scratch on a large
unlabeled set (HCP resting state plus GOD); stage A2 (``mindvis finetune``) continues with the same objective
on the target subject's fMRI. The recipe is the original's (MAE's), every value an option:

* AdamW, betas (0.9, 0.95), weight decay 0.05 except on biases, norms and other 1-D tensors; the learning rate
  is not scaled by the batch size (A1 2.5e-4, A2 5.3e-5);
* per-iteration schedule: linear warmup, then half-cycle cosine to ``min_lr`` (0); A1 500 epochs with 40 of
  warmup, A2 15 epochs with 2 of warmup;
* gradient-norm clipping at 0.8, mask ratio 0.75, batch 100 (A1) / 16 (A2) per device;
* mixed precision on GPUs (bf16 where supported).

Stage A2's data are, by default, the original's (``stageA2_mbm_finetune.py``): the target subject's *test* fMRI
only, the averaged rows and the single trials (``include_nonavg_test=True``), never its training fMRI; the test
rows normalised as the original does (with the mean and std of the already normalised training fMRI, about 0
and 1, so nearly as stored); and validation on rows it also trains on, since the original reports the
correlation on the data it tunes on (so ``val/corr`` is the fit to the tuning data, not generalisation, and
``best/`` is the best fit). Ours, ``god_fmri="train"`` (``mindvis finetune --a2-data train``), tunes on the
training fMRI with 5 % held out for validation and keeps the test fMRI unseen until evaluation.

Masking noise is a hash of ``(seed, epoch, sample index)`` (:func:`mindvis.data.mask_noise.masking_noise`,
which :class:`~mindvis.data.pretrain_loader.MBMDataModule` adds to every batch), not a draw from a global
generator, so that a resumed run and a run on several DDP processes mask every sample exactly as one
uninterrupted process does. Validation masks each held-out sample the same way in every epoch and logs the
masked-patch reconstruction loss and the Pearson correlation between predicted and true voxels of the masked
patches (``val/corr``, averaged over samples; ``val/corr_all`` is the same over all patches, which is what
the original prints).

A run's settings are :class:`~mindvis.train.mbm_config.MBMTrainConfig` (importable from here too);
:mod:`mindvis.train.stage_a` runs a stage from the settings the commands take.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from mindvis.data.corpus import CORPUS_INDEX, VoxelCorpus, build_corpus
from mindvis.data.corpus_plan import common_length, plan_sources
from mindvis.data.encoder_input import PREPROCESSING_NAME
from mindvis.data.padding import choose_pad_mode, is_original_checkpoint
from mindvis.data.pretrain_config import MBMDataConfig
from mindvis.data.pretrain_loader import MBMDataModule, split_rows
from mindvis.errors import CheckpointError, ConfigError
from mindvis.models.mbm import MaskedBrainModel, MBMConfig, load_mbm
from mindvis.train.common import build_trainer, fit
from mindvis.train.mbm_config import (
    GOD_FMRI_LINKED,
    STAGE_DATA_DEFAULTS,
    STAGE_DEFAULTS,
    MBMTrainConfig,
    Stage,
    model_config_for,
    stage_data_settings,
)
from mindvis.train.optim import WarmupCosine, make_adamw, param_groups_weight_decay
from mindvis.train.processes import is_primary_process, seed_everything
from mindvis.train.run_folder import (
    FINAL_WEIGHTS_DIR,
    find_resume_checkpoint,
    read_checkpoint_progress,
    read_run_config,
    write_run_config,
)
from mindvis.utils.io import atomic_dir, read_json, write_json

_logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Masking noise and metrics
# ----------------------------------------------------------------------------------------------------------


def masked_pearson(pred: Tensor, target: Tensor, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Per-sample Pearson correlation between predicted and true voxels of the selected patches.

    Args:
        pred: ``[N, L, p]`` predicted voxels.
        target: ``[N, L, p]`` true voxels.
        mask: ``[N, L]``, 1 selects a patch (the removed ones); ``None`` selects all.

    Returns:
        ``[N]`` float32 correlations (0 where a side has no variance).
    """
    pred = pred.float()
    target = target.float()
    w = torch.ones(pred.shape[:2], device=pred.device) if mask is None else mask.float()
    w = w.unsqueeze(-1).expand_as(pred)
    n = w.sum(dim=(1, 2)).clamp_min(1.0)
    mp = (pred * w).sum(dim=(1, 2)) / n
    mt = (target * w).sum(dim=(1, 2)) / n
    dp = (pred - mp[:, None, None]) * w
    dt = (target - mt[:, None, None]) * w
    cov = (dp * dt).sum(dim=(1, 2))
    var = (dp * dp).sum(dim=(1, 2)) * (dt * dt).sum(dim=(1, 2))
    return torch.where(var > eps, cov / var.clamp_min(eps).sqrt(), torch.zeros_like(cov))


# ----------------------------------------------------------------------------------------------------------
# LightningModule
# ----------------------------------------------------------------------------------------------------------


class MBMModule(pl.LightningModule):
    """Masked brain modeling as a LightningModule (stages A1 and A2).

    Args:
        config: the run configuration (:class:`MBMTrainConfig` or its dict).
        model_config: the model's :class:`~mindvis.models.mbm.MBMConfig` (or its dict).

    Batches are dicts ``{"fmri": [B, V], "index": [B], "noise": [B, L]}``; without ``noise`` the model draws
    its own masks from torch's generator. :class:`~mindvis.data.pretrain_loader.MBMDataModule` adds the noise
    of :func:`~mindvis.data.mask_noise.masking_noise` on the host before each batch moves to the device.
    """

    def __init__(
        self, config: MBMTrainConfig | Mapping[str, Any], model_config: MBMConfig | Mapping[str, Any]
    ):
        super().__init__()
        cfg = config if isinstance(config, MBMTrainConfig) else MBMTrainConfig.from_dict(config)
        mcfg = model_config if isinstance(model_config, MBMConfig) else MBMConfig.from_dict(model_config)
        self.save_hyperparameters({"config": cfg.to_dict(), "model_config": mcfg.to_dict()})
        self.config = cfg
        self.model = MaskedBrainModel(mcfg)

    # -- steps -----------------------------------------------------------------------------------------------

    def forward(self, fmri: Tensor, noise: Tensor | None = None):
        return self.model(fmri, mask_ratio=self.config.mask_ratio, noise=noise)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self(batch["fmri"], batch.get("noise"))
        self.log(
            "train/loss", out.loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["fmri"])
        )
        return out.loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x = batch["fmri"]
        out = self(x, batch.get("noise"))
        target = self.model.patchify(x)
        corr = masked_pearson(out.pred, target, out.mask)
        corr_all = masked_pearson(out.pred, target, None)
        n = len(x)
        self.log("val/loss", out.loss, on_epoch=True, sync_dist=True, batch_size=n)
        self.log("val/corr", corr.mean(), on_epoch=True, sync_dist=True, prog_bar=True, batch_size=n)
        self.log("val/corr_all", corr_all.mean(), on_epoch=True, sync_dist=True, batch_size=n)

    def compile_targets(self) -> dict[str, torch.nn.Module]:
        """What ``--compile`` compiles: the whole masked brain model."""
        return {"model": self.model}

    # -- optimisation ----------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.config
        groups = param_groups_weight_decay(self.model, cfg.weight_decay)
        optimizer = make_adamw(groups, lr=cfg.lr, betas=cfg.betas)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        steps_per_epoch = total / max(self.trainer.max_epochs or cfg.epochs, 1)
        schedule = WarmupCosine(
            cfg.lr, cfg.min_lr, float(cfg.warmup_epochs or 0), cfg.epochs, steps_per_epoch
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # -- export ----------------------------------------------------------------------------------------------

    def export_pretrained(self, directory: str | os.PathLike) -> Path:
        """Our weights format (``config.json`` + ``model.safetensors``) of the masked brain model."""
        return self.model.save_pretrained(directory)


# ----------------------------------------------------------------------------------------------------------
# Running a stage
# ----------------------------------------------------------------------------------------------------------


def make_datamodule(config: MBMTrainConfig, corpus_dir: str | os.PathLike, num_patches: int) -> MBMDataModule:
    """The data module of a run over a built corpus folder (adding the masking noise of ``num_patches``)."""
    assert config.data is not None
    d = config.data
    return MBMDataModule(
        corpus_dir,
        batch_size=config.batch_size,
        val_fraction=d.val_fraction,
        val_max=d.val_max,
        aug_times=d.aug_times,
        mix_ratio=d.mix_ratio,
        seed=config.seed,
        num_workers=config.num_workers,
        num_patches=num_patches,
        val_holdout=d.val_holdout,
    )


def wait_for_file(path: Path, timeout_s: float = 3600.0, poll_s: float = 2.0) -> None:
    """Wait until ``path`` exists (processes other than rank 0 wait for the data rank 0 prepares)."""
    start = time.monotonic()
    while not path.exists():
        if time.monotonic() - start > timeout_s:
            raise ConfigError(
                f"waited {timeout_s:.0f} s for {path} (written by rank 0); is the output folder on a shared filesystem?",
                path=path,
            )
        time.sleep(poll_s)


DATA_DIR = "data"


@dataclass
class MBMRunResult:
    """What a finished (or stopped) stage-A run reports.

    Attributes:
        run_dir: the run folder.
        epochs_done: epochs completed (counting those before a resume).
        global_step: optimizer steps done.
        best_val_corr: best validation masked-patch correlation, if validation ran.
        initial_val_corr: the same before training (new runs with ``trainer.validate_first``).
        metrics: the last logged values of every metric.
        num_samples: corpus samples; num_voxels: voxels per sample.
        seconds: wall time of this invocation's training.
        val_on_training: the validation samples are also trained on (``val_holdout=False``, the original
            stage A2's way), so the correlations measure the fit to the tuning data.
    """

    run_dir: Path
    epochs_done: int
    global_step: int
    best_val_corr: float | None
    initial_val_corr: float | None
    metrics: dict[str, float]
    num_samples: int
    num_voxels: int
    seconds: float
    val_on_training: bool = False


def load_init_model(path: str | os.PathLike) -> MaskedBrainModel:
    """The pretrained model that finetuning starts from: a run folder (its ``model/``), a saved model folder,
    or an original stage-A ``.pth`` file.

    Raises:
        CheckpointError: missing, truncated, corrupt or refused files.
    """
    p = Path(path)
    if (p / FINAL_WEIGHTS_DIR / "model.safetensors").is_file() or (
        p / FINAL_WEIGHTS_DIR / "config.json"
    ).is_file():
        p = p / FINAL_WEIGHTS_DIR
    elif p.is_dir() and not (p / "config.json").is_file():
        raise CheckpointError(
            "not a model folder (no config.json + model.safetensors) nor a run folder (no model/)", path=p
        )
    try:
        return load_mbm(p)
    except ConfigError as exc:
        raise CheckpointError(exc.detail, path=exc.path or p, field=exc.field) from None


def init_is_original(path: str | os.PathLike) -> bool:
    """Whether the ``--init`` model is an original MinD-Vis checkpoint: a ``.pth`` file, or a folder converted
    from one (its ``source.json`` says so)."""
    p = Path(path)
    if p.is_file():
        return True
    for folder in (p, p / FINAL_WEIGHTS_DIR):
        if (folder / "source.json").is_file():
            try:
                return is_original_checkpoint(read_json(folder / "source.json"))
            except (ConfigError, OSError, ValueError):
                return False
    return False


def init_pad_modes(path: str | os.PathLike) -> dict[str, str] | None:
    """The pad modes recorded by the mindvis run the ``--init`` model comes from (its ``preprocessing.json``),
    by subject name (``"god/sbj_1"``; ``""`` for a finetuning run's single preprocessing), or ``None`` when
    ``path`` is not a run folder."""
    f = Path(path) / PREPROCESSING_NAME
    if not f.is_file():
        return None
    try:
        doc = read_json(f)
        if isinstance(doc, Mapping) and isinstance(doc.get("subjects"), Mapping):
            return {str(k): str(v["params"]["pad_mode"]) for k, v in doc["subjects"].items()}
        return {"": str(doc["params"]["pad_mode"])}
    except (ConfigError, OSError, ValueError, KeyError, TypeError):
        return None


def resolve_pad_mode(
    data: MBMDataConfig,
    plans: Sequence[Any],
    init_model: MaskedBrainModel | None,
    original: bool,
    recorded: Mapping[str, str] | None = None,
) -> str:
    """The concrete pad mode of ``data.pad_mode="auto"`` (other values are returned as they are).

    With a pretrained model: ``"original"`` when it comes from an original checkpoint (``original``); else
    the mode its own mindvis run recorded for the subjects (``recorded``, :func:`init_pad_modes`: a subject of
    that run, or the mode all its subjects share); else, for a model of unknown origin, ``"original"`` when its
    voxel count is the original padding rule's for every subject and not ours
    (:func:`~mindvis.data.padding.choose_pad_mode`). ``"wrap"`` otherwise and without a model.
    """
    if data.pad_mode != "auto":
        return data.pad_mode
    if init_model is None or not plans:
        return "wrap"
    n = init_model.config.num_voxels
    why = "the pretrained model is an original checkpoint"
    if original:
        mode = "original"
    elif recorded:
        names = [p.name for p in plans]
        known = {recorded[k] for k in names if k in recorded} or (
            set(recorded.values()) if len(set(recorded.values())) == 1 else {"wrap"}
        )
        mode = known.pop() if len(known) == 1 else "wrap"
        why = "as the run the pretrained model comes from"
    else:
        modes = {choose_pad_mode(p.voxels, data.patch_size, n, False) for p in plans}
        mode = "original" if modes == {"original"} else "wrap"
        why = f"the pretrained model's {n} voxels are the original padding rule's count"
    if mode == "original":
        _logger.info(
            "pad mode 'original' (%s): %s voxels padded by p - V %% p, statistics fitted after padding",
            why,
            "/".join(str(p.voxels) for p in plans),
        )
    return mode


def run_mbm_stage(
    config: MBMTrainConfig,
    run_dir: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: Sequence[Any] = (),
) -> MBMRunResult:
    """Prepare the data and run folder, then train (stage A1 or A2).

    The run folder gets: ``config.json`` (the resolved configuration), ``preprocessing.json`` (the fitted
    preprocessing: every subject's for pretraining, the target subject's for finetuning), ``data/`` (the
    memory-mapped corpus), ``checkpoints/`` (Lightning: ``last.ckpt`` and the best), ``metrics.csv``,
    ``model/`` (final weights, our format) and ``best/`` (best validation correlation).

    Every input is checked (files, keys, NaN/Inf, voxel counts, the ``--init`` and ``--resume`` checkpoints)
    before anything in ``run_dir`` is created or replaced. Processes other than global rank 0 (DDP) only
    wait for the prepared data and train.

    Args:
        config: the resolved run configuration.
        run_dir: the run folder.
        resume: continue from ``run_dir/checkpoints/last.ckpt``.
        overwrite: replace a non-empty ``run_dir`` (only once the new data is ready).
        callbacks: extra Lightning callbacks.

    Raises:
        MindVisError subclasses for bad input, existing output, or unreadable checkpoints.
    """
    run_dir = Path(run_dir)
    primary = is_primary_process()
    data = config.data
    assert data is not None
    ckpt_path, resume_step, saved_model = None, None, None
    if resume:
        ckpt_path = find_resume_checkpoint(run_dir)
        resume_step = read_checkpoint_progress(ckpt_path)["global_step"]
        # the architecture comes from the run itself (the --init folder is not needed any more)
        saved = read_run_config(run_dir, config.stage).get("model")
        if isinstance(saved, dict):
            saved_model = dataclasses.replace(
                MBMConfig.from_dict(saved, source=run_dir / "config.json"), mask_ratio=config.mask_ratio
            )
    init_model = None
    if config.stage == "finetune" and saved_model is None:
        init_model = load_init_model(config.init)  # type: ignore[arg-type]
        if data.patch_size != init_model.config.patch_size:
            data.patch_size = init_model.config.patch_size
        if data.length is not None and data.length != init_model.config.num_voxels:
            raise ConfigError(
                f"length {data.length} differs from the pretrained model's {init_model.config.num_voxels} voxels",
                field="length",
            )
    data_dir = run_dir / DATA_DIR

    plans = None
    if data.pad_mode == "auto":  # resolved before the configuration is written (and in every process)
        plans = plan_sources(data) if init_model is not None else []
        original = init_model is not None and init_is_original(config.init)  # type: ignore[arg-type]
        recorded = init_pad_modes(config.init) if init_model is not None else None  # type: ignore[arg-type]
        data.pad_mode = resolve_pad_mode(data, plans, init_model, original, recorded)
    if primary:
        plans = plans or plan_sources(data)
        if saved_model is not None:
            length = saved_model.num_voxels
        elif init_model is not None:
            length = init_model.config.num_voxels
        else:
            length = common_length(plans, data)

        def write_meta(folder: Path, corpus: VoxelCorpus) -> None:
            mcfg = saved_model or _model_config(config, init_model, corpus.num_voxels)
            write_run_config(
                folder,
                config.stage,
                config.to_dict(),
                model=mcfg.to_dict(),
                data_summary={
                    "samples": corpus.num_samples,
                    "voxels": corpus.num_voxels,
                    "subjects": [b.name for b in corpus.blocks],
                },
            )
            if config.stage == "finetune":
                write_json(folder / PREPROCESSING_NAME, next(iter(corpus.preprocessors.values())).to_dict())
            else:
                write_json(folder / PREPROCESSING_NAME, corpus.preprocessing_bundle())

        if resume:
            corpus = build_corpus(data, data_dir, plans, length, reuse=True)
            write_meta(run_dir, corpus)
        else:
            with atomic_dir(run_dir, overwrite=overwrite) as tmp:
                corpus = build_corpus(data, tmp / DATA_DIR, plans, length, reuse=False)
                write_meta(tmp, corpus)
    else:
        wait_for_file(data_dir / CORPUS_INDEX)
    corpus = VoxelCorpus.open(data_dir)
    model_config = saved_model or _model_config(config, init_model, corpus.num_voxels)
    _logger.info(
        "%s: %d samples x %d voxels (%d patches), model %s",
        config.stage,
        corpus.num_samples,
        corpus.num_voxels,
        model_config.num_patches,
        {k: getattr(model_config, k) for k in ("embed_dim", "depth", "decoder_embed_dim", "decoder_depth")},
    )
    seed_everything(config.seed)
    module = MBMModule(config, model_config)
    if init_model is not None and ckpt_path is None:
        module.model.load_state_dict(init_model.state_dict(), strict=True)
    has_val = len(split_rows(corpus, data.val_fraction, data.val_max, config.seed, data.val_holdout)[1]) > 0
    trainer = build_trainer(
        config.trainer,
        run_dir,
        monitor="val/corr" if has_val else None,
        mode="max",
        callbacks=callbacks,
        resume_step=resume_step,
    )
    datamodule = make_datamodule(config, data_dir, model_config.num_patches)
    t0 = time.perf_counter()
    initial = None
    if has_val and ckpt_path is None and config.trainer.validate_first:
        initial = trainer.validate(module, datamodule=datamodule, verbose=False)[0].get("val/corr")
        _logger.info("validation before training: val/corr %.4f", initial)
    fit(trainer, module, datamodule, ckpt_path, compile=config.trainer.compile)
    seconds = time.perf_counter() - t0
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1
    }
    best = None
    for cb in trainer.callbacks:
        if type(cb).__name__ == "ExportPretrained" and cb.best is not None:
            best = float(cb.best)
    return MBMRunResult(
        run_dir=run_dir,
        epochs_done=int(trainer.current_epoch),
        global_step=int(trainer.global_step),
        best_val_corr=best,
        initial_val_corr=None if initial is None else float(initial),
        metrics=metrics,
        num_samples=corpus.num_samples,
        num_voxels=corpus.num_voxels,
        seconds=seconds,
        val_on_training=not data.val_holdout,
    )


def _model_config(config: MBMTrainConfig, init_model: MaskedBrainModel | None, num_voxels: int) -> MBMConfig:
    if init_model is None:
        return model_config_for(config, num_voxels)
    return dataclasses.replace(init_model.config, mask_ratio=config.mask_ratio)


__all__ = [
    "Stage",
    "MBMModule",
    "MBMRunResult",
    "load_init_model",
    "run_mbm_stage",
    "MBMTrainConfig",
    "GOD_FMRI_LINKED",
    "STAGE_DATA_DEFAULTS",
    "STAGE_DEFAULTS",
    "init_is_original",
    "init_pad_modes",
    "resolve_pad_mode",
    "stage_data_settings",
    "make_datamodule",
    "masked_pearson",
    "model_config_for",
    "wait_for_file",
]
