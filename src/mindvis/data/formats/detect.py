"""Recognise a dataset folder or file and describe it (``mindvis data info``).

:func:`detect_format` looks at names only; :func:`describe` loads every subject and split through the
format's reader (without images where they are large, unless ``check_images``) and reports sample and voxel
counts, ROIs, image count and size, and every problem the readers raise (missing keys, count mismatches, NaN
voxels...), without stopping at the first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mindvis.data.dataset import FMRIDataset
from mindvis.data.formats.bold5000 import BOLD5000_ROIS, list_bold5000_subjects, load_bold5000
from mindvis.data.formats.common import reading
from mindvis.data.formats.god import find_god_images, god_roi_names, list_god_subjects, load_god
from mindvis.data.formats.god_h5 import BDataFile, god_h5_subject, list_h5_files, load_god_h5
from mindvis.data.formats.hcp_cifti import find_hcp_runs
from mindvis.data.formats.nifti import list_nifti_subjects, load_nifti_dataset
from mindvis.data.formats.nsd import IMAGES_FILE, list_nsd_subjects, load_nsd
from mindvis.data.hcp import HCP_ROIS, list_hcp_subjects, load_hcp_subject
from mindvis.errors import DataError, MindVisError

_logger = logging.getLogger(__name__)

FORMATS = ("god", "god-h5", "synthetic", "bold5000", "nsd", "hcp-npz", "hcp-cifti", "nifti")


def _is_bdata(path: Path) -> bool:
    if not path.is_file():  # never open a FIFO or a device
        return False
    try:
        import h5py

        with h5py.File(path, "r") as h5:
            return ("dataset" in h5 or "dataSet" in h5) and ("metadata" in h5 or "metaData" in h5)
    except (OSError, ImportError, KeyError, ValueError, RuntimeError):
        return False


def detect_format(path: str | os.PathLike) -> str:
    """The format of ``path``: one of :data:`FORMATS`.

    Raises:
        DataError: the path does not exist or matches no known layout.
    """
    p = Path(path)
    if not p.exists():
        raise DataError("not found", path=p)
    if p.is_file():
        if p.suffix == ".h5" and _is_bdata(p):
            return "god-h5"
        if p.name == "HCP_visual_voxel.npz":
            return "hcp-npz"
        if p.suffix == ".npz" and p.name.startswith("sbj_"):
            return "god"
        raise DataError(
            "unrecognised file: expected a GOD BData .h5, a sbj_N.npz or HCP_visual_voxel.npz", path=p
        )
    names = {c.name for c in p.iterdir()}
    if any(n.startswith("sbj_") and n.endswith(".npz") for n in names):
        return "god"
    if (p / "GOD").is_dir() and any((p / "GOD").glob("sbj_*.npz")):
        return "synthetic"
    if "BOLD5000_GLMsingle_ROI_betas" in names:
        return "bold5000"
    if any(n.startswith("betas_all_subj") and n.endswith(".hdf5") for n in names):
        return "nsd"
    if "trials.csv" in names:
        return "nifti"
    if any(p.glob("*/HCP_visual_voxel.npz")):
        return "hcp-npz"
    h5s = [c for c in p.glob("*.h5") if _is_bdata(c)]
    if h5s:
        return "god-h5"
    if any(p.glob("*.dtseries.nii")) or any(p.glob("*/MNINonLinear/Results/*/*.dtseries.nii")):
        return "hcp-cifti"
    raise DataError(
        "no known dataset layout here (GOD npz or h5, BOLD5000, NSD, HCP, NIfTI + trials.csv); see "
        "docs/data-formats.md",
        path=p,
    )


def _try_load(
    problems: list[str], load: Callable[..., FMRIDataset], *args: Any, **kw: Any
) -> FMRIDataset | None:
    """``load(*args, **kw)``, or ``None`` with the problem noted; a NaN problem is noted and the load retried
    with ``nan_policy="zero"``, so that the rest of the data can still be described."""
    try:
        return load(*args, **kw)
    except MindVisError as exc:
        problems.append(str(exc))
        if "NaN" not in exc.detail:
            return None
    try:
        return load(*args, nan_policy="zero", **kw)
    except MindVisError as exc:
        problems.append(str(exc))
    return None


def _load_splits(
    problems: list[str], load: Callable[..., FMRIDataset], splits: tuple[str, ...], *args: Any, **kw: Any
) -> list[tuple[str, FMRIDataset | None]]:
    """``(split, dataset or None)`` for each of ``splits``, loaded by :func:`_try_load` with ``split=``."""
    return [(split, _try_load(problems, load, *args, split=split, **kw)) for split in splits]


def _split_summary(ds: FMRIDataset) -> dict[str, Any]:
    out = ds.summary()
    if ds.images is None and "image_names" in ds.meta:
        out["images"] = len(ds.meta["image_names"])
    if ds.num_samples:
        v = np.asarray(ds.voxels)
        out["mean"] = float(np.mean(v))
        out["std"] = float(np.std(v))
        flat = np.flatnonzero(np.all(v == v[:1], axis=0))
        if len(flat) and ds.num_samples > 1:
            out["constant_voxels"] = int(len(flat))
    return out


def describe(path: str | os.PathLike, check_images: bool = False) -> dict[str, Any]:
    """A JSON-friendly report on a dataset: format, subjects, splits, counts, ROIs, images, problems."""
    p = Path(path)
    fmt = detect_format(p)
    report: dict[str, Any] = {"path": str(p), "format": fmt, "subjects": [], "problems": [], "notes": []}
    problems: list[str] = report["problems"]
    handler = _DESCRIBERS[fmt]
    handler(p, report, problems, check_images)
    for s in report["subjects"]:
        for sp in s["splits"]:
            if sp.get("constant_voxels"):
                problems.append(
                    f"{s['subject']}/{sp['split']}: {sp['constant_voxels']} voxels are constant "
                    "across samples"
                )
    return report


def _add(report: dict, subject: str, rois: list[str], splits: list[tuple[str, FMRIDataset | None]]) -> None:
    rows = []
    for label, ds in splits:
        if ds is not None:
            row = _split_summary(ds)
            row["split"] = label
            rows.append(row)
    report["subjects"].append({"subject": subject, "rois": rois, "splits": rows})


def _describe_god(p: Path, report: dict, problems: list[str], check_images: bool) -> None:
    folder = p.parent if p.is_file() else p
    subjects = [p.stem] if p.is_file() else list_god_subjects(folder)
    img = find_god_images(folder)
    if img is None:
        problems.append(f"{folder}: no images_*.npz (train_images/test_images); datasets load without images")
    else:
        report["notes"].append(f"images: {img.name}")
    for name in ("imagenet_class_index.json", "imagenet_training_label.csv", "imagenet_testing_label.csv"):
        if not (folder / name).is_file():
            problems.append(f"{folder / name}: missing; labels will be unknown")
    for s in subjects:
        rois: list[str] = []
        try:
            rois = god_roi_names(folder / f"{s}.npz")
        except MindVisError as exc:
            problems.append(str(exc))
        roi = "VC" if "VC" in rois else (rois[0] if rois else "VC")
        splits = []
        for label, split, avg in (
            ("train", "train", True),
            ("test", "test", True),
            ("test (not averaged)", "test", False),
        ):
            ds = _try_load(
                problems,
                load_god,
                folder,
                subject=s,
                split=split,
                roi=roi,
                average_test=avg,
                include_images=True,
            )
            splits.append((label, ds))
        _add(report, s, rois, splits)
        avg, raw = splits[1][1], splits[2][1]
        if avg is not None and raw is not None:
            _check_averages(avg, raw, problems)


def _check_averages(avg: FMRIDataset, raw: FMRIDataset, problems: list[str]) -> None:
    """Problem if the averaged test rows are not the means of the presentations of their images."""
    n = len(avg)
    if raw.image_ids is None or raw.num_voxels != avg.num_voxels or (n and raw.image_ids.max() >= n):
        return
    means = np.stack(
        [
            raw.voxels[raw.image_ids == j].mean(0)
            if (raw.image_ids == j).any()
            else np.full(raw.num_voxels, np.nan)
            for j in range(n)
        ]
    )
    scale = float(np.nanstd(raw.voxels)) or 1.0
    err = np.nanmax(np.abs(means - avg.voxels), axis=1) / scale
    bad = np.flatnonzero(~(err < 1e-3))
    if len(bad):
        problems.append(
            f"{avg.source}: [arr_2] {len(bad)} of {n} averaged test rows differ from the mean of "
            f"their arr_1 presentations (first: row {int(bad[0])}, max difference "
            f"{float(np.nanmax(err)):.3g} std); the arr_2/test_images order or arr_4 may be wrong"
        )


def _describe_synthetic(p: Path, report: dict, problems: list[str], check_images: bool) -> None:
    report["notes"].append("simulator output; the GOD layout is in GOD/")
    _describe_god(p / "GOD", report, problems, check_images)


def _describe_god_h5(p: Path, report: dict, problems: list[str], check_images: bool) -> None:
    for f in list_h5_files(p):
        rois: list[str] = []
        try:
            with BDataFile(f) as bd:
                rois = [k.removeprefix("ROI_") for k in bd.roi_keys()]
                report["notes"].append(f"{f.name}: {bd.n_samples} samples x {bd.n_columns} columns")
        except MindVisError as exc:
            problems.append(str(exc))
            continue
        roi = "VC" if "VC" in rois else (rois[0] if rois else "VC")
        splits = _load_splits(
            problems, load_god_h5, ("train", "test", "imagery"), f, roi=roi, include_images=True
        )
        _add(report, god_h5_subject(f), rois, splits)


def _describe_bold5000(p: Path, report: dict, problems: list[str], check_images: bool) -> None:
    if not check_images:
        report["notes"].append("images in img_dict.npy not read (pass --check-images to read and check them)")
    for s in list_bold5000_subjects(p):
        splits = _load_splits(
            problems, load_bold5000, ("train", "test"), p, subject=s, include_images=check_images
        )
        _add(report, s, list(BOLD5000_ROIS), splits)


def _describe_nsd(p: Path, report: dict, problems: list[str], check_images: bool) -> None:
    img = p / IMAGES_FILE
    if img.is_file():
        import h5py

        try:
            with reading(img, "images", "HDF5 file"), h5py.File(img, "r") as h5:
                if "images" in h5:
                    report["notes"].append(
                        f"{IMAGES_FILE}: images {tuple(h5['images'].shape)} {h5['images'].dtype}"
                    )
                else:
                    problems.append(f"{img}: [images] missing key 'images'")
        except MindVisError as exc:
            problems.append(str(exc))
    else:
        problems.append(f"{img}: not found; NSD loads without images only")
    for s in list_nsd_subjects(p):
        splits = _load_splits(
            problems, load_nsd, ("train", "test"), p, subject=s, include_images=check_images
        )
        _add(report, s, ["nsdgeneral"], splits)


def _describe_hcp_npz(p: Path, report: dict, problems: list[str], check_images: bool) -> None:
    root = p.parent.parent if p.is_file() else p
    subjects = [p.parent.name] if p.is_file() else list_hcp_subjects(p)
    report["notes"].append(
        f"{len(subjects)} subject(s) of resting-state data (unpaired, for pretraining); "
        "samples are TRs (pretraining averages them in windows)"
    )
    for s in subjects[:50]:
        ds = _try_load(problems, load_hcp_subject, root, s, window=None)
        _add(report, s, list(HCP_ROIS), [("rest", ds)])
    if len(subjects) > 50:
        report["notes"].append(f"only the first 50 of {len(subjects)} subjects were read")


def _describe_hcp_cifti(p: Path, report: dict, problems: list[str], check_images: bool) -> None:
    runs = find_hcp_runs(p)
    report["notes"].append(
        f"{len(runs)} subject(s) with CIFTI dtseries; run `mindvis data prepare-hcp {p} "
        "--parcellation <dlabel.nii> --out <dir>` to extract V1..V4"
    )
    for s, f in list(runs.items())[:20]:
        report["notes"].append(f"  {s}: {f.relative_to(p)}")


def _describe_nifti(p: Path, report: dict, problems: list[str], check_images: bool) -> None:
    try:
        subjects = list_nifti_subjects(p)
    except MindVisError as exc:
        problems.append(str(exc))
        return
    for s in subjects:
        subject = None if s == "default" else s
        splits = _load_splits(
            problems, load_nifti_dataset, ("train", "test"), p, subject=subject, include_images=True
        )
        _add(report, s, [d.roi for _, d in splits if d is not None][:1], splits)


_DESCRIBERS: dict[str, Callable[[Path, dict, list[str], bool], None]] = {
    "god": _describe_god,
    "synthetic": _describe_synthetic,
    "god-h5": _describe_god_h5,
    "bold5000": _describe_bold5000,
    "nsd": _describe_nsd,
    "hcp-npz": _describe_hcp_npz,
    "hcp-cifti": _describe_hcp_cifti,
    "nifti": _describe_nifti,
}
