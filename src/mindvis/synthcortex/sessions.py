"""The experiments SynthCortex runs on its virtual subjects.

GOD-like sessions (:func:`run_god_subject`): single training trials and repeated test images, in scanner runs
with slow drifts, and the noise ceiling estimated from the repeats (:func:`noise_ceiling`, Allen et al. 2022).
HCP-like resting state (:func:`rest_timeseries`): slow latent networks with AR(1) dynamics, retinotopically
structured spontaneous activity ("phantom" images seen through the voxels' pRFs), canonical HRF smoothing
(:func:`hrf`), and measurement noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mindvis.errors import DataError
from mindvis.synthcortex.config import _TARGET_TRIALS, SynthConfig
from mindvis.synthcortex.stimuli import StimulusPlan
from mindvis.synthcortex.subject import VirtualSubject, sample_subject, smooth_along_voxels


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
