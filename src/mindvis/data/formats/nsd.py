"""Reader of the Natural Scenes Dataset (Allen et al. 2022) in the form MindEye2 distributes it.

Layout of the folder (``data_dir``)::

    betas_all_subj01_fp32_renorm.hdf5   /betas   [trials, voxels] float32 (nsdgeneral voxels)
    coco_images_224_float16.hdf5        /images  [73000, 3, 224, 224] float16 in [0, 1], by 73k image id
    shared1000.npy                      [73000] bool, the 1000 images every subject saw (the test images)
    wds/subj01/{train,test,...}/*.tar   webdataset shards; member ``<key>.behav.npy`` is a [1, 17] array per
                                        trial: column 0 = 73k image id, column 5 = row of ``betas``
    behav_subj01.npy                    (alternative to the shards) [trials, >=6] rows in the same layout

The files are tens of GB, so nothing is read whole: the trial table comes from the small ``behav`` arrays,
then only the ``betas`` rows and ``images`` of the requested split are read from HDF5 (h5py, increasing index
chunks). Test trials are those whose image is in ``shared1000.npy`` (or, without that file, the trials of the
``test`` shards); their repeats (up to 3) are averaged per image when ``average_test``.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Literal

import numpy as np

from mindvis.data.dataset import FMRIDataset
from mindvis.data.formats.common import (
    NanPolicy,
    apply_nan_policy,
    as_index,
    average_by_image,
    check_nan_policy,
    check_numeric,
    h5_numeric_dataset,
    load_npy,
    nan_columns,
    reader_dataset,
    reading,
    regular_file,
)
from mindvis.errors import DataError

_logger = logging.getLogger(__name__)

IMAGES_FILE = "coco_images_224_float16.hdf5"
SHARED_FILE = "shared1000.npy"
BEHAV_IMAGE_COL = 0
BEHAV_TRIAL_COL = 5
_BETAS_RE = re.compile(r"^betas_all_(subj\d+)_fp32_renorm\.hdf5\Z")


def nsd_subject_name(subject: str | int) -> str:
    """``1``, ``"1"``, ``"subj1"`` or ``"subj01"`` -> ``"subj01"``."""
    s = str(subject).strip().lower().removeprefix("subj").removeprefix("sub-").removeprefix("s")
    if s.isdigit():
        return f"subj{int(s):02d}"
    return str(subject)


def list_nsd_subjects(data_dir: str | os.PathLike) -> list[str]:
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError("NSD folder not found", path=folder)
    return sorted(m.group(1) for p in folder.iterdir() if (m := _BETAS_RE.match(p.name)))


def betas_path(data_dir: str | os.PathLike, subject: str) -> Path:
    return Path(data_dir) / f"betas_all_{subject}_fp32_renorm.hdf5"


def read_nsd_trials(
    data_dir: str | os.PathLike, subject: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """The trial table of ``subject``: ``(image_73k [T], beta_row [T], shard_split [T] str, source)``.

    Reads ``behav_<subject>.npy`` when present, else the ``behav.npy`` members of ``wds/<subject>/*/*.tar``
    (only those members are extracted). Duplicate beta rows (the same trial in two shards) are kept once.
    """
    folder = Path(data_dir)
    flat = folder / f"behav_{subject}.npy"
    if flat.is_file():
        behav = load_npy(flat, field="behav")
        check_numeric(behav.dtype, path=flat, field="behav")
        if behav.ndim == 0 or behav.shape[0] == 0:
            raise DataError(
                f"expected [trials, >=6] behaviour rows, got shape {behav.shape}", path=flat, field="behav"
            )
        behav = behav.reshape(len(behav), -1)
        if behav.shape[1] <= BEHAV_TRIAL_COL:
            raise DataError(
                f"expected [trials, >=6] behaviour rows, got shape {behav.shape}", path=flat, field="behav"
            )
        return (
            _trial_index(behav[:, BEHAV_IMAGE_COL], flat, "behav (image id)"),
            _trial_index(behav[:, BEHAV_TRIAL_COL], flat, "behav (beta row)"),
            np.full(len(behav), "all"),
            str(flat),
        )
    wds = folder / "wds" / subject
    shards = sorted(wds.glob("*/*.tar")) if wds.is_dir() else []
    if not shards:
        raise DataError(
            f"no trial table: neither behav_{subject}.npy nor wds/{subject}/<split>/*.tar",
            path=folder,
            field="behav",
        )
    imgs, rows, splits = [], [], []
    for shard in shards:
        size = regular_file(shard, what="webdataset shard").stat().st_size
        try:
            with tarfile.open(shard, "r:") as tar:  # webdataset shards are plain tar
                while (member := tar.next()) is not None:
                    tar.members = []  # do not keep every member header (shards hold thousands)
                    name = member.name.rsplit("/", 1)[-1]
                    if not member.isfile() or name.split(".", 1)[-1] != "behav.npy":
                        continue
                    if member.size > size:
                        raise DataError(
                            f"member {member.name!r} declares {member.size} bytes in a {size}-byte shard",
                            path=shard,
                            field="behav.npy",
                        )
                    fh = tar.extractfile(member)
                    b = load_npy(fh.read(), path=shard, field=member.name).reshape(-1)  # type: ignore[union-attr]
                    check_numeric(b.dtype, path=shard, field=member.name)
                    if b.shape[0] <= BEHAV_TRIAL_COL:
                        raise DataError(
                            f"{member.name}: behav has {b.shape[0]} values, expected >= 6",
                            path=shard,
                            field="behav.npy",
                        )
                    imgs.append(float(b[BEHAV_IMAGE_COL]))
                    rows.append(float(b[BEHAV_TRIAL_COL]))
                    splits.append(shard.parent.name)
                _check_tar_end(tar.offset, shard, size)
        except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
            raise DataError(f"unreadable webdataset shard ({exc})", path=shard) from None
    image = _trial_index(np.asarray(imgs, dtype=np.float64), wds, "behav.npy (image id)")
    row = _trial_index(np.asarray(rows, dtype=np.float64), wds, "behav.npy (beta row)")
    split = np.asarray(splits)
    _, first = np.unique(row, return_index=True)
    keep = np.sort(first)
    return image[keep], row[keep], split[keep], str(wds)


def _check_tar_end(offset: int, shard: Path, size: int) -> None:
    """After the last member only the zero blocks that end a tar archive may follow.

    ``tarfile`` stops without an error at a damaged or truncated header after the first one, which would
    silently drop the trials after it.
    """
    if offset > size:
        raise DataError(f"a member runs past the end of the shard (byte {offset} of {size})", path=shard)
    with open(shard, "rb") as fh:
        fh.seek(offset)
        while chunk := fh.read(1 << 20):
            if chunk.count(0) != len(chunk):
                raise DataError(
                    f"damaged tar header at byte {offset}: the members after it cannot be read", path=shard
                )


def _trial_index(values: np.ndarray, path: Path, field: str) -> np.ndarray:
    """Image ids or beta rows of the trial table as non-negative int64."""
    idx = as_index(np.asarray(values).reshape(-1), path=path, field=field)
    if idx.size and idx.min() < 0:
        raise DataError(f"negative value {int(idx.min())}", path=path, field=field)
    return idx


def read_rows(dset, rows: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """``dset[rows]`` for an h5py dataset and any ``rows`` order, reading increasing index chunks.

    Returns:
        ``[len(rows), ...]`` array in ``rows`` order; memory is the result plus one chunk.
    """
    rows = np.asarray(rows, dtype=np.int64)
    uniq, inverse = np.unique(rows, return_inverse=True)
    out = np.empty((len(uniq), *dset.shape[1:]), dtype=dset.dtype)
    for i in range(0, len(uniq), chunk):
        out[i : i + chunk] = dset[uniq[i : i + chunk].tolist()]
    return out[inverse] if len(uniq) != len(rows) or not np.array_equal(uniq, rows) else out


def load_nsd(
    data_dir: str | os.PathLike,
    subject: str | int = "subj01",
    split: Literal["train", "test"] = "train",
    average_test: bool = True,
    include_images: bool = True,
    *,
    nan_policy: NanPolicy = "error",
    test_images: Literal["auto", "shared1000", "shards"] = "auto",
) -> FMRIDataset:
    """Load one subject and split of NSD (MindEye2 files), reading only the needed rows.

    Args:
        data_dir: folder of the betas, images, shared-1000 mask and trial tables.
        subject: ``"subj01"`` .. ``"subj08"`` (``1`` accepted).
        split: ``"train"`` or ``"test"``.
        average_test: one averaged row per test image (``repeats`` = its trial count).
        include_images: read the split's images (uint8 ``[M, 224, 224, 3]``, converted from float16 CHW).
        nan_policy: ``"error"``, ``"zero"`` or ``"drop"`` (drop streams over all trials of the betas file
            in row blocks to find the NaN voxels, so both splits keep the same voxels).
        test_images: how to choose test trials: ``"shared1000"`` (images in ``shared1000.npy``), ``"shards"``
            (trials of the ``test`` webdataset shards) or ``"auto"`` (the mask when present).

    Returns:
        FMRIDataset with ``voxels: [N, V]`` float32, ``image_ids`` into the split's distinct images (sorted
        by 73k id, kept in ``meta["nsd_ids"]``).
    """
    import h5py

    check_nan_policy(nan_policy)
    if split not in ("train", "test"):
        raise DataError(f"NSD has splits 'train' and 'test', not {split!r}", path=data_dir, field="split")
    folder = Path(data_dir)
    subject = nsd_subject_name(subject)
    bpath = betas_path(folder, subject)
    if not bpath.is_file():
        raise DataError(
            f"betas file not found (subjects here: {', '.join(list_nsd_subjects(folder)) or 'none'})",
            path=bpath,
            field="subject",
        )
    image73k, beta_row, shard_split, trial_src = read_nsd_trials(folder, subject)
    shared_path = folder / SHARED_FILE
    mode = test_images
    if mode == "auto":
        mode = "shared1000" if shared_path.is_file() else "shards"
    if mode == "shared1000":
        shared = load_npy(shared_path, field="shared1000")
        check_numeric(shared.dtype, path=shared_path, field="shared1000")
        shared = shared.reshape(-1).astype(bool)
        if image73k.size and image73k.max() >= len(shared):
            raise DataError(
                f"image id {int(image73k.max())} beyond the mask's {len(shared)} entries",
                path=shared_path,
                field="shared1000",
            )
        is_test = shared[image73k]
    else:
        is_test = np.char.find(shard_split.astype(str), "test") >= 0
    sel = is_test if split == "test" else ~is_test
    rows, img_ids = beta_row[sel], image73k[sel]
    if not len(rows):
        raise DataError(f"no {split} trials for {subject}", path=trial_src, field="split")
    with reading(bpath, "betas", "HDF5 file"), h5py.File(bpath, "r") as h5:
        dset = h5_numeric_dataset(h5, "betas", path=bpath)
        if dset.ndim != 2:
            raise DataError(f"expected [trials, voxels], got shape {dset.shape}", path=bpath, field="betas")
        if rows.min() < 0 or rows.max() >= dset.shape[0]:
            raise DataError(
                f"image count != trial count: trial table points at beta row {int(rows.max())} but "
                f"betas has {dset.shape[0]} rows",
                path=trial_src,
                field="behav",
            )
        voxels = read_rows(dset, rows).astype(np.float32, copy=False)
        drop_cols = None
        if nan_policy == "drop":
            # streamed over every trial (bounded memory), so that train and test keep the same voxels
            drop_cols = np.zeros(dset.shape[1], dtype=bool)
            for i in range(0, dset.shape[0], 512):
                drop_cols |= nan_columns(np.asarray(dset[i : i + 512], dtype=np.float32))
    voxels, kept = apply_nan_policy(voxels, nan_policy, path=bpath, field="betas", drop_columns=drop_cols)
    nsd_ids, ids = np.unique(img_ids, return_inverse=True)
    ids = ids.astype(np.int64)
    repeats = np.ones(len(ids), dtype=np.int64)
    if split == "test" and average_test:
        voxels, repeats = average_by_image(voxels, ids, len(nsd_ids), path=bpath, field="betas")
        ids = np.arange(len(nsd_ids), dtype=np.int64)
    images = None
    if include_images:
        images = read_nsd_images(folder / IMAGES_FILE, nsd_ids)
    meta = {
        "format": "nsd",
        "nsd_ids": nsd_ids,
        "beta_rows": rows if not (split == "test" and average_test) else None,
        "test_images": mode,
    }
    return reader_dataset(
        voxels,
        kept,
        meta,
        subject=subject,
        split=split,
        image_ids=ids,
        images=images,
        repeats=repeats,
        roi="nsdgeneral",
        source=str(bpath),
    )


def read_nsd_images(path: str | os.PathLike, nsd_ids: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Images ``nsd_ids`` of ``coco_images_224_float16.hdf5`` as uint8 ``[M, H, W, 3]``, read in chunks."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DataError("images file not found", path=path)
    with reading(path, "images", "HDF5 file"), h5py.File(path, "r") as h5:
        dset = h5_numeric_dataset(h5, "images", path=path)
        if dset.ndim != 4 or dset.shape[1] != 3:
            raise DataError(f"expected [images, 3, H, W], got shape {dset.shape}", path=path, field="images")
        if len(nsd_ids) and nsd_ids.max() >= dset.shape[0]:
            raise DataError(
                f"image id {int(nsd_ids.max())} is in no stimulus table: the file has {dset.shape[0]} images",
                path=path,
                field="images",
            )
        out = np.empty((len(nsd_ids), dset.shape[2], dset.shape[3], 3), dtype=np.uint8)
        for i in range(0, len(nsd_ids), chunk):
            block = np.asarray(dset[np.sort(nsd_ids[i : i + chunk]).tolist()], dtype=np.float32)
            if not np.isfinite(block).all():
                raise DataError(
                    f"NaN or Inf pixels among images {int(nsd_ids[i])}..", path=path, field="images"
                )
            if dset.dtype.kind == "f":
                block = block * 255.0
            out[i : i + chunk] = np.clip(np.rint(block), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return out
