"""Reconstruction metrics: the MinD-Vis n-way top-k protocol, identification, pairwise and NSD pixel metrics.

Shapes used throughout: ground truth ``gt: [N, H, W, 3]`` uint8, reconstructions ``recons: [N, S, H, W, 3]``
uint8 (``S`` samples per item), per-item-per-sample scores ``[N, S]``, similarity tensors
``sim: [N, S, N]`` where ``sim[i, s, j]`` compares sample ``s`` of item ``i`` with ground truth ``j``
(higher = more similar).

**n-way top-k semantic accuracy (MinD-Vis, Chen et al. CVPR 2023).** A classifier's argmax on the ground
truth image is the target class. In one trial ``n - 1`` other classes are drawn at random without
replacement; the trial succeeds when the reconstruction's probability of the target class is among the
``k`` largest of the ``n`` drawn probabilities (ties favour the target). Trials are averaged per image, then
over images. Only the number ``m`` of non-target classes whose probability beats the target's matters, so
each trial's count of drawn "beaters" is hypergeometric; we draw that count directly, which has exactly the
distribution of drawing the classes and is vectorised over images, samples and trials. The exact
expectation over all possible trials is also available (:func:`n_way_top_k_expected`).

**Identification.** ``2-way``: for each reconstruction, the fraction of the other ``N - 1`` ground truths
whose similarity is strictly lower than the true pair's (the NSD papers' 2-way identification; the original
MinD-Vis "pairwise" PCC/SSIM metrics are this with pixel correlation or SSIM, and its "pairwise MSE" is this
with the uint8-wrapped MSE below, not with a true MSE). ``n-way``: in one trial ``n - 1`` distractor ground
truths are drawn; success when the true one is strictly the most similar.

**Pixel metrics** (ground truth resolution; reconstructions are resized to it): MSE, a true mean squared
error of [0, 1] values over all pixels and channels (:func:`mse_matrix`); PCC, the Pearson correlation of the
flattened RGB images; SSIM as scikit-image's ``structural_similarity(channel_axis=-1, data_range=255)`` (7x7
uniform window, sample covariance, per-channel mean, border of 3 px excluded).

**The MinD-Vis original's MSE** (:func:`mse_uint8_original_matrix`, for comparison with published numbers
only). The original (``eval_metrics.py``, ``mse_metric``) computes ``np.square(pred - gt).mean()`` on uint8
arrays: the difference wraps modulo 256 and so does its square (numpy keeps both in uint8), so each pixel
contributes ``((pred - gt) mod 256)^2 mod 256``, a value in 0..255, and the mean is of those. It is not a
squared error (0 vs 255 scores 1, 10 vs 20 scores 100, 0 vs 16 scores 0). We reproduce it exactly, on the
uint8 images at the ground truth's resolution like the other pixel metrics; the original compared 256x256
ground truth with 256x256 samples.

**NSD-style** (MindEye / Brain-Diffuser convention): both images resized to 425x425 (antialiased bilinear),
values in [0, 1]. PixCorr: Pearson correlation of the flattened RGB images. SSIM: on grayscale
(0.2125 R + 0.7154 G + 0.0721 B), Gaussian window sigma 1.5 (11x11), no sample-covariance correction,
data_range 1.

All randomness comes from :func:`metric_rng`, one generator per (seed, metric name), so every metric is
deterministic given the seed and independent of which other metrics were computed.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from typing import Literal

import numpy as np

from mindvis.errors import ConfigError
from mindvis.utils.images import to_float_resized

logger = logging.getLogger(__name__)

Aggregate = Literal["mean", "best_slot", "best_per_image"]

AGGREGATE_LABELS: dict[str, str] = {
    "mean": "mean over samples",
    "best_slot": "best sample slot (max over slots of the image mean; the paper's 'max')",
    "best_per_image": "best of samples per image (oracle: ground truth picks the sample per image)",
    "single": "one value per image",
}

NSD_SIZE = 425
GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)  # scikit-image rgb2gray


def metric_rng(seed: int, name: str) -> np.random.Generator:
    """The random generator of one metric: depends only on ``seed`` and the metric's name."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


# --------------------------------------------------------------------------------------------------------
# Random-trial machinery shared by the n-way protocols
# --------------------------------------------------------------------------------------------------------


def _trial_success(
    beaters: np.ndarray, n_others: int, n: int, k: int, trials: int, rng: np.random.Generator
) -> np.ndarray:
    """Fraction of ``trials`` random draws of ``n - 1`` of ``n_others`` competitors with fewer than ``k`` beaters.

    Args:
        beaters: ``[...]`` int, how many of the ``n_others`` competitors beat the target.
        n_others: number of competitors drawn from (classes other than the target, or other images).
        n: the ``n`` of n-way (``n - 1`` competitors per trial).
        k: success when fewer than ``k`` drawn competitors beat the target (top-k).

    Returns:
        ``[...]`` float64 success rate.
    """
    beaters = np.asarray(beaters, dtype=np.int64)
    good = beaters[..., None]
    bad = (n_others - beaters)[..., None]
    draws = rng.hypergeometric(
        np.broadcast_to(good, beaters.shape + (trials,)),
        np.broadcast_to(bad, beaters.shape + (trials,)),
        n - 1,
    )
    return (draws < k).mean(axis=-1)


def _expected_success(beaters: np.ndarray, n_others: int, n: int, k: int) -> np.ndarray:
    """Exact probability that a random draw of ``n - 1`` of ``n_others`` competitors has fewer than ``k`` beaters."""
    from scipy.stats import hypergeom

    return hypergeom.cdf(k - 1, n_others, np.asarray(beaters), n - 1)


def _check_n(n: int, k: int, available: int, what: str) -> None:
    if n < 2:
        raise ConfigError(f"n-way needs n >= 2, got {n}", field="n_way")
    if k < 1 or k > n:
        raise ConfigError(f"top-k needs 1 <= k <= n, got k={k}, n={n}", field="top_k")
    if n > available:
        raise ConfigError(f"{n}-way needs at least {n} {what}, only {available} available", field="n_way")


# --------------------------------------------------------------------------------------------------------
# n-way top-k semantic accuracy (the MinD-Vis protocol)
# --------------------------------------------------------------------------------------------------------


def semantic_beaters(probs: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Count the classes whose probability is strictly above the target class's.

    Args:
        probs: ``[N, S, C]`` classifier probabilities of the reconstructions.
        target: ``[N]`` int target class per item (the classifier's argmax on the ground truth).

    Returns:
        ``[N, S]`` int64 in ``0..C-1``.
    """
    probs = np.asarray(probs)
    target = np.asarray(target, dtype=np.int64)
    if probs.ndim != 3 or target.shape != (probs.shape[0],):
        raise ConfigError(f"probs must be [N, S, C] and target [N]; got {probs.shape} and {target.shape}")
    p_t = np.take_along_axis(probs, target[:, None, None], axis=2)  # [N, S, 1]
    return (probs > p_t).sum(axis=2)


def n_way_top_k(
    probs: np.ndarray,
    target: np.ndarray,
    n: int,
    k: int = 1,
    trials: int = 1000,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """MinD-Vis n-way top-k accuracy per image and sample, by random trials.

    Args:
        probs: ``[N, S, C]`` probabilities of the reconstructions.
        target: ``[N]`` target class (classifier argmax on the ground truth).
        n: classes per trial (the target plus ``n - 1`` random others); needs ``n <= C``.
        k: success when the target ranks within the top ``k`` of the ``n``.
        trials: random trials per image and sample (1000 for reports, 50 during training).

    Returns:
        ``[N, S]`` success rate of each reconstruction over its trials.
    """
    n_classes = np.asarray(probs).shape[-1]
    _check_n(n, k, n_classes, "classes")
    rng = rng if rng is not None else np.random.default_rng(0)
    return _trial_success(semantic_beaters(probs, target), n_classes - 1, n, k, trials, rng)


def n_way_top_k_expected(probs: np.ndarray, target: np.ndarray, n: int, k: int = 1) -> np.ndarray:
    """The exact expectation of :func:`n_way_top_k` over all trials (infinitely many trials), ``[N, S]``."""
    n_classes = np.asarray(probs).shape[-1]
    _check_n(n, k, n_classes, "classes")
    return _expected_success(semantic_beaters(probs, target), n_classes - 1, n, k)


# --------------------------------------------------------------------------------------------------------
# Identification from a similarity tensor
# --------------------------------------------------------------------------------------------------------


def _diag(sim: np.ndarray) -> np.ndarray:
    n = sim.shape[0]
    return sim[np.arange(n), :, np.arange(n)]  # [N, S]


def two_way_identification(sim: np.ndarray) -> np.ndarray:
    """Fraction of other ground truths less similar than the true one (strictly).

    Args:
        sim: ``[N, S, N]`` similarity, higher = more similar.

    Returns:
        ``[N, S]`` in [0, 1]; chance is 0.5.
    """
    n = sim.shape[0]
    if n < 2:
        raise ConfigError("identification needs at least 2 test images", field="n_items")
    true = _diag(sim)[..., None]
    worse = (sim < true).sum(axis=2)  # the true pair itself is never strictly below itself
    return worse / (n - 1)


def identification_beaters(sim: np.ndarray) -> np.ndarray:
    """``[N, S]`` number of other ground truths at least as similar as the true one."""
    true = _diag(sim)[..., None]
    return (sim >= true).sum(axis=2) - 1


def n_way_identification(
    sim: np.ndarray, n: int, trials: int = 1000, rng: np.random.Generator | None = None
) -> np.ndarray:
    """n-way identification per image and sample: the true ground truth must beat ``n - 1`` random others.

    Args:
        sim: ``[N, S, N]`` similarity, higher = more similar.
        n: candidates per trial, ``2 <= n <= N``.

    Returns:
        ``[N, S]`` success rate; chance is ``1 / n``.
    """
    n_items = sim.shape[0]
    _check_n(n, 1, n_items, "test images")
    rng = rng if rng is not None else np.random.default_rng(0)
    return _trial_success(identification_beaters(sim), n_items - 1, n, 1, trials, rng)


def n_way_identification_expected(sim: np.ndarray, n: int) -> np.ndarray:
    """Exact expectation of :func:`n_way_identification`, ``[N, S]``."""
    n_items = sim.shape[0]
    _check_n(n, 1, n_items, "test images")
    return _expected_success(identification_beaters(sim), n_items - 1, n, 1)


# --------------------------------------------------------------------------------------------------------
# Pixel similarity tensors (vectorised: no loop over image pairs)
# --------------------------------------------------------------------------------------------------------


def _flat(recons: np.ndarray, gt: np.ndarray, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    n, s = recons.shape[:2]
    if recons.shape[2:] != gt.shape[1:]:
        raise ConfigError(f"recons {recons.shape} and gt {gt.shape} must share H, W, C here")
    return recons.reshape(n * s, -1).astype(dtype) / 255.0, gt.reshape(n, -1).astype(dtype) / 255.0


def pcc_matrix(recons: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Pearson correlation of flattened images, ``[N, S, N]`` (constant images give 0)."""
    n, s = recons.shape[:2]
    r, g = _flat(recons, gt, np.float64)
    r -= r.mean(axis=1, keepdims=True)
    g -= g.mean(axis=1, keepdims=True)
    rn = np.linalg.norm(r, axis=1, keepdims=True)
    gn = np.linalg.norm(g, axis=1, keepdims=True)
    r /= np.where(rn > 0, rn, 1.0)
    g /= np.where(gn > 0, gn, 1.0)
    return (r @ g.T).reshape(n, s, n)


def mse_matrix(recons: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """True mean squared error on [0, 1] values, ``[N, S, N]`` (lower = more similar).

    This is a real MSE and differs from the MinD-Vis original's uint8-wrapped "MSE"
    (:func:`mse_uint8_original_matrix`). Off-diagonal entries use ``|a|^2 + |b|^2 - 2 a.b`` in float64; the
    true pairs are computed directly.
    """
    n, s = recons.shape[:2]
    r, g = _flat(recons, gt, np.float64)
    d = r.shape[1]
    out = (np.sum(r * r, axis=1)[:, None] + np.sum(g * g, axis=1)[None, :] - 2.0 * (r @ g.T)) / d
    out = np.maximum(out, 0.0).reshape(n, s, n)
    idx = np.arange(n)
    out[idx, :, idx] = np.mean((r.reshape(n, s, d) - g[:, None, :]) ** 2, axis=2)
    return out


def mse_uint8_original(pred: np.ndarray, gt: np.ndarray) -> float:
    """The MinD-Vis original's ``mse_metric`` of one pair: ``np.square(pred - gt).mean()`` on uint8 arrays.

    Both the difference and the square wrap modulo 256 (uint8 arithmetic), so this is not a squared error:
    0 vs 255 gives 1 and 10 vs 20 gives ``246^2 mod 256 = 100``. Kept only to compare with published numbers.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.dtype != np.uint8 or gt.dtype != np.uint8:
        raise ConfigError(f"the original's MSE is defined on uint8 images, got {pred.dtype} and {gt.dtype}")
    return float(np.square(pred - gt).mean())


def mse_uint8_original_matrix(recons: np.ndarray, gt: np.ndarray, block_bytes: int = 1 << 22) -> np.ndarray:
    """The MinD-Vis original's uint8-wrapped "MSE" of every reconstruction and ground truth, ``[N, S, N]``.

    Entry ``[i, s, j]`` equals :func:`mse_uint8_original` ``(recons[i, s], gt[j])`` exactly: the per-pixel
    ``((a - b) mod 256)^2 mod 256`` is summed in integers (exact, as the original's float64 mean of integers
    is) and divided by the number of values. Lower = more similar, as the original ranks it. Computed in
    blocks of reconstructions with preallocated uint8 buffers (no float copy of the images).
    """
    recons, gt = np.asarray(recons), np.asarray(gt)
    if recons.dtype != np.uint8 or gt.dtype != np.uint8:
        raise ConfigError(f"the original's MSE is defined on uint8 images, got {recons.dtype} and {gt.dtype}")
    n, s = recons.shape[:2]
    if recons.shape[2:] != gt.shape[1:]:
        raise ConfigError(f"recons {recons.shape} and gt {gt.shape} must share H, W, C here")
    r = recons.reshape(n * s, -1)
    g = gt.reshape(gt.shape[0], -1)
    d = r.shape[1]
    acc = np.uint32 if 255 * d < 2**32 else np.uint64  # a uint32 sum is much faster and cannot overflow here
    out = np.empty((n * s, g.shape[0]))
    block = max(1, block_bytes // max(d, 1))
    buf = np.empty((min(block, n * s), d), dtype=np.uint8)
    for a in range(0, n * s, block):
        xb = r[a : a + block]
        b = buf[: len(xb)]
        for j in range(g.shape[0]):
            np.subtract(xb, g[j], out=b)  # wraps modulo 256
            np.multiply(b, b, out=b)  # np.square in uint8: wraps modulo 256
            out[a : a + len(xb), j] = b.sum(axis=1, dtype=acc) / d
    return out.reshape(n, s, g.shape[0])


def _gaussian_kernel(sigma: float, truncate: float = 3.5) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


class _SSIMSetup:
    """Window and constants of one SSIM variant (scikit-image conventions), on float32 arrays in [0, 1].

    Filtering is separable along the last two axes (scipy.ndimage); the result is cropped to the positions
    whose window lies inside the image, which is exactly the part of the SSIM map scikit-image averages.
    """

    def __init__(self, window: Literal["uniform7", "gaussian"], sample_cov: bool):
        self.window = window
        self.kernel = np.full(7, 1.0 / 7.0) if window == "uniform7" else _gaussian_kernel(1.5)
        self.pad = (self.kernel.size - 1) // 2
        npix = self.kernel.size**2
        self.cov_norm = np.float32(npix / (npix - 1.0) if sample_cov else 1.0)
        self.c1 = np.float32(0.01**2)  # (K1 * data_range)^2 with data_range 1
        self.c2 = np.float32(0.03**2)

    def filter(self, x: np.ndarray) -> np.ndarray:
        """``x: [..., H, W]`` float32 -> ``[..., H - 2p, W - 2p]`` windowed means."""
        from scipy import ndimage

        if self.window == "uniform7":
            y = ndimage.uniform_filter1d(x, 7, axis=-1)
            y = ndimage.uniform_filter1d(y, 7, axis=-2)
        else:
            y = ndimage.correlate1d(x, self.kernel, axis=-1)
            y = ndimage.correlate1d(y, self.kernel, axis=-2)
        p = self.pad
        return y[..., p:-p, p:-p]

    def moments(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (mean, variance, mean^2 + c1) maps."""
        mu = self.filter(x)
        var = self.cov_norm * (self.filter(x * x) - mu * mu)
        return mu, var, mu * mu + self.c1

    def mean_ssim(self, mx, vx, ax, my, vy, ay, mxy) -> np.ndarray:
        """Mean SSIM over the map's last three axes (channels, rows, columns) -> ``[...]``."""
        mm = mx * my
        num = (2.0 * mm + self.c1) * (2.0 * self.cov_norm * (mxy - mm) + self.c2)
        den = (ax + ay - self.c1) * (vx + vy + self.c2)
        return (num / den).mean(axis=(-3, -2, -1), dtype=np.float64)


def _planar(images: np.ndarray) -> np.ndarray:
    """``[B, H, W, C]`` uint8 -> ``[B, C, H, W]`` float32 in [0, 1]."""
    return np.ascontiguousarray(np.moveaxis(images, -1, 1), dtype=np.float32) / np.float32(255.0)


def ssim_matrix(recons: np.ndarray, gt: np.ndarray, block_bytes: int = 1 << 22) -> np.ndarray:
    """SSIM of every reconstruction against every ground truth, ``[N, S, N]``.

    Matches ``skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=255)`` (to float32
    precision). Moments of each image are computed once; per pair only ``E[xy]`` is filtered and combined,
    in blocks of reconstructions small enough to stay in cache, with preallocated buffers.
    """
    from scipy import ndimage

    n, s = recons.shape[:2]
    h, w = gt.shape[1:3]
    if min(h, w) < 7:
        raise ConfigError(f"SSIM needs images of at least 7x7 pixels, got {h}x{w}")
    setup = _SSIMSetup("uniform7", sample_cov=True)
    x = _planar(recons.reshape((n * s,) + recons.shape[2:]))
    y = _planar(gt)
    mx, vx, ax = setup.moments(x)
    my, vy, ay = setup.moments(y)
    c1, c2, cn = setup.c1, setup.c2, setup.cov_norm
    out = np.empty((n * s, n))
    block = max(1, block_bytes // max(x[0].nbytes, 1))
    p = setup.pad
    for a in range(0, n * s, block):
        sl = slice(a, min(a + block, n * s))
        xb, mxb, vxb, axb = x[sl], mx[sl], vx[sl], ax[sl]
        prod = np.empty_like(xb)
        tmp = np.empty_like(xb)
        mm, num, den = (np.empty_like(mxb) for _ in range(3))
        for j in range(n):
            np.multiply(xb, y[j], out=prod)
            ndimage.uniform_filter1d(prod, 7, axis=-1, output=tmp)
            ndimage.uniform_filter1d(tmp, 7, axis=-2, output=prod)
            mxy = prod[..., p:-p, p:-p]
            np.multiply(mxb, my[j], out=mm)
            np.subtract(mxy, mm, out=num)  # covariance / cov_norm
            num *= 2.0 * cn
            num += c2
            mm *= 2.0
            mm += c1
            num *= mm  # (2 mx my + C1)(2 cov + C2)
            np.add(vxb, vy[j] + c2, out=den)
            np.add(axb, ay[j] - c1, out=mm)  # mx^2 + my^2 + C1
            den *= mm
            num /= den
            out[sl, j] = num.mean(axis=(-3, -2, -1), dtype=np.float64)
    return out.reshape(n, s, n)


def ssim_pairs(
    x: np.ndarray,
    y: np.ndarray,
    window: Literal["uniform7", "gaussian"] = "uniform7",
    sample_cov: bool = True,
) -> np.ndarray:
    """SSIM of matched pairs ``x[b]`` vs ``y[b]``, ``[B, H, W, C]`` uint8 -> ``[B]`` (data range 255)."""
    setup = _SSIMSetup(window, sample_cov)
    a, b = _planar(x), _planar(y)
    return setup.mean_ssim(*setup.moments(a), *setup.moments(b), setup.filter(a * b))


def feature_corr_matrix(feat_recon: np.ndarray, feat_gt: np.ndarray) -> np.ndarray:
    """Pearson correlation between feature vectors: ``[N, S, D]`` x ``[N, D]`` -> ``[N, S, N]``."""
    n, s, d = feat_recon.shape
    r = feat_recon.reshape(n * s, d).astype(np.float64)
    g = feat_gt.reshape(feat_gt.shape[0], d).astype(np.float64)
    r = r - r.mean(axis=1, keepdims=True)
    g = g - g.mean(axis=1, keepdims=True)
    r /= np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return (r @ g.T).reshape(n, s, g.shape[0])


# --------------------------------------------------------------------------------------------------------
# NSD-style PixCorr and SSIM
# --------------------------------------------------------------------------------------------------------


def _nsd_input(images: np.ndarray) -> np.ndarray:
    """``[B, H, W, 3]`` uint8 -> ``[B, 3, 425, 425]`` float32 in [0, 1] (antialiased bilinear)."""
    return to_float_resized(images, NSD_SIZE).numpy()


def _gray(x: np.ndarray) -> np.ndarray:
    """``[B, 3, H, W]`` -> ``[B, 1, H, W]`` with scikit-image's rgb2gray weights."""
    r, g, b = GRAY_WEIGHTS
    return (r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]).astype(np.float32)


def _standardise_rows(x: np.ndarray) -> np.ndarray:
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def nsd_pixel_metrics(
    recons: np.ndarray, gt: np.ndarray, chance_pairing: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """NSD PixCorr and SSIM per reconstruction (see the module docstring), ``[N, S]`` each.

    Args:
        recons: ``[N, S, H, W, 3]`` uint8.
        gt: ``[N, H', W', 3]`` uint8.
        chance_pairing: ``[N]`` ground-truth index to compare each item with for a chance estimate
            (e.g. ``i + 1 mod N``); adds ``pixcorr_chance`` and ``ssim_chance`` to the output.

    Returns:
        ``{"pixcorr": [N, S], "ssim": [N, S]}`` (plus the two chance arrays when asked).
    """
    n, s = recons.shape[:2]
    setup = _SSIMSetup("gaussian", sample_cov=False)
    g = _nsd_input(gt)
    g_flat = _standardise_rows(g)
    g_gray = _gray(g)
    del g
    mg, vg, ag = setup.moments(g_gray)
    keys = ["pixcorr", "ssim"] + (["pixcorr_chance", "ssim_chance"] if chance_pairing is not None else [])
    out = {k: np.empty((n, s)) for k in keys}
    for k in range(s):  # one sample slot at a time keeps memory at N images of 425x425
        r = _nsd_input(recons[:, k])
        r_flat = _standardise_rows(r)
        out["pixcorr"][:, k] = np.sum(r_flat * g_flat, axis=1)
        r_gray = _gray(r)
        del r
        mr, vr, ar = setup.moments(r_gray)
        out["ssim"][:, k] = setup.mean_ssim(mr, vr, ar, mg, vg, ag, setup.filter(r_gray * g_gray))
        if chance_pairing is not None:
            c = np.asarray(chance_pairing)
            out["pixcorr_chance"][:, k] = np.sum(r_flat * g_flat[c], axis=1)
            out["ssim_chance"][:, k] = setup.mean_ssim(
                mr, vr, ar, mg[c], vg[c], ag[c], setup.filter(r_gray * g_gray[c])
            )
    return out


def nsd_pixcorr(recons: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """NSD PixCorr per reconstruction, ``[N, S]``: Pearson r of 425x425 RGB images in [0, 1]."""
    return nsd_pixel_metrics(recons, gt)["pixcorr"]


def nsd_ssim(recons: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """NSD SSIM per reconstruction, ``[N, S]``: grayscale, Gaussian sigma 1.5, at 425x425, data_range 1."""
    return nsd_pixel_metrics(recons, gt)["ssim"]


# --------------------------------------------------------------------------------------------------------
# Aggregation, bootstrap confidence intervals
# --------------------------------------------------------------------------------------------------------


def _agg_fn(how: str, higher_is_better: bool) -> Callable[[np.ndarray], np.ndarray]:
    """A reducer over the last two axes ``[..., N, S] -> [...]``."""
    best = np.max if higher_is_better else np.min
    if how == "mean" or how == "single":
        return lambda v: v.mean(axis=(-2, -1))
    if how == "best_slot":
        return lambda v: best(v.mean(axis=-2), axis=-1)
    if how == "best_per_image":
        return lambda v: best(v, axis=-1).mean(axis=-1)
    raise ConfigError(f"unknown aggregate {how!r}; expected one of {sorted(AGGREGATE_LABELS)}")


def aggregate(values: np.ndarray, how: Aggregate | str = "mean", higher_is_better: bool = True) -> float:
    """Reduce per-image-per-sample scores ``[N, S]`` (or ``[N]``) to one number.

    ``mean``: mean over samples and images. ``best_slot``: the sample slot whose image-mean is best (the
    paper's "max"). ``best_per_image``: the best sample of each image, averaged over images.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[:, None] if v.ndim == 1 else v
    return float(_agg_fn(how, higher_is_better)(v))


def bootstrap_ci(
    values: np.ndarray,
    how: Aggregate | str = "mean",
    higher_is_better: bool = True,
    n_boot: int = 1000,
    rng: np.random.Generator | None = None,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of :func:`aggregate`, resampling test images with replacement.

    Args:
        values: ``[N, S]`` or ``[N]`` per-image scores.
        n_boot: resamples (0 disables the interval and returns None).

    Returns:
        ``(low, high)`` or None when ``n_boot == 0`` or there is a single image.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[:, None] if v.ndim == 1 else v
    n = v.shape[0]
    if n_boot <= 0 or n < 2:
        return None
    rng = rng if rng is not None else np.random.default_rng(0)
    fn = _agg_fn(how, higher_is_better)
    stats = np.empty(n_boot)
    step = max(1, (1 << 22) // max(v.size, 1))
    for a in range(0, n_boot, step):
        idx = rng.integers(0, n, size=(min(step, n_boot - a), n))
        stats[a : a + idx.shape[0]] = fn(v[idx])
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)
