"""Reader of your own data: NIfTI beta maps, an ROI mask, a folder of images and a CSV pairing trials with images.

Layout of the folder (``data_dir``)::

    trials.csv        header ``trial,image,split`` (+ optional ``subject``), one row per trial
    betas/            one 3-D NIfTI per trial; ``trial`` is its file name (relative to betas/ or data_dir)
      or betas.nii.gz one 4-D NIfTI [X, Y, Z, trials]; ``trial`` is the 0-based volume index
      (per subject: betas_<subject>.nii.gz, used when present)
    roi_mask.nii.gz   3-D mask on the same grid; non-zero voxels are used (per subject: roi_mask_<subject>.nii.gz)
    images/           the stimulus images (PNG, JPEG...), named in the ``image`` column

``split`` is ``train`` or ``test``. Voxels are the mask's non-zero voxels in the array's C order
(``np.flatnonzero(mask)``), the same for every trial. Test trials that show the same image are averaged when
``average_test`` (``repeats`` = how many). Images are converted to RGB uint8 and must all have one size unless
``image_size`` is given. Files are read with nibabel; an uncompressed 4-D file is memory-mapped, so only the
needed volumes are read.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np

from mindvis.data.dataset import FMRIDataset
from mindvis.data.formats.common import (
    NanPolicy,
    apply_nan_policy,
    average_by_image,
    check_nan_policy,
    check_nifti_image,
    nan_columns,
    read_text,
    reader_dataset,
    reading,
)
from mindvis.errors import DataError

_logger = logging.getLogger(__name__)

TRIALS_CSV = "trials.csv"
MASK_NAME = "roi_mask"
BETAS_NAME = "betas"
IMAGES_DIR = "images"
_NII = (".nii.gz", ".nii")


def _find(folder: Path, stem: str, subject: str | None) -> Path | None:
    names = ([f"{stem}_{subject}"] if subject else []) + [stem]
    for name in names:
        for ext in _NII:
            if (folder / f"{name}{ext}").is_file():
                return folder / f"{name}{ext}"
    return None


def read_trials_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of the trial table, with ``row`` (1-based line number after the header) added."""
    path = Path(path)
    if not path.is_file():
        raise DataError("trial table not found", path=path)
    text = read_text(path, what="trial table")
    try:
        return _parse_trials(csv.DictReader(io.StringIO(text, newline="")), path)
    except csv.Error as exc:
        raise DataError(f"not a readable csv table ({exc})", path=path) from None


def _parse_trials(reader: csv.DictReader, path: Path) -> list[dict[str, str]]:
    cols = [c.strip().lower() for c in (reader.fieldnames or [])]
    for need in ("trial", "image", "split"):
        if need not in cols:
            raise DataError(
                f"missing column {need!r}; the header is {reader.fieldnames}", path=path, field=need
            )
    rows = []
    for i, raw in enumerate(reader, 2):
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        row["row"] = str(i)
        split = row["split"].lower()
        if split not in ("train", "test"):
            raise DataError(
                f"line {i}: split must be 'train' or 'test', got {row['split']!r}",
                path=path,
                field="split",
            )
        row["split"] = split
        rows.append(row)
    if not rows:
        raise DataError("the trial table has no rows", path=path)
    return rows


def list_nifti_subjects(data_dir: str | os.PathLike) -> list[str]:
    """Subjects named in the trial table (``["default"]`` when it has no subject column)."""
    rows = read_trials_csv(Path(data_dir) / TRIALS_CSV)
    subs = sorted({r.get("subject") or "default" for r in rows})
    return subs


def load_nifti_dataset(
    data_dir: str | os.PathLike,
    subject: str | None = None,
    split: Literal["train", "test"] = "train",
    average_test: bool = True,
    include_images: bool = True,
    *,
    trials_csv: str | os.PathLike | None = None,
    betas: str | os.PathLike | None = None,
    mask: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    nan_policy: NanPolicy = "error",
) -> FMRIDataset:
    """Load one subject and split of a NIfTI + CSV dataset (layout in the module docstring).

    Args:
        data_dir: the dataset folder.
        subject: a value of the ``subject`` column (default: the first; ignored without that column).
        split: ``"train"`` or ``"test"``.
        average_test: average test trials of the same image.
        include_images: read the images.
        trials_csv, betas, mask, image_dir: override the default paths (relative to ``data_dir``).
        image_size: resize images to this square size.
        nan_policy: ``"error"``, ``"zero"`` or ``"drop"`` (NaN voxels over all trials of the subject).

    Returns:
        FMRIDataset ``voxels: [N, V]`` float32 (V = mask voxels), ``image_ids`` into the split's distinct
        images (first-appearance order, names in ``meta["image_names"]``).
    """

    check_nan_policy(nan_policy)
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}", path=data_dir, field="split")
    folder = Path(data_dir)
    csv_path = folder / (trials_csv or TRIALS_CSV)
    rows = read_trials_csv(csv_path)
    if any(r.get("subject") for r in rows):
        subs = sorted({r.get("subject", "") for r in rows})
        subject = subject if subject is not None else subs[0]
        if subject not in subs:
            raise DataError(
                f"subject {subject!r} not in the table (subjects: {subs})", path=csv_path, field="subject"
            )
        rows = [r for r in rows if r.get("subject", "") == subject]
    else:
        subject = subject or "default"
    mask_path = folder / mask if mask is not None else _find(folder, MASK_NAME, subject)
    if mask_path is None or not Path(mask_path).is_file():
        raise DataError(
            "ROI mask not found (roi_mask.nii.gz or roi_mask_<subject>.nii.gz)",
            path=mask_path or folder / f"{MASK_NAME}.nii.gz",
            field="mask",
        )
    mask_img, mask_arr = _load_3d(mask_path, "mask", "mask")
    roi = np.asarray(mask_arr) != 0
    if not roi.any():
        raise DataError("the ROI mask selects no voxel", path=mask_path, field="mask")

    all_voxels = _read_trials(folder, rows, subject, betas, roi, mask_img, mask_path, csv_path)
    is_split = np.asarray([r["split"] == split for r in rows])
    if not is_split.any():
        raise DataError(
            f"no {split} trials" + (f" for subject {subject}" if subject != "default" else ""),
            path=csv_path,
            field="split",
        )
    drop_cols = nan_columns(all_voxels) if nan_policy == "drop" else None
    voxels, kept = apply_nan_policy(
        all_voxels[is_split], nan_policy, path=csv_path, field=f"{subject}/{split}", drop_columns=drop_cols
    )
    split_rows = [r for r, s in zip(rows, is_split, strict=True) if s]
    names = list(dict.fromkeys(r["image"] for r in split_rows))
    index = {n: i for i, n in enumerate(names)}
    ids = np.asarray([index[r["image"]] for r in split_rows], dtype=np.int64)
    repeats = np.ones(len(ids), dtype=np.int64)
    if split == "test" and average_test:
        voxels, repeats = average_by_image(voxels, ids, len(names), path=csv_path, field="image")
        ids = np.arange(len(names), dtype=np.int64)
    images = None
    img_dir = folder / (image_dir or IMAGES_DIR)
    if include_images:
        first_row = {n: r["row"] for r in reversed(split_rows) for n in [r["image"]]}
        images = _read_images(img_dir, names, first_row, csv_path, image_size)
    meta = {
        "format": "nifti",
        "image_names": names,
        "mask": str(mask_path),
        "trials_csv": str(csv_path),
        "mask_shape": list(roi.shape),
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
        roi=Path(mask_path).name.split(".")[0],
        source=str(folder),
    )


def _read_trials(
    folder: Path,
    rows: list[dict[str, str]],
    subject: str,
    betas: str | os.PathLike | None,
    roi: np.ndarray,
    mask_img,
    mask_path,
    csv_path: Path,
) -> np.ndarray:
    """``[trials, V]`` float32 for every row of the (subject's) table."""

    out = np.empty((len(rows), int(roi.sum())), dtype=np.float32)
    integer = all(r["trial"].lstrip("-").isdigit() for r in rows)
    if integer:
        path = folder / betas if betas is not None else _find(folder, BETAS_NAME, subject)
        if path is None or not Path(path).is_file():
            raise DataError(
                "trial column holds volume indices but there is no 4-D betas.nii(.gz) / "
                "betas_<subject>.nii(.gz)",
                path=folder,
                field="trial",
            )
        img, data = _load_volume(path, "betas")
        if data.ndim != 4:
            raise DataError(
                f"expected a 4-D [X, Y, Z, trials] image, got shape {data.shape}", path=path, field="betas"
            )
        _check_grid(data.shape[:3], img.affine, roi, mask_img, mask_path, path)
        for i, r in enumerate(rows):
            k = int(r["trial"])
            if not 0 <= k < data.shape[3]:
                raise DataError(
                    f"line {r['row']}: volume {k} out of range [0, {data.shape[3]}) of {Path(path).name}",
                    path=csv_path,
                    field="trial",
                )
            with reading(path, "betas", "NIfTI image"):
                out[i] = np.asarray(data[..., k])[roi]
        return out
    beta_dir = folder / betas if betas is not None else folder / BETAS_NAME
    for i, r in enumerate(rows):
        cands = [beta_dir / r["trial"], folder / r["trial"]]
        path = next((c for c in cands if c.is_file()), None)
        if path is None:
            raise DataError(
                f"line {r['row']}: beta file {r['trial']!r} not found in {beta_dir} or {folder}",
                path=csv_path,
                field="trial",
            )
        img, vol = _load_3d(path, "trial", "beta map")
        _check_grid(vol.shape, img.affine, roi, mask_img, mask_path, path)
        out[i] = np.asarray(vol, dtype=np.float32)[roi]
    return out


def _load_volume(path: str | os.PathLike, field: str):
    """``(image, data)`` of a NIfTI file; uncompressed data stays memory-mapped.

    The header is checked (real numbers, declared size within the file) before the data is read.
    """
    import nibabel as nib

    regular = Path(path)
    if not regular.is_file():
        raise DataError("NIfTI file not found or not a regular file", path=path, field=field)
    try:
        img = nib.load(path)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for foreign files
        raise DataError(f"not a NIfTI image ({type(exc).__name__}: {str(exc)[:200]})", path=path) from None
    check_nifti_image(img, path=path, field=field)
    with reading(path, field, "NIfTI image"):
        return img, np.asanyarray(img.dataobj)


def _load_3d(path: str | os.PathLike, field: str, what: str):
    """``(image, data [X, Y, Z])`` of a 3-D NIfTI file (:func:`_load_volume`; a trailing axis of length 1 is
    dropped).

    Raises:
        DataError: not 3-D (``what`` names the volume in the message, e.g. ``"mask"``).
    """
    img, vol = _load_volume(path, field)
    if vol.ndim == 4 and vol.shape[-1] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise DataError(f"expected a 3-D {what}, got shape {vol.shape}", path=path, field=field)
    return img, vol


def _check_grid(shape, affine, roi: np.ndarray, mask_img, mask_path, path) -> None:
    if tuple(shape) != roi.shape:
        raise DataError(
            f"ROI mask has shape {roi.shape} but the betas are {tuple(shape)}: the mask must be on the "
            "betas' grid (resample it, e.g. with nilearn.image.resample_to_img)",
            path=mask_path,
            field="mask",
        )
    if not np.allclose(affine, mask_img.affine, atol=1e-3):
        raise DataError(
            f"ROI mask affine differs from the affine of {Path(path).name}: the mask must be on the "
            "betas' grid",
            path=mask_path,
            field="affine",
        )


def _read_images(
    img_dir: Path, names: list[str], first_row: dict[str, str], csv_path: Path, image_size: int | None
) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    arrays = []
    for n in names:
        p = img_dir / n
        if not p.is_file():
            raise DataError(
                f"line {first_row.get(n, '?')}: image {n!r} is in no stimulus folder (not found in "
                f"{img_dir})",
                path=csv_path,
                field="image",
            )
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if image_size is not None and im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BICUBIC)
                arrays.append(np.asarray(im, dtype=np.uint8))
        except (
            UnidentifiedImageError,
            Image.DecompressionBombError,
            OSError,
            ValueError,
            SyntaxError,
            EOFError,
        ) as exc:
            raise DataError(
                f"not a readable image ({type(exc).__name__}: {str(exc)[:200]})", path=p, field="image"
            ) from None
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise DataError(
            f"images have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}); pass image_size "
            "(--image-size) to resize them",
            path=img_dir,
            field="image",
        )
    return np.stack(arrays)
