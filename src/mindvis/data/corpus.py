"""The voxel corpus that stages A1 and A2 of masked brain modeling (MinD-Vis) read.

A :class:`VoxelCorpus` is one ``[N, V]`` float32 ``.npy`` file, memory-mapped, that holds every subject's
preprocessed samples back to back (each subject normalised with its own training statistics, padded to a
multiple of the patch size, then padded or cropped to the common length ``V``), with a JSON index of the
subjects' row ranges (:class:`SubjectBlock`) and their fitted preprocessing. :func:`build_corpus` writes it
one subject at a time, so peak memory is one subject, never the whole set; the folder appears complete or not
at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mindvis.data.corpus_plan import SourcePlan, common_length, plan_sources
from mindvis.data.dataset import FMRIDataset, VoxelRows
from mindvis.data.formats.common import check_nan_policy
from mindvis.data.formats.god import load_god
from mindvis.data.hcp import load_hcp_subject
from mindvis.data.preprocessor import FMRIPreprocessor
from mindvis.data.pretrain_config import MBMDataConfig
from mindvis.errors import ConfigError, DataError
from mindvis.utils.io import atomic_dir, read_json, write_json

_logger = logging.getLogger(__name__)

CORPUS_INDEX = "corpus.json"
CORPUS_VOXELS = "voxels.npy"
CORPUS_FORMAT_VERSION = 1


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


__all__ = [
    "CORPUS_INDEX",
    "CORPUS_VOXELS",
    "SubjectBlock",
    "VoxelCorpus",
    "build_corpus",
]
