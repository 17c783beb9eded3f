"""How good a prior is: reconstruction quality and code use of its VQ, and how often a classifier names
the class its class-conditional samples were drawn for."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from mindvis.errors import ConfigError
from mindvis.eval.metrics import ssim_pairs
from mindvis.models.ldm import vq_decode, vq_encode, vq_quantize
from mindvis.train.prior.model import sample_class_grid
from mindvis.utils.images import images_to_model, model_to_uint8


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
