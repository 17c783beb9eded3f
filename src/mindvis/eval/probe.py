"""Linear probes: how much of the stimulus a representation of fMRI still carries, level by level.

MinD-Vis passes fMRI through several representations before an image comes out: the preprocessed voxels, the
stage A encoder's tokens ``[N, L, D]``, and stage B's conditioning (the cross-attention context ``[N, T, C]`` and
the time-embedding vector ``[N, E]``). When reconstructions are at chance, these probes say where the
information was lost. Each level is read out linearly, trained on the training split and scored on the test
split:

* **class accuracy**: kernel ridge onto one-hot labels, the largest output wins (chance: the most frequent
  test class's share);
* **one token weighting** (for tokens): the class readout restricted to the form the stage B conditioner can
  express when the UNet's attention spreads evenly over its context, one weighting over the tokens and then one
  channel map (alternating ridge);
* **pixel identification**: kernel ridge onto the seen image's pixels (images are resized to at most
  32 x 32 so that the readout stays small), scored by 2-way identification with pixel correlation (chance 0.5),
  the same rule as ``mindvis evaluate``'s ``ident_pcc_2way``.

Features are z-scored per column on the training split and the ridge penalty is chosen by exact leave-one-out
error (:func:`mindvis.utils.linalg.ridge_dual`). A linear probe is a lower bound on what a level holds: a level
can carry information in a form a linear readout misses. But the stage B conditioner itself is linear in the
encoder tokens, so information that a linear probe cannot find in the tokens is hard for it to use too.

:func:`run_probes` probes given splits and models; :func:`probe` loads a dataset's splits, probes them and writes
``probe.json``, ``probe.md`` and ``probe.png``, as ``mindvis probe`` does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mindvis.data.dataset import FMRIDataset
from mindvis.data.encoder_input import find_preprocessing, prepare_voxels
from mindvis.data.formats.registry import load_dataset
from mindvis.data.paired import images_to_tensor
from mindvis.data.preprocessor import load_preprocessor
from mindvis.errors import DataError
from mindvis.eval.config import ProbeConfig
from mindvis.eval.metrics import pcc_matrix, two_way_identification
from mindvis.models.ldm import prior_class_table
from mindvis.models.mbm import FMRIEncoder, load_mbm_weights
from mindvis.pipeline import MindVisPipeline
from mindvis.utils.images import resize_tensor
from mindvis.utils.io import atomic_dir, atomic_write, check_output_apart, prepare_output_dir, write_json
from mindvis.utils.linalg import ridge_dual, standardise_columns
from mindvis.utils.steps import provenance

_logger = logging.getLogger(__name__)

#: Candidate ridge penalties, scaled by the feature count (features are z-scored).
ALPHAS = np.logspace(-3, 3, 13)
#: Largest side of the images the pixel readout predicts.
PIXEL_SIZE = 32


@dataclass
class ProbeResult:
    """One representation level read out linearly.

    Attributes:
        source: the model folder (or ``"voxels"`` for the raw data).
        level: ``voxels``, ``input`` (preprocessed), ``tokens``, ``mean token``, ``context`` or ``time vector``.
        dims: feature count.
        class_accuracy: test accuracy of the class readout (``None`` without labels).
        class_chance: the most frequent test class's share.
        pixel_2way: 2-way identification of the pixel readout (``None`` without images).
    """

    source: str
    level: str
    dims: int
    class_accuracy: float | None
    class_chance: float | None
    pixel_2way: float | None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _targets(train: FMRIDataset, test: FMRIDataset) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Labels ``(train [N], test [M])`` when both splits have them for every sample, else ``(None, None)``."""
    if train.labels is None or test.labels is None:
        return None, None
    ltr, lte = np.asarray(train.labels), np.asarray(test.labels)
    if (ltr < 0).any() or (lte < 0).any():
        return None, None
    return ltr, lte


def _pixels(ds: FMRIDataset) -> np.ndarray | None:
    """``[N, P]`` float64 pixels in [-1, 1] of each sample's image, resized to at most ``PIXEL_SIZE``."""
    if not ds.paired:
        return None
    x = images_to_tensor(ds.sample_images())
    if max(x.shape[-2:]) > PIXEL_SIZE:
        x = resize_tensor(x, PIXEL_SIZE)
    return x.reshape(len(x), -1).double().numpy()


def two_way_pixel_identification(pred: np.ndarray, truth: np.ndarray) -> float:
    """Share of (item, other item) pairs where prediction ``i`` correlates more with image ``i`` than with the
    other image. ``pred, truth: [M, P]``."""
    sim = pcc_matrix(np.asarray(pred)[:, None, :], np.asarray(truth))  # [M, 1, M]; Pearson ignores the scale
    return float(two_way_identification(sim).mean())


def probe_level(
    source: str,
    level: str,
    x_train: np.ndarray,
    x_test: np.ndarray,
    labels: tuple[np.ndarray | None, np.ndarray | None],
    pixels: tuple[np.ndarray | None, np.ndarray | None],
) -> ProbeResult:
    """Read one level out. ``x_train: [N, ...]``, ``x_test: [M, ...]`` (flattened per sample)."""
    a = np.asarray(x_train, np.float64).reshape(len(x_train), -1)
    b = np.asarray(x_test, np.float64).reshape(len(x_test), -1)
    a, b = standardise_columns(a, b)
    kernel = b @ a.T  # [M, N]
    alphas = ALPHAS * a.shape[1]
    acc = chance = two = None
    ltr, lte = labels
    if ltr is not None and lte is not None:
        classes = np.unique(np.concatenate([ltr, lte]))
        y = (ltr[:, None] == classes[None, :]).astype(np.float64)
        coef, _ = ridge_dual(a, y - y.mean(axis=0), alphas)
        pred = classes[(kernel @ coef).argmax(axis=1)]
        acc = float((pred == lte).mean())
        chance = float(np.unique(lte, return_counts=True)[1].max() / len(lte))
    ptr, pte = pixels
    if ptr is not None and pte is not None:
        mean = ptr.mean(axis=0)
        coef, _ = ridge_dual(a, ptr - mean, alphas)
        two = two_way_pixel_identification(kernel @ coef + mean, pte)
    return ProbeResult(source, level, int(a.shape[1]), acc, chance, two)


def _ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)


def _fit_weighting(t: np.ndarray, y: np.ndarray, lam: float, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Alternating ridge for ``y ~ sum_l a_l t[:, l] @ B``: ``t [N, L, D]``, ``y [N, K]`` -> ``(a [L], B [D, K])``."""
    n, length, _ = t.shape
    a = np.full(length, 1.0 / length)
    for _ in range(iters):
        b = _ridge(np.einsum("nld,l->nd", t, a), y, lam)
        g = np.einsum("nld,dk->nkl", t, b).reshape(n * y.shape[1], length)
        a = _ridge(g, y.reshape(-1), lam)
        a /= np.linalg.norm(a) + 1e-12
    return a, _ridge(np.einsum("nld,l->nd", t, a), y, lam)


def token_weighting_accuracy(
    tokens_train: np.ndarray,
    tokens_test: np.ndarray,
    labels_train: np.ndarray,
    labels_test: np.ndarray,
    lams: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0),
    iters: int = 15,
) -> float:
    """Class accuracy of the best readout of the form the stage B conditioner can express when the UNet's
    attention spreads evenly over its context: one weighting over the tokens, then one channel map
    (``sum_l a_l tokens[:, l] @ B``). Tokens ``[N, L, D]`` are z-scored per token and channel on the training
    split; the penalty is chosen on the last fifth of the training split, then the readout is refitted on all
    of it and scored on the test split."""
    shape = tokens_train.shape[1:]
    flat = standardise_columns(
        np.asarray(tokens_train, np.float64).reshape(len(tokens_train), -1),
        np.asarray(tokens_test, np.float64).reshape(len(tokens_test), -1),
    )
    t_tr, t_te = (x.reshape(len(x), *shape) for x in flat)
    classes = np.unique(np.concatenate([labels_train, labels_test]))
    y = (np.asarray(labels_train)[:, None] == classes[None, :]).astype(np.float64)
    y -= y.mean(axis=0)
    cut = len(t_tr) - max(1, len(t_tr) // 5)

    def score(a: np.ndarray, b: np.ndarray, t: np.ndarray, labels: np.ndarray) -> float:
        return float((classes[(np.einsum("nld,l->nd", t, a) @ b).argmax(axis=1)] == labels).mean())

    fits = {lam: _fit_weighting(t_tr[:cut], y[:cut], lam, iters) for lam in lams}
    best = max(lams, key=lambda lam: score(*fits[lam], t_tr[cut:], np.asarray(labels_train)[cut:]))
    return score(*_fit_weighting(t_tr, y, best, iters), t_te, np.asarray(labels_test))


def _batched(fn: Callable[[torch.Tensor], dict[str, torch.Tensor]], x: np.ndarray, batch: int = 64):
    parts: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = fn(torch.as_tensor(np.asarray(x[i : i + batch], np.float32)))
            for k, v in out.items():
                parts.setdefault(k, []).append(v.float().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def model_levels(
    model_dir: str | os.PathLike, subject: str | None
) -> tuple[object | None, object, Callable, object | None]:
    """The fitted preprocessing (or ``None``), the encoder's :class:`~mindvis.models.mbm.MBMConfig`, a feature
    function (``fmri [B, V] -> {level: array}``) and the stage B model (``None`` for stage A) of a model folder:
    a stage A run folder (``preprocessing.json`` + ``model/``), a stage A weights folder, or a stage B
    pipeline."""
    d = Path(model_dir)
    if (d / "model_index.json").is_file():  # stage B pipeline
        model = MindVisPipeline.from_pretrained(d).model.eval()
        if model.fmri_encoder is None:
            raise DataError("a class-conditional prior has no fMRI levels to probe", path=d, field="model")
        encoder = model.fmri_encoder
        pre_path: Path | None = d / "preprocess.json" if (d / "preprocess.json").is_file() else None

        def stage_b(x: torch.Tensor) -> dict[str, torch.Tensor]:
            tokens = encoder(x)
            cond = model.conditioner(tokens)
            out = {"tokens": tokens, "mean token": tokens.mean(dim=1), "context": cond.context}
            if cond.time_cond is not None:
                out["time vector"] = cond.time_cond
            return out

        fn: Callable = stage_b
        ldm: object | None = model
    else:
        config, state = load_mbm_weights(d / "model" if (d / "model").is_dir() else d)
        encoder = FMRIEncoder(config)
        encoder.load_mbm_state_dict(state)
        encoder.eval()
        pre_path = find_preprocessing(d)

        def stage_a(x: torch.Tensor) -> dict[str, torch.Tensor]:
            tokens = encoder(x)
            return {"tokens": tokens, "mean token": tokens.mean(dim=1)}

        fn = stage_a
        ldm = None
    pre = None if pre_path is None else load_preprocessor(pre_path, subject=subject)
    return pre, encoder.config, fn, ldm


@torch.no_grad()
def _denoising_losses(
    model: Any, x0: torch.Tensor, conds: list[Any], draws: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item denoising losses ``[draws, N, len(conds)]`` of latents ``x0 [N, ...]`` under each conditioning,
    with the same noise and timesteps for every conditioning within a draw, and those timesteps ``[draws, N]``."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(draws, len(x0), len(conds))
    steps = torch.zeros(draws, len(x0), dtype=torch.long)
    for d in range(draws):
        t = steps[d] = torch.randint(0, model.num_timesteps, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = model.q_sample(x0, t, noise)
        for j, c in enumerate(conds):
            out[d, :, j] = ((model.eps(x_t, t, c) - noise) ** 2).float().flatten(1).mean(1)
    return out, steps


def _latents(model: Any, images: np.ndarray) -> torch.Tensor:
    return model.encode_images(resize_tensor(images_to_tensor(images), int(model.vq_config.resolution)))


@torch.no_grad()
def conditioning_use(
    model: Any, voxels: np.ndarray, images: np.ndarray, draws: int = 4, seed: int = 0
) -> dict[str, float]:
    """Does the denoiser use its fMRI input? The mean denoising loss of ``model`` (a stage B DCLDM) on
    ``images [N, H, W, 3]`` uint8 conditioned on their own fMRI ``voxels [N, V]`` (preprocessed) and on the fMRI
    of another sample (shifted by one), with the same noise and timesteps (``draws`` per image).

    Returns:
        ``loss_true``, ``loss_shuffled`` and ``gap_percent`` (``100 * (shuffled / true - 1)``): near 0 when the
        model ignores the fMRI; the class prior's own labels give a few percent on the benchmark.
    """
    x0 = _latents(model, images)
    cond = model.condition(torch.as_tensor(np.asarray(voxels, np.float32)))
    other = cond.index(torch.roll(torch.arange(len(x0)), 1))
    true, shuffled = _denoising_losses(model, x0, [cond, other], draws, seed)[0].mean(dim=(0, 1)).tolist()
    return {"loss_true": true, "loss_shuffled": shuffled, "gap_percent": 100.0 * (shuffled / true - 1.0)}


@torch.no_grad()
def prior_class_signal(
    prior: Any, images: np.ndarray, labels: np.ndarray, draws: int = 16, seed: int = 0
) -> dict[str, Any]:
    """How much a class-conditional prior's denoising loss says about an image's class: the signal that stage B
    learns the class from when the diffusion loss is its only teacher (the original's setting).

    Every image ``[N, H, W, 3]`` uint8 with a label in ``[0, K)`` is noised ``draws`` times; each time the loss
    is computed under every one of the prior's K classes (same noise and timestep).

    Returns:
        ``loss_own`` (mean loss under the image's class), ``loss_other`` (mean under the other classes),
        ``gap_percent`` (``100 * (other / own - 1)``), ``pairwise_win`` (share of single draws in which the own
        class beats a random other class: 0.5 is no signal), ``pairwise_win_by_timestep`` (the same by quarter of
        the timestep range, ``{"0-250": ...}``: where in the noise schedule the class is told apart),
        ``accuracy`` (``{draws: share of images whose lowest mean loss over that many draws is their own
        class}``, a diffusion classifier), ``chance`` (1 / K), ``items``.

    Raises:
        ConfigError: the prior is not class-conditional; DataError: labels outside its classes.
    """
    k = int(prior_class_table(prior, field="prior", purpose="the prior's class signal").shape[0])
    y = torch.as_tensor(np.asarray(labels).astype(np.int64))
    if y.shape != (len(images),) or (len(y) and (int(y.min()) < 0 or int(y.max()) >= k)):
        raise DataError(
            f"expected one class label in [0, {k}) per image ({len(images)}), got {tuple(y.shape)} "
            f"in [{int(y.min()) if len(y) else '-'}, {int(y.max()) if len(y) else '-'}]",
            field="labels",
        )
    x0 = _latents(prior, images)
    conds = [prior.conditioner(torch.full((len(x0),), c, dtype=torch.long)) for c in range(k)]
    losses, steps = _denoising_losses(prior, x0, conds, draws, seed)  # [draws, N, K], [draws, N]
    rows = torch.arange(len(x0))
    own = losses[:, rows, y]  # [draws, N]
    other_mask = torch.ones(len(x0), k, dtype=torch.bool)
    other_mask[rows, y] = False
    other = losses[:, other_mask].view(draws, len(x0), k - 1)
    g = torch.Generator().manual_seed(seed + 1)
    pick = torch.randint(0, k - 1, (draws, len(x0)), generator=g)
    rival = other.gather(2, pick[..., None]).squeeze(2)
    counts = sorted({1, *(n for n in (4, 16, 64) if n < draws), draws})
    accuracy = {n: float((losses[:n].mean(0).argmin(1) == y).float().mean()) for n in counts}
    loss_own, loss_other = float(own.mean()), float(other.mean())
    wins = own < rival
    quarter = (steps * 4) // prior.num_timesteps  # 0..3
    by_t = {
        f"{q * prior.num_timesteps // 4}-{(q + 1) * prior.num_timesteps // 4}": float(
            wins[quarter == q].float().mean()
        )
        for q in range(4)
        if bool((quarter == q).any())
    }
    return {
        "loss_own": loss_own,
        "loss_other": loss_other,
        "gap_percent": 100.0 * (loss_other / loss_own - 1.0),
        "pairwise_win": float(wins.float().mean()),
        "pairwise_win_by_timestep": by_t,
        "accuracy": accuracy,
        "chance": 1.0 / k,
        "items": len(x0),
    }


def source_name(model_dir: str | os.PathLike) -> str:
    """A short name of a model folder for tables: ``run/model`` for the weights folders inside runs."""
    p = Path(model_dir)
    return f"{p.parent.name}/{p.name}" if p.name in ("model", "best", "pipeline") else p.name


@dataclass
class ProbeReport:
    """What :func:`run_probes` finds: one :class:`ProbeResult` per level, and per stage B model the
    :func:`conditioning_use` figures (``{source: {...}}``)."""

    levels: list[ProbeResult]
    conditioning: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, object]:
        return {"results": [r.to_dict() for r in self.levels], "conditioning_use": self.conditioning}


def run_probes(
    train: FMRIDataset, test: FMRIDataset, models: list[str | os.PathLike], max_use_items: int = 400
) -> ProbeReport:
    """Probe the raw voxels, then every level of every model, on the same train/test splits; for stage B models
    also measure :func:`conditioning_use` on up to ``max_use_items`` training samples."""
    if train.num_voxels != test.num_voxels:
        raise DataError(
            f"train has {train.num_voxels} voxels, test {test.num_voxels}", path=test.source, field="voxels"
        )
    labels = _targets(train, test)
    pixels = (_pixels(train), _pixels(test))
    if labels[0] is None and pixels[0] is None:
        raise DataError("the probes need class labels or paired images", path=train.source, field="labels")
    results = [probe_level("voxels", "voxels", train.voxels, test.voxels, labels, pixels)]
    use: dict[str, dict[str, float]] = {}
    _logger.info("probe: raw voxels done")
    for m in models:
        pre, config, fn, ldm = model_levels(m, train.subject)
        name = source_name(m)
        x_tr, x_te, _ = prepare_voxels(train, test, config.num_voxels, config.patch_size, pre)
        results.append(probe_level(name, "input", x_tr, x_te, labels, pixels))
        f_tr, f_te = _batched(fn, x_tr), _batched(fn, x_te)
        for level in f_tr:
            results.append(probe_level(name, level, f_tr[level], f_te[level], labels, pixels))
            if level == "tokens" and labels[0] is not None and f_tr[level].ndim == 3:
                acc = token_weighting_accuracy(f_tr[level], f_te[level], labels[0], labels[1])
                length, width = f_tr[level].shape[1:]
                chance = results[-1].class_chance
                results.append(ProbeResult(name, "one token weighting", length + width, acc, chance, None))
        if ldm is not None and train.paired:
            idx = np.random.default_rng(0).permutation(len(train))[:max_use_items]
            use[name] = conditioning_use(ldm, x_tr[idx], train.sample_images()[idx])
        _logger.info("probe: %s done", m)
    return ProbeReport(results, use)


#: The format of ``probe.json``.
PROBE_FORMAT = "mindvis-probe/1"


def fmt_score(value: float | None, digits: int = 3) -> str:
    """A score for the probe tables: ``-`` for ``None``."""
    return "-" if value is None else f"{value:.{digits}f}"


def probe_table(rows: list[dict[str, Any]], use: dict[str, dict[str, float]] | None = None) -> str:
    """A Markdown table of probe results (``ProbeResult.to_dict()`` rows), then the conditioning-use figures."""
    head = "| source | level | dims | class accuracy | class chance | pixel 2-way |\n|---|---|---:|---:|---:|---:|\n"
    body = "".join(
        f"| {r['source']} | {r['level']} | {r['dims']} | {fmt_score(r['class_accuracy'])} | "
        f"{fmt_score(r['class_chance'])} | {fmt_score(r['pixel_2way'])} |\n"
        for r in rows
    )
    tail = ""
    if use:
        tail = (
            "\n| model | denoising loss, own fMRI | with another sample's fMRI | gap |\n|---|---:|---:|---:|\n"
            + "".join(
                f"| {k} | {u['loss_true']:.5f} | {u['loss_shuffled']:.5f} | {u['gap_percent']:+.2f} % |\n"
                for k, u in use.items()
            )
        )
    return head + body + tail


def training_prior_signal(
    prior: str | os.PathLike, train: FMRIDataset, items: int, draws: int
) -> dict[str, Any]:
    """:func:`prior_class_signal` of the prior pipeline folder ``prior`` on a seeded random subset of ``items``
    labelled training images, with the prior's path and ``draws`` added.

    Raises:
        DataError: ``train`` has no labels or no images.
    """
    from mindvis.train.stage_b_model import load_prior

    if train.labels is None or not train.paired:
        raise DataError("--prior needs labelled, paired training images", path=train.source, field="labels")
    labels = np.asarray(train.labels)
    known = np.flatnonzero(labels >= 0)
    idx = np.sort(np.random.default_rng(0).permutation(known)[:items])
    signal = prior_class_signal(load_prior(prior), train.sample_images()[idx], labels[idx], draws=draws)
    return {"prior": str(prior), "draws": draws, **signal}


def prior_signal_text(signal: dict[str, Any]) -> str:
    """One paragraph on a prior's class signal (:func:`prior_class_signal`)."""
    acc = ", ".join(f"{n} draw{'s' * (int(n) > 1)} {v:.3f}" for n, v in signal["accuracy"].items())
    return (
        f"prior {signal['prior']} on {signal['items']} training images: denoising loss under the image's own "
        f"class {signal['loss_own']:.5f}, under the other classes {signal['loss_other']:.5f} "
        f"({signal['gap_percent']:+.2f} %); in a single draw the own class beats a random other one "
        f"{signal['pairwise_win']:.3f} of the time (0.5: no signal; by timestep "
        + ", ".join(f"{k} {v:.3f}" for k, v in signal["pairwise_win_by_timestep"].items())
        + "); the lowest loss names the class "
        f"({acc}; chance {signal['chance']:.3f})"
    )


def plot_probes(rows: list[dict[str, Any]], path: Path) -> None:
    """Horizontal bars of class accuracy and pixel identification per level, chance marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['source']}: {r['level']}" for r in rows]
    panels = [
        ("class accuracy (test)", "class_accuracy", [r["class_chance"] for r in rows]),
        ("pixel 2-way identification (test)", "pixel_2way", [0.5] * len(rows)),
    ]
    panels = [p for p in panels if any(r[p[1]] is not None for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.35 * len(rows) + 1.2), squeeze=False)
    ys = list(range(len(rows)))[::-1]
    for ax, (title, key, chance) in zip(axes[0], panels, strict=True):
        ax.barh(ys, [r[key] or 0.0 for r in rows], color="#4c72b0")
        for y, c in zip(ys, chance, strict=True):
            if c is not None:
                ax.plot([c, c], [y - 0.4, y + 0.4], color="#c44e52", lw=2)
        ax.set_yticks(ys, names if ax is axes[0][0] else [""] * len(rows), fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_title(title, fontsize=9)
    axes[0][-1].text(1.0, -0.9, "red: chance", color="#c44e52", fontsize=7, ha="right")
    fig.tight_layout()

    with atomic_write(path, mode="wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


@dataclass
class ProbeRun:
    """What :func:`probe` found and wrote.

    Attributes:
        report: the probes (:func:`run_probes`).
        data: the data probed, as ``probe.json`` records it: ``dataset``, ``data_dir``, ``subject``, ``train`` and
            ``test`` (sample counts).
        prior_signal: the prior's class signal (:func:`training_prior_signal`), or ``None`` without a prior.
        out: the folder written (``probe.json``, ``probe.md``, ``probe.png``), or ``None``.
    """

    report: ProbeReport
    data: dict[str, Any]
    prior_signal: dict[str, Any] | None
    out: Path | None

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The levels as ``ProbeResult.to_dict()`` rows."""
        return [r.to_dict() for r in self.report.levels]


def probe(
    config: ProbeConfig,
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike | None,
    *,
    dataset: str,
    data_dir: str | os.PathLike | None = None,
    subject: str | None = None,
    roi: str | None = None,
    prior: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> ProbeRun:
    """Probe the raw voxels and every level of ``models`` (:func:`run_probes`) on a dataset's train and test
    splits, measure ``prior``'s class signal when one is given, and write ``probe.json``, ``probe.md`` and
    ``probe.png`` into ``out`` (built beside it and moved into place when complete).

    Args:
        config: the prior measurement's settings.
        models: stage A runs, stage A weights folders or stage B pipelines (none: only the raw voxels).
        out: the folder to write, apart from every input; ``None``: write nothing.
        dataset: the dataset kind (:func:`~mindvis.data.formats.registry.load_dataset`).
        data_dir: its folder (default: found as ``load_dataset`` finds it).
        subject: the subject (default: the first).
        roi: the ROI mask key (default: the dataset's).
        prior: a class-conditional prior pipeline folder (``train-prior --out/pipeline``).
        overwrite: replace a non-empty ``out``.

    Raises:
        OutputOverlapError: ``out`` is, contains or lies inside an input.
        OutputExistsError: ``out`` is not empty and ``overwrite`` is not set.
        DataError: the splits cannot be probed (no labels nor images; with ``prior``, no labelled images).
    """
    models = list(models)
    if out is not None:
        out = Path(out)
        check_output_apart(out, {"MODELS": models, "--data-dir": data_dir, "--prior": prior})
        prepare_output_dir(out, overwrite=overwrite)
    options: dict[str, Any] = {} if roi is None else {"roi": roi}
    train = load_dataset(dataset, data_dir, subject, "train", **options)
    test = load_dataset(dataset, data_dir, subject or train.subject, "test", **options)
    signal = (
        None if prior is None else training_prior_signal(prior, train, config.prior_items, config.prior_draws)
    )
    report = run_probes(train, test, models)
    data = {
        "dataset": dataset,
        "data_dir": None if data_dir is None else str(data_dir),
        "subject": train.subject,
        "train": len(train),
        "test": len(test),
    }
    result = ProbeRun(report, data, signal, out)
    if out is None:
        return result
    rows = result.rows
    with atomic_dir(out, overwrite=True) as tmp:
        write_json(
            tmp / "probe.json",
            {
                "format": PROBE_FORMAT,
                "data": data,
                **report.to_dict(),
                **({} if signal is None else {"prior_class_signal": signal}),
                **provenance(),
            },
        )
        with atomic_write(tmp / "probe.md", mode="w") as f:
            f.write(probe_table(rows, report.conditioning))
            if signal is not None:
                f.write(f"\n{prior_signal_text(signal)}\n")
        plot_probes(rows, tmp / "probe.png")
    return result


__all__ = [
    "PROBE_FORMAT",
    "ProbeReport",
    "ProbeResult",
    "ProbeRun",
    "conditioning_use",
    "fmt_score",
    "model_levels",
    "plot_probes",
    "prior_class_signal",
    "prior_signal_text",
    "probe",
    "probe_level",
    "probe_table",
    "run_probes",
    "source_name",
    "token_weighting_accuracy",
    "training_prior_signal",
    "two_way_pixel_identification",
]
