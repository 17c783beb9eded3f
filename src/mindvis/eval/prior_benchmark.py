"""How good the embedded benchmark's two stand-ins are: the judge (the n-way classifier) and the image prior.

The original's stand-ins are the ImageNet label2img LDM and ViT-H/14; the semantic metric of the benchmark can
be no better than its judge, and stage B can learn the class of the seen image from the diffusion loss only when
the prior's denoising depends on the class. :func:`evaluate_stand_ins` measures both on composites of the
stimulus source's **test-split objects**, which neither the judge nor the prior saw in training (the prior's
corpus and the judge's training images are composites of training-split objects):

- the judge: top-1 accuracy, per class, and its confusion matrix;
- the VQ: PSNR/SSIM of its reconstructions and how much of the judge's accuracy they keep;
- the UNet: the share of class samples the judge assigns to the requested class, without classifier-free
  guidance and at the guidance scale the demo uses;
- the class signal of the denoising loss (:func:`mindvis.eval.probe.prior_class_signal`): the own-class loss
  advantage and the diffusion-classifier accuracy.

It writes ``evaluation.json`` and three figures (the judge's confusion matrix, VQ reconstructions, class samples).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mindvis.errors import ConfigError
from mindvis.eval.classifier import BenchmarkClassifier
from mindvis.eval.probe import prior_class_signal
from mindvis.models.ldm import vq_decode, vq_encode
from mindvis.synthcortex import make_stimulus_set
from mindvis.train.prior import class_sample_accuracy, classifier_callable, evaluate_vq, sample_class_grid
from mindvis.train.stage_b_model import load_prior
from mindvis.utils.images import image_grid, images_to_model, model_to_uint8, save_png
from mindvis.utils.io import atomic_write, write_json

logger = logging.getLogger(__name__)

#: Names of the figures :func:`evaluate_stand_ins` writes.
FIGURES = {
    "confusion": "judge_confusion.png",
    "vq": "vq_reconstructions.png",
    "samples": "class_samples.png",
}


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """``[K, K]`` counts: row = true class, column = predicted class."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(labels, np.int64), np.asarray(predicted, np.int64)), 1)
    return m


def save_confusion_png(matrix: np.ndarray, class_names: list[str], path: str | Path, title: str) -> Path:
    """The row-normalised confusion matrix as a labelled heat map (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import io

    import matplotlib.pyplot as plt

    rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(0.32 * k + 2.5, 0.32 * k + 2.0), dpi=110)
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set_xlabel("judged as")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=8)
    for i in range(k):
        for j in range(k):
            if rows[i, j] >= 0.05:
                ax.text(
                    j,
                    i,
                    f"{100 * rows[i, j]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=5,
                    color="white" if rows[i, j] > 0.5 else "black",
                )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = Path(path)
    with atomic_write(path) as fh:
        fh.write(buf.getvalue())
    return path


def _upscale(images: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement of ``[..., H, W, 3]`` (the pixels stay visible as the model made them)."""
    return images.repeat(factor, axis=-3).repeat(factor, axis=-2) if factor > 1 else images


def evaluate_stand_ins(
    judge: Any,
    prior: Any,
    source: str,
    resolution: int,
    out_dir: str | Path,
    test_images: int = 2000,
    vq_images: int = 1000,
    per_class: int = 10,
    guidance_scale: float = 3.0,
    sampler: str = "ddim",
    steps: int = 50,
    probe_items: int = 200,
    probe_draws: int = 16,
    seed: int = 1,
    figure_scale: int = 2,
) -> dict[str, Any]:
    """Score a judge and a class-conditional prior on never-seen test-split composites; see the module docstring.

    Args:
        judge: a :class:`~mindvis.eval.classifier.BenchmarkClassifier` (or a folder holding one).
        prior: a prior pipeline folder, pipeline or DCLDM (:func:`mindvis.train.stage_b_model.load_prior`); None scores the
            judge only.
        source, resolution: the stimulus source (``fashion+animal``, ``fashion-mnist``, ...) and image size.
        out_dir: where ``evaluation.json`` and the figures go (created; files in it are replaced).
        test_images: composites scored by the judge; the first ``vq_images`` of them score the VQ and the first
            ``probe_items`` the denoising loss's class signal.
        per_class, guidance_scale, sampler, steps: class samples (each at guidance 1 and at ``guidance_scale``).
        seed: seed of the composites (and of the sample noise).

    Returns:
        The dict written to ``evaluation.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not isinstance(judge, BenchmarkClassifier):
        judge = BenchmarkClassifier.load(judge)
    images, labels, names = make_stimulus_set(test_images, resolution, seed=seed, source=source, split="test")
    if list(names) != list(judge.class_names):
        raise ConfigError(
            f"the judge's classes ({', '.join(judge.class_names[:4])}, ...) are not the classes of source "
            f"{source!r} ({', '.join(names[:4])}, ...)",
            field="source",
        )
    k = len(names)
    predicted = judge.predict(images).probs.argmax(1)
    matrix = confusion_matrix(labels, predicted, k)
    accuracy = float((predicted == labels).mean())
    per = {n: float(matrix[i, i] / max(matrix[i].sum(), 1)) for i, n in enumerate(names)}
    result: dict[str, Any] = {
        "data": {
            "source": source,
            "resolution": resolution,
            "split": "test",
            "images": int(test_images),
            "seed": seed,
            "note": "composites of the source's test-split objects: never seen by the judge or the prior",
        },
        "judge": {
            "accuracy": accuracy,
            "chance": 1.0 / k,
            "per_class": per,
            "confusion": matrix.tolist(),
            "held_out_accuracy_in_training": judge.info.get("held_out_accuracy"),
            "train_seconds": judge.info.get("train_seconds"),
        },
        "figures": {},
    }
    save_confusion_png(
        matrix,
        list(names),
        out_dir / FIGURES["confusion"],
        f"judge on {test_images} test composites: {accuracy:.1%}",
    )
    result["figures"]["confusion"] = FIGURES["confusion"]
    logger.info("judge: %.1f %% of %d test composites (chance %.1f %%)", 100 * accuracy, test_images, 100 / k)
    if prior is None:
        write_json(out_dir / "evaluation.json", result)
        return result

    model = load_prior(prior)
    fn = classifier_callable(judge, list(names))
    n_vq = min(vq_images, test_images)
    vq = evaluate_vq(model.vq, images[:n_vq], labels=labels[:n_vq], classifier=fn)
    vq["judge_accuracy_kept"] = vq["class_accuracy_reconstructions"] / max(vq["class_accuracy_images"], 1e-9)
    result["vq"] = vq
    logger.info(
        "VQ: PSNR %.2f dB, judge %.1f %% on originals, %.1f %% on reconstructions (%.1f %% kept)",
        vq["psnr"],
        100 * vq["class_accuracy_images"],
        100 * vq["class_accuracy_reconstructions"],
        100 * vq["judge_accuracy_kept"],
    )
    scales = sorted({1.0, float(guidance_scale)})  # without guidance, and at the demo's scale
    samples: dict[str, Any] = {}
    for scale in scales:
        s = class_sample_accuracy(
            model, fn, list(names), per_class, steps, sampler, seed=seed, guidance_scale=scale
        )
        samples[f"guidance_{scale:g}"] = s
        logger.info("class samples at guidance %g: %.1f %% judged as their class", scale, 100 * s["accuracy"])
    result["class_samples"] = samples
    n_probe = min(probe_items, test_images)
    signal = prior_class_signal(model, images[:n_probe], labels[:n_probe], draws=probe_draws)
    signal["accuracy"] = {str(a): b for a, b in signal["accuracy"].items()}
    result["class_signal"] = signal
    logger.info(
        "denoising loss under the own class %.2f %% lower than under others; diffusion classifier %.1f %%",
        signal["gap_percent"],
        100 * signal["accuracy"][str(probe_draws)],
    )

    # figures: one image per class and its VQ reconstruction; two samples per class without and with guidance
    first = [int(np.flatnonzero(labels == c)[0]) for c in range(k) if (labels == c).any()]
    with_rec = _vq_pairs(model, images[first])
    vq_grid = image_grid(_upscale(with_rec, figure_scale), row_labels=["image", "VQ"])
    save_png(out_dir / FIGURES["vq"], vq_grid)
    grids = []
    for scale in scales:
        imgs, _ = sample_class_grid(model, k, 2, steps, sampler, seed=seed, guidance_scale=scale)
        grids.append(imgs.reshape(k, 2, *imgs.shape[1:]))
    cols = np.concatenate(grids, axis=1)  # [K, 2 * scales, H, W, 3]
    save_png(out_dir / FIGURES["samples"], image_grid(_upscale(cols, figure_scale), row_labels=list(names)))
    result["figures"].update(vq=FIGURES["vq"], samples=FIGURES["samples"])
    result["figures"]["samples_columns"] = [f"guidance {s:g}" for s in scales for _ in (0, 1)]
    write_json(out_dir / "evaluation.json", result)
    return result


def _vq_pairs(model: Any, images: np.ndarray) -> np.ndarray:
    """``[2, N, H, W, 3]``: the images and their VQ reconstructions."""
    with torch.no_grad():
        rec = model_to_uint8(vq_decode(model.vq, vq_encode(model.vq, images_to_model(images))))
    return np.stack([images, rec])
