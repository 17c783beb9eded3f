"""Baselines that stage B is compared against on the same test set.

* **Ridge regression to the prior's latent** — the classic linear decoder: voxels are regressed onto the image
  prior's (pre-quantisation) VQ latent of the seen image with kernel ridge (penalty chosen by exact
  leave-one-out error), and the predicted latent is decoded by the VQ. One deterministic image per item.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from mindvis.data.dataset import FMRIDataset
from mindvis.errors import DataError
from mindvis.models.ldm import images_to_uint8
from mindvis.utils.images import images_to_model
from mindvis.utils.linalg import ridge_dual, standardise_columns

_logger = logging.getLogger(__name__)

DEFAULT_ALPHAS = np.logspace(0, 6, 13)


@torch.no_grad()
def ridge_reconstruct(
    train: FMRIDataset,
    test: FMRIDataset,
    prior: str | os.PathLike,
    alphas: np.ndarray | None = None,
    batch_size: int = 64,
) -> tuple[np.ndarray, dict[str, float]]:
    """Decode ``test`` fMRI by ridge regression onto the prior's VQ latent.

    Args:
        train: paired training fMRI (``voxels [N, V]`` with images).
        test: test fMRI ``[M, V]`` (same voxels).
        prior: an image prior or fMRI pipeline folder; only its VQ autoencoder is used.
        alphas: candidate ridge penalties (chosen by leave-one-out error on the training set).

    Returns:
        ``(images uint8 [M, 1, H, W, 3], info)`` with the chosen penalty and the training-set latent R².
    """
    from mindvis.train.stage_b_model import load_prior

    if not train.paired:
        raise DataError("the ridge baseline needs paired training images", path=train.source, field="images")
    if train.num_voxels != test.num_voxels:
        raise DataError(
            f"train has {train.num_voxels} voxels, test {test.num_voxels}", path=test.source, field="voxels"
        )
    model = load_prior(prior).eval()
    images = train.sample_images()
    lat = []
    for i in range(0, len(images), batch_size):
        lat.append(model.encode_images(images_to_model(images[i : i + batch_size])).float())
    z = torch.cat(lat).numpy().astype(np.float64)  # [N, c, h, w]
    shape = z.shape[1:]
    y = z.reshape(len(z), -1)
    y_mean = y.mean(axis=0, keepdims=True)
    x_tr, x_te = standardise_columns(
        np.asarray(train.voxels, np.float64), np.asarray(test.voxels, np.float64)
    )
    coef, alpha = ridge_dual(x_tr, y - y_mean, DEFAULT_ALPHAS if alphas is None else np.asarray(alphas))
    pred = (x_te @ x_tr.T) @ coef + y_mean
    fit = (x_tr @ x_tr.T) @ coef + y_mean
    r2 = 1.0 - float(((fit - y) ** 2).sum() / max(((y - y_mean) ** 2).sum(), 1e-12))
    _logger.info("ridge baseline: alpha %.3g, training latent R2 %.3f", alpha, r2)
    out = []
    zp = torch.from_numpy(pred.reshape(len(pred), *shape).astype(np.float32))
    for i in range(0, len(zp), batch_size):
        dec = model.decode_latents(zp[i : i + batch_size])
        # the original's conversion: 255 * clamp((x + 1) / 2), truncated
        out.append(images_to_uint8(dec).numpy())
    return np.concatenate(out)[:, None], {"alpha": float(alpha), "train_latent_r2": r2}
