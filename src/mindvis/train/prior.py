"""Training the image prior of stage B: a VQ autoencoder, then a class-conditional latent diffusion UNet.

MinD-Vis starts stage B from the CompVis "label2img" latent diffusion model (Rombach et al., CVPR 2022): a VQ-f4
autoencoder (VQGAN-style training, Esser et al., CVPR 2021) and a UNet that denoises the autoencoder's latents
with a class embedding as cross-attention context. Those weights are ImageNet-trained and not available
offline, so mindvis trains both halves on an image corpus:

1. :class:`VQAutoencoderModule` trains a diffusers ``VQModel`` with a reconstruction loss (L1 or L2), the
   codebook term ``|sg[h] - e|^2`` and the commitment term ``beta |h - sg[e]|^2``, optionally an LPIPS
   perceptual term (only with locally available backbone weights) and a patch-GAN hinge loss with the
   adaptive weight of VQGAN. Codebook usage (perplexity, dead codes) is logged; dead codes can be
   re-initialised from encoder outputs.
2. :class:`ClassPriorModule` trains a ``UNet2DConditionModel`` with epsilon prediction on the frozen VQ's
   pre-quantisation latents (scale factor 1, as the original), conditioned on a class embedding
   ``[B, 1, C]`` as cross-attention context, optionally with an EMA of the weights.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mindvis.data.formats.common import NpzArchive
from mindvis.data.sampler import EpochShuffleSampler
from mindvis.errors import ConfigError, DataError, MindVisError, WeightsUnavailable
from mindvis.eval.metrics import ssim_pairs
from mindvis.models.conditioning import ClassEmbedder, ClassEmbedderConfig, Conditioning
from mindvis.models.ldm import (
    DCLDM,
    LDMConfig,
    build_unet,
    build_vq,
    ldm_preset,
    vq_decode,
    vq_encode,
    vq_quantize,
)
from mindvis.pipeline import MindVisPipeline
from mindvis.safeload import load_state_dict
from mindvis.sampling import NoiseSchedule, run_sampler
from mindvis.train.common import (
    FINAL_WEIGHTS_DIR,
    TrainerConfig,
    build_trainer,
    find_resume_checkpoint,
    fit,
    is_primary_process,
    make_adamw,
    read_checkpoint_progress,
    seed_everything,
    write_run_config,
)
from mindvis.utils.io import atomic_write, prepare_output_dir, read_json, write_json

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------------------
# Image corpus
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ImageCorpus:
    """Images for prior training.

    Attributes:
        images: ``[M, S, S, 3]`` uint8.
        labels: ``[M]`` int64 class index in ``[0, len(class_names))``.
        class_names: one name per class.
        source: where the images came from.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise DataError(
                f"images must be uint8 [M, H, W, 3], got {self.images.dtype} {self.images.shape}",
                path=self.source,
                field="images",
            )
        if len(self.images) == 0:
            raise DataError("the corpus has no images", path=self.source, field="images")
        if self.labels.shape != (len(self.images),):
            raise DataError(
                f"image/label count mismatch: {len(self.images)} images, labels of shape {self.labels.shape}",
                path=self.source,
                field="labels",
            )
        if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
            raise DataError(
                f"labels must lie in [0, {len(self.class_names)}), got range "
                f"[{self.labels.min()}, {self.labels.max()}]",
                path=self.source,
                field="labels",
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])

    def subset(self, index: np.ndarray) -> ImageCorpus:
        return ImageCorpus(self.images[index], self.labels[index], list(self.class_names), self.source)

    def split(self, holdout: float, seed: int) -> tuple[ImageCorpus, ImageCorpus]:
        """Random ``(train, held-out)`` split with ``round(holdout * M)`` held-out images (at least one)."""
        m = len(self.images)
        n_hold = max(1, int(round(holdout * m)))
        if m - n_hold < 1:
            raise DataError(f"too few images ({m}) to hold out {n_hold} for validation", path=self.source)
        perm = np.random.default_rng(seed).permutation(m)
        return self.subset(np.sort(perm[n_hold:])), self.subset(np.sort(perm[:n_hold]))


def _center_square_resize(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = img[top : top + side, left : left + side]
    if side != size:
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))
    return img


def load_image_corpus(
    path: str | os.PathLike, resolution: int | None = None, resize_mixed: bool = False
) -> ImageCorpus:
    """Load a prior-training corpus from a stimulus ``.npz`` or an image folder.

    * ``.npz`` (as the SynthCortex simulator writes ``stimuli/corpus.npz``): ``images`` ``[M, H, W, 3]``
      uint8, ``labels`` ``[M]`` and ``class_names`` (both optional: without labels every image is class 0).
    * a folder: either one sub-folder per class (the sub-folder names, sorted, are the classes) or image files
      directly (one class). Files are read with Pillow and converted to RGB.

    Images of mixed sizes are an error unless ``resize_mixed`` is set; then every image is centre-cropped to a
    square and resized to ``resolution`` (or to the first image's size) with a warning. A corpus of one size
    that differs from ``resolution`` is resized to it (the training resolution), logged at info level.
    Non-square images are centre-cropped to a square.

    Returns:
        An :class:`ImageCorpus` with ``[M, S, S, 3]`` images.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("not found (expected a corpus .npz or an image folder)", path=path)
    if path.is_file():
        images, labels, class_names = _read_corpus_npz(path)
        side = images.shape[1]
        if images.shape[2] == side and (resolution is None or resolution == side):
            # one size already at the training resolution: keep the memory-mapped array as it is
            return ImageCorpus(images, labels.astype(np.int64), class_names, str(path))
        image_list = list(images)
    else:
        image_list, labels, class_names, names = _read_image_folder(path)
    sizes = {im.shape[:2] for im in image_list}
    if len(sizes) > 1 and not resize_mixed:
        listed = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:4])
        raise DataError(
            f"images have mixed sizes ({listed}); pass --resize-mixed to centre-crop and resize "
            "them to one size",
            path=path,
            field="images",
        )
    target = resolution or min(min(s) for s in sizes)
    changed = sum(1 for im in image_list if im.shape[:2] != (target, target))
    if changed:
        log = _logger.warning if len(sizes) > 1 else _logger.info
        log(
            "%s: %d of %d images centre-cropped/resized to %dx%d",
            path,
            changed,
            len(image_list),
            target,
            target,
        )
        image_list = [_center_square_resize(im, target) for im in image_list]
    stacked = np.ascontiguousarray(np.stack(image_list).astype(np.uint8, copy=False))
    return ImageCorpus(stacked, labels.astype(np.int64), class_names, str(path))


def _read_corpus_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    # the images are memory-mapped (uncompressed members, as the simulator writes them): a corpus of any
    # size is read from disk as batches need it, not loaded whole
    try:
        with NpzArchive(path) as z:
            if "images" not in z:
                raise DataError(f"no 'images' array (keys: {', '.join(z.keys)})", path=path, field="images")
            images = z.get("images")
            labels = np.asarray(z.get("labels", mmap=False)) if "labels" in z else None
            names = [str(n) for n in z.get("class_names", mmap=False)] if "class_names" in z else None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read as .npz ({exc})", path=path) from None
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(
            f"expected uint8 [M, H, W, 3], got {images.dtype} {images.shape}", path=path, field="images"
        )
    if labels is None:
        _logger.warning("%s: no 'labels' array; every image is class 0", path)
        labels = np.zeros(len(images), np.int64)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"image/label count mismatch: {len(images)} images, labels {labels.dtype} {labels.shape}",
            path=path,
            field="labels",
        )
    if names is None:
        names = [f"class_{i}" for i in range(int(labels.max()) + 1 if len(labels) else 1)]
    return images, labels, names


def _read_image_folder(path: Path) -> tuple[list[np.ndarray], np.ndarray, list[str], list[str]]:
    from PIL import Image

    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = (
        [(d.name, sorted(d.iterdir())) for d in subdirs] if subdirs else [(path.name, sorted(path.iterdir()))]
    )
    images, labels, names, classes = [], [], [], []
    for cls, files in groups:
        files = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            continue
        for f in files:
            try:
                with Image.open(f) as im:
                    images.append(np.asarray(im.convert("RGB")))
            except OSError as exc:
                raise DataError(f"cannot read image ({exc})", path=f) from None
            labels.append(len(classes))
            names.append(str(f))
        classes.append(cls)
    if not images:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found", path=path)
    return images, np.asarray(labels, np.int64), classes, names


def images_to_model(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in ``[-1, 1]``."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def model_to_uint8(x: torch.Tensor) -> np.ndarray:
    """float ``[B, 3, H, W]`` in ``[-1, 1]`` -> uint8 ``[B, H, W, 3]`` (rounded)."""
    return (
        ((x.detach().float().clamp(-1, 1) + 1) * 127.5)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .cpu()
        .numpy()
    )


class ImageLabelDataset(torch.utils.data.Dataset):
    """Items ``(image [3, S, S] in [-1, 1], label)`` of an :class:`ImageCorpus`, with optional horizontal flips."""

    def __init__(self, corpus: ImageCorpus, flip: bool = False) -> None:
        self.corpus = corpus
        self.flip = flip

    def __len__(self) -> int:
        return len(self.corpus.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = images_to_model(self.corpus.images[i : i + 1])[0]
        if self.flip and float(torch.rand(())) < 0.5:
            x = x.flip(-1)
        return x, torch.tensor(int(self.corpus.labels[i]))


# ----------------------------------------------------------------------------------------------------------
# Image quality on held-out images
# ----------------------------------------------------------------------------------------------------------


def psnr_ssim(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR (dB) and SSIM of images in ``[-1, 1]``, measured on the 8-bit images as they are saved.

    PSNR uses peak 255 on all pixels and channels; SSIM is :func:`mindvis.eval.metrics.ssim_pairs` (scikit-image
    convention: 7x7 uniform window, per-channel mean, data range 255).

    Args:
        pred, target: ``[B, 3, H, W]``.
    Returns:
        ``(psnr [B], ssim [B])`` float32 on the CPU.
    """
    p, t = model_to_uint8(pred), model_to_uint8(target)
    mse = ((p.astype(np.float64) - t.astype(np.float64)) ** 2).reshape(len(p), -1).mean(1)
    psnr = 10.0 * np.log10(255.0**2 / np.maximum(mse, 1e-10))
    ssim = ssim_pairs(p, t)
    return torch.as_tensor(psnr, dtype=torch.float32), torch.as_tensor(ssim, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Perceptual and adversarial parts of the autoencoder loss
# ----------------------------------------------------------------------------------------------------------


class LocalLPIPS(nn.Module):
    """LPIPS (Zhang et al., CVPR 2018) whose backbone is loaded from a local torchvision weights file.

    The learned linear heads ship with torchmetrics; the ImageNet backbone must be supplied by the user (e.g.
    ``vgg16-397923af.pth``). Every backbone parameter must be found in the file: a random backbone is never
    used as if it were LPIPS.

    Args:
        weights: torchvision state dict file of the backbone (``features.N.weight`` ... keys).
        net: ``"vgg"``, ``"alex"`` or ``"squeeze"``.
    """

    def __init__(self, weights: str | os.PathLike, net: Literal["vgg", "alex", "squeeze"] = "vgg") -> None:
        super().__init__()
        try:
            from torchmetrics.functional.image.lpips import _LPIPS
        except ImportError as exc:  # pragma: no cover
            raise WeightsUnavailable(f"LPIPS needs torchmetrics ({exc})") from None
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailable("LPIPS backbone weights not found", path=path, field="lpips_weights")
        self.model = _LPIPS(pretrained=True, net=net, pnet_rand=True, pnet_tune=False, use_dropout=False)

        try:
            state = load_state_dict(path)
        except MindVisError as exc:
            raise WeightsUnavailable(
                f"cannot read LPIPS backbone weights ({exc.detail})", path=path
            ) from None
        loaded = 0
        with torch.no_grad():
            for name, param in self.model.net.named_parameters():
                # slices hold the torchvision `features` modules under their original indices
                key = "features." + re.sub(r"^(slice\d+|slices\.\d+)\.", "", name)
                if key not in state or tuple(state[key].shape) != tuple(param.shape):
                    got = tuple(state[key].shape) if key in state else "missing"
                    raise WeightsUnavailable(
                        f"not a torchvision {net} backbone: {key} expected {tuple(param.shape)}, got {got}",
                        path=path,
                        field=key,
                    )
                param.copy_(state[key])
                loaded += 1
        self.train(False)
        for p in self.model.parameters():
            p.requires_grad_(False)
        _logger.info("LPIPS (%s) backbone: %d tensors from %s", net, loaded, path)

    def train(self, mode: bool = True) -> LocalLPIPS:  # the perceptual network always stays in eval mode
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x, y: [B, 3, H, W]`` in ``[-1, 1]`` -> mean LPIPS distance (scalar)."""
        return self.model(x, y).mean()


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, as used by VQGAN): ``[B, 3, H, W]`` -> logits ``[B, 1, h, w]``."""

    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            mods += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        mods.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------------------------------------
# The VQ autoencoder
# ----------------------------------------------------------------------------------------------------------


@dataclass
class VQTrainConfig:
    """Training settings of the VQ autoencoder.

    Attributes:
        lr: Adam learning rate of the autoencoder (betas 0.5, 0.9 as VQGAN).
        recon_loss: pixel reconstruction loss.
        codebook_weight: weight of ``|sg[h] - e|^2`` (moves the codes; unused with ``codebook_ema``).
        codebook_ema: update the codes as exponential moving averages of the encoder outputs assigned to
            them (online k-means, van den Oord et al. 2017, appendix) instead of by the codebook loss; this
            converges much faster from a random start.
        codebook_decay: decay of those averages.
        commitment_weight: ``beta`` of ``|h - sg[e]|^2`` (keeps the encoder near its codes).
        lpips_weight: weight of the LPIPS term; used only when ``lpips_weights`` is given.
        lpips_weights: local torchvision backbone weights for LPIPS (``None``: no perceptual term).
        lpips_net: LPIPS backbone.
        gan_weight: patch-GAN generator weight (0 turns the discriminator off).
        gan_start_step: optimizer step at which the adversarial terms start.
        disc_lr: discriminator learning rate (``None``: ``lr``).
        disc_layers, disc_channels: discriminator size.
        dead_code_reinit: re-initialise codes unused for ``dead_code_every`` steps from encoder outputs.
        dead_code_every: window length (steps) for dead-code detection.
        grad_clip: gradient norm clip (``None``: off).
        flip: random horizontal flips of training images.
    """

    lr: float = 2e-4
    recon_loss: Literal["l1", "l2"] = "l1"
    codebook_weight: float = 1.0
    codebook_ema: bool = True
    codebook_decay: float = 0.99
    commitment_weight: float = 0.25
    lpips_weight: float = 1.0
    lpips_weights: str | None = None
    lpips_net: Literal["vgg", "alex", "squeeze"] = "vgg"
    gan_weight: float = 0.0
    gan_start_step: int = 0
    disc_lr: float | None = None
    disc_layers: int = 3
    disc_channels: int = 64
    dead_code_reinit: bool = True
    dead_code_every: int = 100
    grad_clip: float | None = 1.0
    flip: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"must be positive, got {self.lr}", field="vq.lr")
        if self.recon_loss not in ("l1", "l2"):
            raise ConfigError(f"must be 'l1' or 'l2', got {self.recon_loss!r}", field="vq.recon_loss")
        for name in ("codebook_weight", "commitment_weight", "lpips_weight", "gan_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, name)}", field=f"vq.{name}")
        if self.dead_code_every < 1:
            raise ConfigError(f"must be >= 1, got {self.dead_code_every}", field="vq.dead_code_every")
        if not 0.0 < self.codebook_decay < 1.0:
            raise ConfigError(f"must be in (0, 1), got {self.codebook_decay}", field="vq.codebook_decay")
        if self.lpips_net not in ("vgg", "alex", "squeeze"):
            raise ConfigError(f"must be vgg, alex or squeeze, got {self.lpips_net!r}", field="vq.lpips_net")

    @property
    def use_gan(self) -> bool:
        return self.gan_weight > 0

    @property
    def use_lpips(self) -> bool:
        return self.lpips_weights is not None and self.lpips_weight > 0


def codebook_usage(counts: torch.Tensor) -> tuple[float, int]:
    """``(perplexity, dead codes)`` of a code-use histogram ``counts: [K]``.

    Perplexity ``exp(-sum p log p)`` is the effective number of codes in use (1 ... K).
    """
    total = counts.sum()
    if total <= 0:
        return 0.0, int(counts.numel())
    p = counts.double() / total
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    return float(ent.exp()), int((counts == 0).sum())


class VQAutoencoderModule(pl.LightningModule):
    """Lightning module training a diffusers ``VQModel`` (manual optimisation: autoencoder and discriminator).

    Batches are ``(images [B, 3, H, W] in [-1, 1], labels [B])``.
    """

    def __init__(self, vq: nn.Module, config: VQTrainConfig) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.vq = vq
        self.config = config
        n_codes = int(vq.config.num_vq_embeddings)
        self.register_buffer("epoch_counts", torch.zeros(n_codes), persistent=False)
        self.register_buffer("window_counts", torch.zeros(n_codes), persistent=False)
        self.register_buffer("val_counts", torch.zeros(n_codes), persistent=False)
        if config.codebook_ema:
            # running cluster sizes and sums of the online k-means (saved with the checkpoints)
            self.register_buffer("ema_count", torch.ones(n_codes))
            self.register_buffer("ema_sum", vq.quantize.embedding.weight.detach().clone())
            vq.quantize.embedding.weight.requires_grad_(False)
        self.discriminator = (
            PatchDiscriminator(config.disc_channels, config.disc_layers) if config.use_gan else None
        )
        self.lpips = LocalLPIPS(config.lpips_weights, config.lpips_net) if config.use_lpips else None
        if self.lpips is None:
            _logger.info(
                "no LPIPS backbone weights given (--lpips-weights): training the VQ without a "
                "perceptual loss term"
            )
        self.dead_codes_reset = 0

    # -- steps ----------------------------------------------------------------------------------------------

    def quantize(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest-code quantisation with straight-through gradients.

        Args:
            h: ``[B, D, h, w]`` pre-quantisation latent (encoder + quant_conv).
        Returns:
            ``(z_q [B, D, h, w] straight-through, indices [B, h, w], codebook loss, commitment loss)``.
        """
        with torch.no_grad():
            idx = vq_quantize(self.vq, h).indices  # [B, h, w], the same search decoding uses
        e = self.vq.quantize.embedding(idx).permute(0, 3, 1, 2)
        codebook = F.mse_loss(e, h.detach())
        commit = F.mse_loss(h, e.detach())
        return h + (e - h).detach(), idx, codebook, commit

    def reconstruct(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x: [B, 3, H, W]`` -> ``(x_rec, h, indices, codebook loss, commitment loss)``."""
        h = self.vq.encode(x).latents
        zq, idx, codebook, commit = self.quantize(h)
        x_rec = self.vq.decode(zq, force_not_quantize=True).sample
        return x_rec, h, idx, codebook, commit

    def _recon_loss(self, x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x_rec - x).abs().mean() if self.config.recon_loss == "l1" else F.mse_loss(x_rec, x)

    def _adaptive_gan_weight(self, nll: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        last = self.vq.decoder.conv_out.weight
        g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        w = g_nll.norm() / (g_adv.norm() + 1e-4)
        return w.clamp(0.0, 1e4).detach() * self.config.gan_weight

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0]
        opts = self.optimizers()
        opt_ae, opt_d = opts if isinstance(opts, list | tuple) else (opts, None)
        cfg = self.config
        gan_on = (
            self.discriminator is not None and self.global_step // (2 if opt_d else 1) >= cfg.gan_start_step
        )

        x_rec, h, idx, codebook, commit = self.reconstruct(x)
        rec = self._recon_loss(x_rec, x)
        nll = rec
        logs = {
            "train/rec": rec.detach(),
            "train/codebook": codebook.detach(),
            "train/commit": commit.detach(),
        }
        if self.lpips is not None:
            lp = self.lpips(x_rec, x)
            nll = nll + cfg.lpips_weight * lp
            logs["train/lpips"] = lp.detach()
        loss = nll + cfg.commitment_weight * commit
        if not cfg.codebook_ema:
            loss = loss + cfg.codebook_weight * codebook
        if gan_on:
            g_loss = -self.discriminator(x_rec).mean()
            w = self._adaptive_gan_weight(nll, g_loss)
            loss = loss + w * g_loss
            logs["train/g_loss"] = g_loss.detach()
            logs["train/g_weight"] = w
        opt_ae.zero_grad()
        self.manual_backward(loss)
        if cfg.grad_clip:
            self.clip_gradients(opt_ae, gradient_clip_val=cfg.grad_clip, gradient_clip_algorithm="norm")
        opt_ae.step()

        if opt_d is not None:
            opt_d.zero_grad()
            if gan_on:
                real, fake = self.discriminator(x.detach()), self.discriminator(x_rec.detach())
                d_loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
                self.manual_backward(d_loss)
                if cfg.grad_clip:
                    self.clip_gradients(
                        opt_d, gradient_clip_val=cfg.grad_clip, gradient_clip_algorithm="norm"
                    )
                logs["train/d_loss"] = d_loss.detach()
            opt_d.step()  # a step without gradients changes nothing but keeps the step count in lockstep

        counts = torch.bincount(idx.flatten(), minlength=self.epoch_counts.numel()).to(self.epoch_counts)
        if cfg.codebook_ema:
            self._ema_codebook_update(h.detach(), idx)
        self.epoch_counts += counts
        self.window_counts += counts
        if cfg.dead_code_reinit and (batch_idx + 1) % cfg.dead_code_every == 0:
            self._reinit_dead_codes(h.detach())
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, sync_dist=False)
        self.log_dict(logs, on_step=True, on_epoch=True)
        return loss.detach()

    @torch.no_grad()
    def _ema_codebook_update(self, h: torch.Tensor, idx: torch.Tensor) -> None:
        """Online k-means step: codes move to the decayed mean of the encoder outputs assigned to them.

        Args:
            h: ``[B, D, h, w]`` encoder outputs; idx: ``[B, h, w]`` their codes.
        """
        k = self.ema_count.numel()
        flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]).float()
        n = torch.bincount(idx.flatten(), minlength=k).to(flat)
        sums = torch.zeros(k, flat.shape[1], device=flat.device).index_add_(0, idx.flatten(), flat)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(n)
            torch.distributed.all_reduce(sums)
        d = self.config.codebook_decay
        self.ema_count.mul_(d).add_(n, alpha=1 - d)
        self.ema_sum.mul_(d).add_(sums, alpha=1 - d)
        total = self.ema_count.sum()
        smoothed = (
            (self.ema_count + 1e-5) / (total + k * 1e-5) * total
        )  # Laplace smoothing keeps rare codes finite
        self.vq.quantize.embedding.weight.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def _reinit_dead_codes(self, h: torch.Tensor) -> None:
        """Replace codes unused in the last window by random encoder outputs of this batch (same on all ranks)."""
        distributed = self._trainer is not None and self.trainer.world_size > 1
        counts = self.window_counts
        if distributed:
            counts = self.all_gather(counts).sum(0)
        dead = (counts == 0).nonzero().flatten()
        self.window_counts.zero_()
        if dead.numel() == 0:
            return
        vecs = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        pick = torch.randint(0, vecs.shape[0], (dead.numel(),), device=vecs.device)
        new = vecs[pick] + 0.01 * vecs.std() * torch.randn_like(vecs[pick])
        if distributed:
            new = self.trainer.strategy.broadcast(new, src=0)
        self.vq.quantize.embedding.weight.data[dead] = new.to(self.vq.quantize.embedding.weight.dtype)
        if self.config.codebook_ema:
            self.ema_sum[dead] = new.to(self.ema_sum.dtype)
            self.ema_count[dead] = 1.0
        self.dead_codes_reset += int(dead.numel())
        _logger.info("re-initialised %d dead codes", dead.numel())

    def on_train_epoch_end(self) -> None:
        counts = self.epoch_counts
        if self.trainer.world_size > 1:
            counts = self.all_gather(counts).sum(0)
        ppl, dead = codebook_usage(counts)
        self.log_dict({"train/perplexity": ppl, "train/dead_codes": float(dead)}, rank_zero_only=True)
        self.epoch_counts.zero_()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = batch[0]
        x_rec, _, idx, _, _ = self.reconstruct(x)
        psnr, ssim = psnr_ssim(x_rec, x)
        self.val_counts += torch.bincount(idx.flatten(), minlength=self.val_counts.numel()).to(
            self.val_counts
        )
        bs = x.shape[0]
        self.log("val/rec", self._recon_loss(x_rec, x), batch_size=bs, sync_dist=True)
        self.log("val/psnr", psnr.mean(), batch_size=bs, prog_bar=True, sync_dist=True)
        self.log("val/ssim", ssim.mean(), batch_size=bs, prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        counts = self.val_counts
        if self.trainer.world_size > 1:
            counts = self.all_gather(counts).sum(0)
        ppl, dead = codebook_usage(counts)
        self.log_dict({"val/perplexity": ppl, "val/dead_codes": float(dead)}, rank_zero_only=True)
        self.val_counts.zero_()

    def export_pretrained(self, directory: str | os.PathLike) -> None:
        """diffusers ``save_pretrained`` of the VQModel (``config.json`` + safetensors)."""
        self.vq.save_pretrained(str(directory), safe_serialization=True)

    def configure_optimizers(self) -> Any:
        cfg = self.config
        params = [p for p in self.vq.parameters() if p.requires_grad]  # the EMA codebook is not optimised
        opt_ae = torch.optim.Adam(params, lr=cfg.lr, betas=(0.5, 0.9))
        if self.discriminator is None:
            return opt_ae
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.disc_lr or cfg.lr, betas=(0.5, 0.9))
        return [opt_ae, opt_d]


# ----------------------------------------------------------------------------------------------------------
# The class-conditional UNet on frozen VQ latents
# ----------------------------------------------------------------------------------------------------------


@dataclass
class UNetTrainConfig:
    """Training settings of the class-conditional denoiser.

    Attributes:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        ema_decay: decay of the exponential moving average of the UNet and class embedding (``None``: no EMA).
            With EMA, validation samples and the exported prior use the averaged weights.
        class_dropout: probability of replacing a label by the null class during training (for
            classifier-free guidance; 0 = never, as the original prior).
        grad_clip: gradient norm clip (``None``: off).
        sample_every: draw class sample grids every this many validation runs.
        samples_per_class: columns of the grid.
        sample_steps: sampler steps for the grids.
        sampler: sampler for the grids.
        guidance_scale: classifier-free guidance of the grids and the class-accuracy samples (1: none; other
            values need a null class trained with ``class_dropout``).
    """

    lr: float = 2e-4
    weight_decay: float = 0.0
    ema_decay: float | None = 0.999
    class_dropout: float = 0.0
    grad_clip: float | None = 1.0
    sample_every: int = 1
    samples_per_class: int = 4
    sample_steps: int = 50
    sampler: Literal["plms", "ddim", "dpmsolver++"] = "ddim"
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"must be positive, got {self.lr}", field="unet.lr")
        if self.guidance_scale != 1.0 and self.class_dropout <= 0:
            _logger.warning(
                "guidance_scale %s without class_dropout: the null class is never trained",
                self.guidance_scale,
            )
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"must be in (0, 1) or None, got {self.ema_decay}", field="unet.ema_decay")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"must be in [0, 1), got {self.class_dropout}", field="unet.class_dropout")
        for name in ("sample_every", "samples_per_class", "sample_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", field=f"unet.{name}")
        if self.sampler not in ("plms", "ddim", "dpmsolver++"):
            raise ConfigError(
                f"must be plms, ddim or dpmsolver++, got {self.sampler!r}", field="unet.sampler"
            )


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
            path = self.sample_dir / f"samples_epoch{self.current_epoch:04d}.png"
            save_grid(
                images.reshape(len(self.class_names), self.config.samples_per_class, *images.shape[1:]),
                path,
                row_labels=self.class_names,
            )
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


def save_grid(
    images: np.ndarray, path: str | os.PathLike, row_labels: list[str] | None = None, pad: int = 2
) -> Path:
    """Write ``images: [R, C, H, W, 3]`` uint8 as one PNG grid (rows x columns), atomically.

    With ``row_labels`` a strip on the left names each row.
    """
    from PIL import Image, ImageDraw

    images = np.asarray(images)
    if images.ndim != 5 or images.shape[-1] != 3:
        raise DataError(f"expected [rows, cols, H, W, 3], got {images.shape}", field="images")
    r, c, h, w, _ = images.shape
    left = 0 if not row_labels else max(8 + 6 * max(len(s) for s in row_labels), 0)
    canvas = np.full((r * (h + pad) + pad, left + c * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(r):
        for j in range(c):
            y, x = pad + i * (h + pad), left + pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = images[i, j]
    img = Image.fromarray(canvas)
    if row_labels:
        draw = ImageDraw.Draw(img)
        for i, name in enumerate(row_labels[:r]):
            draw.text((4, pad + i * (h + pad) + h // 2 - 5), str(name), fill=(0, 0, 0))
    path = Path(path)
    with atomic_write(path) as fh:
        img.save(fh, format="PNG")
    return path


# ----------------------------------------------------------------------------------------------------------
# The whole prior: VQ, then UNet, then the pipeline folder
# ----------------------------------------------------------------------------------------------------------


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


def warn_instance_norm(ldm: Any) -> list[str]:
    """Warn about layers whose GroupNorm has one channel per group (``width == norm_groups``).

    Such a GroupNorm normalises every channel over space on its own, which erases any per-channel constant: in
    the UNet the time embedding (and a class embedding seen through cross-attention to a single token) added to
    the features, in the autoencoder the global colour. A model built that way cannot learn the noise level;
    use ``norm_groups`` of at most half the narrowest width. Returns the warnings.
    """
    out = []
    u, v = ldm.unet, ldm.vq
    if min(u.block_channels) <= u.norm_groups:
        out.append(
            f"UNet width {min(u.block_channels)} with {u.norm_groups} GroupNorm groups: one channel per "
            "group removes the time embedding (the denoiser cannot tell the noise level); set "
            f"norm_groups <= {min(u.block_channels) // 2}"
        )
    if v.ch * min(v.ch_mult) <= v.norm_groups:
        out.append(
            f"VQ width {v.ch * min(v.ch_mult)} with {v.norm_groups} GroupNorm groups: one channel per "
            f"group removes global colour offsets; set norm_groups <= {v.ch * min(v.ch_mult) // 2}"
        )
    for msg in out:
        _logger.warning(msg)
    return out


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
    if config.lpips_weights is None:
        _logger.warning(
            "LPIPS perceptual loss: off (no local backbone weights; pass --lpips-weights FILE to "
            "use it). The VQ trains with pixel, codebook and commitment losses%s.",
            " and the patch-GAN" if config.use_gan else "",
        )


def evaluate_vq(
    vq: nn.Module,
    images: np.ndarray,
    batch_size: int = 32,
    labels: np.ndarray | None = None,
    classifier: Any = None,
) -> dict[str, float]:
    """Reconstruction quality and code use of a VQ on uint8 images ``[M, H, W, 3]``.

    With ``labels`` and a ``classifier`` (``uint8 [N, H, W, 3] -> labels [N]``), also how often the classifier
    names the class of the images and of their reconstructions: the second is the most that class samples
    decoded by this VQ can be expected to score.

    Returns:
        ``psnr`` and ``ssim`` (means over images, see :func:`psnr_ssim`), ``perplexity`` and ``dead_codes``
        of the code histogram, ``num_codes`` and ``num_images``; with a classifier, ``class_accuracy_images``
        and ``class_accuracy_reconstructions``.
    """
    vq.eval()
    device = next(vq.parameters()).device
    psnrs, ssims, recons = [], [], []
    scored = classifier is not None and labels is not None
    counts = torch.zeros(int(vq.config.num_vq_embeddings), dtype=torch.float64)
    with torch.no_grad():
        for a in range(0, len(images), batch_size):
            x = images_to_model(images[a : a + batch_size]).to(device)
            h = vq_encode(vq, x)
            counts += torch.bincount(
                vq_quantize(vq, h).indices.flatten().cpu(), minlength=counts.numel()
            ).double()
            rec = vq_decode(vq, h)
            p, s = psnr_ssim(rec, x)
            psnrs.append(p)
            ssims.append(s)
            if scored:
                recons.append(model_to_uint8(rec))
    ppl, dead = codebook_usage(counts)
    out: dict[str, float] = {
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "perplexity": ppl,
        "dead_codes": dead,
        "num_codes": int(counts.numel()),
        "num_images": int(len(images)),
    }
    if scored:
        labels = np.asarray(labels)
        out["class_accuracy_images"] = float((np.asarray(classifier(images)) == labels).mean())
        out["class_accuracy_reconstructions"] = float(
            (np.asarray(classifier(np.concatenate(recons))) == labels).mean()
        )
    return out


def class_sample_accuracy(
    model: nn.Module,
    classifier: Any,
    class_names: list[str],
    per_class: int,
    num_steps: int,
    sampler: str,
    seed: int = 1,
    guidance_scale: float = 1.0,
) -> dict[str, Any]:
    """Fraction of class-conditional samples that ``classifier`` assigns to the requested class.

    ``classifier`` maps uint8 images ``[N, H, W, 3]`` to predicted class indices ``[N]`` over ``class_names``.
    """
    images, labels = sample_class_grid(
        model, len(class_names), per_class, num_steps, sampler, seed=seed, guidance_scale=guidance_scale
    )
    pred = np.asarray(classifier(images))
    hit = pred == labels
    per = {name: float(hit[labels == i].mean()) for i, name in enumerate(class_names)}
    return {
        "accuracy": float(hit.mean()),
        "chance": 1.0 / len(class_names),
        "per_class": per,
        "samples": int(len(labels)),
        "guidance_scale": guidance_scale,
        "sampler": sampler,
        "steps": num_steps,
    }


def classifier_callable(classifier: Any, class_names: list[str]) -> Any:
    """Wrap an :class:`~mindvis.eval.classifier.ImageClassifier` over the same classes as a label predictor."""
    names = list(getattr(classifier, "class_names", class_names))
    if names != list(class_names):
        raise ConfigError(
            f"the classifier's classes ({', '.join(names[:5])}...) are not the corpus classes "
            f"({', '.join(class_names[:5])}...)",
            field="classifier",
        )
    return lambda images: classifier.predict(images).probs.argmax(1)


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
    if is_primary_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(
            out_dir,
            "train-prior",
            {"prior": config.to_dict(), "ldm": ldm_cfg.to_dict(), "trainer": trainer_config.to_dict()},
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
        save_grid(np.stack([show, rec]), vq_dir / "recon_holdout.png", row_labels=["input", "VQ"])

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
        save_grid(
            images.reshape(corpus.num_classes, config.unet.samples_per_class, *images.shape[1:]),
            out_dir / "samples_per_class.png",
            row_labels=corpus.class_names,
        )
        save_prior_pipeline(final, out_dir / "pipeline", corpus.class_names)  # complete or absent
        write_json(out_dir / "metrics.json", metrics)
        _logger.info("prior pipeline: %s", out_dir / "pipeline")
    return metrics


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
