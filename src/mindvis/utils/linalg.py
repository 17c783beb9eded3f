"""Linear algebra shared by the linear decoders: kernel (dual) ridge regression with leave-one-out penalty choice.

The penalty is chosen by the exact leave-one-out (PRESS) error of the ridge smoother, computed for every
candidate from one eigendecomposition of the ``N x N`` kernel. Used by the ridge baseline
(:mod:`mindvis.baselines`) and the simulator's calibration decoders (:mod:`mindvis.synthcortex.calibration`).
"""

from __future__ import annotations

import numpy as np


def standardise_columns(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score the columns of ``train [N, V]`` and ``test [M, V]`` with the training mean and std (constant
    columns are only centred)."""
    mu = train.mean(axis=0, keepdims=True)
    sd = train.std(axis=0, keepdims=True)
    sd[sd == 0] = 1.0
    return (train - mu) / sd, (test - mu) / sd


def ridge_dual(x_train: np.ndarray, y_train: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, float]:
    """Kernel (dual) ridge with the penalty chosen by exact leave-one-out error.

    Args:
        x_train: ``[N, V]`` standardised features.
        y_train: ``[N, D]`` centred targets.
        alphas: ``[A]`` candidate penalties; the first wins ties.

    Returns:
        ``(coef, alpha)``: dual coefficients ``[N, D]`` so that predictions are ``x @ x_train.T @ coef``,
        and the chosen penalty.
    """
    k = x_train.astype(np.float64) @ x_train.T.astype(np.float64)
    evals, evecs = np.linalg.eigh(k)
    evals = np.maximum(evals, 0)
    uty = evecs.T @ y_train
    best, best_err = alphas[0], np.inf
    for a in alphas:
        hdiag = ((evecs**2) * (evals / (evals + a))[None]).sum(axis=1)
        fit = evecs @ ((evals / (evals + a))[:, None] * uty)
        loo = (y_train - fit) / np.maximum(1 - hdiag, 1e-6)[:, None]
        err = float((loo**2).mean())
        if err < best_err:
            best, best_err = a, err
    coef = evecs @ (uty / (evals + best)[:, None])
    return coef, float(best)
