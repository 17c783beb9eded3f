"""The whole prior run (``mindvis train-prior``): the VQ, then the UNet on its latents, then the pipeline
folder and the metrics."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch

from mindvis.data.sampler import EpochShuffleSampler
from mindvis.errors import ConfigError, DataError
from mindvis.eval.classifier import load_benchmark_classifier
from mindvis.models.ldm import build_vq, vq_decode, vq_encode
from mindvis.pipeline import MindVisPipeline
from mindvis.train.common import TrainerConfig, build_trainer, fit
from mindvis.train.config import PRIOR_TRAINER, PriorTrainConfig, VQTrainConfig
from mindvis.train.prior.corpus import ImageCorpus, ImageLabelDataset, load_image_corpus
from mindvis.train.prior.evaluate import class_sample_accuracy, classifier_callable, evaluate_vq
from mindvis.train.prior.model import (
    build_class_prior,
    sample_class_grid,
    save_prior_pipeline,
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
from mindvis.utils.io import check_output_apart, prepare_output_dir, read_json, write_json

_logger = logging.getLogger(__name__)


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


def resolve_corpus_path(path: str | os.PathLike) -> Path:
    """A corpus file or image folder; a simulator output folder means its ``stimuli/corpus.npz``."""
    path = Path(path)
    if path.is_dir() and (path / "stimuli" / "corpus.npz").is_file():
        return path / "stimuli" / "corpus.npz"
    return path


def run_train_prior(
    config: PriorTrainConfig,
    corpus: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    classifier: str | os.PathLike | None = None,
    resize_mixed: bool = False,
    trainer_config: TrainerConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """The image prior from a corpus on disk, as ``mindvis train-prior`` trains it: :func:`train_prior` on the
    images of ``corpus`` (a corpus ``.npz``, an image folder with one sub-folder per class, or a simulator output
    folder), scored by the benchmark classifier in folder ``classifier`` when one is given.

    Args:
        resize_mixed: centre-crop and resize images of mixed sizes (otherwise they are an error).
        trainer_config: hardware, precision and logging (default: :data:`~mindvis.train.config.PRIOR_TRAINER`).

    Returns:
        The metrics written to ``metrics.json``.
    """

    inputs = {
        "--corpus": corpus,
        "--lpips-weights": config.vq.lpips_weights,
        "--perceptual-classifier": config.vq.perceptual_classifier,
        "--classifier": classifier,
    }
    check_output_apart(out_dir, {k: None if v is None else Path(v) for k, v in inputs.items()})
    images = load_image_corpus(
        resolve_corpus_path(corpus), config.ldm_config(2).vq.resolution, resize_mixed=resize_mixed
    )
    clf = load_benchmark_classifier(classifier)
    judge = None if clf is None else classifier_callable(clf, images.class_names)
    return train_prior(
        images,
        out_dir,
        config,
        trainer_config or TrainerConfig(**PRIOR_TRAINER),
        classifier=judge,
        resume=resume,
        overwrite=overwrite,
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
