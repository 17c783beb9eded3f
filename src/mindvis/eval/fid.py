"""Fréchet Inception Distance (Heusel et al., NeurIPS 2017), in the two variants people quote.

- ``fid_64``, **the MinD-Vis variant**: torchmetrics' ``FrechetInceptionDistance(feature=64)``. The
  features are the 64 channels after the first max-pool of Inception-v3 (after ``Conv2d_2b_3x3``), spatially
  averaged. MinD-Vis reports it on 50 test images. It is *not* the standard FID and is labelled as such.
- ``fid_2048``, **the standard FID**: the 2048-d pool features of Inception-v3.

Both need local Inception-v3 weights (:class:`InceptionFeatures`):

- the TF-FID Inception weights (``pt_inception-2015-12-05-*.pth`` of pytorch-fid, or torch-fidelity's
  ``weights-inception-2015-12-05-*.pth``; 1008-way ``fc``). The network then follows the TF graph: the
  average-pool branches exclude padding and the last block's pool branch is a max-pool. Inputs are resized
  to 299x299 (bilinear, as pytorch-fid) and scaled to [-1, 1]. These numbers are comparable with published
  FIDs up to the resize filter (torch-fidelity uses a TF1-style bilinear resize).
- torchvision's ImageNet ``inception_v3`` weights (1000-way ``fc``), labelled "torchvision Inception-v3
  weights, not comparable with published FID".

Without weights the metric is reported as unavailable; a random network is never used.

The Fréchet distance itself, ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``, is computed exactly. When
there are fewer samples than feature dimensions (50 images, 2048 features) the covariances are singular and
``tr (S1 S2)^(1/2)`` equals the nuclear norm of ``A B^T / sqrt((n-1)(m-1))`` for the centred feature
matrices ``A [n, d]``, ``B [m, d]`` (the non-zero eigenvalues of ``A^T A B^T B`` are those of
``(A B^T)(A B^T)^T``); no matrix square root of a singular matrix is needed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np

from mindvis.errors import CheckpointError, ConfigError, WeightsUnavailable
from mindvis.eval.classifier import load_state_dict_file

logger = logging.getLogger(__name__)

FIDFeature = Literal["64", "2048"]


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[d]`` and unbiased covariance ``[d, d]`` of ``features: [n, d]``."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ConfigError(f"need at least 2 feature vectors [n, d], got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr (S1 S2)^(1/2)`` for covariance matrices, via the symmetric ``S1^(1/2) S2 S1^(1/2)`` (stable when singular)."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2.0)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root @ sigma2 @ root
    ev = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between two Gaussians from their statistics (means ``[d]``, covariances ``[d, d]``)."""
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def frechet_distance_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to ``f1: [n, d]`` and ``f2: [m, d]``.

    Uses the exact low-rank identity when ``min(n, m) <= d`` (see the module docstring), otherwise the
    statistics and :func:`frechet_distance`.
    """
    a = np.asarray(f1, dtype=np.float64)
    b = np.asarray(f2, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ConfigError(
            f"need two feature sets [n, d] with n >= 2 and equal d, got {a.shape} and {b.shape}"
        )
    n, m, d = len(a), len(b), a.shape[1]
    if min(n, m) > d:
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    ac, bc = a - mu1, b - mu2
    tr1 = float(np.sum(ac * ac)) / (n - 1)
    tr2 = float(np.sum(bc * bc)) / (m - 1)
    nuclear = float(np.linalg.svd(ac @ bc.T, compute_uv=False).sum()) / np.sqrt((n - 1) * (m - 1))
    diff = mu1 - mu2
    return float(diff @ diff + tr1 + tr2 - 2.0 * nuclear)


def fid_per_slot(feat_recon: np.ndarray, feat_gt: np.ndarray, items: np.ndarray | None = None) -> np.ndarray:
    """FID of each sample slot against the ground truth: ``[N, S, d]``, ``[N, d]`` -> ``[S]``.

    Args:
        items: optional ``[N']`` item indices (a bootstrap resample) used for both sides.
    """
    if items is not None:
        feat_recon, feat_gt = feat_recon[items], feat_gt[items]
    return np.array(
        [frechet_distance_features(feat_recon[:, s], feat_gt) for s in range(feat_recon.shape[1])]
    )


def fid_summary(
    feat_recon: np.ndarray, feat_gt: np.ndarray, n_boot: int = 1000, rng: np.random.Generator | None = None
) -> dict:
    """FID per slot, its mean and best (min) over slots, all samples pooled, and bootstrap 95% intervals.

    Args:
        feat_recon: ``[N, S, d]`` features of the reconstructions.
        feat_gt: ``[N, d]`` features of the ground truth.
        n_boot: bootstrap resamples of the test images (0: no intervals).

    Returns:
        ``{"per_slot": [S], "mean": float, "best_slot": float, "pooled": float, "ci95": {"mean": ..,
        "best_slot": ..}}``. The intervals are bias-shifted percentile intervals: FID is inflated when a
        resample holds duplicates, so the bootstrap distribution is re-centred on the point estimate.
    """
    n, s, d = feat_recon.shape
    per_slot = fid_per_slot(feat_recon, feat_gt)
    pooled = frechet_distance_features(feat_recon.reshape(n * s, d), feat_gt)
    out = {
        "per_slot": per_slot.tolist(),
        "mean": float(per_slot.mean()),
        "best_slot": float(per_slot.min()),
        "pooled": pooled,
        "ci95": {"mean": None, "best_slot": None},
    }
    if n_boot > 0 and n >= 3:
        rng = rng if rng is not None else np.random.default_rng(0)
        boots = np.array([fid_per_slot(feat_recon, feat_gt, rng.integers(0, n, n)) for _ in range(n_boot)])
        for key, vals in (("mean", boots.mean(axis=1)), ("best_slot", boots.min(axis=1))):
            # Resampling with duplicates inflates FID, so the percentile interval is shifted by the
            # bootstrap bias (mean of the resampled values minus the point estimate).
            shift = float(vals.mean()) - out[key]
            lo, hi = np.quantile(vals - shift, [0.025, 0.975])
            out["ci95"][key] = [float(lo), float(hi)]
    return out


class InceptionFeatures:
    """Inception-v3 feature extractor for FID from a local weights file.

    ``extract(images [B, H, W, 3] uint8)`` returns ``{"64": [B, 64], "2048": [B, 2048]}``.

    Attributes:
        variant: ``"tf-fid"`` (TF FID weights, comparable with published FID) or ``"torchvision"``.
        label: a human-readable description for the report.
    """

    def __init__(self, weights_path: str | Path, device: str = "cpu"):
        from torchvision.models.inception import Inception3

        self.weights_path = Path(weights_path)
        sd = load_state_dict_file(self.weights_path)
        fc = sd.get("fc.weight")
        if fc is None or "Conv2d_1a_3x3.conv.weight" not in sd:
            raise CheckpointError(
                "not Inception-v3 weights (expected keys 'Conv2d_1a_3x3.conv.weight' and 'fc.weight')",
                path=self.weights_path,
            )
        num_classes = int(fc.shape[0])
        aux = any(k.startswith("AuxLogits.") for k in sd)
        model = Inception3(num_classes=num_classes, aux_logits=aux, transform_input=False, init_weights=False)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"weights do not fit Inception-v3: {str(exc)[:300]}", path=self.weights_path
            ) from None
        self.model = model.eval().to(device)
        self.device = device
        self.variant = "tf-fid" if num_classes == 1008 else "torchvision"
        self.label = (
            "TF-FID Inception-v3 weights (2015-12-05); comparable with published FID up to the resize filter"
            if self.variant == "tf-fid"
            else "torchvision ImageNet Inception-v3 weights: NOT the TF-FID weights, not comparable with published FID"
        )

    def _block(self, name: str, x):
        """Run one Inception block; the TF-FID variant changes the pool branches of the A, C and E blocks."""
        import torch
        import torch.nn.functional as F

        block = getattr(self.model, name)
        if self.variant != "tf-fid" or name in ("Mixed_6a", "Mixed_7a"):
            return block(x)

        def pool(t):
            if name == "Mixed_7c":
                return F.max_pool2d(t, kernel_size=3, stride=1, padding=1)
            return F.avg_pool2d(t, kernel_size=3, stride=1, padding=1, count_include_pad=False)

        b = block
        if name.startswith("Mixed_5"):  # InceptionA
            out = [
                b.branch1x1(x),
                b.branch5x5_2(b.branch5x5_1(x)),
                b.branch3x3dbl_3(b.branch3x3dbl_2(b.branch3x3dbl_1(x))),
                b.branch_pool(pool(x)),
            ]
        elif name.startswith("Mixed_6"):  # InceptionC
            b7 = b.branch7x7_3(b.branch7x7_2(b.branch7x7_1(x)))
            d = x
            for i in range(1, 6):
                d = getattr(b, f"branch7x7dbl_{i}")(d)
            out = [b.branch1x1(x), b7, d, b.branch_pool(pool(x))]
        else:  # InceptionE
            t = b.branch3x3_1(x)
            t = torch.cat([b.branch3x3_2a(t), b.branch3x3_2b(t)], 1)
            u = b.branch3x3dbl_2(b.branch3x3dbl_1(x))
            u = torch.cat([b.branch3x3dbl_3a(u), b.branch3x3dbl_3b(u)], 1)
            out = [b.branch1x1(x), t, u, b.branch_pool(pool(x))]
        return torch.cat(out, 1)

    def extract(self, images: np.ndarray, batch_size: int = 32) -> dict[str, np.ndarray]:
        """``images: [B, H, W, 3]`` uint8 -> ``{"64": [B, 64], "2048": [B, 2048]}`` float64."""
        import torch
        import torch.nn.functional as F

        m = self.model
        f64, f2048 = [], []
        with torch.no_grad():
            for a in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[a : a + batch_size])).permute(0, 3, 1, 2)
                x = x.float().div(255.0)
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
                if self.variant == "tf-fid":
                    x = 2.0 * x - 1.0
                else:  # torchvision ImageNet normalisation
                    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
                    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
                    x = (x - mean) / std
                x = x.to(self.device)
                x = m.maxpool1(m.Conv2d_2b_3x3(m.Conv2d_2a_3x3(m.Conv2d_1a_3x3(x))))
                f64.append(x.mean(dim=(2, 3)).double().cpu().numpy())
                x = m.maxpool2(m.Conv2d_4a_3x3(m.Conv2d_3b_1x1(x)))
                for name in (
                    "Mixed_5b",
                    "Mixed_5c",
                    "Mixed_5d",
                    "Mixed_6a",
                    "Mixed_6b",
                    "Mixed_6c",
                    "Mixed_6d",
                    "Mixed_6e",
                    "Mixed_7a",
                    "Mixed_7b",
                    "Mixed_7c",
                ):
                    x = self._block(name, x)
                f2048.append(x.mean(dim=(2, 3)).double().cpu().numpy())
        return {"64": np.concatenate(f64), "2048": np.concatenate(f2048)}


def load_inception(weights_path: str | Path | None, device: str = "cpu") -> InceptionFeatures:
    """The FID feature extractor, or :class:`WeightsUnavailable` when no local weights file is given."""
    if weights_path is None:
        raise WeightsUnavailable(
            "no weights: FID needs local Inception-v3 weights (--inception-weights PATH: pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth, torch-fidelity's weights-inception-2015-12-05-6726825d.pth, "
            "or torchvision's inception_v3_google-0cc3c7bd.pth)"
        )
    if not Path(weights_path).is_file():
        raise WeightsUnavailable("no weights: Inception-v3 weights file not found", path=weights_path)
    return InceptionFeatures(weights_path, device=device)
