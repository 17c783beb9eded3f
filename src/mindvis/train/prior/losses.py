"""The perceptual and adversarial parts of the VQ autoencoder's loss: LPIPS on a local backbone, a perceptual
distance on the features of a CNN trained on the corpus (where no ImageNet backbone is at hand), and the
patch-GAN discriminator."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from mindvis.errors import MindVisError, WeightsUnavailable
from mindvis.eval.classifier import BenchmarkClassifier
from mindvis.safeload import load_state_dict
from mindvis.utils.images import resize_tensor

_logger = logging.getLogger(__name__)


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


class ClassifierPerceptual(nn.Module):
    """A perceptual distance on the activations of a benchmark classifier CNN trained on the image corpus.

    LPIPS compares images by the activations of an ImageNet network; the original's VQ-f4 was trained with it.
    Where no ImageNet weights are available, a CNN trained to name the corpus's classes plays the same part: the
    autoencoder is pushed to keep what tells the classes apart (shape, texture), not only the pixels' mean. As in
    LPIPS, the activations after each ReLU are unit-normalised along the channels and their squared
    differences averaged over channels and positions; the layers are weighted equally (LPIPS's learned
    per-channel weights exist only for its ImageNet backbones). Use a classifier other than the one that judges
    the results (another seed or architecture), so that the judge stays independent of the training.

    Args:
        folder: a classifier folder written by ``mindvis train-classifier``.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        super().__init__()
        clf = BenchmarkClassifier.load(folder)
        self.body = clf.model.body
        self.size = int(clf.config.input_size)
        self.register_buffer("mean", torch.as_tensor(clf.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.as_tensor(clf.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.train(False)
        for p in self.body.parameters():
            p.requires_grad_(False)
        _logger.info("perceptual loss on the features of the classifier %s", folder)

    def train(self, mode: bool = True) -> ClassifierPerceptual:  # always in eval mode (batch-norm statistics)
        return super().train(False)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = resize_tensor((x + 1.0) / 2.0, self.size)  # [-1, 1] -> [0, 1], the classifier's input scale
        h = (x - self.mean) / self.std
        feats = []
        for layer in self.body:
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                feats.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x, y: [B, 3, H, W]`` in ``[-1, 1]`` -> mean distance (scalar); gradients flow to ``x`` only."""
        fx = self._features(x)
        with torch.no_grad():
            fy = self._features(y)
        return torch.stack([(a - b).pow(2).sum(dim=1).mean() for a, b in zip(fx, fy, strict=True)]).mean()


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
