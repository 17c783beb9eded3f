"""The data settings of masked brain modeling (MinD-Vis stage A, Chen et al., CVPR 2023).

Stage A1 pretrains on unlabeled fMRI of many subjects: HCP resting state (windows of about 8 s averaged into
samples, see :mod:`mindvis.data.hcp`) plus the GOD subjects' training fMRI, about 136k samples of about 4.6k
voxels in the paper. Stage A2 tunes on the target subject's fMRI alone: which of its fMRI is
:attr:`MBMDataConfig.god_fmri` (the original, ``stageA2_mbm_finetune.py``, tunes on the subject's *test* fMRI
only, the averaged and the single-trial rows; ``mindvis finetune --a2-data``).

:class:`MBMDataConfig` says which subjects and which of their fMRI a stage trains on, how they are
preprocessed, and how they are split and augmented; :meth:`MBMDataConfig.corpus_recipe` is the part of it that
determines the corpus file (:mod:`mindvis.data.corpus`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mindvis.data.hcp import HCP_ROIS
from mindvis.data.padding import PAD_MODES
from mindvis.data.preprocessor import NAN_POLICIES, NORMALIZE_MODES, TEST_NORMALIZE_MODES, FMRIPreprocessor
from mindvis.errors import ConfigError

#: Which fMRI of each GOD subject the corpus holds (:attr:`MBMDataConfig.god_fmri`).
GOD_FMRI_CHOICES: tuple[str, ...] = ("train", "train+test", "test")
#: ``pad_mode`` values of the data settings: the preprocessing's, plus ``"auto"`` (see :class:`MBMDataConfig`).
DATA_PAD_MODES: tuple[str, ...] = ("auto", *PAD_MODES)


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
        normalize: ``"global"``, ``"voxel"`` or ``"none"``
            (:class:`~mindvis.data.preprocessor.FMRIPreprocessor`).
        test_normalize: how the test-set rows are normalised: ``"train"`` (ours: the training statistics) or
            ``"original"`` (the original code's: the statistics of the normalised training fMRI, about 0 and
            1, so the test fMRI stays nearly as stored; see :mod:`mindvis.data.preprocessor`).
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


__all__ = [
    "DATA_PAD_MODES",
    "GOD_FMRI_CHOICES",
    "MBMDataConfig",
]
