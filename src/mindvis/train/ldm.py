"""MinD-Vis stage B: finetuning the double-conditioned latent diffusion model on fMRI-image pairs.

Chen et al. (CVPR 2023) start from a class-conditional latent diffusion prior (the CompVis label2img model; here
also a prior trained by ``mindvis train-prior``), replace its class embedding by the fMRI encoder of stage A and
the double conditioner (cross-attention context + time-embedding vector), and train with the epsilon loss of
latent diffusion on (fMRI, image) pairs.

What is trained (``trainable``):

* ``original`` (default): what the original optimises: the fMRI encoder, the conditioner (channel/dim mappers and
  the time-conditioning layers) and, in the UNet, every cross-attention block (``attn2``) with the LayerNorm in
  front of it (``norm2``). Everything else has ``requires_grad=False``, so no weight gradient is computed for
  it. (The original unfreezes the whole model and hands a subset to the optimiser, computing gradients for all
  UNet weights on every step and discarding them.)
* ``cond-only``: the fMRI encoder and the conditioner.
* ``full``: the whole UNet as well (the autoencoder always stays frozen).

The original's settings are the defaults: AdamW, lr 5.3e-5, batch 5 (GOD; 25 for BOLD5000), 500 epochs, gradient
clipping 0.5, float32, no sparse voxel dropout (the original's dropout is a no-op, see
:mod:`mindvis.data.paired`), validation every 5 epochs on the original's schedule.

Validation (``val_schedule``):

* ``original`` (default): as the original. A *quick pass* generates ``quick_samples`` (3) images for each of the
  first ``quick_items`` (5) test items and logs its figures as ``val/quick/<key>``. When its top-1 (see
  :func:`full_pass_trigger`) exceeds ``full_val_threshold`` (0.15), a *full pass* follows: ``num_samples`` (5)
  images for every validation item, logged as ``val/<key>``. Every ``full_val_every``-th (15th) validation is a
  full pass without the quick one. Not in the original: the first validation of each ``fit`` (a new or resumed
  run) and the last one of the run are full passes too, so that the best checkpoint always has a figure to
  compare and the final metrics are full ones (the original generates the whole test set after training).
* ``full`` (ours): every validation is a full pass, about 16 times the quick pass's compute at the defaults.

In both schedules ``val/<key>`` are only ever full-pass figures (the same items, samples and seeds each time),
and the best checkpoint (``monitor``, a ``val/`` figure) is chosen among them, as the original keeps its best
checkpoint by the full passes only; ``val/loss`` (the denoising loss of every validation item at fixed timesteps
and noise) is logged at every validation. Every metric of :func:`mindvis.eval.suite.evaluate_reconstructions`
that is available is logged.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from mindvis.data.dataset import FMRIDataset
from mindvis.data.formats.registry import list_subjects
from mindvis.data.paired import PairedFMRIDataset, sparse_voxel_dropout
from mindvis.data.preprocess import PREPROCESSING_NAME, find_preprocessing, load_preprocessor, prepare_voxels
from mindvis.data.sampler import EpochShuffleSampler
from mindvis.errors import CheckpointError, ConfigError, DataError
from mindvis.eval.suite import evaluate_reconstructions
from mindvis.models.conditioning import ClassEmbedder, Conditioning
from mindvis.models.ldm import DCLDM, LDMConfig, build_unet, prior_class_table
from mindvis.models.mbm import FMRIEncoder, MaskedBrainModel
from mindvis.pipeline import MindVisPipeline
from mindvis.train.common import TrainerConfig, build_trainer, fit
from mindvis.train.config import (
    QUICK_PREFIX,
    StageBConfig,
)
from mindvis.train.mbm import load_init_model
from mindvis.train.optim import make_adamw
from mindvis.train.processes import is_primary_process, seed_everything
from mindvis.train.run_folder import find_resume_checkpoint, read_checkpoint_progress, write_run_config
from mindvis.utils.images import image_grid, save_png
from mindvis.utils.io import prepare_output_dir, write_json

_logger = logging.getLogger(__name__)

#: What `mindvis reconstruct` reads from a model folder.
PIPELINE_PREPROCESS_NAME = "preprocess.json"
SAMPLES_DIR = "samples"
#: The context warm start's record in a stage B run folder.
ALIGN_NAME = "align.json"
#: The validations before training (``StageBConfig.validate_start``) in a stage B run folder.
VALIDATION_START_NAME = "validation_start.json"
#: The subject of the original's released GOD checkpoint and the one its stage B config trains on.
ORIGINAL_GOD_SUBJECT = "sbj_3"


# ----------------------------------------------------------------------------------------------------------
# Building the stage B model
# ----------------------------------------------------------------------------------------------------------


def load_prior(prior: str | os.PathLike | Any) -> Any:
    """The :class:`~mindvis.models.ldm.DCLDM` of a prior pipeline folder (or a pipeline / model given directly).

    A class-conditional prior (``mindvis train-prior``, or a converted CompVis label2img) or an fMRI pipeline
    (its UNet and autoencoder are reused) are accepted.
    """
    if isinstance(prior, DCLDM):
        return prior
    if isinstance(prior, MindVisPipeline):
        return prior.model
    return MindVisPipeline.from_pretrained(prior).model


def check_image_size(prior: Any, image_size: int | None, source: Any = None) -> int:
    """The training resolution: ``image_size`` or the prior's; its latent must be the prior UNet's size.

    Raises:
        ConfigError: the requested resolution gives latents of another size than the prior was trained on.
    """
    vq_cfg = prior.vq_config
    size = int(image_size or vq_cfg.resolution)
    f = vq_cfg.downsample_factor
    want = prior.unet_config.sample_size
    if size % f or size // f != want:
        raise ConfigError(
            f"prior latent size mismatch: the prior's UNet denoises {want}x{want} latents ({want * f} px images "
            f"with its f{f} autoencoder), but image size {size} gives {size / f:g}x{size / f:g} latents",
            path=source,
            field="image_size",
        )
    return size


def build_stage_b_model(prior: Any, encoder: nn.Module, config: StageBConfig, source: Any = None) -> Any:
    """The fMRI-conditioned DCLDM: the prior's UNet (rebuilt with the time-conditioning input when it is used,
    same weights) and autoencoder, the given encoder, and a fresh :class:`DCConditioner` (with
    ``context_basis="prior-classes"``, confined to the prior's class embeddings).

    Raises:
        ConfigError: ``prior-classes`` with a prior that is not class-conditional.
    """
    ucfg = replace(prior.unet_config, time_cond=config.use_time_cond)
    unet = build_unet(ucfg)
    missing, unexpected = unet.load_state_dict(prior.unet.state_dict(), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"the prior's UNet does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}", field="unet"
        )
    basis = (
        prior_class_table(prior, source=source, field="context_basis", purpose="a prior-classes context")
        if config.context_basis == "prior-classes"
        else None
    )
    model = DCLDM.for_fmri(
        LDMConfig(unet=ucfg, vq=prior.vq_config),
        encoder,
        use_time_cond=config.use_time_cond,
        use_cross_attn=config.use_cross_attn,
        standardize_tokens=config.standardize_tokens,
        basis_size=0 if basis is None else int(basis.shape[0]),
        schedule=prior.schedule,
        unet=unet,
        vq=prior.vq,
    )
    if basis is not None:
        null = prior.conditioner.null_conditioning(1, basis).context  # [1, 1, C]: the prior's own null row
        model.conditioner.set_basis(basis, null=null[0, 0].detach().float())
    return model


def prior_context_std(prior: Any) -> float | None:
    """How much the prior's own context varies between conditions: the std over its class embeddings (the null
    row left out), averaged over channels; ``None`` when the prior is not class-conditional."""
    cond = getattr(prior, "conditioner", None)
    if not isinstance(cond, ClassEmbedder) or cond.config.n_classes < 3:
        return None
    return float(prior_class_table(prior).double().std(dim=0).mean())


@torch.no_grad()
def fit_token_stats(
    model: Any, voxels: np.ndarray, context_std: float | None = None, batch_size: int = 256
) -> None:
    """Set the conditioner's token standardisation from the encoder's tokens of ``voxels [N, V]`` (preprocessed
    training fMRI), scaled so that the fMRI context varies across samples by ``context_std`` (the prior's
    :func:`prior_context_std`: the spread its cross-attention was trained on)."""
    encoder = model.fmri_encoder
    was_training = encoder.training
    encoder.eval()
    tokens = torch.cat(
        [
            encoder(torch.as_tensor(voxels[i : i + batch_size])).float()
            for i in range(0, len(voxels), batch_size)
        ]
    )
    encoder.train(was_training)
    model.conditioner.fit_token_stats(tokens, context_std=context_std)
    _logger.info(
        "token standardisation from %d training samples: tokens vary %.3g across samples (scale %.3g); "
        "context scaled to vary %s",
        len(tokens),
        float(tokens.std(dim=0).mean()),
        float(tokens.std()),
        "as the mappers give it"
        if context_std is None
        else f"{context_std:.3g} (the prior's class embeddings)",
    )


def mixture_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the mean of mixture weights ``[N, T, K]`` over samples and tokens: ``log K`` when the
    batch uses every basis row equally, 0 when every context is the same row."""
    mean = weights.float().mean(dim=tuple(range(weights.ndim - 1)))
    return -(mean * mean.clamp_min(1e-12).log()).sum()


def _nearest_class_accuracy(context: torch.Tensor, labels: torch.Tensor, table: torch.Tensor) -> float:
    """Fraction of items whose mean context token lies nearest (Euclidean) to their own class's embedding."""
    pred = torch.cdist(context.mean(dim=1), table).argmin(dim=1)
    return float((pred == labels).float().mean())


def align_context(
    model: Any,
    voxels: np.ndarray,
    labels: np.ndarray,
    class_table: torch.Tensor,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    sparse_rate: float = 0.0,
    seed: int = 0,
    eval_sets: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    source: Any = None,
) -> dict[str, Any]:
    """Context warm start (not in the original): train the fMRI encoder and the conditioner so that every context
    token of a training sample is its image's class embedding in the prior.

    The prior's cross-attention has only ever seen its class embeddings. A fresh conditioner gives contexts that
    it does not respond to, so the denoising loss hardly depends on them and stage B learns to ignore the fMRI.
    After this regression (mean squared error, Adam, sparse voxel dropout) the UNet starts from the conditions it
    knows, and the diffusion finetune takes it from there. Only the training split's labels are used.

    Args:
        model: the fMRI-conditioned DCLDM (its ``fmri_encoder`` and ``conditioner`` are trained in place).
        voxels: ``[N, V]`` preprocessed training fMRI; ``labels``: ``[N]`` class ids of their images, indexing
            ``class_table`` (``-1``, unknown, are left out).
        class_table: ``[K, C]`` the prior's class embeddings (:func:`~mindvis.models.ldm.prior_class_table`).
        eval_sets: ``{name: (voxels, labels)}`` scored after training, without training on them.

    Returns:
        ``{"epochs", "samples", "loss" (per epoch), "accuracy": {split: nearest-class accuracy of the mean
        context token}, "chance", "seconds"}``.

    Raises:
        DataError: no labelled training sample, or a label outside the prior's classes.
    """
    labels = np.asarray(labels).astype(np.int64)
    if labels.shape != (len(voxels),):
        raise DataError(
            f"expected one class label per training sample ({len(voxels)}), got {labels.shape}",
            path=source,
            field="labels",
        )
    keep = labels >= 0
    if not keep.any():
        raise DataError(
            "the context warm start needs class labels of the training images, and none is known",
            path=source,
            field="labels",
        )
    n_classes = int(class_table.shape[0])
    if int(labels.max()) >= n_classes:
        raise DataError(
            f"class label {int(labels.max())} is outside the prior's {n_classes} classes",
            path=source,
            field="labels",
        )
    x = torch.as_tensor(np.asarray(voxels)[keep], dtype=torch.float32)
    y = torch.as_tensor(labels[keep])
    table = class_table.to(torch.float32)
    encoder, conditioner = model.fmri_encoder, model.conditioner
    params = [p for m in (encoder, conditioner) for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    modes = (encoder.training, conditioner.training)
    encoder.train()
    conditioner.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    for _ in range(epochs):
        total = 0.0
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            xb = x[idx]
            if sparse_rate > 0:
                xb = sparse_voxel_dropout(xb, sparse_rate, gen)
            context = conditioner.context_from_tokens(encoder(xb))
            loss = (context - table[y[idx]][:, None, :]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(x))
    for p, f in zip(params, flags, strict=True):
        p.requires_grad_(f)
    encoder.eval()
    conditioner.eval()
    accuracy: dict[str, float] = {}
    with torch.no_grad():
        for name, (xv, yv) in {"train": (x.numpy(), y.numpy()), **(eval_sets or {})}.items():
            yv = np.asarray(yv).astype(np.int64)
            ok = (yv >= 0) & (yv < n_classes)
            if ok.any():
                ctx = conditioner.context_from_tokens(encoder(torch.as_tensor(np.asarray(xv)[ok])))
                accuracy[name] = _nearest_class_accuracy(ctx, torch.as_tensor(yv[ok]), table)
    encoder.train(modes[0])
    conditioner.train(modes[1])
    result = {
        "epochs": epochs,
        "samples": len(x),
        "loss": losses,
        "accuracy": accuracy,
        "chance": 1.0 / n_classes,
        "seconds": time.perf_counter() - t0,
    }
    _logger.info(
        "context warm start: %d epochs on %d samples, loss %.4g -> %.4g; nearest-class accuracy %s "
        "(chance %.3g) in %.0f s",
        epochs,
        len(x),
        losses[0] if losses else float("nan"),
        losses[-1] if losses else float("nan"),
        ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()),
        1.0 / n_classes,
        result["seconds"],
    )
    return result


def build_encoder(mbm: Any, config: StageBConfig) -> nn.Module:
    """The stage A encoder (``pretrained``) or one of the same size with random weights (``random``).

    Args:
        mbm: a stage A run folder, a saved model folder, an original ``.pth`` file, or a ``MaskedBrainModel``.
    """
    model = mbm if isinstance(mbm, MaskedBrainModel) else load_init_model(mbm)
    if config.encoder_init == "random":
        torch.manual_seed(config.seed)
        _logger.info("fMRI encoder: random initialisation (no pretraining), %s", model.config.to_dict())
        return FMRIEncoder(model.config, global_pool=config.global_pool)
    return FMRIEncoder.from_mbm(model, global_pool=config.global_pool)


# ----------------------------------------------------------------------------------------------------------
# The Lightning module
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _keep_modes(module: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag afterwards (building a pipeline switches to eval mode)."""
    modes = {m: m.training for m in module.modules()}
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a logger's info messages (metrics unavailable at every validation are said once, at the end)."""
    lg = logging.getLogger(logger_name)
    level = lg.level
    lg.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        lg.setLevel(level)


def val_metric_names(results: dict[str, Any]) -> dict[str, float]:
    """``val/<key>`` -> value for every available metric's mean-over-samples aggregate (and best slot)."""
    out: dict[str, float] = {}
    for e in results.get("metrics", []):
        aggs = e["aggregates"]
        out[f"val/{e['key']}"] = float(aggs["mean"]["value"])
        if "best_slot" in aggs:
            out[f"val/{e['key']}_best"] = float(aggs["best_slot"]["value"])
    return out


def default_monitor(n_way: tuple[int, ...], classifier: Any, n_items: int) -> str:
    """The metric that picks the best checkpoint when ``monitor="auto"``."""
    if classifier is not None:
        n_classes = len(getattr(classifier, "class_names", []))
        feasible = [n for n in n_way if 2 <= n <= n_classes]
        if feasible:
            return f"val/semantic_{max(feasible)}way_top1"
    return "val/ident_pcc_2way"


#: The n of the original's semantic top-1 that decides on a full validation pass (its 50-way accuracy).
_TRIGGER_REFERENCE_WAY = 50


def _chance_of(key: str) -> float:
    """Chance level of an n-way figure named ``..._<n>way...``."""
    m = re.search(r"_(\d+)way", key)
    return 1.0 / int(m.group(1)) if m else 0.0


def full_pass_trigger(
    quick: dict[str, float], n_way: tuple[int, ...], classifier: Any, threshold: float = 0.15
) -> tuple[str, float, bool] | None:
    """Whether the quick pass's figures ``quick`` (``val/quick/<key>``) call for a full pass (``original``
    schedule).

    The original runs the full pass when the quick pass's 50-way semantic top-1 (the best of its 3 sample slots)
    exceeds 0.15. The figure used here is the automatic monitor's (:func:`default_monitor`: the largest feasible
    n-way semantic top-1 with a classifier, else 2-way identification by pixel correlation, which stands in for
    it), its best sample slot as the original when there are several. Its chance level ``1/n`` differs from the
    original's 1/50, so the threshold is taken as the same distance above chance: the figure ``v`` triggers when
    ``(v - 1/n) / (1 - 1/n) > (threshold - 1/50) / (1 - 1/50)``, which for the 50-way top-1 is ``v > threshold``.

    Returns:
        ``(key, value, triggered)``, or ``None`` when the quick pass has no such figure (no ground truth or
        fewer than 2 items).
    """
    name = default_monitor(n_way, classifier, 0)[len("val/") :]
    for key in (f"{QUICK_PREFIX}{name}_best", f"{QUICK_PREFIX}{name}"):
        if key in quick and math.isfinite(quick[key]):
            value = float(quick[key])
            chance = _chance_of(name)
            ref = 1.0 / _TRIGGER_REFERENCE_WAY
            above = (value - chance) / (1.0 - chance) if chance < 1 else value
            return key, value, above > (threshold - ref) / (1.0 - ref)
    return None


def default_subject(dataset: str, data_dir: Any = None) -> str | None:
    """The subject ``mindvis train`` uses when none is given: for GOD the original's ``sbj_3`` (its stage B
    config and released checkpoint), else ``None`` (the dataset reader's first subject).

    A GOD folder without ``sbj_3`` falls back to its first subject, with a warning.
    """
    if str(dataset).lower() != "god":
        return None

    subjects = list_subjects("god", data_dir)
    if ORIGINAL_GOD_SUBJECT in subjects or not subjects:
        return ORIGINAL_GOD_SUBJECT
    _logger.warning(
        "the original trains on GOD subject %s, which this folder does not have (subjects: %s): using %s; "
        "give --subject to choose",
        ORIGINAL_GOD_SUBJECT,
        ", ".join(subjects),
        subjects[0],
    )
    return subjects[0]


class StageBModule(pl.LightningModule):
    """Lightning module of the stage B finetune.

    Batches are dicts from :class:`~mindvis.data.paired.PairedFMRIDataset`: ``fmri [B, V]``, ``image
    [B, 3, S, S]`` in ``[-1, 1]``, ``index [B]``.

    Args:
        model: the fMRI-conditioned :class:`~mindvis.models.ldm.DCLDM`.
        config: stage B settings.
        val_gt: ``[M, S, S, 3]`` uint8 ground truth of the validation items (by dataset index), for metrics.
        classifier: optional :class:`~mindvis.eval.classifier.ImageClassifier` for the semantic metrics.
        sample_dir: where validation grids go (``None``: none).
        preprocessor: the fitted fMRI preprocessing, saved beside exported pipelines.
    """

    def __init__(
        self,
        model: Any,
        config: StageBConfig,
        val_gt: np.ndarray | None = None,
        classifier: Any = None,
        sample_dir: str | os.PathLike | None = None,
        preprocessor: Any = None,
    ) -> None:
        super().__init__()
        if not model.is_fmri_conditioned:
            raise ConfigError("stage B needs an fMRI-conditioned model")
        self.model = model
        self.config = config
        self.trainable_names = model.set_trainable(config.model_preset)
        self.num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.num_total = sum(p.numel() for p in model.parameters())
        _logger.info(
            "trainable parameters (%s): %d tensors, %s of %s values (%.2f%%)",
            config.trainable,
            len(self.trainable_names),
            f"{self.num_trainable:,}",
            f"{self.num_total:,}",
            100.0 * self.num_trainable / max(self.num_total, 1),
        )
        self.model.vq.eval()
        self.val_gt = val_gt
        self.classifier = classifier
        self.sample_dir = None if sample_dir is None else Path(sample_dir)
        self.preprocessor = preprocessor
        self._val_parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._val_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._full_now = True
        self._full_done = False
        #: validations run in training (checkpointed): the ``original`` schedule's count
        self.val_count = 0
        #: the last full pass's figures (``val/<key>``) and the last quick pass's (``val/quick/<key>``)
        self.last_val_metrics: dict[str, float] = {}
        self.last_quick_metrics: dict[str, float] = {}
        self.last_val_results: dict[str, Any] | None = None

    def train(self, mode: bool = True) -> StageBModule:
        super().train(mode)
        self.model.vq.eval()  # the autoencoder is frozen and stays in eval mode
        return self

    # -- training -----------------------------------------------------------------------------------------

    def _condition(self, fmri: torch.Tensor, drop: float) -> Any:
        cond = self.model.condition(fmri)
        if drop <= 0:
            return cond
        mask = torch.rand(fmri.shape[0], device=fmri.device) < drop
        null = self.model.conditioner.null_conditioning(fmri.shape[0], cond.context)
        ctx = torch.where(mask[:, None, None], null.context, cond.context)
        tc = None if cond.time_cond is None else torch.where(mask[:, None], null.time_cond, cond.time_cond)
        return Conditioning(ctx, tc, cond.weights)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        m = self.model
        with torch.no_grad():
            x0 = m.encode_images(batch["image"])
        cond = self._condition(batch["fmri"], self.config.cond_dropout)
        t = torch.randint(0, m.num_timesteps, (x0.shape[0],), device=x0.device)
        out = m.p_losses(x0, cond, t)
        self.log(
            "train/loss",
            out.loss.detach(),
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=x0.shape[0],
        )
        if cond.weights is None or not self.config.basis_balance:
            return out.loss
        balance = mixture_entropy(cond.weights)
        self.log(
            "train/basis_entropy", balance.detach(), on_step=False, on_epoch=True, batch_size=x0.shape[0]
        )
        return out.loss - self.config.basis_balance * balance

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return make_adamw(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def compile_targets(self) -> dict[str, torch.nn.Module]:
        """What ``--compile`` compiles: the UNet and the fMRI encoder."""
        return {"unet": self.model.unet, "fmri_encoder": self.model.fmri_encoder}

    # -- validation ---------------------------------------------------------------------------------------

    def generate(self, fmri: torch.Tensor, index: torch.Tensor, num_samples: int | None = None) -> np.ndarray:
        """``num_samples`` (default: the config's) images per item ``[B, S, H, W, 3]`` uint8; item ``i`` always
        uses seed ``seed + i``."""
        cfg = self.config
        with _keep_modes(self.model):
            pipe = MindVisPipeline(self.model)
            out = pipe(
                fmri,
                num_samples=cfg.num_samples if num_samples is None else num_samples,
                num_inference_steps=cfg.sample_steps,
                sampler=cfg.sampler,
                guidance_scale=cfg.guidance_scale,
                seed=[cfg.seed + int(i) for i in index],
                progress=False,
                return_latents=False,
            )
        return out.images

    def _val_loss(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        m = self.model
        x0 = m.encode_images(batch["image"])
        g = torch.Generator().manual_seed(
            self.config.seed + 7919 * (batch_idx + 1)
        )  # the same t, noise each time
        t = torch.randint(0, m.num_timesteps, (x0.shape[0],), generator=g).to(x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        return m.p_losses(x0, m.condition(batch["fmri"]), t, noise=noise).loss

    # -- the validation schedule --------------------------------------------------------------------------

    def _is_last_validation(self) -> bool:
        """Whether no validation follows this one in the run (the fit's ``max_epochs``)."""
        trainer = self.trainer
        every = int(trainer.check_val_every_n_epoch or 1)
        last = trainer.max_epochs
        return last is not None and last >= 0 and self.current_epoch + 1 + every > last

    def _plan_validation(self) -> bool:
        """Count this validation and say whether it is a scheduled full pass (``original`` schedule: every
        ``full_val_every``-th, the first of this fit and the last of the run; ``full``: always)."""
        cfg = self.config
        self.val_count += 1
        if cfg.val_schedule == "full":
            return True
        fitting = self.trainer.state.fn == "fit"
        return (
            self.val_count % cfg.full_val_every == 0
            or not self._full_done
            or (fitting and self._is_last_validation())
        )

    def on_fit_start(self) -> None:
        self._full_done = False  # the monitored figure is not among this fit's logged metrics yet

    def on_validation_epoch_start(self) -> None:
        self._val_parts, self._val_inputs = [], []
        self._full_now = True if self.trainer.sanity_checking else self._plan_validation()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self._val_loss(batch, batch_idx)
        self.log("val/loss", loss, batch_size=batch["image"].shape[0], sync_dist=True)
        if self.trainer.sanity_checking:
            return
        if self._full_now:
            images = self.generate(batch["fmri"], batch["index"])
            self._val_parts.append((batch["index"].cpu(), torch.from_numpy(images)))
        else:  # kept for a full pass that the quick pass may call for
            self._val_inputs.append((batch["index"], batch["fmri"]))

    @torch.no_grad()
    def validate_now(self, loader: Any) -> dict[str, float]:
        """The full-pass validation figures of the model as it is now, outside a Lightning run, in this process.

        Same samples (seeds by item), timesteps and noise as :meth:`validation_step`, so the figures continue
        the logged curve.
        """
        with _keep_modes(self.model):
            self.model.eval()
            losses, weights, index, images = [], [], [], []
            for batch_idx, batch in enumerate(loader):
                losses.append(float(self._val_loss(batch, batch_idx)))
                weights.append(len(batch["index"]))
                index.append(batch["index"].cpu())
                images.append(self.generate(batch["fmri"], batch["index"]))
        metrics = {"val/loss": float(np.average(losses, weights=weights))}
        metrics.update(self._metrics(np.concatenate(images), torch.cat(index).numpy()))
        return metrics

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the last validation's figures go into metrics.json; a run resumed after its last epoch needs them
        checkpoint["mindvis_last_val_metrics"] = {k: float(v) for k, v in self.last_val_metrics.items()}
        checkpoint["mindvis_val_count"] = int(self.val_count)  # the original schedule continues its count

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.last_val_metrics = dict(checkpoint.get("mindvis_last_val_metrics", {}))
        self.val_count = int(checkpoint.get("mindvis_val_count", 0))

    def on_validation_epoch_end(self) -> None:
        parts, self._val_parts = self._val_parts, []
        inputs, self._val_inputs = self._val_inputs, []
        if self.trainer.sanity_checking:
            return
        if not self._full_now:
            if not self._quick_pass():
                return
            with torch.no_grad(), self.trainer.precision_plugin.val_step_context():
                parts = [(i.cpu(), torch.from_numpy(self.generate(x, i))) for i, x in inputs]
        if not parts:
            return
        self._full_pass(parts)

    def _quick_pass(self) -> bool:
        """The original's quick pass: ``quick_samples`` images of each of the first ``quick_items`` validation
        items (the same in every process), logged as ``val/quick/<key>``. Returns whether a full pass follows."""
        cfg = self.config
        loader = self.trainer.val_dataloaders
        dataset = loader.dataset if hasattr(loader, "dataset") else loader[0].dataset
        n = min(cfg.quick_items, len(dataset))
        items = [dataset[i] for i in range(n)]
        index = torch.stack([torch.as_tensor(it["index"]) for it in items])
        fmri = torch.stack([torch.as_tensor(it["fmri"]) for it in items]).to(self.device)
        with torch.no_grad(), self.trainer.precision_plugin.val_step_context():
            images = self.generate(fmri, index, num_samples=min(cfg.quick_samples, cfg.num_samples))
        index_np = index.numpy()
        quick = {
            QUICK_PREFIX + k[len("val/") :]: v
            for k, v in self._metrics(images, index_np, record=False).items()
        }
        for k, v in quick.items():
            self.log(k, v, sync_dist=False)
        self.last_quick_metrics = quick
        self._save_grid(index_np, images, "-quick")
        trig = full_pass_trigger(quick, cfg.n_way, self.classifier, cfg.full_val_threshold)
        full = bool(trig is not None and trig[2])
        full = bool(self.trainer.strategy.broadcast(full, src=0))  # every process runs the full pass or none
        if trig is not None:
            _logger.info(
                "quick validation (%d items x %d samples): %s = %.4f; %s",
                n,
                min(cfg.quick_samples, cfg.num_samples),
                trig[0],
                trig[1],
                "above the threshold: full pass" if full else "no full pass",
            )
        return full

    def _full_pass(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Figures of the full pass (every validation item, ``num_samples`` each), logged as ``val/<key>``."""
        index = torch.cat([p[0] for p in parts])
        images = torch.cat([p[1] for p in parts])
        if self.trainer.world_size > 1:  # every rank gets every item (DistributedSampler gives equal shares)
            index = self.all_gather(index.to(self.device)).reshape(-1).cpu()
            images = self.all_gather(images.to(self.device)).reshape(-1, *images.shape[1:]).cpu()
        index_np = index.numpy()
        _, first = np.unique(index_np, return_index=True)  # padded duplicates are dropped
        order = first[np.argsort(index_np[first])]
        index_np, recons = index_np[order], images[order].numpy()
        metrics = self._metrics(recons, index_np)
        for k, v in metrics.items():
            self.log(k, v, sync_dist=False)
        self.last_val_metrics = metrics
        self._full_done = True
        self._save_grid(index_np, recons)

    def _save_grid(self, index: np.ndarray, recons: np.ndarray, suffix: str = "") -> None:
        if self.trainer.is_global_zero and self.sample_dir is not None and self.val_gt is not None:
            k = min(self.config.grid_items, len(index))
            grid = image_grid(recons[:k], ground_truth=self.val_gt[index[:k]])
            path = save_png(self.sample_dir / f"epoch{self.current_epoch:04d}{suffix}.png", grid)
            _logger.info("validation samples: %s", path)

    def _metrics(self, recons: np.ndarray, index: np.ndarray, record: bool = True) -> dict[str, float]:
        if self.val_gt is None or len(index) < 2:
            return {}
        with warnings.catch_warnings(), _quiet("mindvis.eval.suite"):
            warnings.simplefilter("ignore")
            results = evaluate_reconstructions(
                recons,
                self.val_gt[index],
                classifier=self.classifier,
                metrics=["pixel", "identification", "semantic"],
                n_way=self.config.n_way,  # n beyond the items or classes are reported unavailable
                trials=self.config.eval_trials,
                seed=self.config.seed,
                bootstrap=0,
            )
        if record:
            self.last_val_results = results
        return val_metric_names(results)

    # -- export -------------------------------------------------------------------------------------------

    def export_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the pipeline folder (plus ``preprocess.json``, the fitted fMRI preprocessing)."""
        save_stage_b_pipeline(self.model, directory, self.config, self.preprocessor)


def save_stage_b_pipeline(
    model: Any, directory: str | os.PathLike, config: StageBConfig, preprocessor: Any = None
) -> Path:
    """A :class:`~mindvis.pipeline.MindVisPipeline` folder of the stage B model, with its fMRI preprocessing
    (``preprocess.json``, which ``mindvis reconstruct`` applies by default)."""
    directory = Path(directory)
    with _keep_modes(model):
        # the config allows guidance only with conditioning dropout, so this is 1 for any other model
        pipe = MindVisPipeline(
            model,
            default_sampler=config.sampler,
            default_steps=config.sample_steps,
            default_guidance_scale=config.guidance_scale,
        )
        pipe.save_pretrained(
            directory,
            overwrite=True,
            source={
                "kind": "mindvis stage B",
                "trainable": config.trainable,
                "image_size": model.vq_config.resolution,
            },
        )
    if preprocessor is not None:
        write_json(directory / PIPELINE_PREPROCESS_NAME, preprocessor.to_dict())
    return directory


# ----------------------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------------------


class StageBData(pl.LightningDataModule):
    """Training pairs (augmented) and validation pairs (the test split, not augmented)."""

    def __init__(
        self,
        train: PairedFMRIDataset,
        val: PairedFMRIDataset,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        val_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.val_batch_size = val_batch_size or batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(self.train_set), self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.val_set, batch_size=self.val_batch_size, shuffle=False, num_workers=self.num_workers
        )


@dataclass
class StageBResult:
    """What a stage B run reports.

    Attributes:
        run_dir: the run folder; ``model/`` (final pipeline), ``best/`` (best by ``monitor``).
        monitor: the metric that picked the best checkpoint; best: its best value.
        metrics: the last validation metrics.
        trainable_params: number of trained values; total_params: of the whole model.
        epochs_done, global_step, seconds: progress and wall time.
    """

    run_dir: Path
    monitor: str
    best: float | None
    metrics: dict[str, float]
    trainable_params: int
    total_params: int
    epochs_done: int
    global_step: int
    seconds: float


def train_stage_b(
    prior: Any,
    mbm: Any,
    train: FMRIDataset,
    test: FMRIDataset,
    out_dir: str | os.PathLike,
    config: StageBConfig,
    trainer_config: Any = None,
    classifier: Any = None,
    preprocessor: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: tuple = (),
) -> StageBResult:
    """Finetune stage B from a prior and a stage A model on paired fMRI-image data.

    The run folder gets ``config.json``, ``preprocessing.json``, ``metrics.csv``, ``checkpoints/``,
    ``samples/epochNNNN.png`` (ground truth, then the samples, one test item per row; a quick validation pass's
    are ``epochNNNN-quick.png``), ``model/`` (the final
    pipeline, loadable by :meth:`mindvis.pipeline.MindVisPipeline.from_pretrained`, with its
    ``preprocess.json``), ``best/`` (the best by ``monitor``) and ``metrics.json``.

    Args:
        prior: prior pipeline folder (``mindvis train-prior`` or a converted label2img) or a pipeline/model.
        mbm: stage A run folder, model folder, original ``.pth``, or ``MaskedBrainModel``.
        train, test: paired datasets of one subject.
        out_dir: the run folder.
        config: stage B settings.
        trainer_config: :class:`~mindvis.train.common.TrainerConfig` (devices, strategy, precision, logger);
            its ``max_epochs``, ``val_every_n_epochs`` and ``clip_grad`` are taken from ``config``.
        classifier: optional judge for the semantic validation metrics.
        preprocessor: a fitted :class:`~mindvis.data.preprocess.FMRIPreprocessor`; default: the stage A run's
            ``preprocessing.json`` when there is one, else fitted on ``train``.
        resume: continue from ``out_dir/checkpoints/last.ckpt``.
        overwrite: replace a non-empty ``out_dir``.
    """
    trainer_config = trainer_config or TrainerConfig()
    out_dir = Path(out_dir)
    for ds, name in ((train, "train"), (test, "test")):
        if ds.num_samples == 0:
            raise DataError(f"the {name} split is empty (0 samples)", path=ds.source, field=name)
        if not ds.paired:
            raise DataError(f"the {name} split has no paired images", path=ds.source, field="images")
    ckpt, resume_step = None, None
    if resume:
        ckpt = find_resume_checkpoint(out_dir)
        resume_step = read_checkpoint_progress(ckpt)["global_step"]
    elif is_primary_process():
        prepare_output_dir(out_dir, overwrite=overwrite)

    prior_model = load_prior(prior)
    image_size = check_image_size(
        prior_model, config.image_size, source=prior if isinstance(prior, str | Path) else None
    )
    seed_everything(config.seed)
    encoder = build_encoder(mbm, config)
    if preprocessor is None and (found := find_preprocessing(mbm)) is not None:
        preprocessor = load_preprocessor(found, subject=train.subject)
        _logger.info("fMRI preprocessing from the stage A run: %s", found)
    x_train, x_test, preprocessor = prepare_voxels(
        train, test, encoder.config.num_voxels, encoder.config.patch_size, preprocessor
    )
    prior_source = prior if isinstance(prior, str | Path) else None
    model = build_stage_b_model(prior_model, encoder, config, source=prior_source)
    if config.standardize_tokens:  # from the initial encoder; a resumed run then loads the saved buffers
        fit_token_stats(
            model, x_train, None if config.context_basis != "free" else prior_context_std(prior_model)
        )
    train_set = PairedFMRIDataset.from_fmri_dataset(
        train, image_size, voxels=x_train, train=True, augment=config.augment
    )
    val_idx = np.arange(
        test.num_samples if config.val_items is None else min(config.val_items, test.num_samples)
    )
    val_set = PairedFMRIDataset.from_fmri_dataset(
        test.subset(val_idx), image_size, voxels=x_test[val_idx], train=False
    )
    data = StageBData(
        train_set,
        val_set,
        config.batch_size,
        config.seed,
        config.num_workers,
        val_batch_size=max(1, min(len(val_set), 16)),
    )
    module = StageBModule(
        model,
        config,
        val_gt=val_set.ground_truth(),
        classifier=classifier,
        sample_dir=out_dir / SAMPLES_DIR,
        preprocessor=preprocessor,
    )
    # a resumed run continues its curve; its checkpoint holds the warm-started weights
    start: list[dict[str, Any]] = []
    if config.validate_start and ckpt is None and is_primary_process():
        start.append({"point": "before training", **module.validate_now(data.val_dataloader())})
    align = None
    if config.align_epochs and ckpt is None:
        align = align_context(
            model,
            x_train,
            train.labels if train.labels is not None else np.full(len(x_train), -1),
            prior_class_table(prior_model, source=prior_source),
            config.align_epochs,
            lr=config.align_lr,
            batch_size=config.batch_size,
            sparse_rate=config.sparse_rate,
            seed=config.seed,
            eval_sets=None if test.labels is None else {"test": (x_test, test.labels)},
            source=train.source,
        )
        if start:
            start.append({"point": "after the warm start", **module.validate_now(data.val_dataloader())})
    del prior_model
    if start:
        _logger.info(
            "validation before the finetune: %s",
            "; ".join(
                f"{p['point']}: "
                + ", ".join(
                    f"{k[4:]} {v:.3g}" for k, v in p.items() if k != "point" and not k.endswith("_best")
                )
                for p in start
            ),
        )

    monitor = (
        default_monitor(config.n_way, classifier, len(val_set))
        if config.monitor == "auto"
        else config.monitor
    )
    if is_primary_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(
            out_dir,
            "train",
            config.to_dict(),
            trainer=trainer_config.to_dict(),
            monitor=monitor,
            image_size=image_size,
            prior=str(prior) if isinstance(prior, str | Path) else None,
            mbm=str(mbm) if isinstance(mbm, str | Path) else None,
            data={"train": train.summary(), "test": test.summary(), "val_items": len(val_set)},
        )
        write_json(out_dir / PREPROCESSING_NAME, preprocessor.to_dict())
        if align is not None:
            write_json(out_dir / ALIGN_NAME, align)
        if start:
            write_json(out_dir / VALIDATION_START_NAME, {"val_items": len(val_set), "points": start})
    tc = replace(
        trainer_config,
        max_epochs=config.epochs,
        val_every_n_epochs=min(config.val_every, config.epochs),
        clip_grad=config.clip_grad,
    )
    trainer = build_trainer(
        tc,
        out_dir,
        monitor=monitor,
        mode="min" if monitor.endswith("loss") else "max",
        callbacks=callbacks,
        resume_step=resume_step,
    )
    t0 = time.perf_counter()
    fit(trainer, module, data, ckpt_path=ckpt, compile=tc.compile)
    seconds = time.perf_counter() - t0
    best = None
    for cb in trainer.callbacks:
        if type(cb).__name__ == "ExportPretrained" and cb.best is not None:
            best = float(cb.best)
    result = StageBResult(
        run_dir=out_dir,
        monitor=monitor,
        best=best,
        metrics=dict(module.last_val_metrics),
        trainable_params=module.num_trainable,
        total_params=module.num_total,
        epochs_done=int(trainer.current_epoch),
        global_step=int(trainer.global_step),
        seconds=seconds,
    )
    if trainer.is_global_zero:
        write_json(
            out_dir / "metrics.json",
            {**asdict(result), "run_dir": str(out_dir), "trainable": config.trainable},
        )
    return result
