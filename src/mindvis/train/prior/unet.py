"""Training the class-conditional UNet of the prior on the frozen VQ's latents: settings, the latent dataset
and the Lightning module."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn as nn

from mindvis.errors import ConfigError, DataError
from mindvis.models.ldm import DCLDM, vq_encode
from mindvis.train.config import UNetTrainConfig
from mindvis.train.optim import make_adamw
from mindvis.train.prior.model import sample_class_grid, save_prior_pipeline
from mindvis.utils.images import image_grid, images_to_model, save_png

_logger = logging.getLogger(__name__)


class LatentLabelDataset(torch.utils.data.Dataset):
    """Precomputed VQ latents ``[M, C, h, w]`` with their class labels ``[M]``."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor) -> None:
        if len(latents) != len(labels):
            raise DataError(f"latent/label count mismatch: {len(latents)} vs {len(labels)}", field="labels")
        self.latents = latents
        self.labels = labels

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents[i], self.labels[i]


@torch.no_grad()
def encode_corpus(
    vq: nn.Module, images: np.ndarray, batch_size: int = 64, flip: bool = False
) -> torch.Tensor:
    """Pre-quantisation latents of uint8 images ``[M, H, W, 3]`` -> ``[M, C, h, w]`` (``[2M, ...]`` with flips).

    With ``flip`` the horizontally flipped images follow the originals, doubling the training set.
    """
    was_training = vq.training
    vq.eval()
    device = next(vq.parameters()).device
    out = []
    for flipped in (False, True) if flip else (False,):
        for i in range(0, len(images), batch_size):
            x = images_to_model(images[i : i + batch_size]).to(device)
            out.append(vq_encode(vq, x.flip(-1) if flipped else x).float().cpu())
    vq.train(was_training)
    return torch.cat(out)


class ClassPriorModule(pl.LightningModule):
    """Lightning module training the class-conditional denoiser of a :class:`~mindvis.models.ldm.DCLDM`.

    The model's conditioner is a :class:`~mindvis.models.conditioning.ClassEmbedder` with one row per class
    plus a last "null" row (the unconditional input). The VQ autoencoder is frozen. Batches are
    ``(latents [B, C, h, w], labels [B])``.

    Args:
        model: the class-conditional DCLDM (no fMRI encoder).
        config: training settings.
        class_names: names of the real classes (``n_classes - 1`` of them).
        sample_dir: where validation grids go (``None``: no grids).
        classifier: optional ``uint8 [N, H, W, 3] -> predicted labels [N]`` used to score the class samples.
    """

    def __init__(
        self,
        model: nn.Module,
        config: UNetTrainConfig,
        class_names: list[str],
        sample_dir: str | os.PathLike | None = None,
        classifier: Any = None,
    ) -> None:
        super().__init__()
        if model.is_fmri_conditioned:
            raise ConfigError("the image prior is class-conditional; got an fMRI-conditioned model")
        self.model = model
        self.config = config
        self.class_names = list(class_names)
        n_rows = model.conditioner.config.n_classes
        if n_rows != len(self.class_names) + 1:
            raise ConfigError(
                f"the class embedding has {n_rows} rows; expected {len(self.class_names)} classes "
                "+ 1 null row",
                field="n_classes",
            )
        self.null_class = n_rows - 1
        self.model.vq.requires_grad_(False)
        self.model.vq.eval()
        self.ema: nn.ModuleDict | None = None
        if config.ema_decay is not None:
            self.ema = nn.ModuleDict(
                {"unet": copy.deepcopy(model.unet), "conditioner": copy.deepcopy(model.conditioner)}
            )
            self.ema.requires_grad_(False)
        self.sample_dir = None if sample_dir is None else Path(sample_dir)
        self.classifier = classifier
        self._val_runs = 0
        self.last_sample_accuracy: float | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.unet.parameters()) + list(self.model.conditioner.parameters())

    def train(self, mode: bool = True) -> ClassPriorModule:
        super().train(mode)
        self.model.vq.eval()  # the frozen autoencoder stays in eval mode
        if self.ema is not None:
            self.ema.eval()
        return self

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x0, labels = batch
        if self.config.class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.config.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        cond = self.model.condition(labels)
        t = torch.randint(0, self.model.num_timesteps, (x0.shape[0],), device=x0.device)
        out = self.model.p_losses(x0, cond, t)
        self.log(
            "train/loss",
            out.loss.detach(),
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=x0.shape[0],
        )
        return out.loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is None:
            return
        d = self.config.ema_decay
        # warm-up as in common EMA practice: the average starts close to the current weights
        d = min(d, (1 + self.global_step) / (10 + self.global_step))
        with torch.no_grad():
            for ema_m, m in (
                (self.ema["unet"], self.model.unet),
                (self.ema["conditioner"], self.model.conditioner),
            ):
                for pe, p in zip(ema_m.parameters(), m.parameters(), strict=True):
                    pe.lerp_(p.detach(), 1.0 - d)
                for be, b in zip(ema_m.buffers(), m.buffers(), strict=True):
                    be.copy_(b)

    def export_model(self) -> nn.Module:
        """The DCLDM to sample from and save: the EMA weights when EMA is on (sharing the VQ), else the model."""
        if self.ema is None:
            return self.model

        m = self.model
        return DCLDM(
            m.unet_config,
            m.vq_config,
            self.ema["conditioner"],
            m.schedule,
            scale_factor=m.scale_factor,
            unet=self.ema["unet"],
            vq=m.vq,
        )

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x0, labels = batch
        model = self.export_model()
        g = torch.Generator(device="cpu").manual_seed(1000 + batch_idx)  # the same t and noise every time
        t = torch.randint(0, model.num_timesteps, (x0.shape[0],), generator=g).to(x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        out = model.p_losses(x0, model.condition(labels), t, noise=noise)
        self.log("val/loss", out.loss, prog_bar=True, batch_size=x0.shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self._val_runs += 1
        if (self._val_runs - 1) % self.config.sample_every:
            return
        if not self.trainer.is_global_zero or (self.sample_dir is None and self.classifier is None):
            return
        images, labels = sample_class_grid(
            self.export_model(),
            len(self.class_names),
            self.config.samples_per_class,
            self.config.sample_steps,
            self.config.sampler,
            seed=0,
            guidance_scale=self.config.guidance_scale,
        )
        if self.sample_dir is not None:
            grid = image_grid(
                images.reshape(len(self.class_names), self.config.samples_per_class, *images.shape[1:]),
                row_labels=self.class_names,
            )
            path = save_png(self.sample_dir / f"samples_epoch{self.current_epoch:04d}.png", grid)
            _logger.info("class samples: %s", path)
        if self.classifier is not None:
            pred = np.asarray(self.classifier(images))
            self.last_sample_accuracy = float((pred == labels).mean())
            self.log("val/sample_acc", self.last_sample_accuracy, rank_zero_only=True)

    def configure_optimizers(self) -> Any:
        return make_adamw(
            self.trainable_parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )

    def compile_targets(self) -> dict[str, torch.nn.Module]:
        """What ``--compile`` compiles: the UNet."""
        return {"unet": self.model.unet}

    def export_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the prior (EMA weights when EMA is on) as a pipeline folder."""
        save_prior_pipeline(self.export_model(), directory, self.class_names)
