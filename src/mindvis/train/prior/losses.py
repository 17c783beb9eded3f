"""The perceptual and adversarial parts of the VQ autoencoder's loss: LPIPS on a local backbone and the
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
from mindvis.safeload import load_state_dict

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
