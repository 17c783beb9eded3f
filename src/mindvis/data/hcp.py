"""HCP resting-state fMRI in the layout MinD-Vis pretrains on (stage A1, Chen et al., CVPR 2023).

Layout (``hcp_dir`` is the ``HCP`` folder or its ``npz`` subfolder)::

    HCP/npz/<subject>/HCP_visual_voxel.npz
        V1, V2, V3, V4   [T, vertices_r] float   one resting-state run (T = 1200 TRs of 0.72 s), each key the
                                                 grayordinates of one visual area

A subject's voxel vector is the concatenation of the areas in the order ``rois`` (V1..V4 by default).

Samples. Resting-state frames are averaged over windows of about 8 s (10 TRs at 0.72-0.75 s), the length
Kamitani's data average over, giving ``T // window`` samples per run. Windows are non-overlapping and split
the run as evenly as ``np.array_split`` does (when ``window`` does not divide ``T``, some windows hold one
extra frame), so no frame is dropped.

Augmentation. The paper enlarges the pretraining set by linear interpolation between two random samples of
the same subject: ``z = (1 - r) x_a + r x_b`` with ``r = 0.5``, adding ``(aug_times - 1) * N`` samples to the
``N`` originals. (The original computes each one with a separate ``scipy.interpolate.interpn`` call on a
two-point grid, which is exactly this linear mix.) :func:`mixup` computes all of them in one vectorised
operation; the pretraining dataset applies the same formula lazily per sample, so the augmented set is
never materialised.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mindvis.data.dataset import FMRIDataset
from mindvis.data.formats.common import NpzArchive, apply_nan_policy, check_nan_policy, reader_dataset
from mindvis.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)

HCP_FILE = "HCP_visual_voxel.npz"
HCP_ROIS: tuple[str, ...] = ("V1", "V2", "V3", "V4")
#: TR of the HCP resting-state runs, seconds.
HCP_TR = 0.72


def window_length(seconds: float = 8.0, tr: float = 0.75) -> int:
    """TRs per averaging window: ``floor(seconds / tr)`` (8 s at 0.75 s gives 10), at least 1."""
    if not (seconds > 0 and tr > 0):
        raise ConfigError(f"expected positive seconds and tr, got {seconds!r}, {tr!r}", field="window")
    return max(1, int(seconds // tr))


def hcp_root(hcp_dir: str | os.PathLike) -> Path:
    """The folder holding one subfolder per subject: ``hcp_dir/npz`` if it exists, else ``hcp_dir``."""
    root = Path(hcp_dir)
    if (root / "npz").is_dir():
        return root / "npz"
    return root


def list_hcp_subjects(hcp_dir: str | os.PathLike) -> list[str]:
    """Names of the subject folders under :func:`hcp_root` that hold ``HCP_visual_voxel.npz``, sorted.

    Raises:
        DataError: the folder does not exist.
    """
    root = hcp_root(hcp_dir)
    if not root.is_dir():
        raise DataError(
            "HCP folder not found (expected HCP/npz/<subject>/HCP_visual_voxel.npz)", path=hcp_dir
        )
    return sorted(p.name for p in root.iterdir() if (p / HCP_FILE).is_file())


def hcp_subject_file(hcp_dir: str | os.PathLike, subject: str) -> Path:
    """Path of one subject's ``HCP_visual_voxel.npz``."""
    return hcp_root(hcp_dir) / str(subject) / HCP_FILE


def hcp_shape(path: str | os.PathLike, rois: Sequence[str] = HCP_ROIS) -> tuple[int, int]:
    """``(T, V)`` of a subject file from the array headers only (no data is read).

    Raises:
        DataError: a missing ROI key, a key that is not 2-D, or areas with different numbers of TRs.
    """
    with NpzArchive(path) as npz:
        t_counts, total = {}, 0
        for roi in rois:
            shape, dtype = npz.header(roi)
            if len(shape) != 2:
                raise DataError(f"expected [TRs, vertices], got shape {shape}", path=path, field=roi)
            if dtype.kind not in "fiu":
                raise DataError(f"expected numeric values, got dtype {dtype}", path=path, field=roi)
            t_counts[roi] = shape[0]
            total += shape[1]
    if len(set(t_counts.values())) > 1:
        raise DataError(
            f"the visual areas have different numbers of TRs: {t_counts}; expected one run per file",
            path=path,
            field=rois[0],
        )
    return next(iter(t_counts.values())), total


def window_bounds(num_frames: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Start frame and size of each averaging window (``np.array_split`` into ``num_frames // window`` parts).

    Returns:
        ``starts: [W]`` and ``sizes: [W]`` int64, ``W = num_frames // window``.
    """
    if window < 1:
        raise ConfigError(f"expected a window of at least 1 TR, got {window}", field="window")
    n_windows = num_frames // window
    if n_windows == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    base, extra = divmod(num_frames, n_windows)
    sizes = np.full(n_windows, base, dtype=np.int64)
    sizes[:extra] += 1
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return starts, sizes


def average_windows(ts: np.ndarray, window: int = 10) -> np.ndarray:
    """Average consecutive frames of ``ts: [T, V]`` over windows of about ``window`` TRs.

    Returns:
        ``[T // window, V]`` float32 (accumulated in float64).
    """
    if ts.ndim != 2:
        raise DataError(f"expected a time series [TRs, voxels], got shape {ts.shape}", field="voxels")
    starts, sizes = window_bounds(ts.shape[0], window)
    if not len(starts):
        return np.zeros((0, ts.shape[1]), dtype=np.float32)
    sums = np.add.reduceat(np.asarray(ts, dtype=np.float64), starts, axis=0)  # [W, V]
    return (sums / sizes[:, None]).astype(np.float32)


def mixup_pairs(
    num_samples: int, aug_times: float, rng: np.random.Generator, candidates: np.ndarray | None = None
) -> np.ndarray:
    """Random sample pairs for :func:`mixup`: ``int((aug_times - 1) * n)`` rows of two indices.

    Args:
        num_samples: n, the number of original samples (ignored when ``candidates`` is given).
        aug_times: total size multiplier (1 adds nothing, 2 doubles).
        rng: numpy generator.
        candidates: ``[n]`` indices to draw from (e.g. one subject's training rows); default ``arange(n)``.

    Returns:
        ``[M, 2]`` int64 indices (drawn with replacement, as the original does).
    """
    if not aug_times >= 1:
        raise ConfigError(f"expected aug_times >= 1, got {aug_times!r}", field="aug_times")
    pool = (
        np.arange(num_samples, dtype=np.int64)
        if candidates is None
        else np.asarray(candidates, dtype=np.int64)
    )
    n_new = int((aug_times - 1) * len(pool))
    if n_new == 0 or len(pool) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    return pool[rng.integers(0, len(pool), size=(n_new, 2))]


def mixup(x: np.ndarray, pairs: np.ndarray, ratio: float | np.ndarray = 0.5) -> np.ndarray:
    """Linear interpolation between sample pairs: ``(1 - r) * x[a] + r * x[b]``.

    Args:
        x: ``[N, V]`` samples.
        pairs: ``[M, 2]`` int indices ``(a, b)``.
        ratio: r, a scalar or ``[M]`` per pair.

    Returns:
        ``[M, V]`` in ``x.dtype``.
    """
    pairs = np.asarray(pairs, dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise DataError(f"expected pairs [M, 2], got shape {pairs.shape}", field="pairs")
    r = np.asarray(ratio, dtype=np.float64)
    if r.ndim:
        r = r[:, None]
    a, b = x[pairs[:, 0]], x[pairs[:, 1]]
    return ((1.0 - r) * a + r * b).astype(x.dtype, copy=False)


def augment_mixup(
    x: np.ndarray, aug_times: float, rng: np.random.Generator, ratio: float = 0.5
) -> np.ndarray:
    """The originals followed by ``int((aug_times - 1) * N)`` interpolated samples.

    ``x: [N, V]`` -> ``[N + M, V]``.
    """
    pairs = mixup_pairs(len(x), aug_times, rng)
    if not len(pairs):
        return x
    return np.concatenate([x, mixup(x, pairs, ratio)], axis=0)


def load_hcp_subject(
    hcp_dir: str | os.PathLike,
    subject: str,
    rois: Sequence[str] = HCP_ROIS,
    window: int | None = 10,
    nan_policy: str = "error",
) -> FMRIDataset:
    """One subject's resting-state run, averaged into windows.

    Args:
        hcp_dir: the ``HCP`` folder (or its ``npz`` subfolder).
        subject: subject folder name.
        rois: visual areas to concatenate, in order.
        window: TRs per averaging window; ``None`` keeps every frame.
        nan_policy: ``"error"``, ``"zero"`` or ``"drop"`` (NaN and Inf alike; see
            :mod:`mindvis.data.formats.common`); applied to the windowed samples.

    Returns:
        FMRIDataset with ``split="rest"`` and ``voxels: [T // window, V]`` float32 (V = the areas' vertices).

    Raises:
        DataError: missing file or key, inconsistent areas, too few TRs for one window, NaN/Inf under "error".
    """
    check_nan_policy(nan_policy)
    path = hcp_subject_file(hcp_dir, subject)
    if not path.is_file():
        raise DataError("subject file not found", path=path, field="subject")
    n_frames, n_vox = hcp_shape(path, rois)
    if window is not None and n_frames < window:
        raise DataError(
            f"{n_frames} TRs is fewer than one averaging window ({window} TRs)", path=path, field=rois[0]
        )
    parts = []
    with NpzArchive(path) as npz:
        for roi in rois:
            ts = npz.get(roi)  # memory-mapped when stored uncompressed
            parts.append(
                average_windows(ts, window) if window is not None else np.asarray(ts, dtype=np.float32)
            )
    voxels = np.concatenate(parts, axis=1)
    nonfinite = ~np.isfinite(voxels)
    if nonfinite.any():
        if nan_policy == "error":
            n_inf = int(np.isinf(voxels).sum())
            raise DataError(
                f"{int(nonfinite.sum())} non-finite values ({int(nonfinite.sum()) - n_inf} NaN, {n_inf} Inf) in "
                f"{int(nonfinite.any(axis=0).sum())} of {n_vox} voxels; pass --nan-policy zero or drop to "
                "handle them",
                path=path,
                field="voxels",
            )
        voxels[nonfinite] = np.nan  # Inf is handled like NaN
    voxels, kept = apply_nan_policy(voxels, nan_policy, path=path, field="voxels")  # type: ignore[arg-type]
    meta = {
        "format": "hcp",
        "rois": list(rois),
        "frames": n_frames,
        "window": window,
        "voxels_in_file": n_vox,
    }
    return reader_dataset(
        voxels, kept, meta, subject=str(subject), split="rest", roi="+".join(rois), source=str(path)
    )


__all__ = [
    "HCP_FILE",
    "HCP_ROIS",
    "HCP_TR",
    "augment_mixup",
    "average_windows",
    "hcp_root",
    "hcp_shape",
    "hcp_subject_file",
    "list_hcp_subjects",
    "load_hcp_subject",
    "mixup",
    "mixup_pairs",
    "window_bounds",
    "window_length",
]
