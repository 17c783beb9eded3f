"""The common form every reader produces: :class:`FMRIDataset`.

One dataset is one subject and one split. Voxels are ``[N, V]`` float32 (possibly a read-only memory map);
trial ``i`` saw image ``images[image_ids[i]]`` when images are known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mindvis.errors import DataError

Split = Literal["train", "test", "imagery", "rest"]


class VoxelRows:
    """Sizes of a ``voxels: [N, V]`` matrix held as an attribute: one row per sample, one column per voxel."""

    voxels: np.ndarray

    @property
    def num_samples(self) -> int:
        return int(self.voxels.shape[0])

    @property
    def num_voxels(self) -> int:
        return int(self.voxels.shape[1])


@dataclass
class FMRIDataset(VoxelRows):
    """fMRI samples of one subject and one split, with the images they pair with.

    Attributes:
        voxels: ``[N, V]`` float32 responses, one row per sample (a trial, or an average of repeats).
        subject: subject name, e.g. ``"sbj_3"`` or ``"CSI1"``.
        split: ``"train"``, ``"test"``, ``"imagery"`` or ``"rest"`` (unpaired resting state).
        image_ids: ``[N]`` int64 row of ``images`` each sample saw, or ``None`` when unpaired.
        images: ``[M, H, W, 3]`` uint8 stimulus images, or ``None``.
        labels: ``[N]`` int64 semantic class of each sample's image (``-1`` unknown), or ``None``.
        repeats: ``[N]`` int64 number of repeats averaged into each row (1 for single trials), or ``None``.
        roi: name of the ROI the voxels come from (e.g. ``"VC"``), if known.
        source: where the data came from (file or folder), for messages.
        meta: free-form extra information (class names, TR, original keys...).
    """

    voxels: np.ndarray
    subject: str
    split: Split
    image_ids: np.ndarray | None = None
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    repeats: np.ndarray | None = None
    roi: str | None = None
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = self.source or f"{self.subject}/{self.split}"
        if self.voxels.ndim != 2:
            raise DataError(
                f"voxels must be 2-D [samples, voxels], got shape {tuple(self.voxels.shape)}",
                path=where,
                field="voxels",
            )
        n = self.voxels.shape[0]
        for name in ("image_ids", "labels", "repeats"):
            arr = getattr(self, name)
            if arr is not None and (arr.ndim != 1 or arr.shape[0] != n):
                raise DataError(
                    f"{name} must have one entry per sample ({n}), got shape {tuple(arr.shape)}",
                    path=where,
                    field=name,
                )
        if self.images is not None and (
            self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8
        ):
            raise DataError(
                f"images must be uint8 [M, H, W, 3], got {self.images.dtype} {tuple(self.images.shape)}",
                path=where,
                field="images",
            )
        if self.image_ids is not None and self.images is not None and n:
            lo, hi = int(self.image_ids.min()), int(self.image_ids.max())
            if lo < 0 or hi >= len(self.images):
                raise DataError(
                    f"image_ids out of range [0, {len(self.images)}): min {lo}, max {hi}",
                    path=where,
                    field="image_ids",
                )

    @property
    def paired(self) -> bool:
        return self.image_ids is not None and self.images is not None

    def __len__(self) -> int:
        return self.num_samples

    def sample_images(self) -> np.ndarray:
        """``[N, H, W, 3]`` uint8: the image each sample saw, in sample order."""
        if not self.paired:
            raise DataError("this dataset has no paired images", path=self.source or self.subject)
        return self.images[self.image_ids]

    def subset(self, index: np.ndarray | slice) -> FMRIDataset:
        """Rows ``index`` of this dataset (images are shared, not copied)."""

        def pick(a):
            return None if a is None else a[index]

        return FMRIDataset(
            voxels=self.voxels[index],
            subject=self.subject,
            split=self.split,
            image_ids=pick(self.image_ids),
            images=self.images,
            labels=pick(self.labels),
            repeats=pick(self.repeats),
            roi=self.roi,
            source=self.source,
            meta=dict(self.meta),
        )

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description for ``mindvis data info`` and logs."""
        out: dict[str, Any] = {
            "subject": self.subject,
            "split": self.split,
            "samples": self.num_samples,
            "voxels": self.num_voxels,
            "roi": self.roi,
            "paired": self.paired,
        }
        if self.images is not None:
            out["images"] = int(len(self.images))
            out["image_size"] = list(self.images.shape[1:3])
        if self.repeats is not None and len(self.repeats):
            out["repeats"] = int(np.max(self.repeats))
        return out
