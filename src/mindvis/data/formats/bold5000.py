"""Reader of BOLD5000 (Chang et al. 2019) as MinD-Vis uses it: GLMsingle ROI betas and the presented stimuli.

Layout of the folder (``data_dir``)::

    BOLD5000_GLMsingle_ROI_betas/py/
        CSI1_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_LHEarlyVis.npy   [trials, voxels] float
        ... one file per subject (CSI1..CSI4), hemisphere (LH, RH) and ROI (EarlyVis, LOC, OPA, PPA, RSC)
    BOLD5000_Stimuli/
        Scene_Stimuli/Presented_Stimuli/img_dict.npy     pickled dict {image file name: [H, W, 3] uint8}
        Scene_Stimuli/repeated_stimuli_113_list.txt      the repeated (test) images, one name per line
        Stimuli_Presentation_Lists/CSI1/CSI1_sess01/*.txt   image names in presentation order, one per trial;
                                                         a ``rep_`` prefix marks a repeated image

Voxels are the ROI files concatenated in the order EarlyVis, LOC, OPA, PPA, RSC, each left then right
hemisphere. Trials are the presentation lists read in sorted folder and file order, which must give exactly
one name per beta row. Trials of the repeated images form the test set (averaged per image by default, as in
the paper: 113 images, fewer for CSI4, who saw only part of the sessions); all other trials are the training
set. ``img_dict.npy`` is read with :func:`mindvis.safeload.load_pickled_numpy`, which builds numpy arrays and
strings only and refuses any other pickled global.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Literal

import numpy as np

from mindvis.data.dataset import FMRIDataset
from mindvis.data.formats.common import (
    NanPolicy,
    apply_nan_policy,
    average_by_image,
    check_nan_policy,
    check_numeric,
    load_npy,
    nan_columns,
    read_text,
    reader_dataset,
)
from mindvis.errors import DataError
from mindvis.safeload import load_pickled_numpy

_logger = logging.getLogger(__name__)

BOLD5000_ROIS = ("EarlyVis", "LOC", "OPA", "PPA", "RSC")
HEMISPHERES = ("LH", "RH")
FMRI_SUBDIR = "BOLD5000_GLMsingle_ROI_betas/py"
STIMULI_SUBDIR = "BOLD5000_Stimuli"
IMG_DICT = "Scene_Stimuli/Presented_Stimuli/img_dict.npy"
REPEATED_LIST = "Scene_Stimuli/repeated_stimuli_113_list.txt"
PRESENTATION_DIR = "Stimuli_Presentation_Lists"
_BETA_RE = re.compile(r"^(CSI\d+)_GLMbetas-.*_(LH|RH)(EarlyVis|LOC|OPA|PPA|RSC)\.npy\Z")


def list_bold5000_subjects(data_dir: str | os.PathLike) -> list[str]:
    """Subjects (``"CSI1"``...) with ROI beta files in ``data_dir``."""
    folder = Path(data_dir) / FMRI_SUBDIR
    if not folder.is_dir():
        raise DataError("BOLD5000 ROI beta folder not found", path=folder)
    subs = {m.group(1) for p in folder.iterdir() if (m := _BETA_RE.match(p.name))}
    return sorted(subs, key=lambda s: int(s[3:]))


def bold5000_beta_files(
    data_dir: str | os.PathLike, subject: str, rois: tuple[str, ...] = BOLD5000_ROIS
) -> list[Path]:
    """The ROI beta files of ``subject`` in concatenation order (ROI, then LH before RH)."""
    folder = Path(data_dir) / FMRI_SUBDIR
    found: dict[tuple[str, str], Path] = {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = _BETA_RE.match(p.name)
            if m and m.group(1) == subject:
                key = (m.group(3), m.group(2))
                if key in found:
                    first, second = sorted([found[key].name, p.name])
                    raise DataError(
                        f"two ROI beta files for {subject} {key[1]}{key[0]}: {first} and {second}",
                        path=folder,
                        field=f"{key[1]}{key[0]}",
                    )
                found[key] = p
    out = []
    for roi in rois:
        for hemi in HEMISPHERES:
            if (roi, hemi) not in found:
                raise DataError(
                    f"missing ROI beta file for {subject} {hemi}{roi} (expected "
                    f"{subject}_GLMbetas-..._{hemi}{roi}.npy)",
                    path=folder,
                    field=f"{hemi}{roi}",
                )
            out.append(found[(roi, hemi)])
    return out


def read_presentation_list(data_dir: str | os.PathLike, subject: str) -> tuple[list[str], list[str]]:
    """Image names in presentation order for ``subject``, ``rep_`` prefix removed, and where each came from.

    Returns:
        ``(names, origins)`` with ``origins[i]`` = ``"<file>:<line>"`` for messages.
    """
    folder = Path(data_dir) / STIMULI_SUBDIR / PRESENTATION_DIR / subject
    if not folder.is_dir():
        raise DataError("presentation list folder not found", path=folder)
    names, origins = [], []
    for sess in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in sorted(sess.glob("*.txt")):
            for ln, line in enumerate(read_text(f, what="presentation list").splitlines(), 1):
                name = line.strip()
                if not name:
                    continue
                names.append(name[4:] if name.startswith("rep_") else name)
                origins.append(f"{f}:{ln}")
    if not names:
        raise DataError("no presentation lists (*.txt in session folders)", path=folder)
    return names, origins


def load_bold5000(
    data_dir: str | os.PathLike,
    subject: str = "CSI1",
    split: Literal["train", "test"] = "train",
    average_test: bool = True,
    include_images: bool = True,
    *,
    rois: tuple[str, ...] = BOLD5000_ROIS,
    nan_policy: NanPolicy = "error",
    image_size: int | None = None,
) -> FMRIDataset:
    """Load one subject and split of BOLD5000.

    Args:
        data_dir: the BOLD5000 folder (see the module docstring).
        subject: ``"CSI1"`` .. ``"CSI4"`` (``1`` .. ``4`` accepted).
        split: ``"train"`` (trials of the non-repeated images) or ``"test"`` (the repeated images).
        average_test: one averaged row per test image (``repeats`` = its trial count) instead of one per trial.
        include_images: attach the split's images from ``img_dict.npy`` (and check every name is in it).
        rois: ROIs to concatenate, in order.
        nan_policy: ``"error"``, ``"zero"`` or ``"drop"`` (columns with NaN in any trial of the subject).
        image_size: resize images to ``image_size`` squared (needed when ``img_dict.npy`` sizes differ).

    Returns:
        FMRIDataset with ``voxels: [N, V]`` float32, ``image_ids`` into ``images: [M, H, W, 3]`` uint8 (the
        split's distinct images: first-presentation order for train, repeated-list order for test) and
        ``meta["image_names"]``.
    """
    check_nan_policy(nan_policy)
    if split not in ("train", "test"):
        raise DataError(
            f"BOLD5000 has splits 'train' and 'test', not {split!r}", path=data_dir, field="split"
        )
    folder = Path(data_dir)
    subject = f"CSI{subject}" if str(subject).isdigit() else str(subject)
    files = bold5000_beta_files(folder, subject, rois)
    parts = []
    for f in files:
        arr = load_npy(f, field="betas", mmap=True)
        check_numeric(arr.dtype, path=f, field="betas")
        if arr.ndim != 2:
            raise DataError(f"expected [trials, voxels], got shape {arr.shape}", path=f, field="betas")
        if parts and arr.shape[0] != parts[0].shape[0]:
            raise DataError(
                f"{arr.shape[0]} trials but {files[0].name} has {parts[0].shape[0]}", path=f, field="trials"
            )
        parts.append(arr)
    n_trials = parts[0].shape[0]
    names, origins = read_presentation_list(folder, subject)
    if len(names) != n_trials:
        raise DataError(
            f"image count != trial count: the presentation lists name {len(names)} images but the "
            f"ROI betas have {n_trials} trials",
            path=folder / STIMULI_SUBDIR / PRESENTATION_DIR / subject,
            field="trials",
        )
    rep_path = folder / STIMULI_SUBDIR / REPEATED_LIST
    if not rep_path.is_file():
        raise DataError("repeated (test) image list not found", path=rep_path)
    repeated = [
        ln.strip() for ln in read_text(rep_path, what="repeated image list").splitlines() if ln.strip()
    ]
    rep_set = set(repeated)
    is_test = np.asarray([n in rep_set for n in names])
    rows = is_test if split == "test" else ~is_test
    voxels = np.concatenate([np.asarray(p[rows], dtype=np.float32) for p in parts], axis=1)
    drop_cols = None
    if nan_policy == "drop":
        drop_cols = np.concatenate([nan_columns(np.asarray(p, dtype=np.float32)) for p in parts])
    voxels, kept = apply_nan_policy(
        voxels, nan_policy, path=files[0].parent, field=f"{subject}/{split}", drop_columns=drop_cols
    )
    trial_names = [n for n, r in zip(names, rows, strict=True) if r]
    trial_origins = [o for o, r in zip(origins, rows, strict=True) if r]
    if split == "test":
        present = set(trial_names)
        image_names = [n for n in repeated if n in present]
        missing = len(repeated) - len(image_names)
        if missing:
            _logger.info("%s: %d of %d repeated images were not presented", subject, missing, len(repeated))
    else:
        image_names = list(dict.fromkeys(trial_names))
    index = {n: i for i, n in enumerate(image_names)}
    ids = np.asarray([index[n] for n in trial_names], dtype=np.int64)
    repeats = np.ones(len(ids), dtype=np.int64)
    if split == "test" and average_test:
        voxels, repeats = average_by_image(voxels, ids, len(image_names), path=files[0].parent, field="test")
        ids = np.arange(len(image_names), dtype=np.int64)
        trial_origins = []
    images = None
    if include_images:
        images = _images(
            folder / STIMULI_SUBDIR / IMG_DICT, image_names, trial_names, trial_origins, image_size
        )
    meta = {
        "format": "bold5000",
        "image_names": image_names,
        "rois": list(rois),
        "roi_voxels": {
            f"{h}{r}": int(p.shape[1])
            for (r, h), p in zip([(r, h) for r in rois for h in HEMISPHERES], parts, strict=True)
        },
    }
    return reader_dataset(
        voxels,
        kept,
        meta,
        subject=subject,
        split=split,
        image_ids=ids,
        images=images,
        repeats=repeats,
        roi="+".join(rois),
        source=str(folder),
    )


def _images(
    path: Path,
    image_names: list[str],
    trial_names: list[str],
    trial_origins: list[str],
    image_size: int | None,
) -> np.ndarray:
    table = load_pickled_numpy(path)
    if not isinstance(table, dict):
        raise DataError(
            f"expected a pickled dict {{image name: array}}, got {type(table).__name__}", path=path
        )
    for name in image_names:
        if name not in table:
            where = next((o for n, o in zip(trial_names, trial_origins, strict=False) if n == name), None)
            raise DataError(
                f"image {name!r}{f' (presented at {where})' if where else ''} is in no stimulus "
                "table: it is not a key of img_dict.npy",
                path=path,
                field=name,
            )
    arrays = []
    for n in image_names:
        try:
            a = np.asarray(table[n])
        except (ValueError, TypeError) as exc:
            raise DataError(f"not an image array ({exc})", path=path, field=n) from None
        if a.ndim != 3 or a.shape[-1] != 3 or 0 in a.shape:
            raise DataError(f"expected an [H, W, 3] image, got shape {a.shape}", path=path, field=n)
        if a.dtype.kind not in "biuf":
            raise DataError(f"expected image pixels as numbers, got dtype {a.dtype}", path=path, field=n)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise DataError("image holds NaN or Inf pixels", path=path, field=n)
        arrays.append(a)
    sizes = {a.shape[:2] for a in arrays}
    if image_size is None and len(sizes) > 1:
        raise DataError(
            f"images have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}); pass image_size to "
            "resize them to one size",
            path=path,
            field="images",
        )
    if image_size is not None:
        from PIL import Image

        arrays = [
            a
            if a.shape[:2] == (image_size, image_size)
            else np.asarray(Image.fromarray(_to_uint8(a)).resize((image_size, image_size), Image.BICUBIC))
            for a in arrays
        ]
    if not arrays:
        return np.zeros((0, image_size or 1, image_size or 1, 3), dtype=np.uint8)
    return np.stack([_to_uint8(a) for a in arrays])


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    a = np.asarray(a, dtype=np.float32)
    if a.max(initial=0) <= 1.0:
        a = a * 255.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)
