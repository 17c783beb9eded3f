"""Stimulus images for SynthCortex: labelled objects composited over natural textures.

Each stimulus is an object silhouette (Fashion-MNIST or Animal-MNIST), scaled, positioned and coloured at
random, composited over a crop of a natural photograph or texture from scikit-image. The result carries
object semantics (10 classes), colour, texture and a background, which is what makes real stimuli hard.
A user's folder of images can stand in for the composited set.

Sources and where they are looked for:

* ``fashion-mnist``: IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in the folder named by
  ``$MINDVIS_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``),
  else a cache (``$MINDVIS_DATA/fashion-mnist`` or ``~/.cache/mindvis/fashion-mnist``) that torchvision's
  download fills when the machine is online (set ``MINDVIS_OFFLINE=1`` to skip the download).
  Train and test objects come from the dataset's own 60k/10k split.
* ``animal-mnist``: the gzip-pickled arrays of the ``animal_mnist`` package (or ``$MINDVIS_ANIMAL_MNIST``),
  read by a restricted unpickler that builds numpy arrays only. The package has no split; the last sixth of
  each class (in file order) is the test split.
* ``fashion+animal``: both of the above as one 20-class source (Fashion-MNIST's 10 classes, then
  Animal-MNIST's 10); each source keeps its own train/test split, so the splits stay disjoint.
* ``folder:PATH`` (or a path to an existing folder): the user's images, one subfolder per class (a flat folder
  is one class). ``train/`` and ``test/`` subfolders are used as the split when present; otherwise each file
  is assigned to a split by a hash of its relative path (one in six to test). Folder images are used whole
  (centre-cropped and resized), not composited.
* The scikit-image photos (astronaut, brick, coffee, grass, gravel, ...) are the backgrounds.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from mindvis.errors import ConfigError, DataError
from mindvis.safeload import NumpyUnpickler

if TYPE_CHECKING:
    import torch

_logger = logging.getLogger(__name__)

Split = Literal["train", "test"]

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Animal-MNIST ships labels 0..9 without names; these are the classes its description lists, in order.
ANIMAL_MNIST_CLASSES = ("Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra")
ANIMAL_MNIST_FILES = ("animal_data_version_3.gz", "animal_label_version_3.gz")
#: scikit-image photos used as backgrounds (all ship with scikit-image; none needs a download).
TEXTURE_NAMES = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "rocket",
    "clock",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
SOURCES = ("fashion-mnist", "animal-mnist", "fashion+animal", "folder:PATH")
#: combined sources: name -> the single sources whose classes are concatenated, in order
COMBINED_SOURCES = {"fashion+animal": ("fashion-mnist", "animal-mnist")}
#: side of the canonical object-shape descriptor (a 7x7 silhouette, see :class:`StimulusSet`)
SHAPE_SIDE = 7


@dataclass(frozen=True)
class ObjectBank:
    """Object images of one source and split.

    Attributes:
        images: ``[N, h, w]`` uint8 grey objects on black (intensity doubles as opacity), or, for a folder
            source, ``[N, h, w, 3]`` uint8 whole photographs.
        labels: ``[N]`` int64 class ids.
        class_names: name of each class id.
        source: source name, e.g. ``"fashion-mnist"``.
        split: ``"train"`` or ``"test"``.
        composite: True when objects are composited over textures (MNIST-style sources).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str
    split: str
    composite: bool = True

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class StimulusSet:
    """Composited stimuli and how each was made.

    Attributes:
        images: ``[n, H, W, 3]`` uint8 stimuli.
        labels: ``[n]`` int64 class ids.
        class_names: name of each class id.
        object_index: ``[n]`` int64 row of the source split's object each image shows.
        shape: ``[n, 49]`` float32 position-, size- and colour-invariant object shape (the object's 7x7
            silhouette, centred and scaled to unit RMS); the input of the simulator's shape-tuned voxels.
        center: ``[n, 2]`` float32 object centre (x, y) as a fraction of the image width from its centre
            (x right, y up); 0 for folder images.
        scale: ``[n]`` float32 object box size as a fraction of the image width (1 for folder images).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    object_index: np.ndarray
    shape: np.ndarray
    center: np.ndarray
    scale: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


# --------------------------------------------------------------------------------------------------------
# Fashion-MNIST


def _read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzip or raw) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file ({type(exc).__name__}: {exc})", path=path) from None
    if len(raw) < 8:
        raise DataError("truncated IDX file (no header)", path=path)
    zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise DataError("not an IDX file of unsigned bytes (bad magic number)", path=path)
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"IDX size mismatch: header says {dims}, found {data.size} values", path=path)
    return data.reshape(dims)


def _idx_files(folder: Path, split: Split) -> tuple[Path, Path] | None:
    prefix = "train" if split == "train" else "t10k"
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        cands = [folder / f"{prefix}-{kind}.gz", folder / f"{prefix}-{kind}"]
        hit = next((c for c in cands if c.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def _cache_dir(name: str) -> Path:
    root = os.environ.get("MINDVIS_DATA")
    base = Path(root) if root else Path.home() / ".cache" / "mindvis"
    return base / name


def fashion_mnist_folder() -> Path:
    """The folder holding the Fashion-MNIST IDX files, downloading them with torchvision if needed.

    Raises:
        DataError: no folder holds the files and they cannot be downloaded; the message names the places
            looked in and how to install the data.
    """
    explicit = os.environ.get("MINDVIS_FASHION_MNIST")
    if explicit:
        folder = Path(explicit)
        if _idx_files(folder, "train") and _idx_files(folder, "test"):
            return folder
        raise DataError(
            "Fashion-MNIST IDX files not found (expected train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; "
            "set by $MINDVIS_FASHION_MNIST)",
            path=folder,
        )
    cache = _cache_dir("fashion-mnist")
    candidates = [FASHION_MNIST_SYSTEM_DIR, cache, cache / "FashionMNIST" / "raw"]
    for folder in candidates:
        if _idx_files(folder, "train") and _idx_files(folder, "test"):
            return folder
    why = "download disabled by MINDVIS_OFFLINE"
    if not os.environ.get("MINDVIS_OFFLINE"):
        why = _download_fashion_mnist(cache)
        raw = cache / "FashionMNIST" / "raw"
        if why is None and _idx_files(raw, "train") and _idx_files(raw, "test"):
            return raw
    raise DataError(
        f"Fashion-MNIST not found in {FASHION_MNIST_SYSTEM_DIR} or {cache} and {why}; install it with "
        "`apt-get install -y dataset-fashion-mnist`, or point $MINDVIS_FASHION_MNIST at a folder with the IDX files",
        path=FASHION_MNIST_SYSTEM_DIR,
    )


def _download_fashion_mnist(cache: Path) -> str | None:
    """Try torchvision's download into ``cache``; returns None on success, else why it failed."""
    import socket

    _logger.info("Fashion-MNIST not installed; trying torchvision's download into %s", cache)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        from torchvision.datasets import FashionMNIST

        cache.mkdir(parents=True, exist_ok=True)
        FashionMNIST(str(cache), train=True, download=True)
        FashionMNIST(str(cache), train=False, download=True)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not available offline"
        return f"the torchvision download failed ({type(exc).__name__}: {str(exc)[:120]})"
    finally:
        socket.setdefaulttimeout(old)


@lru_cache(maxsize=4)
def _load_fashion_mnist(folder: str, split: Split) -> ObjectBank:
    files = _idx_files(Path(folder), split)
    if files is None:
        raise DataError(f"Fashion-MNIST {split} IDX files not found", path=folder)
    images = _read_idx(files[0])
    labels = _read_idx(files[1]).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"expected images [N,28,28] and labels [N], got {images.shape} and {labels.shape}", path=files[0]
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise DataError("labels outside 0..9", path=files[1])
    images.setflags(write=False)
    labels.setflags(write=False)
    return ObjectBank(images, labels, FASHION_MNIST_CLASSES, "fashion-mnist", split)


# --------------------------------------------------------------------------------------------------------
# Animal-MNIST


def animal_mnist_folder() -> Path:
    """The folder holding Animal-MNIST's two gzip files: ``$MINDVIS_ANIMAL_MNIST``, else mindvis's cache
    (``animal-mnist`` under ``$MINDVIS_DATA`` or ``~/.cache/mindvis``, filled by ``scripts/get-stimuli.sh``), else
    the installed package.

    The package is located without importing it (its modules import TensorFlow).
    """
    explicit = os.environ.get("MINDVIS_ANIMAL_MNIST")
    cached = _cache_dir("animal-mnist")
    if explicit:
        folder = Path(explicit)
    elif all((cached / f).is_file() for f in ANIMAL_MNIST_FILES):
        folder = cached
    else:
        spec = importlib.util.find_spec("animal_mnist")
        if spec is None or not spec.submodule_search_locations:
            raise DataError(
                f"Animal-MNIST's files are not in {cached} (run `make data` or scripts/get-stimuli.sh), the "
                "package is not installed, and $MINDVIS_ANIMAL_MNIST is not set",
                path="animal_mnist",
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    missing = [f for f in ANIMAL_MNIST_FILES if not (folder / f).is_file()]
    if missing:
        raise DataError(f"Animal-MNIST files missing: {', '.join(missing)}", path=folder)
    return folder


def _read_gzip_pickled_array(path: Path) -> np.ndarray:
    import pickle

    try:
        with gzip.open(path, "rb") as fh:
            obj = NumpyUnpickler(fh, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"refused to load pickle: {exc}", path=path) from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise DataError(f"truncated or corrupt file ({type(exc).__name__}: {exc})", path=path) from None
    if not isinstance(obj, np.ndarray):
        raise DataError(f"expected a pickled numpy array, got {type(obj).__name__}", path=path)
    return obj


@lru_cache(maxsize=4)
def _load_animal_mnist(folder: str, split: Split) -> ObjectBank:
    folder_p = Path(folder)
    images = _read_gzip_pickled_array(folder_p / ANIMAL_MNIST_FILES[0])
    labels = _read_gzip_pickled_array(folder_p / ANIMAL_MNIST_FILES[1]).astype(np.int64).reshape(-1)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"expected images [N,h,w] matching labels [N], got {images.shape} and {labels.shape}",
            path=folder_p / ANIMAL_MNIST_FILES[0],
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(ANIMAL_MNIST_CLASSES)):
        raise DataError("labels outside 0..9", path=folder_p / ANIMAL_MNIST_FILES[1])
    images = images.astype(np.uint8, copy=False)
    # no official split: within each class, the last sixth (file order) is the test split
    rank = np.zeros(len(labels), dtype=np.int64)
    count = np.bincount(labels, minlength=len(ANIMAL_MNIST_CLASSES))
    for c in range(len(ANIMAL_MNIST_CLASSES)):
        rank[labels == c] = np.arange(count[c])
    is_test = rank >= count[labels] - count[labels] // 6
    keep = is_test if split == "test" else ~is_test
    imgs, labs = images[keep], labels[keep]
    imgs.setflags(write=False)
    labs.setflags(write=False)
    return ObjectBank(imgs, labs, ANIMAL_MNIST_CLASSES, "animal-mnist", split)


# --------------------------------------------------------------------------------------------------------
# A user's image folder


def _folder_split(rel: str) -> Split:
    digest = hashlib.sha1(rel.encode("utf-8")).digest()
    return "test" if digest[0] % 6 == 0 else "train"


@lru_cache(maxsize=4)
def _load_image_folder(folder: str, split: Split, resolution: int) -> ObjectBank:
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise DataError("image folder not found", path=root)
    split_root = root / split
    explicit_split = (root / "train").is_dir() and (root / "test").is_dir()
    base = split_root if explicit_split else root
    files = sorted(p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not explicit_split:
        files = [p for p in files if _folder_split(p.relative_to(root).as_posix()) == split]
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) for the {split} split", path=base)
    classes = sorted({p.parent.relative_to(base).as_posix() for p in files})
    if explicit_split:
        # class names from both splits, so that ids agree between them
        other = root / ("test" if split == "train" else "train")
        classes = sorted(
            set(classes)
            | {
                p.parent.relative_to(other).as_posix()
                for p in other.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES
            }
        )
    class_id = {c: i for i, c in enumerate(classes)}
    images = np.empty((len(files), resolution, resolution, 3), dtype=np.uint8)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                w, h = im.size
                side = min(w, h)
                left, top = (w - side) // 2, (h - side) // 2
                im = im.crop((left, top, left + side, top + side)).resize(
                    (resolution, resolution), Image.Resampling.LANCZOS
                )
                images[i] = np.asarray(im, dtype=np.uint8)
        except OSError as exc:
            raise DataError(f"cannot read image ({exc})", path=p) from None
    labels = np.array([class_id[p.parent.relative_to(base).as_posix()] for p in files], dtype=np.int64)
    names = tuple("images" if c == "." else c for c in classes)
    images.setflags(write=False)
    labels.setflags(write=False)
    return ObjectBank(images, labels, names, f"folder:{root}", split, composite=False)


# --------------------------------------------------------------------------------------------------------
# Sources


def parse_source(source: str) -> tuple[str, str | None]:
    """``"fashion-mnist"`` / ``"animal-mnist"`` / ``"fashion+animal"`` / ``"folder:PATH"`` / an existing folder
    -> (kind, path)."""
    if source in ("fashion-mnist", "animal-mnist") or source in COMBINED_SOURCES:
        return source, None
    if source.startswith("folder:"):
        return "folder", source[len("folder:") :]
    if os.path.isdir(source):
        return "folder", source
    raise ConfigError(
        f"unknown stimulus source {source!r} (expected fashion-mnist, animal-mnist, fashion+animal, "
        "or folder:PATH)",
        field="source",
    )


def _combine_banks(name: str, banks: list[ObjectBank]) -> ObjectBank:
    """Concatenate the objects of several MNIST-style sources; class ids are offset source by source."""
    sides = {b.images.shape[1:] for b in banks}
    if len(sides) != 1:
        raise DataError(f"the sources of {name} have objects of different sizes {sorted(sides)}", path=name)
    images = np.concatenate([b.images for b in banks])
    offsets = np.cumsum([0] + [len(b.class_names) for b in banks])
    labels = np.concatenate([b.labels + off for b, off in zip(banks, offsets[:-1], strict=True)])
    names = tuple(n for b in banks for n in b.class_names)
    images.setflags(write=False)
    labels.setflags(write=False)
    return ObjectBank(images, labels, names, name, banks[0].split)


@lru_cache(maxsize=4)
def _load_combined(name: str, split: Split, folders: tuple[str, ...]) -> ObjectBank:
    """``folders``: where each part was found (part of the cache key, so that a moved source is re-read)."""
    return _combine_banks(name, [load_objects(part, split) for part in COMBINED_SOURCES[name]])


def _source_folder(kind: str) -> str:
    return str(fashion_mnist_folder() if kind == "fashion-mnist" else animal_mnist_folder())


def load_objects(source: str = "fashion-mnist", split: Split = "train", resolution: int = 64) -> ObjectBank:
    """The objects of one source and split (cached; arrays are read-only).

    ``resolution`` only matters for folder sources, whose images are resized when read.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}", field="split")
    kind, path = parse_source(source)
    if kind == "fashion-mnist":
        return _load_fashion_mnist(str(fashion_mnist_folder()), split)
    if kind == "animal-mnist":
        return _load_animal_mnist(str(animal_mnist_folder()), split)
    if kind in COMBINED_SOURCES:
        parts = COMBINED_SOURCES[kind]
        return _load_combined(kind, split, tuple(_source_folder(p) for p in parts))
    return _load_image_folder(str(Path(path).resolve()), split, int(resolution))


@lru_cache(maxsize=4)
def load_texture_bank(size: int = 128) -> np.ndarray:
    """The scikit-image photos as a background bank: ``[P, size, size, 3]`` float32 in [0, 1].

    Each photo is centre-cropped to a square and resized (area averaging); grey photos are kept grey (they
    are tinted per stimulus).
    """
    import skimage.data
    from PIL import Image

    bank = []
    for name in TEXTURE_NAMES:
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception as exc:  # noqa: BLE001 - a missing optional photo is skipped
            _logger.debug("scikit-image photo %s unavailable: %s", name, exc)
            continue
        if img.dtype != np.uint8:
            img = (np.clip(img.astype(np.float64) / max(float(img.max()), 1e-9), 0, 1) * 255).astype(np.uint8)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = img[..., :3]
        h, w = img.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        crop = Image.fromarray(np.ascontiguousarray(img[top : top + side, left : left + side]))
        small = crop.resize((size, size), Image.Resampling.BOX if side >= size else Image.Resampling.BICUBIC)
        bank.append(np.asarray(small, dtype=np.float32) / 255.0)
    if not bank:
        raise DataError("no scikit-image photos could be loaded for backgrounds", path="skimage.data")
    out = np.stack(bank)
    out.setflags(write=False)
    return out


# --------------------------------------------------------------------------------------------------------
# Composition


def _bilinear(src: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Sample source images at float pixel coordinates (bilinear, zero outside), with torch.

    Args:
        src: ``[m, C, h, w]`` float32 tensor, the source of each output image, or ``[1, C, h, w]`` shared
            by all outputs.
        ys: ``[m, H]`` row coordinates and ``xs``: ``[m, W]`` column coordinates (pixel centres at
            integers); the sampling is axis-aligned.

    Returns:
        ``[m, C, H, W]`` float32 tensor.
    """
    import torch
    import torch.nn.functional as F

    _, c, h, w = src.shape
    m, hh, ww = ys.shape[0], ys.shape[1], xs.shape[1]
    gx = (xs + 0.5) / w * 2 - 1
    gy = (ys + 0.5) / h * 2 - 1
    grid = torch.empty((m, hh, ww, 2), dtype=torch.float32)
    grid[..., 0] = gx[:, None, :]
    grid[..., 1] = gy[:, :, None]
    if src.shape[0] == 1 and m > 1:
        # one source for all: stack the outputs' rows into one tall sampling grid (no copies of the source)
        out = F.grid_sample(
            src, grid.reshape(1, m * hh, ww, 2), mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return out.reshape(c, m, hh, ww).permute(1, 0, 2, 3)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; inputs ``[n]`` in [0, 1], output ``[n, 3]``."""
    k = (np.array([5.0, 3.0, 1.0])[None, :] + h[:, None] * 6.0) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def shape_descriptor(objects: np.ndarray) -> np.ndarray:
    """Canonical 7x7 shape of each object: ``[n, h, w]`` (or ``[n, h, w, 3]``) -> ``[n, 49]`` float32.

    Block-averaged intensity, centred and scaled to unit RMS per image, so it ignores position, size and
    colour.
    """
    x = objects.astype(np.float32) / 255.0
    if x.ndim == 4:
        x = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    n, h, w = x.shape
    if h % SHAPE_SIDE or w % SHAPE_SIDE:
        from skimage.transform import resize

        x = resize(x, (n, SHAPE_SIDE * 4, SHAPE_SIDE * 4), anti_aliasing=True, order=1).astype(np.float32)
        n, h, w = x.shape
    x = (
        x.reshape(n, SHAPE_SIDE, h // SHAPE_SIDE, SHAPE_SIDE, w // SHAPE_SIDE)
        .mean(axis=(2, 4))
        .reshape(n, -1)
    )
    x = x - x.mean(axis=1, keepdims=True)
    rms = np.sqrt((x**2).mean(axis=1, keepdims=True))
    return (x / np.maximum(rms, 1e-6)).astype(np.float32)


def compose(
    bank: ObjectBank,
    object_index: np.ndarray,
    rng: np.random.Generator,
    resolution: int = 64,
    chunk: int = 512,
    out: np.ndarray | None = None,
) -> StimulusSet:
    """Composite the chosen objects over random texture crops.

    Per image: a background crop of a random scikit-image photo (random crop size, flip, tint for grey
    photos, reduced contrast); the object scaled to 45-85 % of the image width, placed at random fully
    inside, in a random hue; opacity from the object's intensity, shading kept.

    Args:
        bank: the objects (see :func:`load_objects`).
        object_index: ``[n]`` rows of ``bank`` to show.
        rng: random generator; the same state gives the same images.
        resolution: output side H = W.
        out: optional ``[n, H, W, 3]`` uint8 array (e.g. a ``np.memmap``) to render into, chunk by chunk, so
            that a large set never sits in memory; the images are the same as without it.

    Returns:
        a :class:`StimulusSet` with ``[n, H, W, 3]`` uint8 images (``out`` itself when given).
    """
    object_index = np.asarray(object_index, dtype=np.int64)
    n = len(object_index)
    labels = bank.labels[object_index].astype(np.int64)
    if not bank.composite:
        imgs = np.ascontiguousarray(bank.images[object_index])
        if imgs.shape[1] != resolution:
            from skimage.transform import resize

            imgs = (
                (resize(imgs, (n, resolution, resolution, 3), anti_aliasing=True) * 255)
                .round()
                .astype(np.uint8)
            )
        return StimulusSet(
            images=imgs,
            labels=labels,
            class_names=list(bank.class_names),
            object_index=object_index,
            shape=shape_descriptor(bank.images[object_index]),
            center=np.zeros((n, 2), np.float32),
            scale=np.ones(n, np.float32),
        )
    # all random draws up front, in a fixed order, so that chunking cannot change the result
    tex = load_texture_bank(int(np.clip(2 * resolution, 128, 512)))
    p, side = tex.shape[0], tex.shape[1]
    tex_grey = (np.abs(tex[..., 0] - tex[..., 1]).max(axis=(1, 2)) < 1e-3) & (
        np.abs(tex[..., 1] - tex[..., 2]).max(axis=(1, 2)) < 1e-3
    )
    tex_id = rng.integers(0, p, n)
    crop = rng.uniform(0.3, 0.75, n) * side
    draws = {
        "tex_id": tex_id,
        "crop": crop,
        "top": rng.uniform(0, 1, n) * (side - crop),
        "left": rng.uniform(0, 1, n) * (side - crop),
        "flip": rng.random(n) < 0.5,
        "tint": _hsv_to_rgb(rng.random(n), rng.uniform(0.15, 0.5, n), np.ones(n)),
        "bg_contrast": rng.uniform(0.35, 0.7, n),
        "bg_level": rng.uniform(0.3, 0.65, n),
    }
    scale = rng.uniform(0.45, 0.85, n)
    cx = rng.uniform(-1, 1, n) * (1 - scale) / 2
    cy = rng.uniform(-1, 1, n) * (1 - scale) / 2
    draws.update(
        scale=scale,
        cx=cx,
        cy=cy,
        colour=_hsv_to_rgb(rng.random(n), rng.uniform(0.45, 1.0, n), rng.uniform(0.65, 1.0, n)),
        shade=rng.uniform(0.2, 0.45, n),
    )
    objects = bank.images[object_index]
    if out is not None and (out.shape != (n, resolution, resolution, 3) or out.dtype != np.uint8):
        raise ConfigError(
            f"out must be uint8 {(n, resolution, resolution, 3)}, got {out.dtype} {out.shape}", field="out"
        )
    with torch_threads(1):
        out = _composite(objects, tex, tex_grey, draws, resolution, chunk, out)
    shapes = [shape_descriptor(objects[a : a + 8192]) for a in range(0, n, 8192)]
    return StimulusSet(
        images=out,
        labels=labels,
        class_names=list(bank.class_names),
        object_index=object_index,
        shape=np.concatenate(shapes) if shapes else np.zeros((0, SHAPE_SIDE**2), np.float32),
        center=np.stack([cx, cy], axis=1).astype(np.float32),
        scale=scale.astype(np.float32),
    )


def _composite(
    objects: np.ndarray,
    tex: np.ndarray,
    tex_grey: np.ndarray,
    draws: dict[str, np.ndarray],
    resolution: int,
    chunk: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Render the stimuli: ``objects`` ``[n, h, w]`` uint8 over crops of ``tex`` ``[P, S, S, 3]``.

    ``draws`` holds the per-image random parameters of :func:`compose` (arrays ``[n]`` or ``[n, 3]``).
    Returns ``[n, resolution, resolution, 3]`` uint8.
    """
    import torch

    n = len(objects)
    oh, ow = objects.shape[1:3]
    t = {
        k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
        for k, v in draws.items()
        if k not in ("tex_id", "flip")
    }
    tex_id, flip = draws["tex_id"], draws["flip"]
    tex_t = torch.from_numpy(np.array(tex, dtype=np.float32)).permute(0, 3, 1, 2).contiguous()
    grey_t = torch.from_numpy(tex_grey)
    grid = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution  # pixel centres in [0, 1]
    if out is None:
        out = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    for s in range(0, n, chunk):
        sl = slice(s, min(n, s + chunk))
        ids = torch.from_numpy(tex_id[sl])
        # background: an axis-aligned crop of a photo, flipped at random, grey photos tinted
        v = torch.where(torch.from_numpy(flip[sl])[:, None], 1 - grid[None, :], grid[None, :])
        ys = t["top"][sl, None] + grid[None, :] * t["crop"][sl, None] - 0.5
        xs = t["left"][sl, None] + v * t["crop"][sl, None] - 0.5
        bg = torch.empty((sl.stop - sl.start, 3, resolution, resolution))
        for k in torch.unique(ids).tolist():
            rows = torch.nonzero(ids == k)[:, 0]
            # all crops of one photo in one call: stack their rows into one tall sampling grid
            bg[rows] = _bilinear(tex_t[k : k + 1], ys[rows], xs[rows])
        tinted = bg * t["tint"][sl, :, None, None] * 1.4
        bg = torch.where(grey_t[ids][:, None, None, None], tinted, bg)
        mean = bg.mean(dim=(1, 2, 3), keepdim=True)
        bg = t["bg_level"][sl, None, None, None] + t["bg_contrast"][sl, None, None, None] * (bg - mean)
        # object: output pixel -> object pixel coordinates (y up in ``cy``, rows down in images)
        box0x = 0.5 + t["cx"][sl] - t["scale"][sl] / 2
        box0y = 0.5 - t["cy"][sl] - t["scale"][sl] / 2
        oys = (grid[None, :] - box0y[:, None]) / t["scale"][sl, None] * oh - 0.5
        oxs = (grid[None, :] - box0x[:, None]) / t["scale"][sl, None] * ow - 0.5
        obj_src = torch.from_numpy(np.ascontiguousarray(objects[sl], dtype=np.float32) / 255.0)[:, None]
        inten = _bilinear(obj_src, oys, oxs)  # [m, 1, H, W]
        alpha = (inten / 0.12).clamp(0.0, 1.0)  # opacity from intensity, soft edges
        shade = t["shade"][sl, None, None, None]
        obj = t["colour"][sl, :, None, None] * (shade + (1 - shade) * inten)
        img = alpha * obj + (1 - alpha) * bg
        out[sl] = (img.permute(0, 2, 3, 1) * 255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads inside the block (restored after).

    The element-wise work here is small; on a shared 2-core machine, more threads than free cores make
    torch's kernels many times slower.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, old)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def sample_objects(
    bank: ObjectBank,
    n: int,
    rng: np.random.Generator,
    exclude: np.ndarray | None = None,
    equal_classes: bool = False,
) -> np.ndarray:
    """Pick ``n`` object rows of ``bank``, balanced over classes, without replacement where possible.

    Rows in ``exclude`` are never picked. When fewer than ``n`` rows are available, rows are reused (each
    reuse is composited differently) and a warning is logged.

    With ``equal_classes``, every class gets an equal share of ``n`` (to within one) even when its objects
    run out first: a small class's objects are then reused (each use is composited differently), so that a
    source with unequal classes (``fashion+animal``: 6000 vs 834 training objects per class) still gives a
    class-balanced corpus.
    """
    avail = np.ones(len(bank), dtype=bool)
    if exclude is not None and len(exclude):
        avail[np.asarray(exclude, dtype=np.int64)] = False
    idx = np.flatnonzero(avail)
    if idx.size == 0:
        raise DataError(f"no {bank.split} objects left to sample", path=bank.source)
    if equal_classes:
        return _sample_equal_classes(bank, idx, n, rng)
    if n > idx.size:
        _logger.warning(
            "%s %s: %d stimuli asked for, %d objects available; objects are reused",
            bank.source,
            bank.split,
            n,
            idx.size,
        )
        reps = -(-n // idx.size)
        return np.concatenate([rng.permutation(idx) for _ in range(reps)])[:n]
    labels = bank.labels[idx]
    classes = np.unique(labels)
    # round-robin over classes in a random order of each class's rows: balanced, then random order
    order = rng.permutation(idx.size)
    rank = np.empty(idx.size, dtype=np.int64)
    for c in classes:
        members = order[labels[order] == c]
        rank[members] = np.arange(members.size)
    key = rank * (classes.size + 1) + np.searchsorted(classes, labels)
    picked = idx[np.argsort(key, kind="stable")[:n]]
    return rng.permutation(picked)


def _sample_equal_classes(bank: ObjectBank, idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    labels = bank.labels[idx]
    classes = np.unique(labels)
    share = np.full(classes.size, n // classes.size, dtype=np.int64)
    share[rng.permutation(classes.size)[: n % classes.size]] += 1
    picked = []
    reused = 0
    for c, k in zip(classes, share, strict=True):
        members = idx[labels == c]
        reps = max(1, -(-int(k) // members.size))
        reused += max(0, int(k) - members.size)
        picked.append(np.concatenate([rng.permutation(members) for _ in range(reps)])[:k])
    if reused:
        _logger.info(
            "%s %s: %d of %d stimuli reuse an object (classes balanced)", bank.source, bank.split, reused, n
        )
    return rng.permutation(np.concatenate(picked))


def make_stimulus_set(
    n: int,
    resolution: int = 64,
    seed: int = 0,
    source: str = "fashion-mnist",
    split: Split = "train",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``n`` stimuli from one source and split.

    Objects of the ``"train"`` and ``"test"`` splits come from disjoint source images (the source's own
    split). The same arguments always give the same images.

    Returns:
        images ``[n, H, W, 3]`` uint8, labels ``[n]`` int64, class names.
    """
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}", field="n")
    if resolution < 8:
        raise ConfigError(f"resolution must be at least 8 pixels, got {resolution}", field="resolution")
    bank = load_objects(source, split, resolution)
    rng = np.random.default_rng([int(seed), 0x5715, 0 if split == "train" else 1])
    stim = compose(bank, sample_objects(bank, n, rng), rng, resolution)
    return stim.images, stim.labels, stim.class_names
