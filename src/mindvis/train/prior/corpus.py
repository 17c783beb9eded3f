"""The image corpus the prior trains on: loading it from a stimulus ``.npz`` or an image folder, and the
dataset of its ``(image, label)`` items."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mindvis.data.formats.common import NpzArchive
from mindvis.errors import DataError
from mindvis.utils.images import IMAGE_EXTENSIONS, center_crop_square, images_to_model, resize_images

_logger = logging.getLogger(__name__)


@dataclass
class ImageCorpus:
    """Images for prior training.

    Attributes:
        images: ``[M, S, S, 3]`` uint8.
        labels: ``[M]`` int64 class index in ``[0, len(class_names))``.
        class_names: one name per class.
        source: where the images came from.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise DataError(
                f"images must be uint8 [M, H, W, 3], got {self.images.dtype} {self.images.shape}",
                path=self.source,
                field="images",
            )
        if len(self.images) == 0:
            raise DataError("the corpus has no images", path=self.source, field="images")
        if self.labels.shape != (len(self.images),):
            raise DataError(
                f"image/label count mismatch: {len(self.images)} images, labels of shape {self.labels.shape}",
                path=self.source,
                field="labels",
            )
        if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
            raise DataError(
                f"labels must lie in [0, {len(self.class_names)}), got range "
                f"[{self.labels.min()}, {self.labels.max()}]",
                path=self.source,
                field="labels",
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])

    def subset(self, index: np.ndarray) -> ImageCorpus:
        return ImageCorpus(self.images[index], self.labels[index], list(self.class_names), self.source)

    def split(self, holdout: float, seed: int) -> tuple[ImageCorpus, ImageCorpus]:
        """Random ``(train, held-out)`` split with ``round(holdout * M)`` held-out images (at least one)."""
        m = len(self.images)
        n_hold = max(1, int(round(holdout * m)))
        if m - n_hold < 1:
            raise DataError(f"too few images ({m}) to hold out {n_hold} for validation", path=self.source)
        perm = np.random.default_rng(seed).permutation(m)
        return self.subset(np.sort(perm[n_hold:])), self.subset(np.sort(perm[:n_hold]))


def load_image_corpus(
    path: str | os.PathLike, resolution: int | None = None, resize_mixed: bool = False
) -> ImageCorpus:
    """Load a prior-training corpus from a stimulus ``.npz`` or an image folder.

    * ``.npz`` (as the SynthCortex simulator writes ``stimuli/corpus.npz``): ``images`` ``[M, H, W, 3]``
      uint8, ``labels`` ``[M]`` and ``class_names`` (both optional: without labels every image is class 0).
    * a folder: either one sub-folder per class (the sub-folder names, sorted, are the classes) or image files
      directly (one class). Files are read with Pillow and converted to RGB.

    Images of mixed sizes are an error unless ``resize_mixed`` is set; then every image is centre-cropped to a
    square and resized to ``resolution`` (or to the first image's size) with a warning. A corpus of one size
    that differs from ``resolution`` is resized to it (the training resolution), logged at info level.
    Non-square images are centre-cropped to a square.

    Returns:
        An :class:`ImageCorpus` with ``[M, S, S, 3]`` images.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("not found (expected a corpus .npz or an image folder)", path=path)
    if path.is_file():
        images, labels, class_names = _read_corpus_npz(path)
        side = images.shape[1]
        if images.shape[2] == side and (resolution is None or resolution == side):
            # one size already at the training resolution: keep the memory-mapped array as it is
            return ImageCorpus(images, labels.astype(np.int64), class_names, str(path))
        image_list = list(images)
    else:
        image_list, labels, class_names, names = _read_image_folder(path)
    sizes = {im.shape[:2] for im in image_list}
    if len(sizes) > 1 and not resize_mixed:
        listed = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:4])
        raise DataError(
            f"images have mixed sizes ({listed}); pass --resize-mixed to centre-crop and resize "
            "them to one size",
            path=path,
            field="images",
        )
    target = resolution or min(min(s) for s in sizes)
    changed = sum(1 for im in image_list if im.shape[:2] != (target, target))
    if changed:
        log = _logger.warning if len(sizes) > 1 else _logger.info
        log(
            "%s: %d of %d images centre-cropped/resized to %dx%d",
            path,
            changed,
            len(image_list),
            target,
            target,
        )
        image_list = [resize_images(center_crop_square(im), target) for im in image_list]
    stacked = np.ascontiguousarray(np.stack(image_list).astype(np.uint8, copy=False))
    return ImageCorpus(stacked, labels.astype(np.int64), class_names, str(path))


def _read_corpus_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    # the images are memory-mapped (uncompressed members, as the simulator writes them): a corpus of any
    # size is read from disk as batches need it, not loaded whole
    try:
        with NpzArchive(path) as z:
            if "images" not in z:
                raise DataError(f"no 'images' array (keys: {', '.join(z.keys)})", path=path, field="images")
            images = z.get("images")
            labels = np.asarray(z.get("labels", mmap=False)) if "labels" in z else None
            names = [str(n) for n in z.get("class_names", mmap=False)] if "class_names" in z else None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read as .npz ({exc})", path=path) from None
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(
            f"expected uint8 [M, H, W, 3], got {images.dtype} {images.shape}", path=path, field="images"
        )
    if labels is None:
        _logger.warning("%s: no 'labels' array; every image is class 0", path)
        labels = np.zeros(len(images), np.int64)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"image/label count mismatch: {len(images)} images, labels {labels.dtype} {labels.shape}",
            path=path,
            field="labels",
        )
    if names is None:
        names = [f"class_{i}" for i in range(int(labels.max()) + 1 if len(labels) else 1)]
    return images, labels, names


def _read_image_folder(path: Path) -> tuple[list[np.ndarray], np.ndarray, list[str], list[str]]:
    from PIL import Image

    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = (
        [(d.name, sorted(d.iterdir())) for d in subdirs] if subdirs else [(path.name, sorted(path.iterdir()))]
    )
    images, labels, names, classes = [], [], [], []
    for cls, files in groups:
        files = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            continue
        for f in files:
            try:
                with Image.open(f) as im:
                    images.append(np.asarray(im.convert("RGB")))
            except OSError as exc:
                raise DataError(f"cannot read image ({exc})", path=f) from None
            labels.append(len(classes))
            names.append(str(f))
        classes.append(cls)
    if not images:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found", path=path)
    return images, np.asarray(labels, np.int64), classes, names


class ImageLabelDataset(torch.utils.data.Dataset):
    """Items ``(image [3, S, S] in [-1, 1], label)`` of an :class:`ImageCorpus`, with optional horizontal flips."""

    def __init__(self, corpus: ImageCorpus, flip: bool = False) -> None:
        self.corpus = corpus
        self.flip = flip

    def __len__(self) -> int:
        return len(self.corpus.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = images_to_model(self.corpus.images[i : i + 1])[0]
        if self.flip and float(torch.rand(())) < 0.5:
            x = x.flip(-1)
        return x, torch.tensor(int(self.corpus.labels[i]))
