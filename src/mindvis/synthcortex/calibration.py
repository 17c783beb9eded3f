"""Calibration figures of a SynthCortex run, checkable against published real data (written by
:func:`~mindvis.synthcortex.run.simulate` with ``report=True`` and by
:func:`~mindvis.synthcortex.run.calibration_report`):

* the distribution of voxel noise ceilings (estimated from the test repeats, and the true ones);
* identification of novel images from repeat averages and from single trials with the TRUE encoding model
  (:func:`identify`; Kay et al. 2008: 92 % / 72 % averaged, 51 % / 32 % single trial, subjects S1 / S2);
* ridge decoders trained on the training trials and tested on the averaged test fMRI: voxels to pixels and to
  class (:func:`ridge_baseline`), and to the object's position and size (:func:`layout_decoder`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mindvis.errors import DataError
from mindvis.synthcortex.config import _CALIBRATION, ROIS, SynthConfig
from mindvis.synthcortex.features import _resample_images, feature_maps
from mindvis.synthcortex.sessions import GodRun
from mindvis.synthcortex.stimuli import StimulusPlan, calibration_stimuli
from mindvis.utils.linalg import ridge_dual


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
