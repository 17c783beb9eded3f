"""Reader of the Generic Object Decoding dataset (Horikawa & Kamitani 2017) in the npz layout MinD-Vis uses.

Layout of the folder (``data_dir``)::

    sbj_1.npz ... sbj_5.npz        one per subject
        arr_0  [1200, V_all]  training fMRI, one row per trial (single presentations)
        arr_1  [1750, V_all]  test fMRI, not averaged (50 images x 35 repeats)
        arr_2  [50, V_all]    test fMRI, averaged over repeats; row j goes with test image j
        arr_3  [1200]         index into ``train_images`` of each ``arr_0`` row (0-based)
        arr_4  [1750]         which test image each ``arr_1`` row saw (see below)
        arr_5, arr_6          noise ceiling and SNR per voxel (kept in ``meta`` when asked)
        VC, V1, ...           boolean ROI masks over the V_all columns (any of them can be selected)
    images_256.npz                 (any ``images_*.npz``) keys ``train_images`` [1200, H, W, 3] uint8,
                                   ``test_images`` [50, H, W, 3] uint8, optionally ``train_labels`` /
                                   ``test_labels`` [M] int class ids
    imagenet_class_index.json      {"<class id>": ["n01440764", ..., "<description>"], ...}
    imagenet_training_label.csv    one row per train image, in ``train_images`` order:
    imagenet_testing_label.csv     ``<category>.<image>,<file name>``, e.g. ``1518878.014910,n01518878_14910.JPEG``

``arr_4`` is read either as 0-based indices into ``test_images`` (integers below the test image count) or as
GOD stimulus labels ``<category>.<image>`` (floats such as ``1518878.01491``) that are looked up in
``imagenet_testing_label.csv``. Each non-averaged test row is paired with its own image through ``arr_4``;
rows are never paired by repeating the image list.

Labels (ImageNet class ids, -1 when unknown) come from ``train_labels``/``test_labels`` in the images npz
when present, else from the label csv files: the category (WordNet offset, the part before the dot) is looked
up among the WordNet ids of ``imagenet_class_index.json``.

Uncompressed npz members (``np.savez``, which is how the distributed files are written) are memory-mapped:
fMRI is read in row blocks when selecting ROI columns and images stay mapped read-only (do not modify
``dataset.images`` in place). Compressed members are read into memory.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from mindvis.data.dataset import FMRIDataset
from mindvis.data.formats.common import (
    NanPolicy,
    NpzArchive,
    apply_nan_policy,
    as_bool_mask,
    as_index,
    check_nan_policy,
    check_numeric,
    nan_columns,
    read_text,
    take_columns,
)
from mindvis.errors import DataError

_logger = logging.getLogger(__name__)

GOD_FMRI_KEYS = ("arr_0", "arr_1", "arr_2", "arr_3", "arr_4", "arr_5", "arr_6")
CLASS_INDEX_FILE = "imagenet_class_index.json"
TRAIN_LABEL_FILE = "imagenet_training_label.csv"
TEST_LABEL_FILE = "imagenet_testing_label.csv"
_SUBJECT_RE = re.compile(r"^sbj_(\d+)\.npz\Z")
_IMAGES_RE = re.compile(r"^images_(\w+)\.npz\Z")
# at most 15 digits each side, so that the numbers fit int64 (real labels have 7-8 and 6)
_LABEL_RE = re.compile(r"([0-9]{1,15})\.([0-9]{1,15})")
_FILE_RE = re.compile(r"n([0-9]{1,15})_([0-9]{1,15})")

TestIndex = Literal["auto", "index", "label"]


def list_god_subjects(data_dir: str | os.PathLike) -> list[str]:
    """Subject names (``"sbj_1"``...) with a ``sbj_N.npz`` in ``data_dir``, in numeric order."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError("GOD folder not found", path=folder)
    found = [(int(m.group(1)), m.group(0)[:-4]) for p in folder.iterdir() if (m := _SUBJECT_RE.match(p.name))]
    return [name for _, name in sorted(found)]


def god_subject_name(subject: str | int) -> str:
    """``3``, ``"3"``, ``"S3"`` or ``"sbj_3"`` -> ``"sbj_3"``."""
    s = str(subject).strip()
    if s.startswith("sbj_"):
        return s
    digits = s.lstrip("sS").lstrip("ubject_-")
    if digits.isdigit():
        return f"sbj_{int(digits)}"
    return s


def find_god_images(data_dir: str | os.PathLike) -> Path | None:
    """The images npz of a GOD folder: ``images_256.npz`` if present, else the highest-resolution ``images_*``."""
    folder = Path(data_dir)
    if (folder / "images_256.npz").is_file():
        return folder / "images_256.npz"
    cands = [p for p in folder.glob("images_*.npz") if _IMAGES_RE.match(p.name) and p.is_file()]
    if not cands:
        return None

    def res(p: Path) -> int:
        tail = _IMAGES_RE.match(p.name).group(1)  # type: ignore[union-attr]
        return int(tail) if tail.isdigit() else -1

    cands.sort(key=lambda p: (res(p), p.name), reverse=True)
    if len(cands) > 1:
        _logger.info("several images npz in %s; using %s", folder, cands[0].name)
    return cands[0]


@dataclass
class GodStimulusTable:
    """Per-image metadata of one GOD image set, from a label csv.

    Attributes:
        categories: ``[M]`` int WordNet offset of each image (the part of the label before the dot).
        image_numbers: ``[M]`` int image number within the category (after the dot).
        file_names: ``[M]`` image file names (second csv column, empty if absent).
        labels: ``[M]`` int ImageNet class id (-1 when the category is in no class of the index).
    """

    categories: np.ndarray
    image_numbers: np.ndarray
    file_names: list[str]
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.categories)

    def lookup(self, god_labels: np.ndarray, field: str) -> np.ndarray:
        """Row index of each GOD label ``<category>.<image>`` (float); unknown labels raise DataError."""
        keys = {
            (int(c), int(n)): i
            for i, (c, n) in enumerate(zip(self.categories, self.image_numbers, strict=True))
        }
        cat, num = split_god_label(god_labels)
        out = np.empty(len(cat), dtype=np.int64)
        for i, (c, n) in enumerate(zip(cat, num, strict=True)):
            j = keys.get((int(c), int(n)))
            if j is None:
                raise DataError(
                    f"label {format_god_label(c, n)} (row {i}) is in no stimulus table "
                    f"(looked in {self.source})",
                    path=self.source,
                    field=field,
                )
            out[i] = j
        return out


def split_god_label(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GOD labels ``<category>.<image>`` as floats (6 decimal digits) -> ``(category, image number)`` ints."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    cat = np.floor(v).astype(np.int64)
    num = np.rint((v - cat) * 1e6).astype(np.int64)
    return cat, num


def format_god_label(category: int, number: int) -> str:
    return f"{int(category)}.{int(number):06d}"


def read_class_index(path: str | os.PathLike) -> tuple[dict[int, int], list[str]]:
    """``imagenet_class_index.json`` -> (WordNet offset -> class id, class descriptions by id)."""
    path = Path(path)
    text = read_text(path, what="class index")
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"not valid JSON ({type(exc).__name__}: {str(exc)[:200]})", path=path) from None
    if not isinstance(raw, dict):
        raise DataError("expected an object {class id: [wnid, ..., description]}", path=path)
    wnid_to_class: dict[int, int] = {}
    names: dict[int, str] = {}
    for key, val in raw.items():
        if not (str(key).isdecimal() and len(str(key)) <= 9 and isinstance(val, list) and len(val) >= 2):
            raise DataError(
                f"entry {key!r} must map a class id to [wnid, ..., description]", path=path, field=str(key)
            )
        cls = int(key)
        names[cls] = str(val[-1])
        for w in val[:-1]:
            w = str(w)
            if not (w[:1] == "n" and w[1:].isascii() and w[1:].isdigit() and len(w) <= 16):
                raise DataError(
                    f"class {key}: {w!r} is not a WordNet id like n01440764", path=path, field=str(key)
                )
            wnid_to_class.setdefault(int(w[1:]), cls)
    n = max(names) + 1 if names else 0
    if n > 2 * len(names) + 16:
        raise DataError(
            f"class ids must run from 0 to the number of classes; found id {n - 1} among {len(names)} classes",
            path=path,
        )
    return wnid_to_class, [names.get(i, "") for i in range(n)]


def read_label_csv(path: str | os.PathLike, wnid_to_class: dict[int, int] | None) -> GodStimulusTable:
    """A GOD stimulus table -> :class:`GodStimulusTable`, one row per image in image order.

    Accepts MinD-Vis's ``imagenet_*_label.csv`` (``<category>.<image>,<file name>``) and the GOD release's
    tab-separated ``stimulus_ImageNet{Training,Test}.csv`` (``<file name>\t<category>.<image>\t...``): in each
    row the first field like ``1518878.014910`` is the label and the first field like ``n01518878_14910.JPEG``
    the file name (the label is taken from the file name when no such field exists).
    """
    path = Path(path)
    text = read_text(path, what="stimulus table")
    delimiter = "\t" if "\t" in text.split("\n", 1)[0] else ","
    try:
        rows = [
            r for r in csv.reader(text.splitlines(), delimiter=delimiter) if r and any(c.strip() for c in r)
        ]
    except csv.Error as exc:
        raise DataError(f"not a readable csv table ({exc})", path=path) from None
    cats, nums, files = [], [], []
    for i, row in enumerate(rows):
        fields = [c.strip() for c in row]
        label = next((f for f in fields if _LABEL_RE.fullmatch(f)), None)
        fname = next((f for f in fields if _FILE_RE.match(f)), "")
        if label is not None:
            m = _LABEL_RE.fullmatch(label)
            # the image number has 6 digits (float labels are read the same way, see split_god_label)
            cat, num = int(m.group(1)), int(m.group(2).ljust(6, "0")[:6])  # type: ignore[union-attr]
        elif fname:
            fm = _FILE_RE.match(fname)
            cat, num = int(fm.group(1)), int(fm.group(2))  # type: ignore[union-attr]
        elif i == 0:  # a header row
            continue
        else:
            raise DataError(
                f"row {i + 1}: no GOD label <category>.<image> or file name n<wnid>_<image> in {fields}",
                path=path,
                field="label",
            )
        cats.append(cat)
        nums.append(num)
        files.append(fname)
    categories = np.asarray(cats, dtype=np.int64)
    if wnid_to_class is None:
        labels = np.full(len(cats), -1, dtype=np.int64)
    else:
        labels = np.asarray([wnid_to_class.get(c, -1) for c in cats], dtype=np.int64)
    return GodStimulusTable(
        categories=categories,
        image_numbers=np.asarray(nums, dtype=np.int64),
        file_names=files,
        labels=labels,
        source=str(path),
    )


#: Stimulus table names looked for, per split: MinD-Vis's label csv first, then the GOD release's table.
STIMULUS_TABLE_NAMES = {
    "train": (TRAIN_LABEL_FILE, "stimulus_ImageNetTraining.csv", "stimulus_ImageNetTraining.tsv"),
    "test": (TEST_LABEL_FILE, "stimulus_ImageNetTest.csv", "stimulus_ImageNetTest.tsv"),
}


def load_stimulus_tables(folder: str | os.PathLike) -> tuple[dict[str, GodStimulusTable], list[str] | None]:
    """The stimulus tables (``"train"``, ``"test"``, where present) of a folder and the class names.

    Labels are ImageNet class ids when ``imagenet_class_index.json`` is present, else -1.
    """
    folder = Path(folder)
    class_path = folder / CLASS_INDEX_FILE
    wnid_to_class, class_names = read_class_index(class_path) if class_path.is_file() else (None, None)
    tables = {}
    for split, names in STIMULUS_TABLE_NAMES.items():
        for name in names:
            if (folder / name).is_file():
                tables[split] = read_label_csv(folder / name, wnid_to_class)
                break
    return tables, class_names


def _resolve_test_index(
    arr4: np.ndarray, n_test: int, table: GodStimulusTable | None, mode: TestIndex, npz_path: Path
) -> tuple[np.ndarray, str]:
    values = np.asarray(arr4).reshape(-1)
    integer = values.dtype.kind in "iu" or (
        values.dtype.kind == "f" and np.all(np.isfinite(values)) and np.all(values == np.round(values))
    )
    if mode == "index" or (
        mode == "auto" and integer and values.size and values.min() >= 0 and values.max() < n_test
    ):
        idx = as_index(values, path=npz_path, field="arr_4")
        if idx.size and (idx.min() < 0 or idx.max() >= n_test):
            raise DataError(
                f"test image index out of range [0, {n_test}): min {idx.min()}, max {idx.max()}",
                path=npz_path,
                field="arr_4",
            )
        return idx, "index"
    if table is None:
        raise DataError(
            f"arr_4 holds GOD labels (e.g. {values[0]!r}) but {TEST_LABEL_FILE} is missing, so they "
            "cannot be paired with test images",
            path=npz_path,
            field="arr_4",
        )
    if values.dtype.kind not in "iuf":
        raise DataError(
            f"expected numeric labels or indices, got dtype {values.dtype}", path=npz_path, field="arr_4"
        )
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero(~(np.abs(values.astype(np.float64)) < 1e15))  # NaN, Inf, or no GOD label
    if len(bad):
        raise DataError(
            f"{len(bad)} labels are NaN, Inf or out of range (first: row {int(bad[0])}, {values[bad[0]]!r})",
            path=npz_path,
            field="arr_4",
        )
    return table.lookup(values, field="arr_4"), "label"


def _numeric_rows_of(npz: NpzArchive, key: str, n_all: int) -> bool:
    """True if member ``key`` is a numeric ``[rows, n_all]`` array."""
    shape, dtype = npz.header(key)
    return len(shape) == 2 and shape[1] == n_all and dtype.kind in "biuf"


def load_god(
    data_dir: str | os.PathLike,
    subject: str | int = "sbj_1",
    split: Literal["train", "test"] = "train",
    roi: str = "VC",
    average_test: bool = True,
    include_images: bool = True,
    *,
    nan_policy: NanPolicy = "error",
    images_file: str | os.PathLike | None = None,
    test_index: TestIndex = "auto",
    mmap: bool = True,
    include_voxel_stats: bool = False,
) -> FMRIDataset:
    """Load one subject and split of GOD in the MinD-Vis npz layout.

    Args:
        data_dir: the folder holding ``sbj_N.npz``, the images npz and the label files.
        subject: ``"sbj_3"``, ``"3"`` or ``3``.
        split: ``"train"`` (``arr_0`` paired through ``arr_3``) or ``"test"``.
        roi: name of the boolean mask key selecting voxel columns (``"VC"``, ``"V1"``...).
        average_test: test split from ``arr_2`` (one averaged row per test image, ``repeats`` = its number
            of ``arr_1`` rows when ``arr_4`` is present) or, when False, from ``arr_1`` (one row per
            presentation, paired through ``arr_4``).
        include_images: attach ``images`` (memory-mapped when possible). ``image_ids`` is set either way.
        nan_policy: ``"error"``, ``"zero"`` or ``"drop"`` (see :mod:`mindvis.data.formats.common`); under
            ``"drop"`` the NaN columns are taken over ``arr_0``, ``arr_1`` and ``arr_2`` of the subject.
        images_file: images npz to use instead of the one found in ``data_dir``.
        test_index: how to read ``arr_4``: ``"index"`` (0-based test image rows), ``"label"`` (GOD labels
            looked up in the testing label csv) or ``"auto"``.
        mmap: memory-map uncompressed members.
        include_voxel_stats: put ``arr_5`` (noise ceiling) and ``arr_6`` (SNR) of the ROI in ``meta``.

    Returns:
        FMRIDataset with ``voxels: [N, V_roi]`` float32, ``image_ids: [N]``, ``labels: [N]`` (when known),
        ``repeats: [N]``, ``images: [M, H, W, 3]`` uint8 (the split's image set, when ``include_images``).

    Raises:
        DataError: missing file or key, ROI mask of the wrong length, image count that does not match the
            trials, a label in no stimulus table, NaN voxels under ``nan_policy="error"``.
    """
    check_nan_policy(nan_policy)
    if split not in ("train", "test"):
        raise DataError(
            f"GOD npz has splits 'train' and 'test', not {split!r} (imagery is in the BData .h5 files)",
            path=data_dir,
            field="split",
        )
    folder = Path(data_dir)
    name = god_subject_name(subject)
    npz_path = folder / f"{name}.npz"
    if not npz_path.is_file():
        have = list_god_subjects(folder) if folder.is_dir() else []
        raise DataError(
            f"subject file not found (subjects here: {', '.join(have) or 'none'})",
            path=npz_path,
            field="subject",
        )
    tables, class_names = load_stimulus_tables(folder)
    img_path = Path(images_file) if images_file is not None else find_god_images(folder)
    meta: dict = {"format": "god", "npz": str(npz_path)}
    if class_names is not None:
        meta["class_names"] = class_names

    with NpzArchive(npz_path) as npz:
        fmri_key = "arr_0" if split == "train" else ("arr_2" if average_test else "arr_1")
        shape, _dtype = npz.header(fmri_key)
        check_numeric(_dtype, path=npz_path, field=fmri_key)
        if len(shape) != 2:
            raise DataError(f"expected [samples, voxels], got shape {shape}", path=npz_path, field=fmri_key)
        n_rows, n_all = shape
        if roi not in npz:
            masks = [k for k in npz.keys if k not in GOD_FMRI_KEYS]
            raise DataError(
                f"missing ROI mask key {roi!r}; ROI keys in the file: {masks}", path=npz_path, field=roi
            )
        mask = as_bool_mask(npz.get(roi, mmap=False), n_all, path=npz_path, field=roi)
        voxels = take_columns(npz.get(fmri_key, mmap=mmap), mask)
        drop_cols = None
        if nan_policy == "drop":
            drop_cols = np.zeros(voxels.shape[1], dtype=bool)
            for key in ("arr_0", "arr_1", "arr_2"):
                if key in npz and _numeric_rows_of(npz, key, n_all):
                    other = voxels if key == fmri_key else take_columns(npz.get(key, mmap=mmap), mask)
                    drop_cols |= nan_columns(other)
        voxels, kept = apply_nan_policy(
            voxels, nan_policy, path=npz_path, field=fmri_key, drop_columns=drop_cols
        )
        if kept is not None:
            meta["kept_voxels"] = kept
        if include_voxel_stats:
            for key, label in (("arr_5", "noise_ceiling"), ("arr_6", "snr")):
                if key in npz:
                    stat = np.asarray(npz.get(key, mmap=False)).reshape(-1)
                    if stat.shape[0] == n_all:
                        stat = stat[mask]
                        meta[label] = stat if kept is None else stat[kept]

        img_shape = None
        img_key = "train_images" if split == "train" else "test_images"
        if img_path is not None:
            with NpzArchive(img_path) as imgs:
                img_shape = (imgs.n_rows(img_key),)
        n_images = img_shape[0] if img_shape is not None else None

        if split == "train":
            ids = as_index(npz.get("arr_3", mmap=False), path=npz_path, field="arr_3")
            if len(ids) != n_rows:
                raise DataError(
                    f"image count != trial count: arr_3 has {len(ids)} image indices for {n_rows} "
                    "training rows in arr_0",
                    path=npz_path,
                    field="arr_3",
                )
            limit = (
                n_images if n_images is not None else (len(tables["train"]) if "train" in tables else None)
            )
            if ids.size and (ids.min() < 0 or (limit is not None and ids.max() >= limit)):
                raise DataError(
                    f"training image index out of range [0, {limit}): min {ids.min()}, max {ids.max()}",
                    path=npz_path,
                    field="arr_3",
                )
            repeats = np.ones(n_rows, dtype=np.int64)
        else:
            n_test = n_images
            if n_test is None:
                n_test = len(tables["test"]) if "test" in tables else npz.n_rows("arr_2")
            arr4 = None
            if "arr_4" in npz:
                arr4 = np.asarray(npz.get("arr_4", mmap=False)).reshape(-1)
                n_nonavg = npz.n_rows("arr_1") if "arr_1" in npz else None
                if n_nonavg is not None and len(arr4) != n_nonavg:
                    raise DataError(
                        f"image count != trial count: arr_4 has {len(arr4)} entries for {n_nonavg} "
                        "rows of arr_1",
                        path=npz_path,
                        field="arr_4",
                    )
            if average_test:
                if n_rows != n_test:
                    raise DataError(
                        f"image count != trial count: {n_rows} averaged test rows in arr_2 but "
                        f"{n_test} test images" + (f" in {img_path.name}" if n_images is not None else ""),
                        path=npz_path,
                        field="arr_2",
                    )
                ids = np.arange(n_rows, dtype=np.int64)
                repeats = None
                if arr4 is not None:  # only used to count the repeats of each averaged row
                    try:
                        per_row, how = _resolve_test_index(
                            arr4, n_test, tables.get("test"), test_index, npz_path
                        )
                    except DataError as exc:
                        if "test" in tables:
                            raise
                        _logger.warning("%s; repeats of the averaged rows are unknown", exc)
                    else:
                        repeats = np.bincount(per_row, minlength=n_test).astype(np.int64)
                        meta["test_index"] = how
            else:
                if arr4 is None:
                    raise DataError(
                        "missing key 'arr_4' (the test image of each arr_1 row), needed for the "
                        "non-averaged test set",
                        path=npz_path,
                        field="arr_4",
                    )
                ids, how = _resolve_test_index(arr4, n_test, tables.get("test"), test_index, npz_path)
                meta["test_index"] = how
                repeats = np.ones(n_rows, dtype=np.int64)

    images = None
    image_labels = None
    if img_path is not None:
        with NpzArchive(img_path) as imgs:
            if include_images:
                images = imgs.get(img_key, mmap=mmap)
                if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
                    raise DataError(
                        f"expected uint8 [images, H, W, 3], got {images.dtype} {images.shape}",
                        path=img_path,
                        field=img_key,
                    )
            lab_key = "train_labels" if split == "train" else "test_labels"
            if lab_key in imgs:
                image_labels = as_index(imgs.get(lab_key, mmap=False), path=img_path, field=lab_key)
                if n_images is not None and len(image_labels) != n_images:
                    raise DataError(
                        f"{len(image_labels)} labels for {n_images} images", path=img_path, field=lab_key
                    )
    elif include_images:
        _logger.warning("no images_*.npz in %s; loading %s without images", folder, name)
    table = tables.get(split)
    if image_labels is None and table is not None:
        if n_images is not None and len(table) != n_images:
            raise DataError(
                f"image count != label count: {len(table)} rows but {n_images} {img_key}",
                path=table.source,
                field="rows",
            )
        if class_names is not None:
            image_labels = table.labels
        meta["image_names"] = table.file_names
    if table is not None:
        meta["image_god_labels"] = [
            format_god_label(c, n) for c, n in zip(table.categories, table.image_numbers, strict=True)
        ]
    labels = None
    if image_labels is not None:
        if ids.size and ids.max() >= len(image_labels):
            raise DataError(
                f"image index {int(ids.max())} has no label ({len(image_labels)} labels)",
                path=npz_path,
                field="arr_3" if split == "train" else "arr_4",
            )
        labels = image_labels[ids]
    meta["voxels_in_file"] = int(n_all)
    return FMRIDataset(
        voxels=voxels,
        subject=name,
        split=split,
        image_ids=ids,
        images=images,
        labels=labels,
        repeats=repeats,
        roi=roi,
        source=str(npz_path),
        meta=meta,
    )


def load_god_subjects(
    data_dir: str | os.PathLike,
    subjects: list[str] | None = None,
    split: Literal["train", "test"] = "train",
    **options,
) -> list[FMRIDataset]:
    """:func:`load_god` for several subjects (all of ``data_dir`` by default), one dataset each."""
    names = list_god_subjects(data_dir) if subjects is None else [god_subject_name(s) for s in subjects]
    if not names:
        raise DataError("no sbj_N.npz files", path=data_dir)
    return [load_god(data_dir, subject=s, split=split, **options) for s in names]


def god_roi_names(npz_path: str | os.PathLike) -> list[str]:
    """ROI mask keys of a GOD subject npz (keys other than ``arr_0``..``arr_6``)."""
    with NpzArchive(npz_path) as npz:
        return [k for k in npz.keys if k not in GOD_FMRI_KEYS]
