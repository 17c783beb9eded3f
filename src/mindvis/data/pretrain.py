"""Training data of masked brain modeling (MinD-Vis stage A, Chen et al., CVPR 2023).

Stage A1 pretrains on unlabeled fMRI of many subjects: HCP resting state (windows of about 8 s averaged into
samples, see :mod:`mindvis.data.hcp`) plus the GOD subjects' training fMRI, about 136k samples of about 4.6k
voxels in the paper. Stage A2 tunes on the target subject's fMRI alone: which of its fMRI is
:attr:`MBMDataConfig.god_fmri` (the original, ``stageA2_mbm_finetune.py``, tunes on the subject's *test* fMRI
only, the averaged and the single-trial rows; ``mindvis finetune --a2-data``).

Both stages read a :class:`VoxelCorpus`: one ``[N, V]`` float32 ``.npy`` file, memory-mapped, that holds every
subject's preprocessed samples back to back (each subject normalised with its own training statistics,
padded to a multiple of the patch size, then padded or cropped to the common length ``V``), with a JSON index
of the subjects' row ranges and their fitted preprocessing. :func:`build_corpus` writes it one subject at a
time, so peak memory is one subject, never the whole set; the folder appears complete or not at all.

:class:`MBMDataset` serves rows from that memory map, plus the paper's interpolation augmentation
(``aug_times``) computed on the fly from pairs of rows drawn once per subject, so the augmented set is never
materialised. Each item carries its dataset index, from which :class:`MBMDataModule` derives the masking noise
(:func:`masking_noise`, a function of seed, epoch and index): results do not depend on the number of processes
or workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mindvis.data.dataset import FMRIDataset, VoxelRows
from mindvis.data.formats.common import NpzArchive, check_nan_policy
from mindvis.data.formats.god import god_subject_name, list_god_subjects, load_god
from mindvis.data.hcp import (
    HCP_ROIS,
    hcp_shape,
    hcp_subject_file,
    list_hcp_subjects,
    load_hcp_subject,
    mixup_pairs,
    window_bounds,
)
from mindvis.data.preprocess import (
    NAN_POLICIES,
    NORMALIZE_MODES,
    PAD_MODES,
    TEST_NORMALIZE_MODES,
    FMRIPreprocessor,
    padded_length,
)
from mindvis.data.sampler import EpochShuffleSampler
from mindvis.errors import ConfigError, DataError
from mindvis.utils.io import atomic_dir, read_json, write_json

_logger = logging.getLogger(__name__)

CORPUS_INDEX = "corpus.json"
CORPUS_VOXELS = "voxels.npy"
CORPUS_FORMAT_VERSION = 1

#: Which fMRI of each GOD subject the corpus holds (:attr:`MBMDataConfig.god_fmri`).
GOD_FMRI_CHOICES: tuple[str, ...] = ("train", "train+test", "test")
#: ``pad_mode`` values of the data settings: the preprocessing's, plus ``"auto"`` (see :class:`MBMDataConfig`).
DATA_PAD_MODES: tuple[str, ...] = ("auto", *PAD_MODES)


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


@dataclass
class MBMDataConfig:
    """Which fMRI a masked-brain-model stage trains on, and how it is prepared.

    Args:
        hcp_dir: HCP folder (``HCP/npz/<subject>/HCP_visual_voxel.npz``), or ``None``.
        god_dir: GOD folder (``sbj_N.npz``), or ``None``.
        hcp_subjects: HCP subject folders to use (``None``: all).
        hcp_limit: use only the first this many HCP subjects (sorted by name).
        god_subjects: GOD subjects to use (``None``: all in ``god_dir``).
        hcp_rois: HCP visual areas, concatenated in this order.
        god_roi: GOD ROI mask key.
        window_trs: HCP frames averaged into one sample (10 TRs of 0.72 s, about 8 s).
        include_test_fmri: the older spelling of ``god_fmri="train+test"`` (``mindvis pretrain
            --include-test-fmri``): with ``god_fmri="train"`` it becomes ``"train+test"``; afterwards it is
            True exactly when the corpus holds test-set fMRI.
        god_fmri: which fMRI of each GOD subject the corpus holds. ``"train"`` (the default, and the
            original's stage A1): the training fMRI (``arr_0``). ``"train+test"``: plus the single-trial
            test fMRI (``arr_1``, without images). ``"test"`` (the original's stage A2,
            ``include_nonavg_test=True``): the test fMRI only, the averaged rows (``arr_2``) then the single
            trials (``arr_1``), never the training fMRI. The normalisation is fitted on the training fMRI in
            every case (as the original does). With either test choice the test fMRI is not unseen later.
        normalize: ``"global"``, ``"voxel"`` or ``"none"`` (:class:`~mindvis.data.preprocess.FMRIPreprocessor`).
        test_normalize: how the test-set rows are normalised: ``"train"`` (ours: the training statistics) or
            ``"original"`` (the original code's: the statistics of the normalised training fMRI, about 0 and
            1, so the test fMRI stays nearly as stored; see :mod:`mindvis.data.preprocess`).
        patch_size: voxels per patch.
        pad_mode: ``"wrap"``, ``"constant"``, ``"cut"``, ``"original"`` or ``"auto"`` (the default):
            ``"original"`` when stage A2 starts from an original checkpoint, or from a model whose voxel count
            is the original padding rule's for the subject (a whole extra patch when ``V % p == 0``), else
            ``"wrap"``; the run resolves it before it writes its configuration.
        length: common voxel length (``None``: the longest subject's padded length).
        nan_policy: ``"error"``, ``"zero"`` or ``"drop"`` for NaN/Inf voxels.
        aug_times: size multiplier of the interpolation augmentation (1: none).
        mix_ratio: interpolation weight r of the augmentation.
        val_fraction: fraction of the samples used for validation (0: no validation).
        val_max: at most this many validation samples.
        val_holdout: True (ours): the validation samples are held out of training. False (the original's
            stage A2, which reports the correlation on the data it tunes on): they are drawn from the training
            samples and trained on too, so ``val/corr`` measures the fit to the tuning data, not
            generalisation.
        seed: seed of the validation split and the augmentation pairs.
    """

    hcp_dir: str | None = None
    god_dir: str | None = None
    hcp_subjects: list[str] | None = None
    hcp_limit: int | None = None
    god_subjects: list[str] | None = None
    hcp_rois: list[str] = field(default_factory=lambda: list(HCP_ROIS))
    god_roi: str = "VC"
    window_trs: int = 10
    include_test_fmri: bool = False
    god_fmri: str = "train"
    normalize: str = "global"
    test_normalize: str = "train"
    patch_size: int = 16
    pad_mode: str = "auto"
    length: int | None = None
    nan_policy: str = "error"
    aug_times: float = 1.0
    mix_ratio: float = 0.5
    val_fraction: float = 0.01
    val_max: int = 2000
    val_holdout: bool = True
    seed: int = 2022

    def __post_init__(self) -> None:
        if self.hcp_dir is None and self.god_dir is None:
            raise ConfigError("no training data: give an HCP folder, a GOD folder, or both", field="data")
        for name in ("hcp_dir", "god_dir"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, str(Path(value).expanduser().absolute()))
        for name in ("hcp_subjects", "god_subjects", "hcp_rois"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str):
                    value = [value]
                setattr(self, name, [str(v) for v in value])
        if not self.hcp_rois:
            raise ConfigError("expected at least one HCP area", field="hcp_rois")
        _require_int("window_trs", self.window_trs, 1)
        _require_int("patch_size", self.patch_size, 1)
        _require_int("val_max", self.val_max, 0)
        if self.hcp_limit is not None:
            _require_int("hcp_limit", self.hcp_limit, 1)
        if self.length is not None:
            _require_int("length", self.length, self.patch_size)
            if self.length % self.patch_size:
                raise ConfigError(
                    f"length {self.length} is not a multiple of patch_size {self.patch_size}", field="length"
                )
        for name, choices in (
            ("normalize", NORMALIZE_MODES),
            ("test_normalize", TEST_NORMALIZE_MODES),
            ("pad_mode", DATA_PAD_MODES),
            ("nan_policy", NAN_POLICIES),
            ("god_fmri", GOD_FMRI_CHOICES),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"expected one of {', '.join(choices)}, got {getattr(self, name)!r}", field=name
                )
        if not (isinstance(self.aug_times, (int, float)) and self.aug_times >= 1):
            raise ConfigError(f"expected aug_times >= 1, got {self.aug_times!r}", field="aug_times")
        if not 0.0 <= float(self.mix_ratio) <= 1.0:
            raise ConfigError(f"expected 0 <= mix_ratio <= 1, got {self.mix_ratio!r}", field="mix_ratio")
        if not 0.0 <= float(self.val_fraction) < 1.0:
            raise ConfigError(
                f"expected 0 <= val_fraction < 1, got {self.val_fraction!r}", field="val_fraction"
            )
        self.aug_times = float(self.aug_times)
        self.mix_ratio = float(self.mix_ratio)
        self.val_fraction = float(self.val_fraction)
        if self.include_test_fmri and self.god_fmri == "train":
            self.god_fmri = "train+test"
        self.include_test_fmri = self.god_fmri != "train"
        self.val_holdout = bool(self.val_holdout)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MBMDataConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in names)
        if unknown:
            raise ConfigError(f"unknown field(s) {', '.join(unknown)}", field=f"data.{unknown[0]}")
        return cls(**dict(data))

    @property
    def god_selection(self) -> str:
        """``god_fmri``, with ``include_test_fmri`` set later (an attribute assignment) still counting."""
        return "train+test" if self.god_fmri == "train" and self.include_test_fmri else self.god_fmri

    @property
    def effective_pad_mode(self) -> str:
        """``pad_mode``, with ``"auto"`` unresolved (no pretrained model to match) meaning ``"wrap"``."""
        return "wrap" if self.pad_mode == "auto" else self.pad_mode

    def preprocessor(self, length: int | None) -> FMRIPreprocessor:
        """An unfitted preprocessor with these settings and the common ``length``."""
        return FMRIPreprocessor(
            normalize=self.normalize,  # type: ignore[arg-type]
            patch_size=self.patch_size,
            pad_mode=self.effective_pad_mode,  # type: ignore[arg-type]
            length=length,
            nan_policy=self.nan_policy,  # type: ignore[arg-type]
            test_normalize=self.test_normalize,  # type: ignore[arg-type]
        )

    def corpus_recipe(self) -> dict[str, Any]:
        """The settings that determine the corpus file (everything but split, augmentation and seed)."""
        d = self.to_dict()
        for k in ("aug_times", "mix_ratio", "val_fraction", "val_max", "val_holdout", "seed"):
            d.pop(k)
        d["pad_mode"] = self.effective_pad_mode
        # left out at their defaults, so that corpora prepared before these settings existed are reused
        if self.god_selection != "test":
            d.pop("god_fmri")  # include_test_fmri tells "train" from "train+test"
        if d["test_normalize"] == "train":
            d.pop("test_normalize")
        for k in ("hcp_dir", "god_dir"):
            if d[k] is not None:
                d[k] = str(Path(d[k]).resolve())
        return d


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"expected an integer >= {minimum}, got {value!r}", field=name)


# ----------------------------------------------------------------------------------------------------------
# Planning (headers only) and building
# ----------------------------------------------------------------------------------------------------------


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


def _fingerprint(config: MBMDataConfig, plans: Sequence[SourcePlan], length: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(config.corpus_recipe(), sort_keys=True).encode())
    h.update(str(length).encode())
    for p in plans:
        st = os.stat(p.path)
        h.update(f"{p.name}|{Path(p.path).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


@dataclass
class SubjectBlock:
    """Rows ``[start, stop)`` of a corpus: one subject, training rows first (``[start, train_stop)``)."""

    name: str
    dataset: str
    subject: str
    source: str
    start: int
    train_stop: int
    stop: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class VoxelCorpus(VoxelRows):
    """A built corpus: ``voxels [N, V]`` float32 (read-only memory map) plus its subject index.

    Attributes:
        folder: the corpus folder (``voxels.npy`` and ``corpus.json``).
        voxels: ``[N, V]`` memory map.
        blocks: one :class:`SubjectBlock` per subject, in row order.
        preprocessors: each subject's fitted preprocessing, by block name.
        fingerprint: hash of the recipe and the source files (size, mtime) it was built from.
        recipe: the data settings it was built with.
    """

    folder: Path
    voxels: np.ndarray
    blocks: list[SubjectBlock]
    preprocessors: dict[str, FMRIPreprocessor]
    fingerprint: str
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def voxels_path(self) -> Path:
        return self.folder / CORPUS_VOXELS

    @classmethod
    def open(cls, folder: str | os.PathLike) -> VoxelCorpus:
        """Open a corpus folder written by :func:`build_corpus`.

        Raises:
            DataError: missing or inconsistent files.
        """
        folder = Path(folder)
        index = read_json(folder / CORPUS_INDEX)
        if not isinstance(index, dict) or index.get("_kind") != "mindvis-voxel-corpus":
            raise DataError("not a voxel corpus index", path=folder / CORPUS_INDEX)
        try:
            voxels = np.load(folder / CORPUS_VOXELS, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot map the corpus voxels ({exc})", path=folder / CORPUS_VOXELS) from None
        blocks = [SubjectBlock(**b) for b in index["blocks"]]
        if (
            voxels.ndim != 2
            or voxels.shape[0] != index["num_samples"]
            or voxels.shape[1] != index["num_voxels"]
        ):
            raise DataError(
                f"voxels.npy has shape {voxels.shape}, the index says "
                f"[{index['num_samples']}, {index['num_voxels']}]",
                path=folder,
            )
        pre = {
            name: FMRIPreprocessor.from_dict(d, source=folder / CORPUS_INDEX)
            for name, d in index["preprocessing"]["subjects"].items()
        }
        return cls(folder, voxels, blocks, pre, index["fingerprint"], index.get("recipe", {}))

    def preprocessing_bundle(self) -> dict[str, Any]:
        """JSON of every subject's preprocessing (``{"subjects": {name: ...}, "recipe": ...}``)."""
        return {
            "_class_name": "PreprocessingBundle",
            "_format_version": 1,
            "num_voxels": self.num_voxels,
            "recipe": self.recipe,
            "subjects": {name: p.to_dict() for name, p in self.preprocessors.items()},
        }


def build_corpus(
    config: MBMDataConfig,
    folder: str | os.PathLike,
    plans: Sequence[SourcePlan] | None = None,
    length: int | None = None,
    reuse: bool = True,
) -> VoxelCorpus:
    """Preprocess every subject into one memory-mapped ``[N, V]`` file (see the module documentation).

    Subjects are read, windowed (HCP), checked for NaN/Inf, normalised with statistics fitted on their own
    training rows, padded to the patch size and padded or cropped to the common length, one at a time. Test-set
    rows (``god_fmri``) are normalised by the ``test_normalize`` rule. The folder is built under a temporary
    name and moved into place when complete.

    Args:
        config: data settings.
        folder: the corpus folder to write.
        plans: the result of :func:`plan_sources` (computed if not given).
        length: common voxel length (default :func:`common_length`).
        reuse: return the existing corpus in ``folder`` unchanged when its fingerprint matches.

    Raises:
        DataError: any problem with the input data (nothing is left behind).
    """
    folder = Path(folder)
    plans = list(plans) if plans is not None else plan_sources(config)
    length = int(length) if length is not None else common_length(plans, config)
    fingerprint = _fingerprint(config, plans, length)
    if reuse and (folder / CORPUS_INDEX).is_file():
        try:
            existing = VoxelCorpus.open(folder)
            if existing.fingerprint == fingerprint:
                _logger.info("reusing the prepared data in %s", folder)
                return existing
        except (DataError, ConfigError, KeyError, TypeError):
            pass
    check_nan_policy(config.nan_policy)
    total = sum(p.rows for p in plans)
    _logger.info(
        "preparing %d samples x %d voxels from %d subjects into %s", total, length, len(plans), folder
    )
    blocks: list[SubjectBlock] = []
    preprocessors: dict[str, FMRIPreprocessor] = {}
    with atomic_dir(folder, overwrite=True) as tmp:
        out = np.lib.format.open_memmap(
            tmp / CORPUS_VOXELS, mode="w+", dtype=np.float32, shape=(total, length)
        )
        row = 0
        for i, plan in enumerate(plans):
            fit_rows, train, tests = _load_source(plan, config)
            pre = config.preprocessor(length)
            pre.fit(fit_rows, source=plan.path)
            n_test = sum(len(t) for t in tests)
            if len(train) != plan.train_rows or n_test != plan.test_rows:
                raise DataError(
                    f"read {len(train)}+{n_test} rows, the headers promised {plan.train_rows}+{plan.test_rows}",
                    path=plan.path,
                )
            pre.transform(train, source=plan.path, out=out[row : row + len(train)])
            at = row + len(train)
            for test in tests:
                pre.transform(test, source=plan.path, out=out[at : at + len(test)], split="test")
                at += len(test)
            blocks.append(
                SubjectBlock(
                    plan.name, plan.dataset, plan.subject, plan.path, row, row + len(train), row + plan.rows
                )
            )
            preprocessors[plan.name] = pre
            row += plan.rows
            if (i + 1) % 50 == 0:
                _logger.info("prepared %d of %d subjects", i + 1, len(plans))
        out.flush()
        del out
        write_json(
            tmp / CORPUS_INDEX,
            {
                "_kind": "mindvis-voxel-corpus",
                "_format_version": CORPUS_FORMAT_VERSION,
                "fingerprint": fingerprint,
                "num_samples": total,
                "num_voxels": length,
                "recipe": config.corpus_recipe(),
                "blocks": [b.to_dict() for b in blocks],
                "preprocessing": {"subjects": {n: p.to_dict() for n, p in preprocessors.items()}},
            },
        )
    return VoxelCorpus.open(folder)


def _load_source(plan: SourcePlan, config: MBMDataConfig) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Raw voxels of one subject: ``(fit [n, V_s], train [n', V_s], [test [m, V_s], ...])``: the rows the
    normalisation is fitted on (the training fMRI), the training rows of the corpus (the same, or none under
    ``god_fmri="test"``) and its test-set rows, in corpus order."""
    if plan.dataset == "hcp":
        ds = load_hcp_subject(
            config.hcp_dir,  # type: ignore[arg-type]
            plan.subject,
            rois=config.hcp_rois,
            window=config.window_trs,
            nan_policy=config.nan_policy,
        )
        return ds.voxels, ds.voxels, []

    def god_split(split: str, **kw: Any) -> FMRIDataset:
        return load_god(
            config.god_dir,  # type: ignore[arg-type]
            plan.subject,
            split=split,  # type: ignore[arg-type]
            roi=config.god_roi,
            include_images=False,
            nan_policy=config.nan_policy,  # type: ignore[arg-type]
            **kw,
        )

    train = god_split("train")
    tests = []
    selection = config.god_selection
    averaged = {"train": [], "train+test": [False], "test": [True, False]}[selection]
    for average in averaged:  # the original: np.concatenate([arr_2, arr_1])
        test_ds = god_split("test", average_test=average)
        if test_ds.num_voxels != train.num_voxels:
            raise DataError(
                f"the test split has {test_ds.num_voxels} voxels, the training split {train.num_voxels}",
                path=plan.path,
                field=config.god_roi,
            )
        tests.append(test_ds.voxels)
    corpus_train = train.voxels[:0] if selection == "test" else train.voxels
    return train.voxels, corpus_train, tests


# ----------------------------------------------------------------------------------------------------------
# Masking noise
# ----------------------------------------------------------------------------------------------------------

#: The masking-noise "epoch" used for validation: the same masks every epoch.
VALIDATION_NOISE_KEY = 2**31 - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def masking_noise(seed: int, epoch: int, indices: np.ndarray | Tensor, num_patches: int) -> np.ndarray:
    """Uniform noise in [0, 1) for the masks of samples ``indices`` in ``epoch``: ``[B, L]`` float64.

    A counter-based hash (splitmix64) of ``(seed, epoch, index, patch)``: the same sample gets the same mask
    in the same epoch whatever the batch, process or worker that handles it.
    """
    idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64).astype(
        np.uint64
    )
    with np.errstate(over="ignore"):
        key = _splitmix64(np.asarray([seed], dtype=np.uint64))
        key = _splitmix64(key ^ np.asarray([epoch], dtype=np.uint64))
        per_sample = _splitmix64(key ^ idx)  # [B]
        counter = per_sample[:, None] + np.arange(num_patches, dtype=np.uint64)[None, :] * _GOLDEN
        bits = _splitmix64(counter)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)  # 53-bit mantissa


# ----------------------------------------------------------------------------------------------------------
# Torch datasets
# ----------------------------------------------------------------------------------------------------------


def split_rows(
    corpus: VoxelCorpus, val_fraction: float, val_max: int, seed: int, holdout: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Random ``(train_rows, val_rows)`` of a corpus, each sorted; the validation set is
    ``min(val_max, round(val_fraction * N))`` rows (at least 1 when ``val_fraction > 0`` and N > 1).

    With ``holdout=False`` (the original stage A2's way) the training rows are all rows, the validation rows
    among them: validation then measures the fit to the training data.
    """
    n = corpus.num_samples
    n_val = 0
    if val_fraction > 0 and n > 1:
        n_val = int(min(val_max, max(1, round(val_fraction * n)), n - 1))
    rng = np.random.default_rng([int(seed), 7])
    perm = rng.permutation(n)
    train = np.sort(perm[n_val:]) if holdout else np.arange(n, dtype=perm.dtype)
    return train, np.sort(perm[:n_val])


def augmentation_pairs(
    corpus: VoxelCorpus, train_rows: np.ndarray, aug_times: float, seed: int
) -> np.ndarray:
    """Interpolation pairs ``[M, 2]`` (corpus rows), drawn within each subject among its training rows."""
    if aug_times <= 1:
        return np.zeros((0, 2), dtype=np.int64)
    rng = np.random.default_rng([int(seed), 11])
    out = []
    for b in corpus.blocks:
        lo, hi = np.searchsorted(train_rows, [b.start, b.stop])
        pairs = mixup_pairs(0, aug_times, rng, candidates=train_rows[lo:hi])
        if len(pairs):
            out.append(pairs)
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


class MBMDataset(Dataset):
    """Rows of a memory-mapped ``[N, V]`` voxel file, plus interpolated rows.

    Item ``i < len(rows)`` is ``voxels[rows[i]]``; item ``len(rows) + j`` is
    ``(1 - r) * voxels[pairs[j, 0]] + r * voxels[pairs[j, 1]]``. Items are dicts ``{"fmri": [V] float32,
    "index": i}``. The file is opened lazily in each process (a pickled dataset carries the path, not the data).

    Args:
        voxels_path: the ``.npy`` file (or an in-memory ``[N, V]`` array).
        rows: ``[n]`` rows served as they are.
        pairs: ``[M, 2]`` rows to interpolate (default none).
        ratio: r.
    """

    def __init__(
        self,
        voxels_path: str | os.PathLike | np.ndarray,
        rows: np.ndarray | None = None,
        pairs: np.ndarray | None = None,
        ratio: float = 0.5,
    ):
        if isinstance(voxels_path, np.ndarray):
            self._path, self._voxels = None, voxels_path
        else:
            self._path, self._voxels = str(voxels_path), None
        n = self.voxels.shape[0]
        self.rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.pairs = np.zeros((0, 2), dtype=np.int64) if pairs is None else np.asarray(pairs, dtype=np.int64)
        self.ratio = float(ratio)
        for name, arr in (("rows", self.rows), ("pairs", self.pairs)):
            if arr.size and (arr.min() < 0 or arr.max() >= n):
                raise DataError(f"{name} out of range [0, {n})", path=self._path, field=name)

    @property
    def voxels(self) -> np.ndarray:
        if self._voxels is None:
            self._voxels = np.load(self._path, mmap_mode="r")
        return self._voxels

    @property
    def num_voxels(self) -> int:
        return int(self.voxels.shape[1])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if state["_path"] is not None:
            state["_voxels"] = None
        return state

    def __len__(self) -> int:
        return len(self.rows) + len(self.pairs)

    def fetch(self, indices: np.ndarray) -> np.ndarray:
        """``[B, V]`` float32 for dataset indices ``[B]`` (one sorted read of the memory map)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"index out of range [0, {len(self)})")
        n_plain = len(self.rows)
        mixed = indices >= n_plain
        a = np.empty_like(indices)
        a[~mixed] = self.rows[indices[~mixed]]
        j = indices[mixed] - n_plain
        a[mixed] = self.pairs[j, 0]
        b = self.pairs[j, 1]
        needed = np.unique(np.concatenate([a, b]))  # sorted: one forward pass over the memory map
        block = np.asarray(self.voxels[needed], dtype=np.float32)
        out = block[np.searchsorted(needed, a)]
        if mixed.any():
            r = np.float32(self.ratio)
            out[mixed] = (1 - r) * out[mixed] + r * block[np.searchsorted(needed, b)]
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = self.fetch(np.asarray([i]))[0]
        return {"fmri": torch.from_numpy(x), "index": torch.tensor(int(i), dtype=torch.int64)}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        x = torch.from_numpy(self.fetch(np.asarray(indices)))
        return [
            {"fmri": x[k], "index": torch.tensor(int(i), dtype=torch.int64)} for k, i in enumerate(indices)
        ]


class MBMDataModule(pl.LightningDataModule):
    """Training and validation loaders over a :class:`VoxelCorpus`.

    Args:
        corpus_dir: the corpus folder.
        batch_size: samples per device and step.
        val_fraction, val_max: validation samples (see :func:`split_rows`).
        val_holdout: hold the validation samples out of training (False: validate on training samples).
        aug_times, mix_ratio: interpolation augmentation of the training rows.
        seed: seed of the split, the augmentation pairs, the per-epoch order and the masking noise.
        num_workers: data-loader worker processes.
        num_patches: L; when given, every batch gets ``"noise": [B, L]`` float64 masking noise, a function of
            ``(seed, epoch, index)`` (:func:`masking_noise`); validation batches use one fixed
            key, so each held-out sample is masked the same way in every epoch.
    """

    def __init__(
        self,
        corpus_dir: str | os.PathLike,
        batch_size: int,
        val_fraction: float = 0.01,
        val_max: int = 2000,
        aug_times: float = 1.0,
        mix_ratio: float = 0.5,
        seed: int = 0,
        num_workers: int = 0,
        num_patches: int | None = None,
        val_holdout: bool = True,
    ):
        super().__init__()
        self.num_patches = num_patches
        self.val_holdout = bool(val_holdout)
        self.corpus_dir = Path(corpus_dir)
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self.val_max = int(val_max)
        self.aug_times = float(aug_times)
        self.mix_ratio = float(mix_ratio)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.train_set: MBMDataset | None = None
        self.val_set: MBMDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        corpus = VoxelCorpus.open(self.corpus_dir)
        train_rows, val_rows = split_rows(
            corpus, self.val_fraction, self.val_max, self.seed, holdout=self.val_holdout
        )
        pairs = augmentation_pairs(corpus, train_rows, self.aug_times, self.seed)
        self.train_set = MBMDataset(corpus.voxels_path, train_rows, pairs, self.mix_ratio)
        self.val_set = MBMDataset(corpus.voxels_path, val_rows) if len(val_rows) else None
        _logger.info(
            "training samples: %d (+%d interpolated), validation samples: %d%s, voxels: %d",
            len(train_rows),
            len(pairs),
            len(val_rows),
            "" if self.val_holdout else " (drawn from the training samples, as the original)",
            corpus.num_voxels,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if (
            self.num_patches is None
            or not isinstance(batch, dict)
            or "index" not in batch
            or "noise" in batch
        ):
            return batch
        trainer = self.trainer
        key = trainer.current_epoch if (trainer is not None and trainer.training) else VALIDATION_NOISE_KEY
        batch["noise"] = torch.from_numpy(masking_noise(self.seed, key, batch["index"], self.num_patches))
        return batch

    def _loader(self, ds: MBMDataset, sampler: Any | None) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return self._loader(self.train_set, EpochShuffleSampler(len(self.train_set), self.seed))

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, None)


__all__ = [
    "CORPUS_INDEX",
    "CORPUS_VOXELS",
    "DATA_PAD_MODES",
    "GOD_FMRI_CHOICES",
    "VALIDATION_NOISE_KEY",
    "MBMDataConfig",
    "MBMDataModule",
    "MBMDataset",
    "SourcePlan",
    "SubjectBlock",
    "VoxelCorpus",
    "augmentation_pairs",
    "build_corpus",
    "common_length",
    "masking_noise",
    "plan_sources",
    "split_rows",
]
