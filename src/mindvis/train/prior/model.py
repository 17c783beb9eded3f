"""The class-conditional prior itself: building it, drawing class samples from it, saving it as a pipeline
folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from mindvis.errors import ConfigError
from mindvis.models.conditioning import ClassEmbedder, ClassEmbedderConfig, Conditioning
from mindvis.models.ldm import DCLDM, build_unet, build_vq
from mindvis.pipeline import MindVisPipeline
from mindvis.sampling import NoiseSchedule, run_sampler
from mindvis.utils.images import model_to_uint8

_logger = logging.getLogger(__name__)


def build_class_prior(ldm_config: Any, num_classes: int, vq: nn.Module | None = None) -> nn.Module:
    """A class-conditional :class:`~mindvis.models.ldm.DCLDM`: UNet without time conditioning, a class embedding
    of ``num_classes + 1`` rows (the last is the null class) and the VQ (new, or the one given)."""
    if ldm_config.unet.time_cond:
        raise ConfigError("the class-conditional prior is built without time conditioning", field="time_cond")
    emb = ClassEmbedder(ClassEmbedderConfig(n_classes=num_classes + 1, embed_dim=ldm_config.unet.context_dim))
    return DCLDM(
        ldm_config.unet,
        ldm_config.vq,
        emb,
        NoiseSchedule(),
        unet=build_unet(ldm_config.unet),
        vq=vq if vq is not None else build_vq(ldm_config.vq),
    )


@torch.no_grad()
def sample_class_grid(
    model: nn.Module,
    num_classes: int,
    per_class: int,
    num_steps: int,
    sampler: str = "ddim",
    seed: int = 0,
    batch_size: int = 64,
    guidance_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``per_class`` images of each class from a class-conditional DCLDM.

    Sample ``k`` of class ``c`` starts from the latent noise of a generator seeded with ``seed`` (the same for
    every class), so grids of different epochs are comparable. With ``guidance_scale`` != 1, classifier-free
    guidance against the null class (the embedding's last row, trained with ``class_dropout``):
    ``eps = eps_null + s * (eps_class - eps_null)``.

    Returns:
        ``(images [num_classes * per_class, H, W, 3] uint8, labels [num_classes * per_class])``, class-major.
    """
    device = next(model.unet.parameters()).device
    dtype = next(model.unet.parameters()).dtype
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((per_class, *model.latent_shape), generator=g).repeat(num_classes, 1, 1, 1)
    out = []
    for a in range(0, len(labels), batch_size):
        lab = labels[a : a + batch_size].to(device)
        cond = model.condition(lab)
        x_T = noise[a : a + batch_size].to(device, dtype)
        if guidance_scale == 1.0:
            eps_fn = lambda x, t, c=cond: model.eps(x, t, c)  # noqa: E731
        else:
            null = model.conditioner.null_conditioning(len(lab), cond.context)

            def eps_fn(x, t, c=cond, u=null):
                e_u, e_c = model.eps(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([u, c])).chunk(2)
                return e_u + guidance_scale * (e_c - e_u)

        z = run_sampler(sampler, eps_fn, x_T, model.schedule, num_steps)
        out.append(model_to_uint8(model.decode_latents(z)))
    return np.concatenate(out), labels.numpy()


def save_prior_pipeline(
    model: nn.Module,
    directory: str | os.PathLike,
    class_names: list[str],
    source: dict[str, Any] | None = None,
) -> Path:
    """Write a class-conditional prior as a :class:`~mindvis.pipeline.MindVisPipeline` folder.

    The class names go into ``model_index.json`` (``source.class_names``; the last embedding row is the null
    class).
    """
    was_training = model.training
    pipe = MindVisPipeline(model, default_sampler="ddim", default_steps=50)  # sets eval mode
    info = {
        "kind": "class-conditional prior",
        "class_names": list(class_names),
        "null_class": len(class_names),
        **(source or {}),
    }
    try:
        return pipe.save_pretrained(directory, overwrite=True, source=info)
    finally:
        model.train(was_training)
