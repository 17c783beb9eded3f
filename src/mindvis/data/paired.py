"""Paired fMRI-image samples for MinD-Vis stage B (DC-LDM finetuning), with the paper's augmentations.

MinD-Vis (Chen et al., CVPR 2023) finetunes the latent diffusion model on (fMRI, image) pairs with two
augmentations:

* **Image random crop**: with probability ``crop_p`` (0.5) a square of side ``S - int(crop_ratio * S)``
  (``crop_ratio`` 0.2) is cut at a random place from the ``S``-pixel stimulus, then every image is resized to
  the training resolution (antialiased bilinear, :func:`mindvis.utils.images.resize_tensor`).
* **Sparse voxel dropout**: ``int(sparse_rate * V)`` randomly chosen voxels of each training sample are set to
  zero (``sparse_rate`` 0.2). After the usual normalisation zero is the training mean, so a dropped voxel
  carries no information.

The original implementation's voxel dropout draws its indices from axis 0 of a ``(1, V)`` array, so it picks
``int(0.2 * 1) = 0`` rows and never changes anything. Here the voxels really are dropped; ``sparse_rate=0``
reproduces the original exactly. Evaluation samples (``train=False``) are never augmented: the image is only
resized.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mindvis.data.dataset import FMRIDataset
from mindvis.errors import ConfigError, DataError
from mindvis.utils.images import resize_tensor

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairedAugmentConfig:
    """Augmentation settings of the stage B training set (the paper's values are the defaults).

    Attributes:
        crop_ratio: fraction of the image side removed by the random crop (``int(crop_ratio * S)`` pixels).
        crop_p: probability that an image is cropped.
        sparse_rate: fraction of voxels set to zero in each training sample; 0 turns the dropout off, which
            is what the original implementation effectively does.
    """

    crop_ratio: float = 0.2
    crop_p: float = 0.5
    sparse_rate: float = 0.2

    def __post_init__(self) -> None:
        for name, hi in (("crop_ratio", 1.0), ("crop_p", 1.0), ("sparse_rate", 1.0)):
            value = getattr(self, name)
            closed = name == "crop_p"
            if not isinstance(value, int | float) or not (
                0.0 <= value <= hi if closed else 0.0 <= value < hi
            ):
                raise ConfigError(
                    f"must be a number in [0, 1{']' if closed else ')'}, got {value!r}", field=name
                )


def images_to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float32 ``[..., 3, H, W]`` in ``[-1, 1]``."""
    if isinstance(images, torch.Tensor):
        x = images
    else:  # read-only arrays (memory-mapped npz members) are copied; torch warns on them otherwise
        x = torch.from_numpy(np.require(images, requirements="W"))
    if x.dtype != torch.uint8:
        raise DataError(f"images must be uint8, got {x.dtype}", field="images")
    return x.movedim(-1, -3).to(torch.float32).div(127.5).sub(1.0)


def random_crop(
    image: torch.Tensor, crop_ratio: float, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """With probability ``p``, cut a random ``s x s`` square, ``s = S - int(crop_ratio * S)``, ``S = min(H, W)``.

    Args:
        image: ``[3, H, W]``.
    Returns:
        ``[3, s, s]`` when cropped, else ``image`` unchanged.
    """
    if p <= 0.0 or crop_ratio <= 0.0:
        return image
    if float(torch.rand((), generator=generator)) >= p:
        return image
    h, w = image.shape[-2:]
    side = min(h, w) - int(crop_ratio * min(h, w))
    top = int(torch.randint(0, h - side + 1, (), generator=generator))
    left = int(torch.randint(0, w - side + 1, (), generator=generator))
    return image[..., top : top + side, left : left + side]


def sparse_voxel_dropout(
    voxels: torch.Tensor, rate: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero ``int(rate * V)`` randomly chosen voxels of each sample (a new tensor; the input is not changed).

    Args:
        voxels: ``[V]`` one sample, or ``[B, V]`` a batch, each row with its own choice of voxels.
    Returns:
        the same shape, with exactly ``int(rate * V)`` entries of each sample set to 0.
    """
    n = voxels.shape[-1]
    k = int(rate * n)
    if k == 0:
        return voxels
    out = voxels.clone()
    if voxels.ndim == 2:
        idx = torch.rand(voxels.shape, generator=generator).argsort(dim=1)[:, :k]
        return out.scatter_(1, idx.to(out.device), 0.0)
    idx = torch.randperm(n, generator=generator)[:k]
    out[..., idx] = 0.0
    return out


class PairedFMRIDataset(Dataset):
    """(fMRI, image) pairs for stage B training and validation.

    Args:
        voxels: ``[N, V]`` float32, already preprocessed (normalised, padded to the encoder's voxel count).
        images: ``[M, H, W, 3]`` uint8 stimulus images (one size for all).
        image_ids: ``[N]`` row of ``images`` seen in each sample.
        image_size: output resolution ``S`` (images are resized to ``S x S``).
        labels: ``[N]`` semantic class of each sample (``-1`` unknown), optional.
        train: apply the augmentations (training set) or not (validation / test).
        augment: augmentation settings.
        source: a name for error messages (file or dataset).

    Items are dicts: ``fmri`` ``[V]`` float32, ``image`` ``[3, S, S]`` float32 in ``[-1, 1]``, ``label``
    int64, ``index`` int64 (the sample's row).
    """

    def __init__(
        self,
        voxels: np.ndarray,
        images: np.ndarray,
        image_ids: np.ndarray,
        image_size: int,
        labels: np.ndarray | None = None,
        train: bool = True,
        augment: PairedAugmentConfig | None = None,
        source: str | None = None,
    ) -> None:
        where = source or "paired dataset"
        voxels = np.asarray(voxels)
        image_ids = np.asarray(image_ids)
        if voxels.ndim != 2:
            raise DataError(
                f"voxels must be [samples, voxels], got shape {voxels.shape}", path=where, field="voxels"
            )
        if voxels.shape[0] == 0:
            raise DataError("the split is empty (0 samples)", path=where, field="voxels")
        if image_ids.ndim != 1 or image_ids.shape[0] != voxels.shape[0]:
            raise DataError(
                f"image/fMRI count mismatch: {voxels.shape[0]} fMRI samples but image_ids has "
                f"shape {image_ids.shape}",
                path=where,
                field="image_ids",
            )
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3:
            shape = getattr(images, "shape", None)
            raise DataError(
                f"images must be one uint8 array [M, H, W, 3] of equal-size images, got {shape}",
                path=where,
                field="images",
            )
        if images.dtype != np.uint8:
            raise DataError(f"images must be uint8, got {images.dtype}", path=where, field="images")
        if len(images) == 0:
            raise DataError("no images", path=where, field="images")
        if image_ids.min() < 0 or image_ids.max() >= len(images):
            raise DataError(
                f"image_ids must index the {len(images)} images, got range "
                f"[{image_ids.min()}, {image_ids.max()}]",
                path=where,
                field="image_ids",
            )
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (voxels.shape[0],):
                raise DataError(
                    f"labels must have one entry per sample ({voxels.shape[0]}), got {labels.shape}",
                    path=where,
                    field="labels",
                )
        if not np.all(np.isfinite(voxels)):
            raise DataError("voxels contain NaN or infinite values", path=where, field="voxels")
        if image_size <= 0:
            raise ConfigError(f"image_size must be positive, got {image_size}", field="image_size")
        self.voxels = torch.as_tensor(np.ascontiguousarray(voxels, dtype=np.float32))
        self.images = images
        self.image_ids = torch.as_tensor(image_ids.astype(np.int64))
        self.labels = None if labels is None else torch.as_tensor(labels.astype(np.int64))
        self.image_size = int(image_size)
        self.train = train
        self.augment = augment or PairedAugmentConfig()
        self.source = where

    @classmethod
    def from_fmri_dataset(
        cls,
        dataset: FMRIDataset,
        image_size: int,
        voxels: np.ndarray | None = None,
        train: bool = True,
        augment: PairedAugmentConfig | None = None,
    ) -> PairedFMRIDataset:
        """Pairs of an :class:`FMRIDataset` with images; ``voxels`` replaces its voxels (e.g. preprocessed)."""
        where = dataset.source or f"{dataset.subject}/{dataset.split}"
        if not dataset.paired:
            raise DataError(
                "the dataset has no paired images (image_ids and images are required for stage B)",
                path=where,
                field="images",
            )
        vox = dataset.voxels if voxels is None else voxels
        if len(vox) != dataset.num_samples:
            raise DataError(
                f"image/fMRI count mismatch: {len(vox)} voxel rows for {dataset.num_samples} paired samples",
                path=where,
                field="voxels",
            )
        return cls(
            vox,
            dataset.images,
            dataset.image_ids,
            image_size,
            labels=dataset.labels,
            train=train,
            augment=augment,
            source=where,
        )

    @property
    def num_voxels(self) -> int:
        return int(self.voxels.shape[1])

    def __len__(self) -> int:
        return int(self.voxels.shape[0])

    def image(self, i: int) -> torch.Tensor:
        """The un-augmented image of sample ``i``: ``[3, S, S]`` in ``[-1, 1]``."""
        return resize_tensor(images_to_tensor(self.images[int(self.image_ids[i])]), self.image_size)

    def ground_truth(self) -> np.ndarray:
        """``[N, S, S, 3]`` uint8: the image each sample saw, resized to the training resolution."""
        x = resize_tensor(images_to_tensor(self.images[self.image_ids.numpy()]), self.image_size)
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(1, -1).numpy()

    def __getitem__(self, i: int) -> dict[str, Any]:
        fmri = self.voxels[i]
        img = images_to_tensor(self.images[int(self.image_ids[i])])
        if self.train:
            img = random_crop(img, self.augment.crop_ratio, self.augment.crop_p)
            fmri = sparse_voxel_dropout(fmri, self.augment.sparse_rate)
        img = resize_tensor(img, self.image_size)
        label = -1 if self.labels is None else int(self.labels[i])
        return {"fmri": fmri, "image": img, "label": torch.tensor(label), "index": torch.tensor(i)}


def check_image_sizes(images: list[np.ndarray], source: str = "images") -> tuple[int, int]:
    """Return the common ``(H, W)`` of a list of ``[H, W, 3]`` images or raise :class:`DataError` naming a mismatch."""
    if not images:
        raise DataError("no images", path=source)
    first = images[0].shape[:2]
    for i, im in enumerate(images):
        if im.shape[:2] != first:
            raise DataError(
                f"images have mixed sizes: image 0 is {first[0]}x{first[1]}, image {i} is "
                f"{im.shape[0]}x{im.shape[1]} (resize them to one size first)",
                path=source,
                field="images",
            )
    return int(first[0]), int(first[1])


def latent_side(image_size: int, downsample: int) -> int:
    """Latent side of an ``image_size`` image under a VQ with total downsampling ``downsample``."""
    if image_size % downsample:
        raise ConfigError(
            f"image size {image_size} is not a multiple of the autoencoder's downsampling "
            f"factor {downsample}",
            field="image_size",
        )
    return image_size // downsample
