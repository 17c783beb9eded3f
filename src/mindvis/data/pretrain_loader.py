"""The training and validation data of masked brain modeling (MinD-Vis stage A), served from a voxel corpus.

:func:`split_rows` splits the rows of a :class:`~mindvis.data.corpus.VoxelCorpus` into training and validation
rows, and :func:`augmentation_pairs` draws the row pairs of the paper's interpolation augmentation
(``aug_times``) within each subject's training rows. :class:`MBMDataset` serves rows from the corpus's memory
map, with the interpolated rows computed on the fly, so the augmented set is never materialised. Each item
carries its dataset index, from which :class:`MBMDataModule` derives the masking noise
(:func:`~mindvis.data.mask_noise.masking_noise`, a function of seed, epoch and index): results do not depend
on the number of processes or workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mindvis.data.corpus import VoxelCorpus
from mindvis.data.hcp import mixup_pairs
from mindvis.data.mask_noise import VALIDATION_NOISE_KEY, masking_noise
from mindvis.data.sampler import EpochShuffleSampler
from mindvis.errors import DataError

_logger = logging.getLogger(__name__)


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
    "MBMDataModule",
    "MBMDataset",
    "augmentation_pairs",
    "split_rows",
]
