"""Training the benchmark's own judge (:class:`~mindvis.eval.classifier.BenchmarkClassifier`) on its corpus.

:func:`train_benchmark_classifier` trains the CNN on training images only, holds out whole objects to measure
its accuracy, caches the result by the SHA-256 of its training data and settings, and resumes an interrupted
training from the state it saves after every epoch. :func:`load_training_corpus` reads the stimulus corpus (or
the training split of a GOD-layout npz) and drops the images that match a subject's test images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mindvis.data.formats.common import NpzArchive
from mindvis.errors import CheckpointError, DataError, WeightsUnavailable
from mindvis.eval.classifier import (
    CONFIG_FILE,
    STATE_FILE,
    BenchmarkClassifier,
    ClassifierConfig,
    _build_cnn,
    _check_rgb,
    check_classifier_output,
)
from mindvis.safeload import load_torch_file
from mindvis.utils.images import to_float_resized
from mindvis.utils.io import atomic_write, check_output_apart
from mindvis.utils.steps import provenance

logger = logging.getLogger(__name__)


def training_data_sha256(
    images: np.ndarray, labels: np.ndarray, class_names: list[str], groups: np.ndarray | None = None
) -> str:
    """SHA-256 of the training images (bytes and shape), labels, class names and hold-out groups if any.

    The images are hashed in row blocks, so a memory-mapped corpus is never copied whole.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"shape": list(images.shape), "classes": list(class_names)}).encode())
    for a in range(0, len(images), 4096):
        h.update(np.ascontiguousarray(images[a : a + 4096], dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    if groups is not None:
        h.update(b"groups")
        h.update(np.ascontiguousarray(groups, dtype=np.int64).tobytes())
    return h.hexdigest()


def _stratified_split(
    labels: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, hold out ``fraction`` of the images; with ``groups`` (e.g. the source object of each
    composite), whole groups are held out, so that no held-out image shares its object with a training one."""
    rng = np.random.default_rng(seed)
    train, hold = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if groups is None:
            idx = rng.permutation(idx)
            k = int(round(fraction * len(idx)))
            k = min(max(k, 1), len(idx) - 1) if len(idx) > 1 else 0
            hold.append(idx[:k])
            train.append(idx[k:])
            continue
        units = rng.permutation(np.unique(groups[idx]))
        k = int(round(fraction * len(units)))
        k = min(max(k, 1), len(units) - 1) if len(units) > 1 else 0
        held = np.isin(groups[idx], units[:k])
        hold.append(idx[held])
        train.append(idx[~held])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(hold))


def _augment(x, gen, blur: float = 0.0):
    """Random horizontal flip and a small random affine (shift up to 10%, zoom 0.9..1.1) per image; a share
    ``blur`` of the images is resized down (antialiased) to one random size in ``[H/2, H)`` and back up."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    if blur > 0:
        h = x.shape[-1]
        size = int(torch.randint(h // 2, h, (1,), generator=gen))
        low = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        smooth = F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)
        pick = torch.rand(b, generator=gen) < blur
        x = torch.where(pick.view(b, 1, 1, 1), smooth, x)
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    scale = 0.9 + 0.2 * torch.rand(b, generator=gen)
    shift = (torch.rand(b, 2, generator=gen) - 0.5) * 0.2
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass
class TrainResult:
    """What :func:`train_benchmark_classifier` did: the classifier, whether the cache was used, timings."""

    classifier: BenchmarkClassifier
    cached: bool
    seconds: float
    history: list[dict] = field(default_factory=list)


def train_benchmark_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    out_dir: str | Path | None = None,
    config: ClassifierConfig | None = None,
    force: bool = False,
    source: str = "",
    overwrite: bool = False,
    groups: np.ndarray | None = None,
) -> TrainResult:
    """Train (or reuse) the benchmark classifier on training images only.

    A stratified ``holdout_fraction`` of ``images`` is held out to measure accuracy; the rest trains the
    network. When ``out_dir`` already holds a classifier whose ``training_data_sha256`` and training config
    match, it is loaded instead of retrained (unless ``force``). After every epoch the training state is saved
    to ``out_dir/training-state.pt``; a training interrupted after epoch k resumes at epoch k+1 when its data
    and config are the same, and ends with the same weights as an uninterrupted one.

    Args:
        images: ``[M, H, W, 3]`` uint8 training images (no test images!).
        labels: ``[M]`` int class index in ``0..C-1``.
        class_names: ``C`` names.
        out_dir: folder for ``model.safetensors`` + ``config.json`` (None: keep in memory only).
        config: training settings.
        force: retrain even when the cache matches.
        source: where the images came from, recorded in the config.
        overwrite: replace an ``out_dir`` that holds something other than a classifier.
        groups: optional ``[M]`` group id of each image (the corpus's ``object_index``); the hold-out then
            takes whole groups, so that composites of one object are never on both sides.

    Raises:
        OutputExistsError: ``out_dir`` holds something other than a classifier (checked before training).
    """
    import torch
    import torch.nn.functional as F

    config = config or ClassifierConfig()
    images = _check_rgb(images)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(images),):
        raise DataError(f"labels must be [M] with M={len(images)}, got {labels.shape}", field="labels")
    n_classes = len(class_names)
    if n_classes < 2 or labels.min() < 0 or labels.max() >= n_classes:
        raise DataError(f"labels must lie in 0..{n_classes - 1} with at least 2 classes", field="labels")
    if groups is not None:
        groups = np.asarray(groups, dtype=np.int64)
        if groups.shape != labels.shape:
            raise DataError(f"groups must be [M] with M={len(images)}, got {groups.shape}", field="groups")
    digest = training_data_sha256(images, labels, class_names, groups)
    if out_dir is not None:
        check_classifier_output(out_dir, overwrite)
    if out_dir is not None and not force and (Path(out_dir) / CONFIG_FILE).is_file():
        try:
            old = BenchmarkClassifier.load(out_dir)
        except (CheckpointError, WeightsUnavailable, DataError) as exc:
            logger.warning("ignoring the cached classifier in %s: %s", out_dir, exc)
        else:
            if old.info.get("training_data_sha256") == digest and asdict(old.config) == asdict(config):
                logger.info("training data unchanged (sha256 %s...): reusing %s", digest[:12], out_dir)
                return TrainResult(old, cached=True, seconds=0.0)
            logger.warning(
                "the classifier in %s was trained on other data or settings: it is retrained and replaced",
                out_dir,
            )

    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    tr_idx, ho_idx = _stratified_split(labels, config.holdout_fraction, config.seed, groups)
    if len(ho_idx) == 0:
        raise DataError("too few images per class to hold any out for measuring accuracy", field="labels")

    def prep(idx: np.ndarray):
        return torch.cat(
            [to_float_resized(images[idx[a : a + 512]], config.input_size) for a in range(0, len(idx), 512)]
        )

    x_tr, x_ho = prep(tr_idx), prep(ho_idx)
    mean = x_tr.mean(dim=(0, 2, 3))
    std = x_tr.std(dim=(0, 2, 3)).clamp_min(1e-3)
    x_tr = (x_tr - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    x_ho = (x_ho - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    y_tr = torch.from_numpy(labels[tr_idx])
    y_ho = torch.from_numpy(labels[ho_idx])

    model = _build_cnn(n_classes, config.widths, config.arch)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, -(-len(tr_idx) // config.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    history: list[dict] = []
    state_path = None if out_dir is None else Path(out_dir) / STATE_FILE
    first = 0
    if state_path is not None and not force:
        resumed = _load_training_state(state_path, digest, config)
        if resumed is not None:
            model.load_state_dict(resumed["model"])
            opt.load_state_dict(resumed["optimizer"])
            sched.load_state_dict(resumed["scheduler"])
            gen.set_state(resumed["generator"])
            history = list(resumed["history"])
            first = len(history)
            logger.info(
                "resuming the classifier's training after epoch %d/%d (%s)", first, config.epochs, state_path
            )
    for epoch in range(first, config.epochs):
        t_epoch = time.perf_counter()
        model.train()
        perm = torch.randperm(len(tr_idx), generator=gen)
        total = 0.0
        for a in range(0, len(perm), config.batch_size):
            b = perm[a : a + config.batch_size]
            xb = _augment(x_tr[b], gen, config.blur) if config.augment else x_tr[b]
            loss = F.cross_entropy(model(xb), y_tr[b], label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        model.eval()
        with torch.no_grad():
            acc = float((model(x_ho).argmax(1) == y_ho).float().mean())
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": total / len(tr_idx),
                "held_out_accuracy": acc,
                "seconds": round(time.perf_counter() - t_epoch, 2),
            }
        )
        logger.info(
            "classifier epoch %d/%d: loss %.4f, held-out accuracy %.3f",
            epoch + 1,
            config.epochs,
            total / len(tr_idx),
            acc,
        )
        if state_path is not None and epoch + 1 < config.epochs:
            _save_training_state(state_path, digest, config, model, opt, sched, gen, history)
    seconds = time.perf_counter() - t0 + sum(h.get("seconds", 0.0) for h in history[:first])
    counts = np.bincount(labels[ho_idx], minlength=n_classes)
    info = {
        "training_data_sha256": digest,
        "training_source": source,
        "n_train": int(len(tr_idx)),
        "n_holdout": int(len(ho_idx)),
        "held_out_accuracy": history[-1]["held_out_accuracy"],
        "held_out_chance": float(counts.max() / counts.sum()),
        "train_seconds": round(seconds, 2),
        "history": history,
        "holdout_by_object": groups is not None,
        "note": "trained on training images only; accuracy measured on a stratified held-out part of them"
        + (" (whole source objects held out)" if groups is not None else ""),
        **provenance(),
    }
    clf = BenchmarkClassifier(model, config, class_names, mean.numpy(), std.numpy(), info)
    if out_dir is not None:
        clf.save(out_dir, overwrite=overwrite)
        clf.info["path"] = str(out_dir)
    return TrainResult(clf, cached=False, seconds=seconds, history=history)


def _save_training_state(
    path: Path, digest: str, config: ClassifierConfig, model, opt, sched, gen, history
) -> None:
    """Write the state after an epoch (atomically), so that a killed training resumes from it."""
    import io

    import torch

    state = {
        "format": 1,
        "training_data_sha256": digest,
        "config": json.dumps(asdict(config), sort_keys=True),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "history": history,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        fh.write(buf.getvalue())


def _load_training_state(path: Path, digest: str, config: ClassifierConfig) -> dict | None:
    """The saved state at ``path`` when it belongs to this data and config; None otherwise (logged)."""

    if not path.is_file():
        return None
    try:
        state = load_torch_file(path)
        same = (
            state["training_data_sha256"] == digest
            and state["config"] == json.dumps(asdict(config), sort_keys=True)
            and 0 < len(state["history"]) < config.epochs
        )
    except Exception as exc:  # a torn or foreign file: train from the start
        logger.warning("ignoring the classifier training state %s (%s: %s)", path, type(exc).__name__, exc)
        return None
    if not same:
        logger.warning(
            "the training state in %s belongs to other data or settings: training from the start", path
        )
        return None
    return state


def load_training_corpus(
    path: str | Path, exclude: str | Path | None = None, groups: bool = False
) -> (
    tuple[np.ndarray, np.ndarray, list[str], str]
    | tuple[np.ndarray, np.ndarray, list[str], str, np.ndarray | None]
):
    """Read a classifier training set: the stimulus corpus or the training split of a GOD-layout npz.

    Accepted layouts:

    - ``corpus.npz``: ``images [M, H, W, 3]`` uint8, ``labels [M]`` int, ``class_names [C]``;
    - GOD-layout ``images_<res>.npz``: ``train_images`` + ``train_labels`` (the test split is never read).

    Args:
        exclude: an npz whose ``test_images`` (or ``images``) must not be trained on; corpus images that
            match one of them (16x16 grayscale thumbnails within 2 grey levels on average) are dropped.
        groups: also return the corpus's ``object_index`` (the source object of each composite; None when
            the file has none), for a hold-out by object.

    Returns:
        ``(images, labels, class_names, description)`` (``+ (object_index,)`` with ``groups``). The images of
        an uncompressed npz are memory-mapped (read-only); excluding test images copies the kept rows.
    """

    path = Path(path)
    if not path.is_file():
        raise DataError("training corpus not found", path=path)
    object_index = None
    try:
        with NpzArchive(path) as npz:
            files = set(npz.keys)
            # the GOD layout's training split, or a corpus
            layout = next(
                (
                    pair
                    for pair in (("train_images", "train_labels"), ("images", "labels"))
                    if pair[0] in files
                ),
                None,
            )
            if layout is None:
                raise DataError(
                    f"expected 'images'+'labels' or 'train_images'+'train_labels', found {sorted(files)}",
                    path=path,
                )
            image_key, label_key = layout
            if label_key not in files:
                raise DataError(f"npz with '{image_key}' has no '{label_key}'", path=path, field=label_key)
            images = npz.get(image_key)
            labels = npz.get(label_key, mmap=False)
            desc = f"{path} [{image_key}]"
            if image_key == "images" and "object_index" in files:
                object_index = np.asarray(npz.get("object_index", mmap=False), dtype=np.int64)
            names = [str(x) for x in npz.get("class_names", mmap=False)] if "class_names" in files else None
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read corpus ({type(exc).__name__}: {exc})", path=path) from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"images must be uint8 [M, H, W, 3], got {images.dtype} {images.shape}", path=path)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) != len(images):
        raise DataError(f"{len(images)} images but {len(labels)} labels", path=path, field="labels")
    if object_index is not None and object_index.shape != labels.shape:
        raise DataError(f"object_index must be [{len(labels)}]", path=path, field="object_index")
    if names is None:
        names = [str(i) for i in range(int(labels.max()) + 1)]
    if exclude is not None:
        keep = ~_matches_any(images, _read_exclude(Path(exclude)))
        dropped = int((~keep).sum())
        logger.info("excluding %d corpus images that match the test images of %s", dropped, exclude)
        if dropped:
            images, labels = images[keep], labels[keep]
            object_index = None if object_index is None else object_index[keep]
        desc += f" minus {dropped} images matching {exclude}"
    if groups:
        return images, labels, names, desc, object_index
    return images, labels, names, desc


def _read_exclude(path: Path) -> np.ndarray:
    try:
        npz = np.load(path, allow_pickle=False)
        key = "test_images" if "test_images" in npz.files else "images" if "images" in npz.files else None
        if key is None:
            raise DataError(f"no 'test_images' to exclude (found {npz.files})", path=path)
        return _check_rgb(npz[key])
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read ({type(exc).__name__}: {exc})", path=path) from None


def _thumbs(images: np.ndarray) -> np.ndarray:

    out = [
        to_float_resized(np.array(images[a : a + 512]), 16).mean(dim=1).reshape(-1, 256).numpy()
        for a in range(0, len(images), 512)
    ]
    return np.concatenate(out) * 255.0


def _matches_any(images: np.ndarray, others: np.ndarray, tol: float = 2.0) -> np.ndarray:
    """``[M]`` bool: image m looks like one of ``others`` (mean abs difference of thumbnails <= tol)."""
    a, b = _thumbs(images), _thumbs(others)
    hit = np.zeros(len(a), dtype=bool)
    for i in range(0, len(a), 2048):  # blocks of both sides: at most 2048 x 64 x 256 floats at once
        for j in range(0, len(b), 64):
            d = np.abs(a[i : i + 2048, None, :] - b[None, j : j + 64, :]).mean(axis=2)
            hit[i : i + 2048] |= (d <= tol).any(axis=1)
    return hit


def train_classifier_on(
    config: ClassifierConfig,
    corpus: str | Path,
    out_dir: str | Path,
    *,
    exclude_test: str | Path | None = None,
    force: bool = False,
    overwrite: bool = False,
) -> TrainResult:
    """The benchmark classifier of a corpus on disk, as ``mindvis train-classifier`` trains it.

    Args:
        config: the training settings (:func:`~mindvis.eval.classifier.classifier_config` builds one from a
            preset).
        corpus: a stimulus corpus ``.npz`` (images, labels, class_names) or a GOD-layout ``images_<res>.npz``
            (only its training split is used).
        out_dir: the classifier folder (``model.safetensors`` + ``config.json``); it must not lie inside an input.
        exclude_test: an ``.npz`` whose ``test_images`` must not be trained on; matching corpus images are dropped.
        force: retrain even when the folder's classifier was trained on the same data and settings.
        overwrite: replace an ``out_dir`` that holds something other than a classifier.
    """

    check_output_apart(out_dir, {"--corpus": corpus, "--exclude-test": exclude_test})
    check_classifier_output(out_dir, overwrite)  # before reading the corpus
    images, labels, names, desc, groups = load_training_corpus(corpus, exclude=exclude_test, groups=True)
    return train_benchmark_classifier(
        images, labels, names, out_dir, config, force=force, source=desc, overwrite=overwrite, groups=groups
    )
