"""The whole prior run (``mindvis train-prior``): the VQ, then the UNet on its latents, then the pipeline
folder and the metrics."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch

from mindvis.data.sampler import EpochShuffleSampler
from mindvis.errors import ConfigError, DataError
from mindvis.models.ldm import LDMConfig, build_vq, ldm_preset, vq_decode, vq_encode
from mindvis.pipeline import MindVisPipeline
from mindvis.train.common import TrainerConfig, build_trainer, fit
from mindvis.train.config import UNetTrainConfig, VQTrainConfig
from mindvis.train.prior.corpus import ImageCorpus, ImageLabelDataset
from mindvis.train.prior.evaluate import class_sample_accuracy, evaluate_vq
from mindvis.train.prior.model import (
    build_class_prior,
    sample_class_grid,
    save_prior_pipeline,
    warn_instance_norm,
)
from mindvis.train.prior.unet import ClassPriorModule, LatentLabelDataset, encode_corpus
from mindvis.train.prior.vq import VQAutoencoderModule
from mindvis.train.processes import is_primary_process, seed_everything
from mindvis.train.run_folder import (
    FINAL_WEIGHTS_DIR,
    check_resume_settings,
    find_resume_checkpoint,
    read_checkpoint_progress,
    write_run_config,
)
from mindvis.utils.images import image_grid, images_to_model, model_to_uint8, save_png
from mindvis.utils.io import prepare_output_dir, read_json, write_json

_logger = logging.getLogger(__name__)


@dataclass
class PriorTrainConfig:
    """Everything ``mindvis train-prior`` learns and how long.

    Attributes:
        preset: model sizes (:func:`mindvis.models.ldm.ldm_preset`: ``tiny``, ``small``, ``label2img``).
        resolution: image size; ``None`` takes the preset's. The UNet's latent size follows from it.
        vq_epochs, unet_epochs: training length of each half.
        vq_batch_size, unet_batch_size: batch sizes (per process).
        holdout: fraction of the corpus held out for validation (VQ PSNR/SSIM, UNet validation loss).
        flip: horizontal flips (VQ images; the UNet trains on the latents of both orientations).
        val_every: validation every this many epochs (both halves).
        final_samples_per_class: samples per class drawn at the end to measure class accuracy.
        seed: split and initialisation seed.
        num_workers: data-loader workers.
        vq, unet: the two halves' loss and optimiser settings.
        vq_model, unet_model: overrides of the preset's :class:`~mindvis.models.ldm.VQConfig` /
            :class:`~mindvis.models.ldm.UNetConfig` fields (e.g. ``{"ch": 32}``, ``{"model_channels": 32}``).
    """

    preset: str = "small"
    resolution: int | None = None
    vq_epochs: int = 20
    unet_epochs: int = 60
    vq_batch_size: int = 16
    unet_batch_size: int = 64
    holdout: float = 0.1
    flip: bool = True
    val_every: int = 5
    final_samples_per_class: int = 10
    seed: int = 0
    num_workers: int = 0
    vq: VQTrainConfig = field(default_factory=VQTrainConfig)
    unet: UNetTrainConfig = field(default_factory=UNetTrainConfig)
    vq_model: dict[str, Any] = field(default_factory=dict)
    unet_model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.vq, dict):
            self.vq = VQTrainConfig(**self.vq)
        if isinstance(self.unet, dict):
            self.unet = UNetTrainConfig(**self.unet)
        for name in ("vq_epochs", "unet_epochs", "vq_batch_size", "unet_batch_size", "val_every"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if "epochs" in name else 1)
            ):
                raise ConfigError(f"expected a non-negative integer, got {value!r}", field=name)
        if not 0.0 < self.holdout < 0.5:
            raise ConfigError(f"expected a fraction in (0, 0.5), got {self.holdout}", field="holdout")
        if self.final_samples_per_class < 0:
            raise ConfigError("must be >= 0", field="final_samples_per_class")
        self.ldm_config(2)  # validates preset and resolution

    def ldm_config(self, num_classes: int) -> Any:
        """The :class:`~mindvis.models.ldm.LDMConfig` of the prior (no time conditioning)."""
        base = ldm_preset(self.preset, time_cond=False)
        vq_changes = dict(self.vq_model)
        if self.resolution is not None:
            vq_changes["resolution"] = int(self.resolution)
        unet_changes = {k: v for k, v in self.unet_model.items()}
        if "time_cond" in unet_changes:
            raise ConfigError("the prior has no time conditioning", field="unet_model.time_cond")
        try:
            vq = dataclasses.replace(base.vq, **vq_changes)
            unet_changes.setdefault("sample_size", vq.latent_size)
            unet_changes.setdefault("in_channels", vq.embed_dim)
            unet_changes.setdefault("out_channels", vq.embed_dim)
            unet = dataclasses.replace(base.unet, **unet_changes)
        except TypeError as exc:
            raise ConfigError(f"unknown model field ({exc})", field="vq_model/unet_model") from None
        ldm = LDMConfig(unet=unet, vq=vq)
        warn_instance_norm(ldm)
        return ldm

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Loaders(pl.LightningDataModule):
    """Train and validation loaders of one stage (an epoch order that depends only on seed and epoch)."""

    def __init__(
        self,
        train: torch.utils.data.Dataset,
        val: torch.utils.data.Dataset,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(self.train_set), self.seed),
            num_workers=self.num_workers,
            drop_last=len(self.train_set) > self.batch_size,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )


def _stage_done(stage_dir: Path, epochs: int, weights: Path) -> bool:
    marker = stage_dir / "stage.json"
    if not marker.is_file() or not weights.is_dir():
        return False
    try:
        return int(read_json(marker).get("epochs", -1)) >= epochs
    except Exception:  # noqa: BLE001 - a damaged marker means "not done"
        return False


def _run_stage(
    module: pl.LightningModule,
    data: _Loaders,
    stage_dir: Path,
    trainer_config: Any,
    epochs: int,
    val_every: int,
    monitor: str,
    mode: Literal["min", "max"],
    resume: bool,
    clip_grad: float | None,
    export: bool = True,
) -> pl.Trainer:
    tc = dataclasses.replace(
        trainer_config,
        max_epochs=max(epochs, 1),
        val_every_n_epochs=min(val_every, max(epochs, 1)),
        clip_grad=clip_grad,
    )
    ckpt = None
    resume_step = None
    if resume and (stage_dir / "checkpoints" / "last.ckpt").is_file():
        ckpt = find_resume_checkpoint(stage_dir)
        resume_step = read_checkpoint_progress(ckpt)["global_step"]
        _logger.info("%s: resuming from %s (step %d)", stage_dir.name, ckpt, resume_step)
    stage_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(tc, stage_dir, monitor=monitor, mode=mode, resume_step=resume_step, export=export)
    fit(trainer, module, data, ckpt_path=ckpt, compile=tc.compile)
    if trainer.is_global_zero:
        write_json(stage_dir / "stage.json", {"epochs": epochs, "global_step": int(trainer.global_step)})
    return trainer


def _log_lpips_availability(config: VQTrainConfig) -> None:
    if config.lpips_weights is None and config.perceptual_classifier is None:
        _logger.warning(
            "perceptual loss: off (no local LPIPS backbone weights or perceptual classifier; pass "
            "--lpips-weights FILE or --perceptual-classifier DIR to use one). The VQ trains with pixel, codebook and commitment losses%s.",
            " and the patch-GAN" if config.use_gan else "",
        )


#: Settings a resumed ``train-prior`` run may change: the epochs of each half (to extend it), how it validates
#: and shows samples, and how it is run (``trainer.``: hardware, precision, logging); anything else would mix two
#: trainings in one model.
RESUME_MAY_CHANGE = frozenset(
    {
        "prior.vq_epochs",
        "prior.unet_epochs",
        "prior.val_every",
        "prior.final_samples_per_class",
        "prior.num_workers",
        "prior.unet.sample_every",
        "prior.unet.samples_per_class",
        "prior.unet.sample_steps",
        "prior.unet.sampler",
        "prior.unet.guidance_scale",
        "trainer.",
    }
)


def train_prior(
    corpus: ImageCorpus,
    out_dir: str | os.PathLike,
    config: PriorTrainConfig,
    trainer_config: Any = None,
    classifier: Any = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train the VQ autoencoder, then the class-conditional UNet, and write the prior pipeline folder.

    Layout of ``out_dir``: ``config.json``; ``vq/`` (``metrics.csv``, ``checkpoints/``, ``model/``, ``best/``,
    ``recon_holdout.png``); ``unet/`` (``metrics.csv``, ``checkpoints/``, ``samples/``); ``pipeline/`` (the
    prior, loadable by :class:`mindvis.pipeline.MindVisPipeline`); ``metrics.json``.

    Args:
        corpus: training images at the model resolution.
        out_dir: run folder.
        config: what to train.
        trainer_config: :class:`mindvis.train.common.TrainerConfig` (devices, strategy, precision, logging).
        classifier: optional ``uint8 [N, H, W, 3] -> labels [N]`` over the corpus classes, to score samples.
        resume: continue an interrupted run in ``out_dir`` (finished halves are kept).
        overwrite: allow a non-empty ``out_dir`` without ``resume`` (its contents are replaced stage by stage).

    Returns:
        The metrics written to ``metrics.json``.
    """
    from diffusers import VQModel

    trainer_config = trainer_config or TrainerConfig()
    out_dir = Path(out_dir)
    if resume:
        if not out_dir.is_dir():
            raise ConfigError(
                "nothing to resume: the output folder does not exist", path=out_dir, field="resume"
            )
    elif is_primary_process():
        prepare_output_dir(out_dir, overwrite=overwrite)
        if overwrite:
            import shutil

            for sub in ("vq", "unet", "pipeline"):
                shutil.rmtree(out_dir / sub, ignore_errors=True)
    ldm_cfg = config.ldm_config(corpus.num_classes)
    if corpus.resolution != ldm_cfg.vq.resolution:
        raise ConfigError(
            f"the corpus images are {corpus.resolution} px but the model expects "
            f"{ldm_cfg.vq.resolution} px (load the corpus at that resolution)",
            path=corpus.source,
            field="resolution",
        )
    if corpus.num_classes < 1:
        raise DataError("the corpus has no classes", path=corpus.source)
    seed_everything(config.seed)
    train_set, held = corpus.split(config.holdout, config.seed)
    run_config = {"prior": config.to_dict(), "ldm": ldm_cfg.to_dict(), "trainer": trainer_config.to_dict()}
    if resume:
        check_resume_settings(out_dir, "train-prior", run_config, RESUME_MAY_CHANGE)
    if is_primary_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(
            out_dir,
            "train-prior",
            run_config,
            corpus={
                "source": corpus.source,
                "images": len(corpus.images),
                "classes": corpus.class_names,
                "train": len(train_set.images),
                "holdout": len(held.images),
            },
        )
    metrics: dict[str, Any] = {
        "preset": config.preset,
        "resolution": ldm_cfg.vq.resolution,
        "corpus": {
            "source": corpus.source,
            "train": len(train_set.images),
            "holdout": len(held.images),
            "classes": corpus.num_classes,
        },
    }

    # 1. the VQ autoencoder -------------------------------------------------------------------------------
    vq_dir = out_dir / "vq"
    _log_lpips_availability(config.vq)
    if resume and _stage_done(vq_dir, config.vq_epochs, vq_dir / FINAL_WEIGHTS_DIR):
        _logger.info("VQ: finished earlier, loading %s", vq_dir / FINAL_WEIGHTS_DIR)
        vq = VQModel.from_pretrained(str(vq_dir / FINAL_WEIGHTS_DIR))
    else:
        torch.manual_seed(config.seed)
        vq_module = VQAutoencoderModule(build_vq(ldm_cfg.vq), config.vq)
        data = _Loaders(
            ImageLabelDataset(train_set, flip=config.flip),
            ImageLabelDataset(held),
            config.vq_batch_size,
            config.seed,
            config.num_workers,
        )
        _logger.info(
            "VQ: %d parameters, %d codes, %d training images",
            sum(p.numel() for p in vq_module.vq.parameters()),
            ldm_cfg.vq.n_embed,
            len(train_set.images),
        )
        _run_stage(
            vq_module,
            data,
            vq_dir,
            trainer_config,
            config.vq_epochs,
            config.val_every,
            "val/psnr",
            "max",
            resume,
            clip_grad=None,
        )
        vq = vq_module.vq
    vq = vq.cpu().eval()
    metrics["vq"] = {"holdout": evaluate_vq(vq, held.images, labels=held.labels, classifier=classifier)}
    _logger.info(
        "VQ on %d held-out images: PSNR %.2f dB, SSIM %.3f, perplexity %.1f of %d codes (%d dead)",
        len(held.images),
        metrics["vq"]["holdout"]["psnr"],
        metrics["vq"]["holdout"]["ssim"],
        metrics["vq"]["holdout"]["perplexity"],
        ldm_cfg.vq.n_embed,
        metrics["vq"]["holdout"]["dead_codes"],
    )
    if "class_accuracy_reconstructions" in metrics["vq"]["holdout"]:
        _logger.info(
            "classifier accuracy on the held-out images %.3f, on their VQ reconstructions %.3f (what class "
            "samples through this VQ can be expected to reach)",
            metrics["vq"]["holdout"]["class_accuracy_images"],
            metrics["vq"]["holdout"]["class_accuracy_reconstructions"],
        )
    if is_primary_process():
        with torch.no_grad():
            show = held.images[:8]
            rec = model_to_uint8(vq_decode(vq, vq_encode(vq, images_to_model(show))))
        save_png(vq_dir / "recon_holdout.png", image_grid(np.stack([show, rec]), row_labels=["input", "VQ"]))

    # 2. the class-conditional UNet on frozen latents -------------------------------------------------------
    vq.requires_grad_(False)
    latents = encode_corpus(vq, train_set.images, flip=config.flip)
    lat_labels = torch.as_tensor(np.tile(train_set.labels, 2 if config.flip else 1))
    held_latents = encode_corpus(vq, held.images)
    metrics["latent_std"] = float(latents.std())
    torch.manual_seed(config.seed + 1)
    prior = build_class_prior(ldm_cfg, corpus.num_classes, vq=vq)
    unet_dir = out_dir / "unet"
    module = ClassPriorModule(
        prior, config.unet, corpus.class_names, sample_dir=unet_dir / "samples", classifier=classifier
    )
    if resume and _stage_done(unet_dir, config.unet_epochs, out_dir / "pipeline"):
        _logger.info("UNet: finished earlier, loading %s", out_dir / "pipeline")
        final = MindVisPipeline.from_pretrained(out_dir / "pipeline").model
    else:
        data = _Loaders(
            LatentLabelDataset(latents, lat_labels),
            LatentLabelDataset(held_latents, torch.as_tensor(held.labels)),
            config.unet_batch_size,
            config.seed,
            config.num_workers,
        )
        _logger.info(
            "UNet: %d parameters on %d latents %s",
            sum(p.numel() for p in prior.unet.parameters()),
            len(latents),
            tuple(latents.shape[1:]),
        )
        _run_stage(
            module,
            data,
            unet_dir,
            trainer_config,
            config.unet_epochs,
            config.val_every,
            "val/loss",
            "min",
            resume,
            clip_grad=config.unet.grad_clip,
            export=False,
        )
        final = module.export_model()
    final = final.cpu().eval()

    # 3. the pipeline folder and the report -----------------------------------------------------------------
    if classifier is not None and config.final_samples_per_class > 0:
        metrics["class_samples"] = class_sample_accuracy(
            final,
            classifier,
            corpus.class_names,
            config.final_samples_per_class,
            config.unet.sample_steps,
            config.unet.sampler,
            guidance_scale=config.unet.guidance_scale,
        )
        _logger.info(
            "class-conditional samples: classifier accuracy %.3f (chance %.3f) over %d samples",
            metrics["class_samples"]["accuracy"],
            metrics["class_samples"]["chance"],
            metrics["class_samples"]["samples"],
        )
    if is_primary_process():
        images, _ = sample_class_grid(
            final,
            corpus.num_classes,
            config.unet.samples_per_class,
            config.unet.sample_steps,
            config.unet.sampler,
            seed=0,
            guidance_scale=config.unet.guidance_scale,
        )
        grid = image_grid(
            images.reshape(corpus.num_classes, config.unet.samples_per_class, *images.shape[1:]),
            row_labels=corpus.class_names,
        )
        save_png(out_dir / "samples_per_class.png", grid)
        save_prior_pipeline(final, out_dir / "pipeline", corpus.class_names)  # complete or absent
        write_json(out_dir / "metrics.json", metrics)
        _logger.info("prior pipeline: %s", out_dir / "pipeline")
    return metrics
