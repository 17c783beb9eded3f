"""The stage B model and what it is made from.

The prior (:func:`load_prior`) and the stage A encoder (:func:`build_encoder`) make the fMRI-conditioned
:class:`~mindvis.models.ldm.DCLDM` (:func:`build_stage_b_model`): the prior's UNet and autoencoder, the encoder in
place of the prior's class embedding, and a fresh double conditioner (cross-attention context + time-embedding
vector). Also here: the conditioner's token standardisation from the training fMRI (:func:`fit_token_stats`) and
the pipeline folder the model is saved as (:func:`save_stage_b_pipeline`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mindvis.errors import CheckpointError, ConfigError
from mindvis.models.conditioning import ClassEmbedder
from mindvis.models.ldm import DCLDM, LDMConfig, build_unet, prior_class_table
from mindvis.models.mbm import FMRIEncoder, MaskedBrainModel
from mindvis.pipeline import MindVisPipeline
from mindvis.train.config import StageBConfig
from mindvis.train.mbm import load_init_model
from mindvis.utils.io import write_json

_logger = logging.getLogger(__name__)

#: What `mindvis reconstruct` reads from a model folder.
PIPELINE_PREPROCESS_NAME = "preprocess.json"


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


@contextlib.contextmanager
def keep_modes(module: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag afterwards (building a pipeline switches to eval mode)."""
    modes = {m: m.training for m in module.modules()}
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def save_stage_b_pipeline(
    model: Any, directory: str | os.PathLike, config: StageBConfig, preprocessor: Any = None
) -> Path:
    """A :class:`~mindvis.pipeline.MindVisPipeline` folder of the stage B model, with its fMRI preprocessing
    (``preprocess.json``, which ``mindvis reconstruct`` applies by default)."""
    directory = Path(directory)
    with keep_modes(model):
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
