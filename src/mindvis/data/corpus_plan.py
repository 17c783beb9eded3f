"""The subjects a voxel corpus will hold, known from file headers before any data is read.

:func:`plan_sources` lists every HCP and GOD subject that an
:class:`~mindvis.data.pretrain_config.MBMDataConfig` selects, each as a :class:`SourcePlan` with its training
and test rows and its voxel count, and checks what the headers can show; :func:`common_length` is the voxel
length the corpus pads or crops every subject to. :func:`~mindvis.data.corpus.build_corpus` reads the data by
these plans.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mindvis.data.formats.common import NpzArchive
from mindvis.data.formats.god import god_subject_name, list_god_subjects
from mindvis.data.hcp import hcp_shape, hcp_subject_file, list_hcp_subjects, window_bounds
from mindvis.data.padding import padded_length
from mindvis.data.pretrain_config import MBMDataConfig
from mindvis.errors import DataError


@dataclass
class SourcePlan:
    """One subject's contribution, known from file headers before any data is read."""

    dataset: str  # "hcp" or "god"
    subject: str
    path: str
    train_rows: int
    test_rows: int
    voxels: int

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.subject}"

    @property
    def rows(self) -> int:
        return self.train_rows + self.test_rows


def plan_sources(config: MBMDataConfig) -> list[SourcePlan]:
    """List every subject that the corpus will hold, with row and voxel counts from the file headers.

    Checks what can be checked without reading the data: folders and files exist, HCP areas exist and agree on
    the number of TRs, GOD files have the ROI mask and fMRI arrays that fit it, every subject has at least one
    patch of voxels.

    Raises:
        DataError: a missing folder, file or key; inconsistent subjects; fewer voxels than one patch.
    """
    plans: list[SourcePlan] = []
    if config.hcp_dir is not None:
        subjects = list_hcp_subjects(config.hcp_dir)
        if config.hcp_subjects is not None:
            missing = sorted(set(config.hcp_subjects) - set(subjects))
            if missing:
                raise DataError(
                    f"HCP subject(s) not found: {', '.join(missing[:5])} ({len(subjects)} available)",
                    path=config.hcp_dir,
                    field="hcp_subjects",
                )
            subjects = [s for s in subjects if s in set(config.hcp_subjects)]
        if config.hcp_limit is not None:
            subjects = subjects[: config.hcp_limit]
        if not subjects:
            raise DataError(
                "no HCP subjects (expected <subject>/HCP_visual_voxel.npz under HCP/npz)", path=config.hcp_dir
            )
        for subject in subjects:
            path = hcp_subject_file(config.hcp_dir, subject)
            frames, voxels = hcp_shape(path, config.hcp_rois)
            n_windows = len(window_bounds(frames, config.window_trs)[0])
            if n_windows == 0:
                raise DataError(
                    f"{frames} TRs is fewer than one averaging window ({config.window_trs} TRs)",
                    path=path,
                    field=config.hcp_rois[0],
                )
            _check_patch(voxels, config.patch_size, path, "+".join(config.hcp_rois))
            plans.append(SourcePlan("hcp", subject, str(path), n_windows, 0, voxels))
    if config.god_dir is not None:
        folder = Path(config.god_dir)
        available = list_god_subjects(folder)
        subjects = (
            available if config.god_subjects is None else [god_subject_name(s) for s in config.god_subjects]
        )
        missing = [s for s in subjects if s not in available]
        if missing:
            raise DataError(
                f"GOD subject(s) not found: {', '.join(missing)} (subjects here: {', '.join(available) or 'none'})",
                path=folder,
                field="subject",
            )
        if not subjects:
            raise DataError("no GOD subjects (expected sbj_N.npz files)", path=folder)
        for subject in subjects:
            path = folder / f"{subject}.npz"
            train_rows, test_rows, voxels = _god_shape(path, config.god_roi, config.god_selection)
            _check_patch(voxels, config.patch_size, path, config.god_roi)
            plans.append(SourcePlan("god", subject, str(path), train_rows, test_rows, voxels))
    return plans


def _check_patch(voxels: int, patch_size: int, path: str | os.PathLike, field: str) -> None:
    if voxels < patch_size:
        raise DataError(
            f"{voxels} voxels is fewer than one patch ({patch_size} voxels); the model needs at least one whole patch",
            path=path,
            field=field,
        )


#: The npz members each ``god_fmri`` choice reads (``arr_0`` always: the normalisation is fitted on it).
_GOD_KEYS = {"train": ("arr_0",), "train+test": ("arr_0", "arr_1"), "test": ("arr_0", "arr_2", "arr_1")}


def _god_shape(path: Path, roi: str, god_fmri: str) -> tuple[int, int, int]:
    """``(training rows, test rows, ROI voxels)`` of the corpus, from the npz headers."""
    with NpzArchive(path) as npz:
        if roi not in npz:
            raise DataError(f"missing ROI mask key {roi!r}", path=path, field=roi)
        mask = np.asarray(npz.get(roi, mmap=False)).reshape(-1)
        counts = {}
        for key in _GOD_KEYS[god_fmri]:
            if key not in npz:
                raise DataError(
                    f"missing key {key!r}, needed for the {god_fmri!r} fMRI of stage A", path=path, field=key
                )
            shape, dtype = npz.header(key)
            if len(shape) != 2:
                raise DataError(f"expected [samples, voxels], got shape {shape}", path=path, field=key)
            if shape[1] != mask.shape[0]:
                raise DataError(
                    f"{shape[1]} voxel columns but the {roi} mask has {mask.shape[0]} entries",
                    path=path,
                    field=key,
                )
            counts[key] = shape[0]
    voxels = int(mask.astype(bool).sum()) if mask.dtype == np.bool_ or np.isin(mask, (0, 1)).all() else 0
    n_test = counts.get("arr_1", 0) + counts.get("arr_2", 0)
    return (0 if god_fmri == "test" else counts["arr_0"]), n_test, voxels


def common_length(plans: Sequence[SourcePlan], config: MBMDataConfig) -> int:
    """``config.length``, or the longest subject's voxel count padded to the patch size."""
    if config.length is not None:
        return int(config.length)
    return max(padded_length(p.voxels, config.patch_size, config.effective_pad_mode) for p in plans)  # type: ignore[arg-type]


__all__ = [
    "SourcePlan",
    "common_length",
    "plan_sources",
]
