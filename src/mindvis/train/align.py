"""The context warm start of stage B (not in the original; ``StageBConfig.align_epochs``, ``mindvis train
--align-epochs``): a supervised pre-training of the fMRI encoder and the conditioner that regresses every context
token of a training sample onto the prior's embedding of its image's class, before the diffusion finetune
(:func:`align_context`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from mindvis.data.paired import sparse_voxel_dropout
from mindvis.errors import DataError

_logger = logging.getLogger(__name__)


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
