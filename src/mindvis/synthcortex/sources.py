"""Where SynthCortex's stimuli come from: labelled object images, and the photos they are composited over.

The objects are grey silhouettes (Fashion-MNIST or Animal-MNIST) that :mod:`mindvis.synthcortex.stimuli`
scales, positions, colours and composites over crops of the scikit-image photos loaded here
(:func:`load_texture_bank`). A user's folder of images can stand in for the composited set.

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

import gzip
import hashlib
import importlib.util
import logging
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from mindvis.errors import ConfigError, DataError
from mindvis.safeload import NumpyUnpickler

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
