"""SynthCortex: a simulated human visual cortex that writes GOD- and HCP-format fMRI.

The encoding model follows the voxel-wise models of human visual cortex:

* Kay, Naselaris, Prenger & Gallant 2008 (Nature 452): each early visual voxel pools the energy of a Gabor
  wavelet pyramid (orientations x spatial frequencies) over its receptive field; identification of novel
  images from their responses is the benchmark we calibrate against.
* Kay, Winawer, Mezer & Wandell 2013 (J Neurophysiol 110), compressive spatial summation (CSS): the
  response is the Gaussian-pooled drive raised to an exponent ``n < 1``, smaller up the hierarchy.
* Dumoulin & Wandell 2008 (NeuroImage 39), population receptive fields: a Gaussian pRF whose centre follows
  the retinotopic map (log-polar eccentricity, polar angle with mirror reversals at the V1/V2/V3 borders) and
  whose size grows with eccentricity and from V1 to V4.
* Higher visual cortex (HVC, the LOC/FFA/PPA union of GOD) is category selective in spatial clusters
  (sparse tuning over the 10 stimulus classes), with large foveal receptive fields and weak global shape
  tuning.
* Trial noise has a heavy-tailed voxel SNR, a component that is spatially smooth along the cortical order,
  a global component, and slow per-run drifts. The noise ceiling follows Allen et al. 2022 (NSD, ncsnr).
* Resting state: slow latent networks with AR(1) dynamics, retinotopically structured spontaneous activity
  ("phantom" images seen through the voxels' pRFs), canonical HRF smoothing, and measurement noise.

Voxels are laid out on a cortical sheet per ROI and hemisphere and vectorised along a boustrophedon path,
so consecutive voxels (and 16-voxel patches) are cortical neighbours, as in real vectorised ROIs.

Everything is seeded (``numpy.random.default_rng([seed, stream, index])``), vectorised over voxels, and
written in the real formats (see ``docs/synthcortex.md``): ``GOD/sbj_<k>.npz`` as MinD-Vis distributes GOD,
``HCP/npz/<subject>/HCP_visual_voxel.npz`` as its HCP files, plus ``stimuli/corpus.npz`` and the manifest
``synthcortex.json`` with every parameter and the ground truth.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mindvis.data import stimuli as stim
from mindvis.errors import ConfigError, DataError
from mindvis.utils.io import atomic_dir, atomic_write, prepare_output_dir, read_json, save_npz_atomic
from mindvis.utils.linalg import ridge_dual

_logger = logging.getLogger(__name__)

#: ROIs of a target subject, in the order of the voxel vector; ``VC`` is their union.
ROIS: tuple[str, ...] = ("V1", "V2", "V3", "V4", "HVC")
RETINOTOPIC: tuple[str, ...] = ("V1", "V2", "V3", "V4")
FORMAT_VERSION = 1
MANIFEST = "synthcortex.json"

Progress = Callable[[str, float], None]

# seed streams: default_rng([seed, STREAM, index])
_STIMULI, _TARGET, _TARGET_TRIALS, _REST, _UNMODELLED, _CALIBRATION = 1, 2, 3, 4, 5, 6


# ========================================================================================================
# Configuration


def _default_fractions() -> dict[str, float]:
    return {"V1": 0.22, "V2": 0.21, "V3": 0.17, "V4": 0.14, "HVC": 0.26}


@dataclass
class SynthConfig:
    """Every parameter of a SynthCortex run. Build with :meth:`preset`; validated at creation.

    Sizes (defaults mirror GOD and HCP):
        n_subjects: GOD-like target subjects ``sbj_1..``.
        n_rest_subjects: HCP-like resting-state subjects.
        n_train / n_test / n_repeats: training images (one trial each), test images, test repeats.
        trials_per_run: trials per scanner run (drifts are per run).
        n_trs / tr: resting-state length in TRs and the TR in seconds.
        resolution: stimulus side in pixels (``images_<resolution>.npz``).
        source: stimulus source (``fashion-mnist``, ``animal-mnist``, ``fashion+animal`` (20 classes),
            ``folder:PATH``).
        corpus_size: images in ``stimuli/corpus.npz`` (the labelled corpus for the image prior / classifier).
        field_deg: the stimulus spans ``field_deg`` x ``field_deg`` degrees of visual angle (GOD: 12).

    Anatomy:
        voxels: mean VC voxel count of a target subject (GOD: 4133-4643).
        voxel_jitter: between-subject SD of each ROI's voxel count, as a fraction.
        roi_fractions: share of VC voxels per ROI.
        rest_vertices: V1..V4 vertices of every resting-state subject (fixed, as on a template surface).
        map_jitter_deg: between-subject SD of the polar-angle map rotation, in degrees.

    Signal and noise (these differ between presets):
        snr_median: median single-trial voxel SNR (signal SD / noise SD) of a retinotopic ROI.
        snr_spread: SD of log SNR across voxels (heavy tail: many nearly uninformative voxels).
        subject_snr_jitter: between-subject SD of log SNR scale.
        hvc_snr_factor: HVC SNR relative to the retinotopic ROIs.
        unmodelled_fraction: share of the stimulus-driven variance that comes from features outside the
            encoding model (texture statistics pooled in the same pRF), the gap between a model's
            prediction and the noise ceiling.
        noise_spatial / noise_global: shares of trial-noise variance that are smooth along the cortical
            order / shared by all voxels; the rest is independent.
        noise_length: SD, in voxels, of the smoothing of the spatial noise along the cortical order.
        drift_offset / drift_slope: SD of per-run offsets and linear trends, relative to the trial noise SD.

    Resting state (shares of variance; independent noise gets the rest):
        rest_network_var, rest_phantom_var, rest_global_var: slow networks, retinotopic spontaneous
            patterns, global signal.
        rest_spatial_noise_var, rest_drift_var: measurement noise smooth along the cortical order; slow
            scanner drift.
        rest_ecc_bands: eccentricity bands of the latent networks (x dorsal/ventral: 2 * bands networks).
        rest_network_ar / rest_phantom_ar: AR(1) coefficient per TR of the network / phantom latents.
        rest_phantom_length_deg: spatial correlation length of the phantom images.

    Calibration (``--report``):
        calibration_images / calibration_repeats / calibration_voxels: Kay et al. 2008's identification set
            (120 novel images, 13 repeats, 500 voxels selected by prediction accuracy on training data).
    """

    name: str = "realistic"
    seed: int = 0
    n_subjects: int = 1
    n_rest_subjects: int = 50
    n_train: int = 1200
    n_test: int = 50
    n_repeats: int = 35
    trials_per_run: int = 50
    n_trs: int = 1200
    tr: float = 0.72
    resolution: int = 64
    source: str = "fashion-mnist"
    corpus_size: int = 5000
    field_deg: float = 12.0
    voxels: int = 4500
    voxel_jitter: float = 0.05
    roi_fractions: dict[str, float] = field(default_factory=_default_fractions)
    rest_vertices: int = 3600
    map_jitter_deg: float = 5.0
    snr_median: float = 0.1
    snr_spread: float = 0.8
    subject_snr_jitter: float = 0.15
    hvc_snr_factor: float = 1.2
    unmodelled_fraction: float = 0.6
    noise_spatial: float = 0.4
    noise_global: float = 0.1
    noise_length: float = 6.0
    drift_offset: float = 0.3
    drift_slope: float = 0.3
    rest_network_var: float = 0.3
    rest_phantom_var: float = 0.25
    rest_global_var: float = 0.05
    rest_spatial_noise_var: float = 0.1
    rest_drift_var: float = 0.05
    rest_ecc_bands: int = 3
    rest_network_ar: float = 0.95
    rest_phantom_ar: float = 0.85
    rest_phantom_length_deg: float = 2.0
    calibration_images: int = 120
    calibration_repeats: int = 13
    calibration_voxels: int = 500
    # derived (computed after overrides, in __post_init__)
    roi_voxels: dict[str, int] = field(init=False)
    rest_roi_vertices: dict[str, int] = field(init=False)

    @classmethod
    def preset(cls, name: str = "realistic", **overrides: Any) -> SynthConfig:
        """A preset (``easy``, ``realistic``, ``hard``) with ``overrides`` applied on top.

        Raises:
            ConfigError: unknown preset or unknown / invalid option.
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r} (choose {', '.join(PRESETS)})", field="preset")
        known = {f.name for f in fields(cls) if f.init}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ConfigError(f"unknown option(s) {', '.join(bad)}", field=bad[0])
        kwargs = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}, "name": name}
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SynthConfig:
        """Rebuild a config saved by :meth:`to_dict` (derived values are recomputed)."""
        known = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{msg}, got {getattr(self, name)!r}", field=name)

        for name in (
            "seed",
            "n_subjects",
            "n_rest_subjects",
            "n_train",
            "n_test",
            "n_repeats",
            "trials_per_run",
            "n_trs",
            "resolution",
            "corpus_size",
            "voxels",
            "rest_vertices",
            "rest_ecc_bands",
            "calibration_images",
            "calibration_repeats",
            "calibration_voxels",
        ):
            v = getattr(self, name)
            need(isinstance(v, (int, np.integer)) and not isinstance(v, bool), name, "must be an integer")
            setattr(self, name, int(v))
        need(self.seed >= 0, "seed", "must be >= 0")
        need(self.n_subjects >= 0, "n_subjects", "must be >= 0")
        need(self.n_rest_subjects >= 0, "n_rest_subjects", "must be >= 0")
        need(self.n_subjects + self.n_rest_subjects >= 1, "n_subjects", "need at least one subject")
        need(self.n_train >= 2, "n_train", "must be at least 2")
        need(self.n_test >= 2, "n_test", "must be at least 2")
        need(self.n_repeats >= 2, "n_repeats", "must be at least 2 (the noise ceiling needs repeats)")
        need(self.trials_per_run >= 1, "trials_per_run", "must be >= 1")
        need(self.n_trs >= 32, "n_trs", "must be at least 32 TRs")
        need(0.1 <= self.tr <= 10, "tr", "must be between 0.1 and 10 seconds")
        need(16 <= self.resolution <= 1024, "resolution", "must be between 16 and 1024 pixels")
        need(self.corpus_size >= 0, "corpus_size", "must be >= 0")
        need(1.0 <= self.field_deg <= 60.0, "field_deg", "must be between 1 and 60 degrees")
        stim.parse_source(self.source)
        fr = self.roi_fractions
        need(
            isinstance(fr, dict) and set(fr) == set(ROIS) and all(float(v) > 0 for v in fr.values()),
            "roi_fractions",
            f"must give a positive share for each of {', '.join(ROIS)}",
        )
        total = sum(float(v) for v in fr.values())
        self.roi_fractions = {r: float(fr[r]) / total for r in ROIS}
        # every ROI needs two hemispheres of at least one 16-voxel patch each
        min_vc = math.ceil(32 / min(self.roi_fractions.values()))
        need(
            min_vc <= self.voxels <= 200_000,
            "voxels",
            f"impossible voxel count: must be between {min_vc} (32 per ROI) and 200000",
        )
        ret_total = sum(self.roi_fractions[r] for r in RETINOTOPIC)
        min_rest = math.ceil(32 / min(self.roi_fractions[r] / ret_total for r in RETINOTOPIC))
        need(
            min_rest <= self.rest_vertices <= 200_000,
            "rest_vertices",
            f"impossible vertex count: must be between {min_rest} (32 per ROI) and 200000",
        )
        need(0 <= self.voxel_jitter <= 0.3, "voxel_jitter", "must be between 0 and 0.3")
        need(0 <= self.map_jitter_deg <= 45, "map_jitter_deg", "must be between 0 and 45")
        need(0 < self.snr_median <= 100, "snr_median", "must be positive")
        need(0 <= self.snr_spread <= 3, "snr_spread", "must be between 0 and 3")
        need(0 <= self.subject_snr_jitter <= 1, "subject_snr_jitter", "must be between 0 and 1")
        need(0 < self.hvc_snr_factor <= 10, "hvc_snr_factor", "must be positive")
        need(0 <= self.unmodelled_fraction < 1, "unmodelled_fraction", "must be in [0, 1)")
        need(
            self.noise_spatial >= 0 and self.noise_global >= 0 and self.noise_spatial + self.noise_global < 1,
            "noise_spatial",
            "noise_spatial + noise_global must be below 1",
        )
        need(0.5 <= self.noise_length <= 1000, "noise_length", "must be between 0.5 and 1000 voxels")
        need(
            0 <= self.drift_offset <= 10 and 0 <= self.drift_slope <= 10, "drift_offset", "must be in [0, 10]"
        )
        shares = (
            self.rest_network_var,
            self.rest_phantom_var,
            self.rest_global_var,
            self.rest_spatial_noise_var,
            self.rest_drift_var,
        )
        need(
            all(s >= 0 for s in shares) and sum(shares) < 1,
            "rest_network_var",
            "resting-state variance shares must be >= 0 and sum below 1",
        )
        need(1 <= self.rest_ecc_bands <= 8, "rest_ecc_bands", "must be between 1 and 8")
        need(
            0 <= self.rest_network_ar < 1 and 0 <= self.rest_phantom_ar < 1,
            "rest_network_ar",
            "AR coefficients must be in [0, 1)",
        )
        need(0.1 <= self.rest_phantom_length_deg <= 50, "rest_phantom_length_deg", "must be in [0.1, 50]")
        need(self.calibration_images >= 2, "calibration_images", "must be at least 2")
        need(self.calibration_repeats >= 1, "calibration_repeats", "must be >= 1")
        need(self.calibration_voxels >= 2, "calibration_voxels", "must be at least 2")
        # derived values
        self.roi_voxels = {r: int(round(self.voxels * self.roi_fractions[r])) for r in ROIS}
        self.rest_roi_vertices = {
            r: int(round(self.rest_vertices * self.roi_fractions[r] / ret_total)) for r in RETINOTOPIC
        }


#: Presets: overrides of the defaults (``realistic`` is the default configuration).
PRESETS: dict[str, dict[str, Any]] = {
    "easy": {
        "snr_median": 0.3,
        "snr_spread": 0.6,
        "unmodelled_fraction": 0.3,
        "noise_spatial": 0.25,
        "noise_global": 0.05,
        "drift_offset": 0.15,
        "drift_slope": 0.15,
        "rest_network_var": 0.35,
        "rest_phantom_var": 0.35,
        "rest_spatial_noise_var": 0.05,
        "rest_drift_var": 0.02,
    },
    "realistic": {},
    "hard": {
        "snr_median": 0.06,
        "snr_spread": 0.9,
        "unmodelled_fraction": 0.7,
        "noise_spatial": 0.45,
        "noise_global": 0.15,
        "drift_offset": 0.5,
        "drift_slope": 0.5,
        "rest_network_var": 0.2,
        "rest_phantom_var": 0.15,
        "rest_spatial_noise_var": 0.15,
        "rest_drift_var": 0.1,
    },
}


# ========================================================================================================
# Image features (subject-independent): Gabor energy pyramid + colour-opponent + contrast channels

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


# ========================================================================================================
# Virtual subjects

# ROI -> parameters: eccentricity range (deg), pRF size = s0 + s1 * ecc (deg), CSS exponent, preferred SF at
# the fovea (cycles/deg), colour weight, cortical sheet aspect (eccentricity : polar angle), SNR factor.
_ROI_KEYS = ("emax", "s0", "s1", "n", "sf0", "colour", "aspect", "snr")
# fmt: off
_ROI_PARAMS: dict[str, dict[str, float]] = {
    r: dict(zip(_ROI_KEYS, vals, strict=True)) for r, vals in {
        #       emax   s0    s1    n     sf0   colour aspect snr
        "V1":  (7.5,  0.15, 0.10, 0.50, 1.6,  0.25,  3.0,   1.0),
        "V2":  (7.5,  0.25, 0.15, 0.42, 1.2,  0.25,  3.0,   1.0),
        "V3":  (7.5,  0.35, 0.25, 0.36, 0.9,  0.30,  3.0,   0.95),
        "V4":  (6.5,  0.50, 0.35, 0.30, 0.6,  0.60,  2.0,   0.9),
        "HVC": (3.0,  2.00, 0.50, 0.30, 0.3,  0.20,  1.5,   1.0),
    }.items()
}
# fmt: on
# ROI -> sheets per hemisphere: (share, polar angle at w=0, polar angle at w=1), degrees from the horizontal
# meridian, upper field positive. V2/V3 are split into dorsal (lower field) and ventral (upper field)
# quarter-field maps with mirror reversals at the vertical (V1/V2) and horizontal (V2/V3) meridians.
_SHEETS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "V1": ((1.0, -90.0, 90.0),),
    "V2": ((0.5, -90.0, 0.0), (0.5, 90.0, 0.0)),
    "V3": ((0.5, 0.0, -90.0), (0.5, 0.0, 90.0)),
    "V4": ((1.0, -90.0, 90.0),),
    "HVC": ((1.0, -90.0, 90.0),),
}
_FOVEAL_A = 0.75  # deg, foveal constant of the log-polar eccentricity map


def _split_counts(total: int, shares: list[float]) -> list[int]:
    raw = np.asarray(shares, float) / sum(shares) * total
    out = np.floor(raw).astype(int)
    out[np.argsort(raw - out)[::-1][: total - out.sum()]] += 1
    return out.tolist()


def _sheet(n: int, aspect: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` voxels on a cortical sheet, in boustrophedon order: (u along eccentricity, w along angle)."""
    nw = max(2, int(round(math.sqrt(n / aspect))))
    nu = -(-n // nw)
    i = np.arange(n)
    row, col = i // nw, i % nw
    col = np.where(row % 2 == 1, nw - 1 - col, col)
    u = (row + 0.5 + rng.uniform(-0.3, 0.3, n)) / nu
    w = (col + 0.5 + rng.uniform(-0.3, 0.3, n)) / nw
    return np.clip(u, 0, 1), np.clip(w, 0, 1)


@dataclass
class VirtualSubject:
    """One simulated brain: per-voxel anatomy, tuning and noise (arrays ``[V]`` unless noted).

    Voxels are ordered ROI by ROI (``ROIS`` order), within an ROI hemisphere by hemisphere and sheet by
    sheet, and within a sheet along the boustrophedon path.

    Attributes:
        name: subject name (``sbj_1``, ``rest_001``).
        roi: int8 index into ``rois``; hemi: 0 left, 1 right (left hemisphere sees the right field).
        u, w: position on the cortical sheet (eccentricity axis, polar-angle axis), in [0, 1].
        x, y: pRF centre in degrees (x right, y up); sigma: pRF SD (deg); css_n: CSS exponent.
        sf_pref: preferred spatial frequency (cycles/deg); ori_pref: preferred orientation (rad).
        profile_idx, profile_w: ``[V, 2]`` the two Gabor-energy tuning profiles a voxel mixes and their
            weights; a profile (``profiles``: ``[P, 16]``) weights the energy channels by spatial frequency
            and orientation. Voxels interpolate between the two profiles around their preferred spatial
            frequency, so pooling costs two maps per voxel instead of 16.
        colour_w, contrast_w: ``[V]`` weights of the colour-opponent energy (red-green + blue-yellow) and
            of local luminance contrast inside the CSS drive.
        hue_pref, hue_w, lum_w: ``[V]`` a linear hue-tuned term (Brouwer & Heeger 2009): the pRF-pooled
            signed colour projected on the preferred hue angle (clustered along the cortex), plus a weak
            luminance weight, added with weight ``hue_w`` to the CSS response.
        unmod_idx: ``[V]`` the voxel's profile (``unmod_profiles``: ``[Q, 8]``) over the unmodelled channels.
        category_w: ``[V, K]`` category tuning (zero outside HVC); shape_w: ``[V, 49]`` shape tuning.
        hvc_mix: ``[V, 3]`` HVC weights of (pRF drive, category, shape).
        noise_sd: trial-noise SD; baseline: response offset; snr_nominal: drawn SNR; amp: signal gain.
        network: resting-state network of each voxel (index), ``[V, K]`` loadings in ``network_w``.
    """

    name: str
    rois: tuple[str, ...]
    roi: np.ndarray
    hemi: np.ndarray
    u: np.ndarray
    w: np.ndarray
    x: np.ndarray
    y: np.ndarray
    sigma: np.ndarray
    css_n: np.ndarray
    sf_pref: np.ndarray
    ori_pref: np.ndarray
    profile_idx: np.ndarray
    profile_w: np.ndarray
    profiles: np.ndarray
    colour_w: np.ndarray
    contrast_w: np.ndarray
    hue_pref: np.ndarray
    hue_w: np.ndarray
    lum_w: np.ndarray
    unmod_idx: np.ndarray
    unmod_profiles: np.ndarray
    category_w: np.ndarray
    shape_w: np.ndarray
    hvc_mix: np.ndarray
    noise_sd: np.ndarray
    baseline: np.ndarray
    snr_nominal: np.ndarray
    network_w: np.ndarray
    field_deg: float
    unmodelled_fraction: float
    noise_spatial: float
    noise_global: float
    noise_length: float
    drift_offset: float
    drift_slope: float
    global_load: np.ndarray
    # set by fit(): normalisation of the response components on the training stimuli
    norm: dict[str, np.ndarray] | None = None
    rf: np.ndarray | None = field(default=None, repr=False)
    _group_cache: Any = field(default=None, repr=False)

    @property
    def num_voxels(self) -> int:
        return int(self.roi.shape[0])

    @property
    def network(self) -> np.ndarray:
        return np.argmax(self.network_w, axis=1).astype(np.int64)

    def mask(self, roi: str) -> np.ndarray:
        """Boolean ``[V]`` mask of one ROI (``VC``: all)."""
        if roi == "VC":
            return np.ones(self.num_voxels, dtype=bool)
        return self.roi == self.rois.index(roi)

    @property
    def noise_total_sd(self) -> np.ndarray:
        """SD of all noise in one trial: trial noise plus the run offset and trend."""
        return self.noise_sd * math.sqrt(1 + self.drift_offset**2 + self.drift_slope**2 / 3)

    # ---- responses ---------------------------------------------------------------------------------
    def _rf(self) -> np.ndarray:
        if self.rf is None:
            self.rf = rf_weights(self.x, self.y, self.sigma, self.field_deg)
        return self.rf

    def _groups(self) -> tuple[list[tuple[int, np.ndarray, np.ndarray]], list[tuple[int, np.ndarray]]]:
        """Voxels (and their slot weights) of each energy profile in use; voxels of each unmodelled profile."""
        if self._group_cache is None:
            groups = []
            for p in np.unique(self.profile_idx):
                vv, slot = np.nonzero(self.profile_idx == p)
                groups.append((int(p), vv, self.profile_w[vv, slot].astype(np.float32)))
            ugroups = [(int(q), np.flatnonzero(self.unmod_idx == q)) for q in np.unique(self.unmod_idx)]
            self._group_cache = (groups, ugroups)
        return self._group_cache

    def _components(
        self, fm: np.ndarray, labels: np.ndarray | None, shape: np.ndarray | None, chunk: int = 256
    ) -> dict[str, np.ndarray]:
        """Raw response components ``[N, V]``: CSS pRF drive, unmodelled drive, category, shape.

        Drive of voxel v (Kay et al. 2013 CSS): ``(sum_x G_v(x) d_v(x)) ** n_v`` with G_v the pRF and
        ``d_v = sum_p a_vp E_p + colour_v (RG + BY) + contrast_v C``, E_p the profile-weighted Gabor energy.
        """
        n, v = fm.shape[0], self.num_voxels
        rf_t = np.ascontiguousarray(self._rf().T)  # [G*G, V]
        groups, ugroups = self._groups()
        rf_g = [np.ascontiguousarray(rf_t[:, vv]) for _, vv, _ in groups]
        rf_u = [np.ascontiguousarray(rf_t[:, vv]) for _, vv in ugroups]
        css = np.empty((n, v), np.float32)
        hue = np.empty((n, v), np.float32)
        unmod = np.empty((n, v), np.float32)
        for s in range(0, n, chunk):
            f = fm[s : s + chunk].reshape(min(chunk, n - s), fm.shape[1], -1)  # [b, C, X]
            b = f.shape[0]
            energy = np.tensordot(self.profiles, f[:, :N_ENERGY], axes=([1], [1]))  # [P, b, X]
            drive = ((f[:, N_ENERGY] + f[:, N_ENERGY + 1]) @ rf_t) * self.colour_w[None]  # opponent energy
            drive += (f[:, N_ENERGY + 2] @ rf_t) * self.contrast_w[None]
            for (p, vv, wgt), rg in zip(groups, rf_g, strict=True):
                drive[:, vv] += (energy[p] @ rg) * wgt[None]
            css[s : s + b] = np.maximum(drive, 0.0) ** self.css_n[None]
            rg, by, lum = (f[:, N_ENERGY_LIKE + i] @ rf_t for i in range(3))
            hue[s : s + b] = (
                rg * np.cos(self.hue_pref)[None] + by * np.sin(self.hue_pref)[None] + lum * self.lum_w[None]
            )
            umix = np.tensordot(self.unmod_profiles, f[:, MODEL_CHANNELS:], axes=([1], [1]))  # [Q, b, X]
            for (q, vv), rg in zip(ugroups, rf_u, strict=True):
                unmod[s : s + b, vv] = umix[q] @ rg
        cat = np.zeros((n, v), np.float32)
        if labels is not None:
            lab = np.asarray(labels, np.int64)
            ok = lab >= 0
            cat[ok] = self.category_w[:, lab[ok]].T
        shp = np.zeros((n, v), np.float32)
        if shape is not None:
            shp = (np.asarray(shape, np.float32) @ self.shape_w.T).astype(np.float32)
        return {"css": css, "hue": hue, "unmod": unmod, "cat": cat, "shape": shp}

    def _roi_scale(self, x: np.ndarray) -> np.ndarray:
        """Per-voxel scale ``[V]``: the median over the voxel's ROI of the SD across stimuli."""
        sd = x.std(axis=0)
        scale = np.ones(self.num_voxels, np.float32)
        for i in range(len(self.rois)):
            m = self.roi == i
            if m.any():
                scale[m] = max(float(np.median(sd[m])), 1e-8)
        return scale

    def fit(
        self, fm: np.ndarray, labels: np.ndarray | None, shape: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fix the response normalisation on the training stimuli (means per voxel, scales per ROI).

        Component scales are ROI-level, so a voxel whose pRF barely overlaps the stimulus keeps a weak
        signal (low SNR), as in real data.

        Returns:
            :meth:`responses` to the same stimuli (computed once).
        """
        comp = self._components(fm, labels, shape)
        norm: dict[str, np.ndarray] = {}
        for k, x in comp.items():
            norm[f"{k}_mean"] = x.mean(axis=0)
            norm[f"{k}_scale"] = self._roi_scale(x)
        self.norm = norm
        model = self._model_from(comp)
        norm["model_mean"] = model.mean(axis=0)
        norm["model_scale"] = self._roi_scale(model)
        return self._finish(comp)

    def _z(self, comp: dict[str, np.ndarray], k: str) -> np.ndarray:
        assert self.norm is not None
        return (comp[k] - self.norm[f"{k}_mean"]) / self.norm[f"{k}_scale"]

    def _model_from(self, comp: dict[str, np.ndarray]) -> np.ndarray:
        hvc = self.hvc_mix
        ret = self._z(comp, "css") + self.hue_w * self._z(comp, "hue")
        return ret * hvc[:, 0] + self._z(comp, "cat") * hvc[:, 1] + self._z(comp, "shape") * hvc[:, 2]

    @property
    def amp(self) -> np.ndarray:
        """Signal gain ``[V]``: a unit-scale response component becomes ``snr_nominal`` x noise SD."""
        return self.snr_nominal * self.noise_total_sd

    def responses(
        self, fm: np.ndarray, labels: np.ndarray | None = None, shape: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Noiseless responses to stimuli (after :meth:`fit`).

        Args:
            fm: ``[N, 30, 32, 32]`` feature maps (:func:`feature_maps`).
            labels: ``[N]`` class of each stimulus (-1 or None: no object, no category drive).
            shape: ``[N, 49]`` object shape descriptors (None: no object).

        Returns:
            (signal, model): ``[N, V]`` float32 each. ``signal`` is the full stimulus-driven response (the
            noiseless beta, without baseline); ``model`` is the part the encoding model predicts (the
            "true encoding model" prediction; the rest is the unmodelled component).
        """
        if self.norm is None:
            raise RuntimeError("VirtualSubject.fit() must be called before responses()")
        return self._finish(self._components(fm, labels, shape))

    def _finish(self, comp: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        assert self.norm is not None
        model = (self._model_from(comp) - self.norm["model_mean"]) / self.norm["model_scale"]
        unmod = self._z(comp, "unmod")
        a = self.amp[None]
        pred = (a * math.sqrt(1 - self.unmodelled_fraction) * model).astype(np.float32)
        sig = (pred + a * math.sqrt(self.unmodelled_fraction) * unmod).astype(np.float32)
        return sig, pred

    # ---- noise -------------------------------------------------------------------------------------
    def trial_noise(self, run: np.ndarray, position: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noise of single trials: ``[T]`` run id and position in run (-1..1) -> ``[T, V]`` float32.

        Independent + spatially smooth (along the voxel order) + global components, plus a per-run offset
        and linear trend that are smooth along the voxel order.
        """
        t, v = len(run), self.num_voxels
        f_sp, f_gl = self.noise_spatial, self.noise_global
        noise = rng.standard_normal((t, v), dtype=np.float32) * np.float32(math.sqrt(1 - f_sp - f_gl))
        if f_sp > 0:
            noise += smooth_along_voxels(
                rng.standard_normal((t, v), dtype=np.float32), self.noise_length
            ) * np.float32(math.sqrt(f_sp))
        if f_gl > 0:
            g = rng.standard_normal(t).astype(np.float32)
            noise += np.float32(math.sqrt(f_gl)) * g[:, None] * self.global_load[None]
        runs, inv = np.unique(np.asarray(run), return_inverse=True)
        off = smooth_along_voxels(
            rng.standard_normal((len(runs), v), dtype=np.float32), 4 * self.noise_length
        )
        slope = smooth_along_voxels(
            rng.standard_normal((len(runs), v), dtype=np.float32), 4 * self.noise_length
        )
        drift = (
            self.drift_offset * off[inv]
            + self.drift_slope * slope[inv] * np.asarray(position, np.float32)[:, None]
        )
        return ((noise + drift) * self.noise_sd[None]).astype(np.float32)

    def ground_truth(self, class_names: list[str] | None = None) -> dict[str, Any]:
        """Per-voxel parameters for the manifest (lists, rounded)."""
        gt: dict[str, Any] = {
            "roi": [self.rois[i] for i in self.roi.tolist()],
            "hemisphere": ["L" if h == 0 else "R" for h in self.hemi.tolist()],
            "cortex_u": _r(self.u, 3),
            "cortex_w": _r(self.w, 3),
            "x_deg": _r(self.x, 3),
            "y_deg": _r(self.y, 3),
            "sigma_deg": _r(self.sigma, 3),
            "css_exponent": _r(self.css_n, 3),
            "sf_pref_cpd": _r(self.sf_pref, 3),
            "ori_pref_deg": _r(np.degrees(self.ori_pref) % 180, 1),
            "hue_pref_deg": _r(np.degrees(self.hue_pref) % 360, 1),
            "noise_sd": _r(self.noise_total_sd, 4),
            "baseline": _r(self.baseline, 4),
            "snr_nominal": _r(self.snr_nominal, 4),
            "network": self.network.tolist(),
        }
        if "HVC" in self.rois:
            m = self.mask("HVC")
            cw = self.category_w[m]
            gt["hvc_category_pref"] = np.argmax(cw, axis=1).tolist()
            gt["hvc_category_selectivity"] = _r(cw.max(axis=1) - np.median(cw, axis=1), 3)
            if class_names is not None:
                gt["class_names"] = list(class_names)
        return gt


def _r(a: np.ndarray, d: int) -> list[float]:
    return np.round(np.asarray(a, np.float64), d).tolist()


def smooth_along_voxels(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing along the last (voxel) axis, rescaled to keep white noise at unit variance."""
    from scipy.ndimage import gaussian_filter1d

    impulse = np.zeros(int(8 * sigma) + 3, np.float64)
    impulse[len(impulse) // 2] = 1
    k = gaussian_filter1d(impulse, sigma, mode="constant")
    gain = 1.0 / math.sqrt(float((k**2).sum()))
    return (gaussian_filter1d(x, sigma, axis=-1, mode="reflect") * np.float32(gain)).astype(np.float32)


#: preferred spatial frequencies of the tuning profiles (cycles/deg), log-spaced
PROFILE_SF = np.geomspace(0.1, 2.0, 8)
N_UNMOD_PROFILES = 16


def _tuning_profiles() -> np.ndarray:
    """Gabor-energy weights of the tuning profiles: ``[len(PROFILE_SF) * N_ORI, N_ENERGY]``.

    Profile (sf bin, orientation bin): a Gaussian in log SF (1-octave SD) around the bin's SF times
    ``1 + 0.25 cos(2 (theta - theta_bin))`` (voxel orientation biases are weak), normalised to unit sum.
    """
    sfs = np.log2(np.asarray(SF_CPD))
    th = np.pi * np.arange(N_ORI) / N_ORI
    out = []
    for sf in PROFILE_SF:
        g_sf = np.exp(-((sfs - np.log2(sf)) ** 2) / 2.0)
        for o in range(N_ORI):
            e = np.outer(g_sf, 1 + 0.25 * np.cos(2 * (th - th[o]))).reshape(-1)
            out.append(e / e.sum())
    return np.asarray(out, np.float32)


def sample_subject(
    config: SynthConfig, index: int, kind: Literal["target", "rest"] = "target", n_classes: int = 10
) -> VirtualSubject:
    """Draw one virtual subject (deterministic in ``config.seed``, ``kind`` and ``index``).

    Target subjects (``sbj_<index>``) have V1..V4 + HVC with subject-specific voxel counts; resting-state
    subjects (``rest_<index>``) have V1..V4 with the fixed vertex counts of ``config.rest_roi_vertices``.
    """
    rng = np.random.default_rng([config.seed, _TARGET if kind == "target" else _REST, int(index)])
    if kind == "target":
        rois = ROIS
        counts = {
            r: max(32, int(round(config.roi_voxels[r] * (1 + config.voxel_jitter * rng.standard_normal()))))
            for r in ROIS
        }
        name = f"sbj_{index}"
    else:
        rois = RETINOTOPIC
        counts = dict(config.rest_roi_vertices)
        name = f"rest_{index:03d}"
    # subject-level map jitter
    rot = np.radians(config.map_jitter_deg) * rng.standard_normal(2)  # per hemisphere
    e_scale = float(np.exp(0.08 * rng.standard_normal()))
    a_fov = _FOVEAL_A * float(np.exp(0.1 * rng.standard_normal()))
    snr_scale = float(np.exp(config.subject_snr_jitter * rng.standard_normal()))

    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("roi", "hemi", "u", "w", "ecc", "ang", "sheet")}
    sheet_id = 0
    for ri, r in enumerate(rois):
        p = _ROI_PARAMS[r]
        halves = _split_counts(counts[r], [1, 1])
        for h in (0, 1):
            shares = [s[0] for s in _SHEETS[r]]
            for (_, a0, a1), m in zip(_SHEETS[r], _split_counts(halves[h], shares), strict=True):
                u, w = _sheet(m, p["aspect"], rng)
                emax = p["emax"] * e_scale
                if r == "HVC":
                    ecc = emax * u
                else:
                    ecc = a_fov * ((1 + emax / a_fov) ** u - 1)
                ang = np.radians(a0 + (a1 - a0) * w) + rot[h]
                cols["roi"].append(np.full(m, ri, np.int8))
                cols["hemi"].append(np.full(m, h, np.int8))
                cols["u"].append(u)
                cols["w"].append(w)
                cols["ecc"].append(ecc)
                cols["ang"].append(ang)
                cols["sheet"].append(np.full(m, sheet_id, np.int32))
                sheet_id += 1
    roi = np.concatenate(cols["roi"])
    hemi = np.concatenate(cols["hemi"])
    u, w = np.concatenate(cols["u"]), np.concatenate(cols["w"])
    ecc, ang = np.concatenate(cols["ecc"]), np.concatenate(cols["ang"])
    sheet = np.concatenate(cols["sheet"])
    v = len(roi)
    par = {k: np.array([_ROI_PARAMS[rois[i]][k] for i in range(len(rois))])[roi] for k in _ROI_PARAMS["V1"]}
    # left hemisphere (0) represents the right visual field
    side = np.where(hemi == 0, 1.0, -1.0)
    scatter = 0.1 + 0.05 * ecc
    x = side * ecc * np.cos(ang) + scatter * rng.standard_normal(v)
    y = ecc * np.sin(ang) + scatter * rng.standard_normal(v)
    ecc_true = np.hypot(x, y)
    sigma = np.maximum((par["s0"] + par["s1"] * ecc_true) * np.exp(0.15 * rng.standard_normal(v)), 0.08)
    css_n = np.clip(par["n"] + 0.04 * rng.standard_normal(v), 0.12, 1.0)
    # feature tuning: spatial frequency falls with eccentricity and up the hierarchy; weak radial bias
    # (orientation parallel to the radial direction, i.e. frequency vector perpendicular to it). A voxel
    # interpolates between the two tuning profiles around its preferred SF, at its nearest orientation bin.
    sf_pref = par["sf0"] / (1 + ecc_true / 2.0) * np.exp(0.2 * rng.standard_normal(v))
    sf_pref = np.clip(sf_pref, PROFILE_SF[0], PROFILE_SF[-1])
    ori_pref = (np.arctan2(y, x) + np.pi / 2 + np.radians(30) * rng.standard_normal(v)) % np.pi
    profiles = _tuning_profiles()
    t_sf = np.log(sf_pref / PROFILE_SF[0]) / np.log(PROFILE_SF[-1] / PROFILE_SF[0]) * (len(PROFILE_SF) - 1)
    i0 = np.clip(np.floor(t_sf).astype(np.int64), 0, len(PROFILE_SF) - 2)
    frac = np.clip(t_sf - i0, 0.0, 1.0)
    ori_bin = np.rint(ori_pref / (np.pi / N_ORI)).astype(np.int64) % N_ORI
    profile_idx = np.stack([ori_bin + i0 * N_ORI, ori_bin + (i0 + 1) * N_ORI], axis=1).astype(np.int32)
    profile_w = np.stack([1 - frac, frac], axis=1).astype(np.float32)
    unmod_profiles = (rng.standard_normal((N_UNMOD_PROFILES, N_UNMODELLED)) / math.sqrt(N_UNMODELLED)).astype(
        np.float32
    )
    unmod_idx = rng.integers(0, N_UNMOD_PROFILES, v).astype(np.int32)
    colour_w = (par["colour"] * np.exp(0.3 * rng.standard_normal(v))).astype(np.float32)
    # hue preference clustered along the cortical order: angle of a smoothed 2-D random field
    hv2 = smooth_along_voxels(rng.standard_normal((2, v)).astype(np.float32), 8.0)
    hue_pref = np.arctan2(hv2[1], hv2[0]).astype(np.float32)
    hue_w = (par["colour"] * np.exp(0.3 * rng.standard_normal(v))).astype(np.float32)
    lum_w = (0.3 + 0.3 * rng.standard_normal(v)).astype(np.float32)
    contrast_w = (0.3 * np.exp(0.3 * rng.standard_normal(v))).astype(np.float32)
    # HVC: spatially clustered sparse category tuning, shape tuning, weak pRF drive
    category_w = np.zeros((v, n_classes), np.float32)
    shape_w = np.zeros((v, stim.SHAPE_SIDE**2), np.float32)
    hvc_mix = np.zeros((v, 3), np.float32)
    hvc_mix[:, 0] = 1.0
    if "HVC" in rois:
        hv = roi == rois.index("HVC")
        nh = int(hv.sum())
        # per sheet and class, two Gaussian blobs on the sheet; tuning = soft winner-take-all
        n_sheets = int(sheet.max()) + 1
        cu = rng.uniform(0, 1, (n_sheets, n_classes, 2))
        cw = rng.uniform(0, 1, (n_sheets, n_classes, 2))
        su, sw, ss = u[hv], w[hv], sheet[hv]
        d2 = (su[:, None, None] - cu[ss]) ** 2 + (sw[:, None, None] - cw[ss]) ** 2  # [nh, K, 2]
        field_k = np.exp(-d2 / (2 * 0.12**2)).sum(axis=2) + 0.05 * rng.standard_normal((nh, n_classes))
        tune = np.exp(6.0 * (field_k - field_k.max(axis=1, keepdims=True)))
        category_w[hv] = (tune / tune.sum(axis=1, keepdims=True)).astype(np.float32)
        shape_w[hv] = (rng.standard_normal((nh, stim.SHAPE_SIDE**2)) / stim.SHAPE_SIDE).astype(np.float32)
        mix = np.array([0.45, 1.0, 0.45]) * np.exp(0.3 * rng.standard_normal((nh, 3)))
        hvc_mix[hv] = (mix / np.sqrt((mix**2).sum(axis=1, keepdims=True))).astype(np.float32)
    # noise and SNR: heavy-tailed (log-normal) voxel SNR
    noise_sd = np.exp(0.2 * rng.standard_normal(v)).astype(np.float32)
    snr_roi = par["snr"] * np.where(
        roi == (rois.index("HVC") if "HVC" in rois else -1), config.hvc_snr_factor, 1.0
    )
    snr_nominal = snr_scale * snr_roi * config.snr_median * np.exp(config.snr_spread * rng.standard_normal(v))
    baseline = (0.5 * rng.standard_normal(v)).astype(np.float32)
    global_load = (1 + 0.3 * rng.standard_normal(v)).astype(np.float32)
    # resting-state networks: eccentricity bands x dorsal/ventral (lower/upper field), shared by all ROIs
    nb = config.rest_ecc_bands
    le = np.log1p(ecc_true / _FOVEAL_A) / np.log1p(7.5 / _FOVEAL_A)
    centres = (np.arange(nb) + 0.5) / nb
    band = np.exp(-((le[:, None] - centres[None]) ** 2) / (2 * (0.5 / nb) ** 2))
    upper = 1 / (1 + np.exp(-y / 0.5))
    network_w = np.concatenate([band * (1 - upper)[:, None], band * upper[:, None]], axis=1)
    network_w /= np.linalg.norm(network_w, axis=1, keepdims=True) + 1e-12
    arrays = {
        "u": u, "w": w, "x": x, "y": y, "sigma": sigma, "css_n": css_n, "sf_pref": sf_pref,
        "ori_pref": ori_pref, "profile_w": profile_w, "profiles": profiles, "colour_w": colour_w,
        "contrast_w": contrast_w, "hue_pref": hue_pref, "hue_w": hue_w, "lum_w": lum_w,
        "unmod_profiles": unmod_profiles, "category_w": category_w, "shape_w": shape_w, "hvc_mix": hvc_mix,
        "noise_sd": noise_sd, "baseline": baseline, "snr_nominal": snr_nominal, "network_w": network_w,
        "global_load": global_load,
    }  # fmt: skip
    noise = {k: getattr(config, k) for k in ("unmodelled_fraction", "noise_spatial", "noise_global",
                                             "noise_length", "drift_offset", "drift_slope")}  # fmt: skip
    return VirtualSubject(
        name=name, rois=rois, roi=roi, hemi=hemi, profile_idx=profile_idx, unmod_idx=unmod_idx,
        field_deg=config.field_deg, **{k: np.asarray(v, np.float32) for k, v in arrays.items()}, **noise,
    )  # fmt: skip


# ========================================================================================================
# Stimuli of a run


@dataclass
class StimulusPlan:
    """The stimuli of one SynthCortex run (deterministic in the config)."""

    train: stim.StimulusSet
    test: stim.StimulusSet
    corpus: stim.StimulusSet | None
    class_names: list[str]


def make_stimuli(config: SynthConfig, corpus: bool = True) -> StimulusPlan:
    """GOD train/test images and the corpus. Test objects come from the source's test split; train and
    corpus objects from its train split, disjoint from each other."""
    train_bank = stim.load_objects(config.source, "train", config.resolution)
    test_bank = stim.load_objects(config.source, "test", config.resolution)
    # one random stream per set, so that changing one set's size leaves the others unchanged
    r_train, r_test = (np.random.default_rng([config.seed, _STIMULI, k]) for k in range(2))
    train_idx = stim.sample_objects(train_bank, config.n_train, r_train)
    test_idx = stim.sample_objects(test_bank, config.n_test, r_test)
    with stim.torch_threads(1):
        train = stim.compose(train_bank, train_idx, r_train, config.resolution)
        test = stim.compose(test_bank, test_idx, r_test, config.resolution)
    corp = make_corpus(config, train_idx) if corpus and config.corpus_size > 0 else None
    return StimulusPlan(train, test, corp, list(train_bank.class_names))


def corpus_reuses_objects(config: SynthConfig) -> bool:
    """Whether the corpus balances classes by reusing objects (combined sources such as ``fashion+animal``,
    whose classes have unequal object counts); such a corpus also records each image's ``object_index``."""
    return config.source in stim.COMBINED_SOURCES


def make_corpus(
    config: SynthConfig, train_index: np.ndarray, out: np.ndarray | None = None
) -> stim.StimulusSet:
    """The labelled stimulus corpus: ``config.corpus_size`` composites of training-split objects that are not
    among the GOD training images (``train_index``).

    Args:
        out: optional ``[corpus_size, H, W, 3]`` uint8 array (a ``np.memmap``) to render into chunk by chunk,
            so that a large corpus is never held in memory; the images are the same either way.
    """
    train_bank = stim.load_objects(config.source, "train", config.resolution)
    rng = np.random.default_rng([config.seed, _STIMULI, 2])
    idx = stim.sample_objects(
        train_bank, config.corpus_size, rng, exclude=train_index, equal_classes=corpus_reuses_objects(config)
    )
    with stim.torch_threads(1):
        return stim.compose(train_bank, idx, rng, config.resolution, out=out)


def write_corpus(config: SynthConfig, train_index: np.ndarray, path: Path, class_names: list[str]) -> None:
    """Render the corpus into a temporary ``.npy`` memmap beside ``path`` and stream it into the uncompressed
    ``.npz`` at ``path`` (``images``, ``labels``, ``class_names``, plus ``object_index`` when objects are
    reused): peak memory is one chunk of images, whatever the corpus size. Readers memory-map the images
    (:class:`mindvis.data.formats.common.NpzArchive`)."""
    scratch = path.with_name(f".{path.stem}-images.npy")
    shape = (config.corpus_size, config.resolution, config.resolution, 3)
    images = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=shape)
    try:
        corp = make_corpus(config, train_index, out=images)
        images.flush()
        extra = {"object_index": corp.object_index} if corpus_reuses_objects(config) else {}
        save_npz(path, images=images, labels=corp.labels, class_names=np.array(class_names), **extra)
    finally:
        del images
        scratch.unlink(missing_ok=True)


def calibration_stimuli(config: SynthConfig, exclude: np.ndarray) -> stim.StimulusSet:
    """Kay et al. 2008-style identification images: novel test-split objects not among the GOD test images."""
    rng = np.random.default_rng([config.seed, _CALIBRATION])
    bank = stim.load_objects(config.source, "test", config.resolution)
    idx = stim.sample_objects(bank, config.calibration_images, rng, exclude=exclude)
    with stim.torch_threads(1):
        return stim.compose(bank, idx, rng, config.resolution)


# ========================================================================================================
# Experiments


def _run_layout(n_trials: int, per_run: int, first_run: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Run id and position in the run (-1..1) of consecutive trials."""
    i = np.arange(n_trials)
    run = first_run + i // per_run
    k = i % per_run
    size = np.minimum(per_run, n_trials - (i // per_run) * per_run)
    pos = 2 * (k + 0.5) / size - 1
    return run, pos.astype(np.float32)


def noise_ceiling(trials: np.ndarray, image: np.ndarray, n_avg: int) -> tuple[np.ndarray, np.ndarray]:
    """Estimate per-voxel ncsnr and noise ceiling from repeated trials (Allen et al. 2022).

    noise variance = mean over images of the across-repeat variance; signal variance = variance of the
    repeat-averaged responses minus noise variance / repeats (floored at 0); ncsnr = signal SD / noise SD;
    noise ceiling (fraction of variance, 0..1) = ncsnr^2 / (ncsnr^2 + 1 / n_avg).

    Args:
        trials: ``[T, V]`` single trials; image: ``[T]`` image of each trial (each image repeated r times).
        n_avg: number of trials averaged in the data the ceiling refers to.

    Returns:
        (noise_ceiling, ncsnr), ``[V]`` float32 each.
    """
    ids, inv, cnt = np.unique(image, return_inverse=True, return_counts=True)
    if cnt.min() < 2:
        raise DataError("the noise ceiling needs at least 2 repeats of every image", field="repeats")
    r = float(np.mean(cnt))
    if cnt.min() == cnt.max():
        x = trials[np.argsort(inv, kind="stable")].reshape(len(ids), int(cnt[0]), -1).astype(np.float64)
        means = x.mean(axis=1)
        noise_var = x.var(axis=1, ddof=1).mean(axis=0)
    else:
        sums = np.zeros((len(ids), trials.shape[1]), np.float64)
        np.add.at(sums, inv, trials)
        means = sums / cnt[:, None]
        sq = np.zeros_like(sums)
        np.add.at(sq, inv, (trials - means[inv]) ** 2)
        noise_var = (sq / (cnt[:, None] - 1)).mean(axis=0)
    sig_var = np.maximum(means.var(axis=0, ddof=1) - noise_var / r, 0.0)
    ncsnr = np.sqrt(sig_var / np.maximum(noise_var, 1e-12))
    nc = ncsnr**2 / (ncsnr**2 + 1.0 / n_avg)
    return nc.astype(np.float32), ncsnr.astype(np.float32)


@dataclass
class GodRun:
    """Arrays of one GOD-like subject (see ``docs/synthcortex.md`` for the file layout)."""

    subject: VirtualSubject
    train: np.ndarray  # arr_0 [n_train, V]
    test_trials: np.ndarray  # arr_1 [n_test * repeats, V]
    test_avg: np.ndarray  # arr_2 [n_test, V]
    train_index: np.ndarray  # arr_3
    test_index: np.ndarray  # arr_4
    nc: np.ndarray  # arr_5
    ncsnr: np.ndarray  # arr_6
    test_signal: np.ndarray  # noiseless [n_test, V]
    true_snr: np.ndarray  # [V]
    true_nc: np.ndarray  # [V]
    model_r2: np.ndarray  # [V] share of the stimulus-driven variance the encoding model predicts
    train_pred: np.ndarray  # true-model prediction of each arr_0 row [n_train, V]
    test_pred: np.ndarray  # true-model prediction of each test image [n_test, V]


def run_god_subject(
    config: SynthConfig, index: int, plan: StimulusPlan, fm_train: np.ndarray, fm_test: np.ndarray
) -> GodRun:
    """Simulate one GOD-like subject: 1200 single training trials and 50 test images x 35 repeats.

    Training images are shown once each in a random order, ``trials_per_run`` per run. Each test repeat is
    one run showing all test images in a random order. ``arr_1`` rows are sorted image-major (image 0's
    repeats first, in run order), so ``arr_4`` is ``repeat(arange(n_test), repeats)``.
    """
    subj = sample_subject(config, index, "target", len(plan.class_names))
    sig_train, pred_train = subj.fit(fm_train, plan.train.labels, plan.train.shape)
    rng = np.random.default_rng([config.seed, _TARGET_TRIALS, int(index)])
    sig_test, pred_test = subj.responses(fm_test, plan.test.labels, plan.test.shape)
    order = rng.permutation(config.n_train)
    run, pos = _run_layout(config.n_train, config.trials_per_run)
    train = subj.baseline[None] + sig_train[order] + subj.trial_noise(run, pos, rng)
    r, nt = config.n_repeats, config.n_test
    pres = np.stack([rng.permutation(nt) for _ in range(r)])  # [R, n_test] image shown at each slot
    run_t = np.repeat(np.arange(r), nt) + 10_000
    pos_t = np.tile(2 * (np.arange(nt) + 0.5) / nt - 1, r).astype(np.float32)
    noise = subj.trial_noise(run_t, pos_t, rng).reshape(r, nt, -1)
    # image-major order: row i * R + k = image i in repeat k
    slot = np.argsort(pres, axis=1)  # [R, n_test]: slot of image i in repeat k
    noise_by_image = np.take_along_axis(noise, slot[:, :, None], axis=1).transpose(1, 0, 2)  # [n_test, R, V]
    trials = subj.baseline[None, None] + sig_test[:, None] + noise_by_image
    test_trials = trials.reshape(nt * r, -1).astype(np.float32)
    test_index = np.repeat(np.arange(nt), r).astype(np.int64)
    nc, ncsnr = noise_ceiling(test_trials, test_index, r)
    sd_sig = sig_train.std(axis=0)
    true_snr = sd_sig / subj.noise_total_sd
    true_nc = true_snr**2 / (true_snr**2 + 1.0 / r)
    model_r2 = pred_train.var(axis=0) / np.maximum(sig_train.var(axis=0), 1e-12)
    return GodRun(
        subject=subj,
        train=train.astype(np.float32),
        test_trials=test_trials,
        test_avg=trials.mean(axis=1).astype(np.float32),
        train_index=order.astype(np.int64),
        test_index=test_index,
        nc=nc,
        ncsnr=ncsnr,
        test_signal=sig_test,
        true_snr=true_snr.astype(np.float32),
        true_nc=true_nc.astype(np.float32),
        model_r2=np.clip(model_r2, 0, 1).astype(np.float32),
        train_pred=pred_train[order],
        test_pred=pred_test,
    )


def hrf(tr: float, length_s: float = 32.0) -> np.ndarray:
    """Canonical double-gamma haemodynamic response (peak ~5 s, undershoot ~15 s), sampled every ``tr`` s,
    normalised to unit sum."""
    from scipy.stats import gamma

    t = np.arange(0, length_s, tr)
    h = gamma.pdf(t, 6) - gamma.pdf(t, 16) / 6.0
    return (h / h.sum()).astype(np.float64)


def _ar1(rng: np.random.Generator, n: int, d: int, phi: float, burn: int = 200) -> np.ndarray:
    """Unit-variance AR(1) series ``[n, d]``."""
    from scipy.signal import lfilter

    e = rng.standard_normal((n + burn, d))
    return lfilter([math.sqrt(1 - phi**2)], [1, -phi], e, axis=0)[burn:]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-12)


def rest_timeseries(config: SynthConfig, subj: VirtualSubject, rng: np.random.Generator) -> np.ndarray:
    """Resting-state BOLD of one subject: ``[n_trs, V]`` float32.

    neural(t) = networks (AR(1) latents x eccentricity/dorsal-ventral loadings) + retinotopic phantoms
    (an AR(1) smooth random image seen through each voxel's pRF, with random Fourier features) + a global
    signal; the latent time courses are convolved with the canonical HRF (the convolution commutes with
    the voxel loadings); plus measurement noise (independent, and a component smooth along the voxel order
    and AR(1) in time) and slow cosine drifts. Shares of variance come from the config.
    """
    t, v = config.n_trs, subj.num_voxels
    k = subj.network_w.shape[1]
    n_ph = 96
    latents = np.concatenate(
        [
            _ar1(rng, t + 64, k, config.rest_network_ar),
            _ar1(rng, t + 64, n_ph, config.rest_phantom_ar),
            _ar1(rng, t + 64, 1, config.rest_network_ar),
        ],
        axis=1,
    )
    from scipy.signal import fftconvolve

    lat = _unit(fftconvolve(latents, hrf(config.tr)[:, None], axes=0)[64 : 64 + t])
    # phantom pRF responses: a Gaussian pRF pools cos(k.x + b) into exp(-s^2 |k|^2 / 2) cos(k.c + b)
    kvec = rng.standard_normal((n_ph, 2)) / config.rest_phantom_length_deg
    phase = rng.uniform(0, 2 * np.pi, n_ph)
    centres = np.stack([subj.x, subj.y], axis=1).astype(np.float64)
    att = np.exp(-(subj.sigma[:, None].astype(np.float64) ** 2) * (kvec**2).sum(axis=1)[None] / 2)
    phi = att * np.cos(centres @ kvec.T + phase[None]) * math.sqrt(2.0 / n_ph)  # [V, n_ph]
    phi /= np.median(np.sqrt((phi**2).sum(axis=1)))
    # slow scanner drift: cosine basis with random per-voxel weights
    tt = (np.arange(t) + 0.5) / t
    basis = np.stack([np.cos(np.pi * j * tt) for j in (1, 2, 3)], axis=1) * math.sqrt(2)  # [T, 3]
    drift_w = rng.standard_normal((v, 3)) / math.sqrt(3)
    # all low-rank parts in one product: [T, K + n_ph + 1 + 3] @ [K + n_ph + 1 + 3, V]
    time_parts = np.concatenate(
        [
            lat[:, :k] * math.sqrt(config.rest_network_var),
            lat[:, k : k + n_ph] * math.sqrt(config.rest_phantom_var),
            lat[:, k + n_ph :] * math.sqrt(config.rest_global_var),
            basis * math.sqrt(config.rest_drift_var),
        ],
        axis=1,
    ).astype(np.float32)
    space_parts = np.concatenate([subj.network_w, phi, subj.global_load[:, None], drift_w], axis=1).astype(
        np.float32
    )
    out = time_parts @ space_parts.T  # [T, V]
    # measurement noise: white, plus a component smooth along the voxel order and AR(1) in time
    from scipy.signal import lfilter

    white_var = 1 - (
        config.rest_network_var
        + config.rest_phantom_var
        + config.rest_global_var
        + config.rest_spatial_noise_var
        + config.rest_drift_var
    )
    out += rng.standard_normal((t, v), dtype=np.float32) * np.float32(math.sqrt(white_var))
    if config.rest_spatial_noise_var > 0:
        rho = 0.3  # temporal autocorrelation of physiological noise, per TR
        smooth = smooth_along_voxels(rng.standard_normal((t, v), dtype=np.float32), config.noise_length)
        smooth = lfilter([math.sqrt((1 - rho**2) * config.rest_spatial_noise_var)], [1, -rho], smooth, axis=0)
        out += smooth.astype(np.float32)
    out *= (subj.noise_sd / np.float32(np.mean(subj.noise_sd)))[None]
    out += subj.baseline[None]
    return out


# ========================================================================================================
# Writing


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write an uncompressed ``.npz`` atomically and byte-reproducibly (fixed zip timestamps, no pickle)."""
    save_npz_atomic(path, **arrays)


def _json_dumps(obj: Any, indent: int = 0) -> str:
    """JSON with nested objects indented and flat lists of numbers/strings kept on one line."""
    pad = "  " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad}{json.dumps(str(k))}: {_json_dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(obj, (list, tuple)):
        if any(isinstance(v, (dict, list, tuple)) for v in obj):
            return (
                "[\n" + ",\n".join(pad + _json_dumps(v, indent + 1) for v in obj) + "\n" + "  " * indent + "]"
            )
        return json.dumps(list(obj), separators=(",", ":"))
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "null"
    return json.dumps(obj)


def write_json_compact(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(_json_dumps(obj) + "\n")


def god_label(class_id: int, number: int) -> str:
    """GOD stimulus label ``<category>.<image>`` of a SynthCortex image (category = pseudo WordNet offset)."""
    return f"{WNID_BASE + class_id}.{number:06d}"


#: Class ``k`` is written as the pseudo WordNet id ``n{90000000 + k}`` (real WordNet offsets start with 0).
WNID_BASE = 90_000_000


def _write_god_tables(folder: Path, plan: StimulusPlan) -> None:
    index = {str(k): [f"n{WNID_BASE + k:08d}", name] for k, name in enumerate(plan.class_names)}
    with atomic_write(folder / "imagenet_class_index.json", "w") as fh:
        json.dump(index, fh, indent=1)
        fh.write("\n")
    for split, s in (("training", plan.train), ("testing", plan.test)):
        buf = io.StringIO()
        wr = csv.writer(buf, lineterminator="\n")
        for i, c in enumerate(s.labels.tolist()):
            wr.writerow([god_label(c, i + 1), f"n{WNID_BASE + c:08d}_{i + 1}.png"])
        with atomic_write(folder / f"imagenet_{split}_label.csv", "w") as fh:
            fh.write(buf.getvalue())


def _write_rest_subject(config: SynthConfig, index: int, hcp_dir: Path) -> tuple[str, dict[str, Any]]:
    """Simulate and write one resting-state subject; returns its manifest entry."""
    subj = sample_subject(config, index, "rest")
    ts = rest_timeseries(config, subj, np.random.default_rng([config.seed, _REST, index, 1]))
    parts, start = {}, 0
    for ri, r in enumerate(subj.rois):
        m = int((subj.roi == ri).sum())
        parts[r] = np.ascontiguousarray(ts[:, start : start + m])
        start += m
    (hcp_dir / subj.name).mkdir()
    save_npz(hcp_dir / subj.name / "HCP_visual_voxel.npz", **parts)
    gt = subj.ground_truth()
    return subj.name, {
        "vertices": {r: int(p.shape[1]) for r, p in parts.items()},
        "voxel": {k: gt[k] for k in ("roi", "hemisphere", "x_deg", "y_deg", "sigma_deg", "network")},
    }


def _open_permissions(root: Path) -> None:
    """Give the finished folder the modes of ordinary new files (temporary files are created private)."""
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)


def simulate(
    config: SynthConfig,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    *,
    report: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Run SynthCortex and write the GOD, HCP and stimulus folders into ``out_dir``.

    Everything is written into a temporary folder beside ``out_dir`` and renamed when complete.

    Args:
        config: the run's parameters.
        out_dir: output folder (must not exist or be empty, unless ``overwrite``).
        report: also compute the calibration figures (:func:`calibration_report`) and write
            ``calibration.json``.
        progress: called as ``progress(message, fraction_done)``.
        workers: threads for the resting-state subjects (default: up to 2); the output does not depend on it.

    Returns:
        the manifest (also written as ``synthcortex.json``), with ``calibration`` when ``report``, and
        ``timings`` (wall and CPU seconds per stage; not written, so that files stay reproducible).

    Raises:
        OutputExistsError: ``out_dir`` exists and is not empty, without ``overwrite``.
        DataError: the stimulus source is missing.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    out_dir = Path(out_dir)
    prepare_output_dir(out_dir, overwrite=overwrite)
    if report and config.n_subjects < 1:
        raise ConfigError("the calibration report needs at least one target subject", field="n_subjects")

    def tell(msg: str, frac: float) -> None:
        _logger.debug("%s (%.0f%%)", msg, 100 * frac)
        if progress is not None:
            progress(msg, frac)

    tell("composing stimuli", 0.0)
    # load the sources first: a missing source fails before anything is written
    plan = make_stimuli(config, corpus=False)  # the corpus is streamed to its file below
    timings: dict[str, float] = {
        "stimuli_s": time.perf_counter() - t0,
        "stimuli_cpu_s": time.process_time() - c0,
    }
    w_target = 0.25 if config.n_subjects else 0.0
    w_rest = 0.6 if config.n_rest_subjects else 0.0
    scale = 0.9 / max(w_target + w_rest, 1e-9)
    w_target, w_rest = w_target * scale, w_rest * scale
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        god_dir, hcp_dir, stim_dir = tmp / "GOD", tmp / "HCP" / "npz", tmp / "stimuli"
        for d, needed in (
            (god_dir, config.n_subjects),
            (hcp_dir, config.n_rest_subjects),
            (stim_dir, config.corpus_size > 0),
        ):
            if needed:
                d.mkdir(parents=True, exist_ok=True)
        manifest: dict[str, Any] = {
            "format": "synthcortex",
            "version": FORMAT_VERSION,
            "config": config.to_dict(),
            "class_names": plan.class_names,
            "units": {
                "x_deg/y_deg": "degrees of visual angle, x right, y up, (0, 0) at the image centre",
                "field_deg": config.field_deg,
            },
            "subjects": {},
            "rest_subjects": {},
        }
        t1, c1 = time.perf_counter(), time.process_time()
        runs: list[GodRun] = []
        if config.n_subjects:
            tell("feature maps", 0.05)
            fm_train = feature_maps(plan.train.images, config.field_deg, config.seed)
            fm_test = feature_maps(plan.test.images, config.field_deg, config.seed)
            for k in range(1, config.n_subjects + 1):
                tell(f"target subject sbj_{k}", 0.1 + w_target * (k - 1) / config.n_subjects)
                run = run_god_subject(config, k, plan, fm_train, fm_test)
                masks = {r: run.subject.mask(r) for r in (*ROIS, "VC")}
                save_npz(
                    god_dir / f"sbj_{k}.npz",
                    arr_0=run.train,
                    arr_1=run.test_trials,
                    arr_2=run.test_avg,
                    arr_3=run.train_index,
                    arr_4=run.test_index,
                    arr_5=run.nc,
                    arr_6=run.ncsnr,
                    **masks,
                )
                gt = run.subject.ground_truth(plan.class_names)
                gt["snr"] = _r(run.true_snr, 4)
                gt["noise_ceiling"] = _r(run.true_nc, 4)
                gt["model_r2"] = _r(run.model_r2, 3)
                manifest["subjects"][f"sbj_{k}"] = {
                    "voxels": run.subject.num_voxels,
                    "roi_voxels": {r: int(masks[r].sum()) for r in ROIS},
                    "noise_ceiling_definition": f"fraction of variance of the {config.n_repeats}-repeat average "
                    "that is stimulus-driven: snr^2 / (snr^2 + 1/repeats)",
                    "voxel": gt,
                }
                runs.append(run)
            save_npz(
                god_dir / f"images_{config.resolution}.npz",
                train_images=plan.train.images,
                test_images=plan.test.images,
                train_labels=plan.train.labels,
                test_labels=plan.test.labels,
            )
            _write_god_tables(god_dir, plan)
        timings["target_s"], timings["target_cpu_s"] = time.perf_counter() - t1, time.process_time() - c1
        t2, c2 = time.perf_counter(), time.process_time()
        n_rest = config.n_rest_subjects
        n_workers = max(1, min(workers if workers is not None else min(2, os.cpu_count() or 1), n_rest or 1))
        pool = ThreadPoolExecutor(n_workers)
        try:
            jobs = [pool.submit(_write_rest_subject, config, s, hcp_dir) for s in range(1, n_rest + 1)]
            for i, job in enumerate(jobs):
                name, entry = job.result()
                manifest["rest_subjects"][name] = entry
                tell(f"resting-state subject {i + 1}/{n_rest}", 0.1 + w_target + w_rest * (i + 1) / n_rest)
        finally:
            # on an error or Ctrl-C, drop the queued subjects instead of simulating them all first
            pool.shutdown(wait=True, cancel_futures=True)
        timings["rest_s"], timings["rest_cpu_s"] = time.perf_counter() - t2, time.process_time() - c2
        tell("writing the stimulus corpus", 0.92)
        if config.corpus_size > 0:
            t4 = time.perf_counter()
            write_corpus(config, plan.train.object_index, stim_dir / "corpus.npz", plan.class_names)
            timings["corpus_s"] = time.perf_counter() - t4
        manifest["rest_networks"] = {
            "definition": "network k < bands: eccentricity band k, lower field (dorsal); k >= bands: band "
            "k - bands, upper field (ventral); each voxel is listed with its strongest network",
            "bands": config.rest_ecc_bands,
        }
        write_json_compact(tmp / MANIFEST, manifest)
        if report:
            tell("calibration", 0.95)
            t3, c3 = time.perf_counter(), time.process_time()
            cal = _calibrate(config, plan, runs[0])
            timings["report_s"], timings["report_cpu_s"] = time.perf_counter() - t3, time.process_time() - c3
            write_json_compact(tmp / "calibration.json", cal)
            manifest["calibration"] = cal
        _open_permissions(tmp)
        timings["total_s"], timings["total_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    _logger.info(
        "SynthCortex written to %s in %.1f s (%s)",
        out_dir,
        timings["total_s"],
        ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
    )
    tell("done", 1.0)
    manifest["timings"] = timings
    return manifest


# ========================================================================================================
# Calibration


def _center(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0, keepdims=True)


def identify(measured: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Correlation identification: for each measured pattern ``[n, D]``, the index of the best-correlated
    candidate ``[m, D]`` (Pearson correlation across the D features)."""
    a = measured - measured.mean(axis=1, keepdims=True)
    b = candidates - candidates.mean(axis=1, keepdims=True)
    a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.argmax(a @ b.T, axis=1)


def _quantiles(x: np.ndarray) -> dict[str, float]:
    q = np.quantile(x, [0.1, 0.25, 0.5, 0.75, 0.9]) if len(x) else np.full(5, np.nan)
    return {
        "p10": round(float(q[0]), 4),
        "p25": round(float(q[1]), 4),
        "median": round(float(q[2]), 4),
        "p75": round(float(q[3]), 4),
        "p90": round(float(q[4]), 4),
    }


def _pixels(images: np.ndarray, side: int = 16) -> np.ndarray:
    return _resample_images(images, side).reshape(len(images), -1)


def _calibrate(config: SynthConfig, plan: StimulusPlan, run: GodRun) -> dict[str, Any]:
    subj = run.subject
    r_cal = config.calibration_repeats
    cal_stim = calibration_stimuli(config, exclude=plan.test.object_index)
    if len(cal_stim) < 2:
        raise DataError(
            "not enough test-split objects for the calibration images", field="calibration_images"
        )
    fm = feature_maps(cal_stim.images, config.field_deg, config.seed)
    sig, pred = subj.responses(fm, cal_stim.labels, cal_stim.shape)
    n = len(cal_stim)
    rng = np.random.default_rng([config.seed, _CALIBRATION, 1])
    run_id = np.repeat(np.arange(r_cal), n) + 20_000
    pos = np.tile(2 * (np.arange(n) + 0.5) / n - 1, r_cal).astype(np.float32)
    noise = subj.trial_noise(run_id, pos, rng).reshape(r_cal, n, -1)
    trials = subj.baseline[None, None] + sig[None] + noise  # [R, n, V]
    # Kay et al. 2008: voxels selected by the model's prediction accuracy on the training data
    acc = _column_corr(run.train_pred, run.train)
    early = np.flatnonzero(subj.mask("V1") | subj.mask("V2") | subj.mask("V3"))
    sel = early[np.argsort(-acc[early])[: min(config.calibration_voxels, len(early))]]
    cand = _center(pred[:, sel])
    avg = _center(trials.mean(axis=0)[:, sel])
    id_avg = float(np.mean(identify(avg, cand) == np.arange(n)))
    single = [
        float(np.mean(identify(_center(trials[k][:, sel]), cand) == np.arange(n))) for k in range(r_cal)
    ]
    # the same on the GOD test set (arr_2, n_repeats-repeat averages)
    hit = identify(_center(run.test_avg[:, sel]), _center(run.test_pred[:, sel])) == np.arange(config.n_test)
    id_god = float(np.mean(hit))
    # noise ceilings
    nc_est = {r: _quantiles(run.nc[subj.mask(r)]) for r in (*ROIS, "VC")}
    nc_true = {r: _quantiles(run.true_nc[subj.mask(r)]) for r in (*ROIS, "VC")}
    snr_true = {r: _quantiles(run.true_snr[subj.mask(r)]) for r in (*ROIS, "VC")}
    # ridge decoder baseline: voxels -> 16x16 RGB pixels; and a linear class decoder
    ridge = ridge_baseline(
        run.train,
        run.train_index,
        run.test_avg,
        plan.train.images,
        plan.test.images,
        plan.train.labels,
        plan.test.labels,
    )
    layout = layout_decoder(
        run.train,
        run.train_index,
        run.test_avg,
        np.c_[plan.train.center, plan.train.scale],
        np.c_[plan.test.center, plan.test.scale],
    )
    return {
        "subject": subj.name,
        "preset": config.name,
        "noise_ceiling": {
            "definition": f"fraction of the variance of the {config.n_repeats}-repeat average that is "
            "stimulus-driven, ncsnr^2 / (ncsnr^2 + 1/repeats) (Allen et al. 2022)",
            "estimated_from_test_repeats": nc_est,
            "true": nc_true,
            "fraction_of_voxels_above_0.5": round(float(np.mean(run.nc > 0.5)), 4),
        },
        "single_trial_snr_true": snr_true,
        "identification_true_model": {
            "protocol": f"Kay et al. 2008: {n} novel images x {r_cal} repeats; correlation between the measured "
            f"pattern and the true model's predicted patterns over the {len(sel)} V1-V3 voxels "
            "best predicted on the training trials",
            "n_images": n,
            "repeats": r_cal,
            "n_voxels": int(len(sel)),
            "averaged": round(id_avg, 4),
            "single_trial": round(float(np.mean(single)), 4),
            "chance": round(1.0 / n, 4),
            "published": {
                "averaged": [0.92, 0.72],
                "single_trial": [0.51, 0.32],
                "source": "Kay et al. 2008, subjects S1 / S2",
            },
        },
        "identification_true_model_god_test": {
            "n_images": config.n_test,
            "repeats_averaged": config.n_repeats,
            "accuracy": round(id_god, 4),
            "chance": round(1.0 / config.n_test, 4),
        },
        "ridge_decoder": ridge,
        "layout_decoder": layout,
    }


def _column_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching columns of ``[N, V]`` arrays -> ``[V]``."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    den = np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
    return (a * b).sum(axis=0) / np.maximum(den, 1e-12)


def calibration_report(out_dir: str | os.PathLike, subject: int = 1, write: bool = True) -> dict[str, Any]:
    """Calibration figures of a SynthCortex folder, checkable against published real data.

    The subject and stimuli are regenerated from the manifest's config (the run is deterministic; the
    regenerated training fMRI is checked against ``GOD/sbj_<subject>.npz``). Reports:

    * the distribution of voxel noise ceilings (estimated from the test repeats, and the true ones);
    * identification of 120 novel images from 13-repeat averages and from single trials with the TRUE
      encoding model (Kay et al. 2008: 92 % / 72 % averaged, 51 % / 32 % single trial, subjects S1 / S2);
    * a ridge decoder (voxels -> pixels) trained on the training trials, with its identification accuracy
      among the test images from the averaged test fMRI, and a linear class decoder.

    Args:
        out_dir: a folder written by :func:`simulate`.
        subject: which ``sbj_<subject>`` to calibrate.
        write: also write ``calibration.json`` into ``out_dir``.
    """
    out_dir = Path(out_dir)
    man = read_json(out_dir / MANIFEST)
    if not isinstance(man, dict) or man.get("format") != "synthcortex":
        raise DataError("not a SynthCortex manifest", path=out_dir / MANIFEST)
    config = SynthConfig.from_dict(man["config"])
    if not 1 <= subject <= config.n_subjects:
        raise ConfigError(
            f"subject must be between 1 and {config.n_subjects}, got {subject}", field="subject"
        )
    plan = make_stimuli(config, corpus=False)
    fm_train = feature_maps(plan.train.images, config.field_deg, config.seed)
    fm_test = feature_maps(plan.test.images, config.field_deg, config.seed)
    run = run_god_subject(config, subject, plan, fm_train, fm_test)
    path = out_dir / "GOD" / f"sbj_{subject}.npz"
    with np.load(path) as npz:
        if npz["arr_0"].shape != run.train.shape or not np.array_equal(npz["arr_0"], run.train):
            raise DataError(
                "arr_0 differs from the simulation the manifest describes (edited files, or another "
                "mindvis version)",
                path=path,
                field="arr_0",
            )
    cal = _calibrate(config, plan, run)
    if write:
        write_json_compact(out_dir / "calibration.json", cal)
    return cal


def _zscore_train(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = train.mean(axis=0), train.std(axis=0) + 1e-6
    return (train - mu) / sd, (test - mu) / sd


def layout_decoder(
    train: np.ndarray,
    train_index: np.ndarray,
    test_avg: np.ndarray,
    train_layout: np.ndarray,
    test_layout: np.ndarray,
) -> dict[str, Any]:
    """Coarse layout from fMRI: ridge from voxels to the object's centre (x, y) and size, trained on single
    trials, tested on the averaged test fMRI; Pearson r between decoded and true values."""
    xtr, xte = _zscore_train(train, test_avg)
    y = train_layout[train_index]
    ym = y.mean(axis=0)
    coef, alpha = ridge_dual(xtr, y - ym, np.logspace(1, 6, 16) * xtr.shape[1] / 1000)
    dec = (xte @ xtr.T) @ coef + ym
    r = [float(np.corrcoef(dec[:, i], test_layout[:, i])[0, 1]) for i in range(y.shape[1])]
    return {
        "target": "object centre x, y and size",
        "alpha": round(alpha, 3),
        "r_x": round(r[0], 4),
        "r_y": round(r[1], 4),
        "r_size": round(r[2], 4),
    }


def ridge_baseline(
    train: np.ndarray,
    train_index: np.ndarray,
    test_avg: np.ndarray,
    train_images: np.ndarray,
    test_images: np.ndarray,
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    side: int = 16,
) -> dict[str, Any]:
    """Ridge regression from voxels to pixels (and to class), trained on single trials, tested on averages.

    Voxels are z-scored with the training mean and SD; targets are ``side x side`` RGB pixels (centred);
    the penalty is chosen by leave-one-out error on the training trials. Identification: for each averaged
    test pattern, the test image whose pixels correlate best with the decoded pixels (both centred per
    pixel across the test images). The pixel correlation is the plain per-image correlation.
    """
    xtr, xte = _zscore_train(train, test_avg)
    y = _pixels(train_images, side)[train_index]
    ym = y.mean(axis=0)
    alphas = np.logspace(1, 6, 16) * xtr.shape[1] / 1000
    coef, alpha = ridge_dual(xtr, y - ym, alphas)
    dec = (xte @ xtr.T) @ coef + ym
    truth = _pixels(test_images, side)
    nte = len(test_images)
    # like the true-model identification: patterns centred per pixel across the candidate images
    pick = identify(dec - dec.mean(axis=0), truth - truth.mean(axis=0))
    corr = [float(np.corrcoef(dec[i], truth[i])[0, 1]) for i in range(nte)]
    onehot = np.eye(int(max(train_labels.max(), test_labels.max())) + 1)[train_labels[train_index]]
    ccoef, calpha = ridge_dual(xtr, onehot - onehot.mean(axis=0), alphas)
    cls = np.argmax((xte @ xtr.T) @ ccoef, axis=1)
    return {
        "target": f"{side}x{side} RGB pixels",
        "trained_on": f"{len(train)} single training trials",
        "tested_on": f"{nte} averaged test patterns",
        "n_test": nte,
        "alpha": round(alpha, 3),
        "identification": round(float(np.mean(pick == np.arange(nte))), 4),
        "identification_chance": round(1.0 / nte, 4),
        "pixel_correlation_mean": round(float(np.mean(corr)), 4),
        "class_accuracy": round(float(np.mean(cls == test_labels)), 4),
        "class_chance": round(1.0 / onehot.shape[1], 4),
    }
