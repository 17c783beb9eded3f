"""SynthCortex's stimuli: labelled objects composited over natural textures, and the image sets of a run.

Each stimulus is an object silhouette (Fashion-MNIST or Animal-MNIST, from
:mod:`mindvis.synthcortex.sources`), scaled, positioned and coloured at random, composited over a crop of a
natural photograph or texture from scikit-image (:func:`compose`). The result carries object semantics
(10 classes), colour, texture and a background, which is what makes real stimuli hard. Images of a folder
source are used whole (centre-cropped and resized), not composited.

A run shows GOD-like training and test images and writes a labelled corpus (:func:`make_stimuli`,
:func:`make_corpus`); its calibration shows novel test-split images (:func:`calibration_stimuli`). Each set
has its own seed stream; test images come from the source's test split, training and corpus images from
disjoint objects of its training split.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mindvis.errors import ConfigError, DataError
from mindvis.synthcortex.config import _CALIBRATION, _STIMULI, SynthConfig
from mindvis.synthcortex.sources import COMBINED_SOURCES, ObjectBank, Split, load_objects, load_texture_bank

if TYPE_CHECKING:
    import torch

_logger = logging.getLogger(__name__)

#: side of the canonical object-shape descriptor (a 7x7 silhouette, see :class:`StimulusSet`)
SHAPE_SIDE = 7


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
        bank: the objects (see :func:`~mindvis.synthcortex.sources.load_objects`).
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
        if out is not None:  # the caller reads the images from ``out`` (a corpus file being written)
            out[...] = imgs
            imgs = out
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


# --------------------------------------------------------------------------------------------------------
# Stimuli of a run


@dataclass
class StimulusPlan:
    """The stimuli of one SynthCortex run (deterministic in the config)."""

    train: StimulusSet
    test: StimulusSet
    corpus: StimulusSet | None
    class_names: list[str]


def make_stimuli(config: SynthConfig, corpus: bool = True) -> StimulusPlan:
    """GOD train/test images and the corpus. Test objects come from the source's test split; train and
    corpus objects from its train split, disjoint from each other."""
    train_bank = load_objects(config.source, "train", config.resolution)
    test_bank = load_objects(config.source, "test", config.resolution)
    # one random stream per set, so that changing one set's size leaves the others unchanged
    r_train, r_test = (np.random.default_rng([config.seed, _STIMULI, k]) for k in range(2))
    train_idx = sample_objects(train_bank, config.n_train, r_train)
    test_idx = sample_objects(test_bank, config.n_test, r_test)
    with torch_threads(1):
        train = compose(train_bank, train_idx, r_train, config.resolution)
        test = compose(test_bank, test_idx, r_test, config.resolution)
    corp = make_corpus(config, train_idx) if corpus and config.corpus_size > 0 else None
    return StimulusPlan(train, test, corp, list(train_bank.class_names))


def corpus_reuses_objects(config: SynthConfig) -> bool:
    """Whether the corpus balances classes by reusing objects (combined sources such as ``fashion+animal``,
    whose classes have unequal object counts); such a corpus also records each image's ``object_index``."""
    return config.source in COMBINED_SOURCES


def make_corpus(config: SynthConfig, train_index: np.ndarray, out: np.ndarray | None = None) -> StimulusSet:
    """The labelled stimulus corpus: ``config.corpus_size`` composites of training-split objects that are not
    among the GOD training images (``train_index``).

    Args:
        out: optional ``[corpus_size, H, W, 3]`` uint8 array (a ``np.memmap``) to render into chunk by chunk,
            so that a large corpus is never held in memory; the images are the same either way.
    """
    train_bank = load_objects(config.source, "train", config.resolution)
    rng = np.random.default_rng([config.seed, _STIMULI, 2])
    idx = sample_objects(
        train_bank, config.corpus_size, rng, exclude=train_index, equal_classes=corpus_reuses_objects(config)
    )
    with torch_threads(1):
        return compose(train_bank, idx, rng, config.resolution, out=out)


def calibration_stimuli(config: SynthConfig, exclude: np.ndarray) -> StimulusSet:
    """Kay et al. 2008-style identification images: novel test-split objects not among the GOD test images."""
    rng = np.random.default_rng([config.seed, _CALIBRATION])
    bank = load_objects(config.source, "test", config.resolution)
    idx = sample_objects(bank, config.calibration_images, rng, exclude=exclude)
    with torch_threads(1):
        return compose(bank, idx, rng, config.resolution)
