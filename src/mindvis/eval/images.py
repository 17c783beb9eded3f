"""Loading and checking the images an evaluation compares.

Everything in :mod:`mindvis.eval` works on uint8 RGB arrays:

- ground truth ``gt: [N, H, W, 3]``;
- reconstructions ``recons: [N, S, H', W', 3]``, ``S`` samples per test item.

Accepted inputs (see :func:`load_eval_images`):

- a reconstruction folder written by ``mindvis reconstruct``: ``reconstructions.npz`` with ``images``
  ``[N, S, H, W, 3]`` (or ``[N, H, W, 3]`` for one sample) and optionally ``ground_truth`` ``[N, H, W, 3]``
  and ``ids`` ``[N]`` (item names, used to check the pairing);
- an ``.npz`` file with the same keys (a ground-truth npz may hold its images under ``ground_truth``,
  ``images`` or ``test_images``);
- a folder of PNG/JPEG images, taken in name order. Reconstruction files named ``<item>_s<k>.<ext>`` are
  grouped into samples of ``<item>``; any other name is one sample of its own item.

Rules, so that a bad input fails loudly instead of giving a wrong number:

- reconstructions and ground truth must have the same number of items, and when both carry item names
  (npz ``ids`` or file names) the names must agree position by position;
- grayscale versus RGB is refused unless ``gray_to_rgb=True`` (the gray channel is then repeated);
- a reconstruction resolution that differs from the ground truth's is allowed: each metric resizes to its
  own documented resolution (:func:`mindvis.utils.images.resize_images`, antialiased bilinear);
- a file that cannot be decoded raises :class:`~mindvis.errors.DataError` naming that file.
"""

from __future__ import annotations

import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mindvis.errors import DataError
from mindvis.utils.images import PNG_JPEG_EXTENSIONS

# re-exported: mindvis.eval.classifier and mindvis.eval.classifier_training import it from here

logger = logging.getLogger(__name__)

RECON_FILE = "reconstructions.npz"
_SAMPLE_NAME = re.compile(r"^(?P<item>.+?)[_-]s(?P<k>\d+)$")


@dataclass
class EvalImages:
    """Paired reconstructions and ground truth, checked and ready for the metrics.

    Attributes:
        recons: ``[N, S, H, W, 3]`` uint8 reconstructions.
        gt: ``[N, H', W', 3]`` uint8 ground truth.
        ids: ``N`` item names, when the inputs had them.
        source: a short description of where the images came from (for the report).
    """

    recons: np.ndarray
    gt: np.ndarray
    ids: list[str] | None = None
    source: str = ""

    @property
    def n_items(self) -> int:
        return int(self.gt.shape[0])

    @property
    def n_samples(self) -> int:
        return int(self.recons.shape[1])


def _check_array(arr: np.ndarray, what: str, path: str, field: str, ndim_rgb: int) -> np.ndarray:
    """Validate dtype and layout; returns the array with an explicit channel axis (1 or 3 channels)."""
    if arr.dtype != np.uint8:
        raise DataError(
            f"{what} must be uint8 (0..255), got {arr.dtype}; convert with (x * 255).round().astype(np.uint8) "
            "if they are floats in [0, 1]",
            path=path,
            field=field,
        )
    if arr.ndim == ndim_rgb - 1:  # no channel axis: grayscale
        arr = arr[..., None]
    if arr.ndim != ndim_rgb or arr.shape[-1] not in (1, 3, 4):
        layout = "[N, S, H, W, 3]" if ndim_rgb == 5 else "[N, H, W, 3]"
        raise DataError(f"{what} must have shape {layout}, got {tuple(arr.shape)}", path=path, field=field)
    if arr.shape[-1] == 4:
        logger.info("%s: dropping the alpha channel of %s", path, what)
        arr = arr[..., :3]
    return arr


def read_image_file(path: str | Path) -> np.ndarray:
    """Decode one PNG/JPEG file to ``[H, W, C]`` uint8 (C = 1 for grayscale, 3 for colour).

    Raises:
        DataError: naming the file when it cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("L", "I;16", "I", "F", "1"):
                arr = np.asarray(im.convert("L"))[..., None]
            else:
                arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode image file ({type(exc).__name__}: {exc})", path=path) from None
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _read_folder(folder: Path) -> tuple[list[str], list[np.ndarray]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PNG_JPEG_EXTENSIONS)
    if not files:
        raise DataError(f"no image files ({', '.join(PNG_JPEG_EXTENSIONS)}) in folder", path=folder)
    images = [read_image_file(p) for p in files]
    shapes = {im.shape[:2] for im in images}
    if len(shapes) > 1:
        first = images[0].shape[:2]
        odd, im = next((p, im) for p, im in zip(files, images, strict=True) if im.shape[:2] != first)
        raise DataError(
            f"images in one folder must share one size: {files[0].name} is {first[0]}x{first[1]} but "
            f"{odd.name} is {im.shape[0]}x{im.shape[1]}",
            path=folder,
        )
    channels = {im.shape[2] for im in images}
    if len(channels) > 1:
        images = [np.repeat(im, 3, axis=2) if im.shape[2] == 1 else im for im in images]
    return [p.stem for p in files], images


def load_recon_folder_images(folder: Path) -> tuple[np.ndarray, list[str]]:
    """Read a folder of reconstruction images; ``<item>_s<k>`` names become samples of ``<item>``.

    Returns:
        ``([N, S, H, W, C] uint8, item names)``.
    """
    stems, images = _read_folder(folder)
    groups: dict[str, dict[int, np.ndarray]] = {}
    for stem, im in zip(stems, images, strict=True):
        m = _SAMPLE_NAME.match(stem)
        item, k = (m["item"], int(m["k"])) if m else (stem, 0)
        if k in groups.setdefault(item, {}):
            raise DataError(f"two files give sample {k} of item {item!r}", path=folder)
        groups[item][k] = im
    counts = {len(v) for v in groups.values()}
    if len(counts) != 1:
        per = {item: len(v) for item, v in groups.items()}
        raise DataError(f"every item needs the same number of samples, got {per}", path=folder)
    items = sorted(groups)
    stacked = np.stack([np.stack([groups[i][k] for k in sorted(groups[i])]) for i in items])
    return stacked, items


def _open_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read npz file ({type(exc).__name__}: {exc})", path=path) from None


def _npz_get(npz, path: Path, keys: tuple[str, ...]) -> tuple[str, np.ndarray] | None:
    for key in keys:
        if key in npz.files:
            try:
                return key, np.asarray(npz[key])
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
                raise DataError(f"cannot read array ({exc})", path=path, field=key) from None
    return None


def _npz_ids(npz, path: Path) -> list[str] | None:
    got = _npz_get(npz, path, ("ids", "names"))
    return None if got is None else [str(x) for x in got[1].reshape(-1)]


def _load_recon_side(path: Path) -> tuple[np.ndarray, np.ndarray | None, list[str] | None, str]:
    """Returns ``(recons [N,S,H,W,C], gt or None, ids or None, description)``."""
    if path.is_dir():
        npz_path = path / RECON_FILE
        if npz_path.is_file():
            path = npz_path
        else:
            recons, ids = load_recon_folder_images(path)
            return recons, None, ids, f"image folder {path}"
    if not path.exists():
        raise DataError("reconstructions not found", path=path)
    if path.suffix.lower() != ".npz":
        raise DataError("expected a reconstruction folder, an image folder or an .npz file", path=path)
    npz = _open_npz(path)
    got = _npz_get(npz, path, ("images", "recons", "reconstructions"))
    if got is None:
        raise DataError(f"no reconstruction array: expected key 'images' (found {npz.files})", path=path)
    key, recons = got
    if recons.ndim in (3, 4) and not (recons.ndim == 4 and recons.shape[-1] not in (1, 3, 4)):
        recons = recons[:, None]  # one sample per item: [N, H, W, C] -> [N, 1, H, W, C]
    recons = _check_array(recons, "reconstructions", str(path), key, ndim_rgb=5)
    gt_got = _npz_get(npz, path, ("ground_truth", "gt"))
    gt = None if gt_got is None else _check_array(gt_got[1], "ground truth", str(path), gt_got[0], 4)
    return recons, gt, _npz_ids(npz, path), f"npz {path}"


def _load_gt_side(path: Path) -> tuple[np.ndarray, list[str] | None]:
    if path.is_dir():
        if (path / RECON_FILE).is_file():
            return _load_gt_side(path / RECON_FILE)
        stems, images = _read_folder(path)
        return np.stack(images), stems
    if not path.exists():
        raise DataError("ground truth not found", path=path)
    if path.suffix.lower() != ".npz":
        raise DataError("expected an image folder or an .npz file for the ground truth", path=path)
    npz = _open_npz(path)
    got = _npz_get(npz, path, ("ground_truth", "gt", "test_images", "images"))
    if got is None:
        raise DataError(
            f"no ground-truth array: expected 'ground_truth', 'test_images' or 'images' (found {npz.files})",
            path=path,
        )
    return _check_array(got[1], "ground truth", str(path), got[0], 4), _npz_ids(npz, path)


def pair_images(
    recons: np.ndarray,
    gt: np.ndarray,
    *,
    recon_ids: list[str] | None = None,
    gt_ids: list[str] | None = None,
    gray_to_rgb: bool = False,
    where: str = "inputs",
) -> EvalImages:
    """Check that reconstructions ``[N, S, H, W, C]`` and ground truth ``[N, H', W', C']`` pair up.

    Raises:
        DataError: on count or name-order mismatch, or grayscale versus RGB without ``gray_to_rgb``.
    """
    recons = _check_array(np.asarray(recons), "reconstructions", where, "recons", 5)
    gt = _check_array(np.asarray(gt), "ground truth", where, "gt", 4)
    if recons.shape[0] != gt.shape[0]:
        raise DataError(
            f"count mismatch: {recons.shape[0]} reconstructed items but {gt.shape[0]} ground-truth images "
            "(one ground truth per item, in the same order, is expected)",
            path=where,
        )
    if recons.shape[-1] != gt.shape[-1] and not gray_to_rgb:
        gray, rgb = (
            ("reconstructions", "ground truth")
            if recons.shape[-1] == 1
            else ("ground truth", "reconstructions")
        )
        raise DataError(
            f"color mismatch: {gray} are grayscale but {rgb} are RGB; pass gray_to_rgb "
            "(--gray-to-rgb) to compare with the gray channel repeated",
            path=where,
        )
    if gray_to_rgb or (recons.shape[-1] == 1 and gt.shape[-1] == 1):
        recons = np.repeat(recons, 3, axis=-1) if recons.shape[-1] == 1 else recons
        gt = np.repeat(gt, 3, axis=-1) if gt.shape[-1] == 1 else gt
    ids = None
    if recon_ids is not None and gt_ids is not None:
        if len(recon_ids) != len(recons) or len(gt_ids) != len(gt):
            raise DataError("item names do not match the number of images", path=where, field="ids")
        if recon_ids != gt_ids:
            common = set(recon_ids) & set(gt_ids)
            if common:
                pos = next(i for i, (a, b) in enumerate(zip(recon_ids, gt_ids, strict=True)) if a != b)
                raise DataError(
                    f"ordering mismatch: item {pos} is {recon_ids[pos]!r} in the reconstructions but "
                    f"{gt_ids[pos]!r} in the ground truth",
                    path=where,
                )
            logger.warning(
                "%s: reconstruction and ground-truth names share nothing (%r vs %r); pairing by position",
                where,
                recon_ids[0],
                gt_ids[0],
            )
        ids = list(recon_ids)
    else:
        ids = recon_ids or gt_ids
    if recons.shape[2:4] != gt.shape[1:3]:
        logger.info(
            "reconstructions are %dx%d and ground truth %dx%d: each metric resizes to its own resolution",
            *recons.shape[2:4],
            *gt.shape[1:3],
        )
    return EvalImages(np.ascontiguousarray(recons), np.ascontiguousarray(gt), ids, where)


def load_eval_images(
    recon_path: str | Path, gt_path: str | Path | None = None, *, gray_to_rgb: bool = False
) -> EvalImages:
    """Load reconstructions (and ground truth) from folders or npz files; see the module docstring.

    Args:
        recon_path: a ``mindvis reconstruct`` output folder, an npz file, or a folder of images.
        gt_path: ground truth (npz or image folder); optional when ``recon_path`` holds ``ground_truth``.
        gray_to_rgb: allow grayscale on one side by repeating the gray channel.
    """
    recon_path = Path(recon_path)
    recons, gt, rids, desc = _load_recon_side(recon_path)
    gids = rids if gt is not None else None
    if gt_path is not None:
        gt, gids = _load_gt_side(Path(gt_path))
        desc += f" vs ground truth {gt_path}"
    elif gt is None:
        raise DataError(
            "no ground truth: the reconstructions hold no 'ground_truth' array; pass the ground-truth "
            "images (an npz or an image folder) as well",
            path=recon_path,
        )
    return pair_images(
        recons, gt, recon_ids=rids, gt_ids=gids, gray_to_rgb=gray_to_rgb, where=str(recon_path)
    )
