"""Optimisation helpers used by the original recipes.

:func:`param_groups_weight_decay` (no decay on biases, norms and other 1-D tensors), :class:`WarmupCosine`
(linear warmup then half-cycle cosine, per iteration) and :func:`make_adamw` (torch's fused AdamW kernel
wherever it applies).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def param_groups_weight_decay(
    module: torch.nn.Module, weight_decay: float, no_decay_names: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Two AdamW parameter groups: no decay for biases, norms and every tensor of at most one dimension, and
    ``weight_decay`` for the rest. Frozen parameters (``requires_grad=False``) are left out.

    The no-decay group comes first, as in the original stage-A optimizer state.
    """
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in no_decay_names:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": float(weight_decay)},
    ]


class WarmupCosine:
    """Learning-rate factor per optimizer step: linear warmup, then half-cycle cosine to ``min_lr``.

    With ``e = step / steps_per_epoch`` (fractional epochs), the learning rate is ``lr * e / warmup`` during
    the warmup and ``min_lr + (lr - min_lr) * (1 + cos(pi * (e - warmup) / (epochs - warmup))) / 2`` after it.
    The factor returned is that value divided by ``lr`` (for ``torch.optim.lr_scheduler.LambdaLR``). A plain
    class, so that its state in a checkpoint is a dict of numbers.
    """

    def __init__(self, lr: float, min_lr: float, warmup_epochs: float, epochs: float, steps_per_epoch: float):
        self.lr = float(lr)
        self.min_lr = float(min_lr)
        self.warmup_epochs = float(warmup_epochs)
        self.epochs = float(epochs)
        self.steps_per_epoch = max(float(steps_per_epoch), 1e-12)

    def lr_at(self, step: int) -> float:
        e = step / self.steps_per_epoch
        if e < self.warmup_epochs:
            return self.lr * e / self.warmup_epochs
        span = max(self.epochs - self.warmup_epochs, 1e-12)
        progress = min(max((e - self.warmup_epochs) / span, 0.0), 1.0)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.lr_at(step) / self.lr if self.lr > 0 else 0.0


def make_adamw(params: Any, **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with torch's fused kernel when every parameter allows it (floating point, on a
    CPU or a CUDA device), else the default implementation. Call it after the module is on its device, as
    Lightning's ``configure_optimizers`` is."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, Mapping) else [g])]
    fused = bool(tensors) and all(
        isinstance(p, torch.Tensor) and p.is_floating_point() and p.device.type in ("cpu", "cuda")
        for p in tensors
    )
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


__all__ = ["WarmupCosine", "make_adamw", "param_groups_weight_decay"]
