"""Image-computable features of SynthCortex's encoding model, the same for every subject.

A Gabor energy pyramid (quadrature pairs at 4 spatial frequencies x 4 orientations, as in Kay, Naselaris,
Prenger & Gallant 2008), colour-opponent energy, local luminance contrast and signed colour, pooled onto a
grid of visual-field cells (:func:`feature_maps`), plus "unmodelled" texture channels outside the encoding
model; and the Gaussian population receptive fields that pool the grid cells (:func:`rf_weights`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from mindvis.synthcortex.config import _UNMODELLED

WORK_RES = 64  # features are computed on the stimulus resampled to 64 x 64 pixels
GRID = 32  # ... and pooled onto a 32 x 32 grid of visual-field cells
SF_CPD = (0.2, 0.4, 0.8, 1.6)  # Gabor spatial frequencies, cycles per degree (at a 12-degree field)
N_ORI = 4  # orientations 0, 45, 90, 135 degrees (direction of the frequency vector)
N_ENERGY = len(SF_CPD) * N_ORI
N_ENERGY_LIKE = N_ENERGY + 3  # + red-green, blue-yellow opponent energy, local luminance contrast
MODEL_CHANNELS = N_ENERGY_LIKE + 3  # + signed red-green, blue-yellow and luminance (local means)
N_UNMODELLED = 8  # nonlinear texture-statistic channels outside the encoding model


def _resample_images(images: np.ndarray, res: int) -> np.ndarray:
    """``[N, H, W, 3]`` uint8 -> ``[N, res, res, 3]`` float32 in [0, 1] (area averaging or bilinear)."""
    x = images.astype(np.float32) / 255.0
    n, h, w, _ = x.shape
    if h == res and w == res:
        return x
    if h % res == 0 and w % res == 0:
        return x.reshape(n, res, h // res, res, w // res, 3).mean(axis=(2, 4))
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    return (
        F.interpolate(t, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
        .permute(0, 2, 3, 1)
        .numpy()
    )


@lru_cache(maxsize=4)
def _gabor_bank(field_deg: float) -> np.ndarray:
    """Frequency-domain quadrature Gabor filters: ``[N_ENERGY, 64, 64]`` float32 (one-sided Gaussians)."""
    f = np.fft.fftfreq(WORK_RES) * WORK_RES / field_deg  # cycles per degree
    fy, fx = np.meshgrid(f, f, indexing="ij")
    bank = []
    for sf in SF_CPD:
        for o in range(N_ORI):
            th = np.pi * o / N_ORI
            # theta is the direction of the frequency vector in visual coordinates (y up); rows run down
            cx, cy = sf * np.cos(th), -sf * np.sin(th)
            sig = 0.4 * sf  # ~1.5-octave bandwidth
            bank.append(np.exp(-((fx - cx) ** 2 + (fy - cy) ** 2) / (2 * sig**2)))
    return np.stack(bank).astype(np.float32)


def _gauss_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(
        gaussian_filter1d(x, sigma, axis=-1, mode="nearest"), sigma, axis=-2, mode="nearest"
    )


def _raw_channels(x: np.ndarray, field_deg: float) -> np.ndarray:
    """``[n, 64, 64, 3]`` float images -> ``[n, MODEL_CHANNELS, GRID, GRID]`` unnormalised channels."""
    import scipy.fft

    lum = x @ np.array([0.299, 0.587, 0.114], np.float32)  # [n, 64, 64]
    rg = x[..., 0] - x[..., 1]
    by = x[..., 2] - 0.5 * (x[..., 0] + x[..., 1])
    spec = scipy.fft.fft2(lum - 0.5, workers=1).astype(np.complex64)  # [n, 64, 64]
    energy = np.abs(
        scipy.fft.ifft2(spec[:, None] * _gabor_bank(field_deg)[None], workers=1)
    )  # [n, F, 64, 64]
    colour = np.abs(_gauss_blur(np.stack([rg, by], axis=1), 1.0))  # [n, 2, 64, 64]
    local = lum - _gauss_blur(lum, 2.0)
    contrast = np.sqrt(_gauss_blur(local**2, 2.0))[:, None]
    signed = np.stack([rg, by, lum - 0.5], axis=1)
    ch = np.concatenate([energy.astype(np.float32), colour, contrast, signed], axis=1)
    n, c = ch.shape[:2]
    k = WORK_RES // GRID
    return ch.reshape(n, c, GRID, k, GRID, k).mean(axis=(3, 5)).astype(np.float32)


@lru_cache(maxsize=4)
def _channel_norms(field_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel normalisers from a fixed reference set (colour 1/f noise), independent of the stimuli.

    Returns (mean of each raw channel, mean and SD of each log1p-normalised channel) on the reference.
    """
    rng = np.random.default_rng(20080306)  # fixed: the feature space is the same for every run
    n = 32
    f = np.fft.fftfreq(WORK_RES)
    amp = 1.0 / np.maximum(np.hypot(*np.meshgrid(f, f, indexing="ij")), 1.0 / WORK_RES)
    noise = rng.standard_normal((n, 3, WORK_RES, WORK_RES)) + 1.5 * rng.standard_normal(
        (n, 1, WORK_RES, WORK_RES)
    )
    img = np.real(np.fft.ifft2(np.fft.fft2(noise) * amp))
    img = img / img.std(axis=(1, 2, 3), keepdims=True) * 0.2 + 0.5
    raw = _raw_channels(np.clip(img.transpose(0, 2, 3, 1), 0, 1).astype(np.float32), field_deg)
    # energy-like channels are scaled to mean 1, signed ones to RMS 1
    mean = np.concatenate(
        [
            raw[:, :N_ENERGY_LIKE].mean(axis=(0, 2, 3)),
            np.sqrt((raw[:, N_ENERGY_LIKE:] ** 2).mean(axis=(0, 2, 3))),
        ]
    )
    lg = np.log1p(raw[:, :N_ENERGY_LIKE] / mean[None, :N_ENERGY_LIKE, None, None])
    return (
        mean.astype(np.float32),
        lg.mean(axis=(0, 2, 3)).astype(np.float32),
        lg.std(axis=(0, 2, 3)).astype(np.float32),
    )


def feature_maps(images: np.ndarray, field_deg: float = 12.0, seed: int = 0, chunk: int = 128) -> np.ndarray:
    """Image-computable feature maps of the encoding model.

    Channels (normalised on a fixed colour 1/f-noise reference: energies to mean 1, signed ones to RMS 1):
        0..15: Gabor energy (quadrature pairs) at 4 spatial frequencies (0.2-1.6 cycles/degree) x 4
            orientations; 16: red-green and 17: blue-yellow opponent energy; 18: local luminance contrast;
        19: red-green, 20: blue-yellow, 21: luminance (signed, grey = 0);
        22..29: "unmodelled" channels, softplus of random combinations of the log energy channels (texture
            statistics that the encoding model does not contain; drawn from ``seed``).

    Args:
        images: ``[N, H, W, 3]`` uint8 stimuli spanning ``field_deg`` degrees.

    Returns:
        ``[N, 30, 32, 32]`` float32 maps on a 32 x 32 grid of visual-field cells (row 0 at the top).
    """
    mean, lmean, lstd = _channel_norms(float(field_deg))
    rng = np.random.default_rng([int(seed), _UNMODELLED])
    mix = (rng.standard_normal((N_UNMODELLED, N_ENERGY_LIKE)) / np.sqrt(N_ENERGY_LIKE) * 2.0).astype(
        np.float32
    )
    bias = rng.normal(-0.5, 0.5, N_UNMODELLED).astype(np.float32)
    out = np.empty((len(images), MODEL_CHANNELS + N_UNMODELLED, GRID, GRID), dtype=np.float32)
    for s in range(0, len(images), chunk):
        x = _resample_images(images[s : s + chunk], WORK_RES)
        raw = _raw_channels(x, float(field_deg)) / mean[None, :, None, None]
        z = (np.log1p(raw[:, :N_ENERGY_LIKE]) - lmean[None, :, None, None]) / lstd[None, :, None, None]
        un = np.logaddexp(0.0, np.einsum("mc,ncyx->nmyx", mix, z) + bias[None, :, None, None])
        out[s : s + chunk, :MODEL_CHANNELS] = raw
        out[s : s + chunk, MODEL_CHANNELS:] = un
    return out


def _grid_centres(field_deg: float) -> np.ndarray:
    """Cell centres along one axis, degrees (x: left to right; for y, row 0 is at +field/2)."""
    step = field_deg / GRID
    return (-field_deg / 2 + (np.arange(GRID) + 0.5) * step).astype(np.float64)


def rf_weights(x: np.ndarray, y: np.ndarray, sigma: np.ndarray, field_deg: float) -> np.ndarray:
    """Gaussian pRFs integrated over the grid cells: ``[V]`` centres/sizes (deg) -> ``[V, GRID*GRID]``.

    Weights are the Gaussian's mass in each cell, so a pRF that lies partly outside the stimulus pools
    less (the screen around the stimulus is grey).
    """
    from scipy.special import ndtr

    c = _grid_centres(field_deg)
    h = field_deg / GRID / 2
    s = np.asarray(sigma, np.float64)[:, None]
    wx = ndtr((c[None] + h - np.asarray(x)[:, None]) / s) - ndtr((c[None] - h - np.asarray(x)[:, None]) / s)
    yc = c[::-1]  # row 0 at the top
    wy = ndtr((yc[None] + h - np.asarray(y)[:, None]) / s) - ndtr((yc[None] - h - np.asarray(y)[:, None]) / s)
    return (wy[:, :, None] * wx[:, None, :]).reshape(len(s), -1).astype(np.float32)
