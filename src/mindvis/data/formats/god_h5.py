"""Reader of GOD in the Kamitani lab's BData ``.h5`` format (bdpy), read with h5py directly, and the
converter from BData to the MinD-Vis npz layout (:mod:`mindvis.data.formats.god`).

BData layout (one file per subject, e.g. ``Subject3.h5``)::

    /dataset                [samples, columns] float   every column is a voxel or a per-sample value
    /metadata/key           [K] strings                e.g. VoxelData, ROI_V1 ... ROI_VC, DataType, Run, Label
    /metadata/description   [K] strings
    /metadata/value         [K, columns] float         row k flags or annotates columns (NaN = not applicable)
    /vmap/<key>/<value>     optional value -> label strings (not needed here)

(older files name them ``/dataSet`` and ``/metaData``; both are accepted). A column belongs to ``key`` when
``value[key, column] == 1``: the voxel columns are flagged by ``VoxelData`` and by the ``ROI_*`` keys, and the
single ``DataType`` column holds 1 (training), 2 (test, perception) or 3 (test, imagery) for each sample. The
``Label`` column holds the stimulus id ``<category>.<image>`` (e.g. ``1518878.014910``) for perception and the
category for imagery. Labels are mapped to images through the stimulus tables
(:func:`mindvis.data.formats.god.load_stimulus_tables`: MinD-Vis's ``imagenet_*_label.csv`` or GOD's
``stimulus_ImageNet{Training,Test}.csv``), whose row order is the order of the images in the images npz.

:func:`convert_god_h5` writes ``sbj_N.npz`` (``arr_0`` training rows, ``arr_1`` test rows, ``arr_2`` their
per-image averages in test table order, ``arr_3`` training image index, ``arr_4`` the ``Label`` of each
``arr_1`` row, ``arr_5``/``arr_6`` NaN because BData holds no noise ceiling or SNR, one boolean mask per
``ROI_*`` key without the prefix) plus the label csv files, so that :func:`load_god_h5` and
:func:`mindvis.data.formats.god.load_god` return identical datasets.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from mindvis.data.dataset import FMRIDataset
from mindvis.data.formats.common import (
    NanPolicy,
    NpzArchive,
    apply_nan_policy,
    as_index,
    average_by_image,
    check_h5_dataset,
    check_nan_policy,
    h5_numeric_dataset,
    nan_columns,
    reading,
)
from mindvis.data.formats.god import (
    CLASS_INDEX_FILE,
    TEST_LABEL_FILE,
    TRAIN_LABEL_FILE,
    GodStimulusTable,
    find_god_images,
    format_god_label,
    load_stimulus_tables,
    read_class_index,
    split_god_label,
)
from mindvis.errors import DataError
from mindvis.utils.io import atomic_dir, atomic_write

_logger = logging.getLogger(__name__)

DATATYPE_CODES = {"train": 1, "test": 2, "imagery": 3}
_SUBJECT_FILE_RE = re.compile(r"(?:subject|sub|sbj)[-_]?0*(\d+)", re.IGNORECASE)


def _decode(values) -> list[str]:
    return [
        v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
        for v in np.asarray(values).reshape(-1)
    ]


class BDataFile:
    """Read-only access to a BData ``.h5`` file; the metadata is read at once, the dataset lazily.

    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError("file not found", path=self.path)
        try:
            self._h5 = h5py.File(self.path, "r")
        except (OSError, ValueError, RuntimeError) as exc:
            raise DataError(f"not a readable HDF5 file ({exc})", path=self.path) from None
        try:
            with reading(self.path, what="HDF5 file"):
                self._open()
        except BaseException:
            self._h5.close()
            raise

    def _open(self) -> None:
        h5 = self._h5
        ds_name = "dataset" if "dataset" in h5 else "dataSet" if "dataSet" in h5 else None
        md_name = "metadata" if "metadata" in h5 else "metaData" if "metaData" in h5 else None
        if ds_name is None:
            raise DataError("missing key '/dataset'", path=self.path, field="/dataset")
        if md_name is None:
            raise DataError("missing group '/metadata'", path=self.path, field="/metadata")
        for k in ("key", "value"):
            if k not in h5[md_name]:
                raise DataError(f"missing key '/{md_name}/{k}'", path=self.path, field=f"/{md_name}/{k}")
        self.dataset = h5_numeric_dataset(h5, ds_name, path=self.path, field=f"/{ds_name}")
        for k in ("key", "value", "description"):
            if k in h5[md_name]:
                check_h5_dataset(h5[md_name][k], path=self.path, field=f"/{md_name}/{k}")
        if self.dataset.ndim != 2:
            raise DataError(
                f"expected [samples, columns], got shape {self.dataset.shape}",
                path=self.path,
                field=f"/{ds_name}",
            )
        self.keys = _decode(h5[md_name]["key"][()])
        self.descriptions = (
            _decode(h5[md_name]["description"][()]) if "description" in h5[md_name] else [""] * len(self.keys)
        )
        self.values = np.asarray(h5[md_name]["value"][()], dtype=np.float64)
        if self.values.ndim != 2 or self.values.shape != (len(self.keys), self.dataset.shape[1]):
            raise DataError(
                f"metadata value has shape {self.values.shape}, expected ({len(self.keys)} keys, "
                f"{self.dataset.shape[1]} columns)",
                path=self.path,
                field=f"/{md_name}/value",
            )
        self._md = md_name

    def __enter__(self) -> BDataFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._h5.close()

    @property
    def n_samples(self) -> int:
        return int(self.dataset.shape[0])

    @property
    def n_columns(self) -> int:
        return int(self.dataset.shape[1])

    def meta(self, key: str) -> np.ndarray:
        """``[columns]`` metadata row ``key``."""
        if key not in self.keys:
            raise DataError(f"missing metadata key {key!r}; keys: {self.keys}", path=self.path, field=key)
        return self.values[self.keys.index(key)]

    def columns(self, key: str) -> np.ndarray:
        """``[columns]`` bool: the columns flagged by ``key`` (metadata value 1)."""
        return self.meta(key) == 1

    def roi_keys(self) -> list[str]:
        return [k for k in self.keys if k.startswith("ROI_")]

    def voxel_columns(self) -> np.ndarray:
        """``[columns]`` bool: voxel columns (``VoxelData``, else the union of the ``ROI_*`` flags)."""
        if "VoxelData" in self.keys:
            cols = self.columns("VoxelData")
        else:
            rois = self.roi_keys()
            if not rois:
                raise DataError(
                    "no VoxelData or ROI_* metadata: cannot tell voxel columns",
                    path=self.path,
                    field="VoxelData",
                )
            cols = np.any([self.columns(k) for k in rois], axis=0)
        if not cols.any():
            raise DataError("no voxel columns", path=self.path, field="VoxelData")
        return cols

    def sample_values(self, key: str) -> np.ndarray:
        """``[samples]`` float64: the one column flagged by ``key`` (e.g. ``DataType``, ``Label``)."""
        idx = np.flatnonzero(self.columns(key))
        if len(idx) != 1:
            raise DataError(
                f"expected exactly one column flagged by {key!r}, found {len(idx)}", path=self.path, field=key
            )
        with reading(self.path, "/dataset", "HDF5 dataset"):
            return np.asarray(self.dataset[:, int(idx[0])], dtype=np.float64)

    def read(self, rows: np.ndarray, columns: np.ndarray, block_rows: int = 512) -> np.ndarray:
        """``dataset[rows][:, columns]`` as float32, read in row blocks.

        Args:
            rows: ``[samples]`` bool.
            columns: ``[columns]`` bool.
        Returns:
            ``[rows.sum(), columns.sum()]`` float32.
        """
        ridx = np.flatnonzero(rows)
        cidx = np.flatnonzero(columns)
        out = np.empty((len(ridx), len(cidx)), dtype=np.float32)
        if not len(ridx):
            return out
        pos = 0
        lo = int(ridx[0])
        hi_all = int(ridx[-1]) + 1
        for start in range(lo, hi_all, block_rows):
            stop = min(start + block_rows, hi_all)
            sel = rows[start:stop]
            if not sel.any():
                continue
            with reading(self.path, "/dataset", "HDF5 dataset"):
                block = np.asarray(self.dataset[start:stop])[sel][:, cidx]
            out[pos : pos + len(block)] = block
            pos += len(block)
        return out


def roi_key(roi: str) -> str:
    """``"VC"`` -> ``"ROI_VC"`` (a name already starting with ``ROI_`` is kept)."""
    return roi if roi.startswith("ROI_") else f"ROI_{roi}"


def god_h5_subject(path: str | os.PathLike) -> str:
    """``Subject3.h5`` -> ``"sbj_3"``; names without a number keep their stem."""
    m = _SUBJECT_FILE_RE.search(Path(path).stem)
    return f"sbj_{int(m.group(1))}" if m else Path(path).stem


def _finite_labels(labels: np.ndarray, h5_path: Path, key: str) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero(~(np.abs(labels) < 1e15))  # NaN, Inf, or too large for a GOD label
    if len(bad):
        raise DataError(
            f"{len(bad)} sample labels are NaN, Inf or out of range (first: sample {int(bad[0])})",
            path=h5_path,
            field=key,
        )
    return labels


def _lookup_images(labels: np.ndarray, table: GodStimulusTable, h5_path: Path, key: str) -> np.ndarray:
    _finite_labels(labels, h5_path, key)
    try:
        return table.lookup(labels, field=key)
    except DataError as exc:
        raise DataError(f"{exc.detail} (sample label in {h5_path.name})", path=h5_path, field=key) from None


def load_god_h5(
    path: str | os.PathLike,
    split: Literal["train", "test", "imagery"] = "train",
    roi: str = "VC",
    average_test: bool = True,
    include_images: bool = True,
    *,
    stimulus_dir: str | os.PathLike | None = None,
    images_file: str | os.PathLike | None = None,
    subject: str | None = None,
    nan_policy: NanPolicy = "error",
    label_key: str = "Label",
    datatype_key: str = "DataType",
) -> FMRIDataset:
    """Load one split of a GOD BData ``.h5`` file.

    Args:
        path: the subject's ``.h5`` file.
        split: ``"train"`` (DataType 1), ``"test"`` (DataType 2, perception) or ``"imagery"`` (DataType 3;
            no images, labels from the imagined category).
        roi: ``"VC"`` or ``"ROI_VC"``: the ``ROI_*`` metadata key selecting the voxel columns.
        average_test: the test split as one averaged row per test image (in stimulus table order) instead of
            one row per presentation.
        stimulus_dir: folder with the stimulus tables, class index and images npz (default: the file's folder).
        images_file: images npz (``train_images``/``test_images``); default: found in ``stimulus_dir``.
        subject: subject name (default from the file name, ``Subject3.h5`` -> ``sbj_3``).
        nan_policy: ``"error"``, ``"zero"`` or ``"drop"`` (NaN columns taken over the training and test
            samples, plus the imagery samples for ``split="imagery"``).
        label_key, datatype_key: metadata keys of the label and data-type columns.

    Returns:
        FMRIDataset with ``voxels: [N, V_roi]`` float32 and, for train/test, ``image_ids`` into the split's
        images and ``labels`` (ImageNet class ids when the class index is present).
    """
    check_nan_policy(nan_policy)
    if split not in DATATYPE_CODES:
        raise DataError(
            f"split must be one of {list(DATATYPE_CODES)}, got {split!r}", path=path, field="split"
        )
    path = Path(path)
    folder = Path(stimulus_dir) if stimulus_dir is not None else path.parent
    tables, class_names = load_stimulus_tables(folder)
    name = subject or god_h5_subject(path)
    meta: dict = {"format": "god-h5", "h5": str(path)}
    if class_names is not None:
        meta["class_names"] = class_names
    with BDataFile(path) as bd:
        vox_cols = bd.voxel_columns()
        rk = roi_key(roi)
        if rk not in bd.keys:
            raise DataError(
                f"missing ROI key {rk!r}; ROI keys in the file: {bd.roi_keys()}", path=path, field=rk
            )
        roi_cols = bd.columns(rk) & vox_cols
        if not roi_cols.any():
            raise DataError("ROI selects no voxel columns", path=path, field=rk)
        dtype = bd.sample_values(datatype_key)
        rows = dtype == DATATYPE_CODES[split]
        if not rows.any():
            raise DataError(
                f"no samples with {datatype_key} == {DATATYPE_CODES[split]} ({split})",
                path=path,
                field=datatype_key,
            )
        labels_raw = _finite_labels(bd.sample_values(label_key)[rows], path, label_key)
        voxels = bd.read(rows, roi_cols)
        drop_cols = None
        if nan_policy == "drop":
            drop_cols = np.zeros(voxels.shape[1], dtype=bool)
            # the perception splits share their voxels (as in the npz layout); imagery adds its own NaN
            codes = {1, 2, DATATYPE_CODES[split]}
            for code in sorted(codes):
                r = dtype == code
                if r.any():
                    drop_cols |= nan_columns(
                        voxels if code == DATATYPE_CODES[split] else bd.read(r, roi_cols)
                    )
        meta["voxels_in_file"] = int(vox_cols.sum())
    voxels, kept = apply_nan_policy(
        voxels, nan_policy, path=path, field=f"{rk}/{split}", drop_columns=drop_cols
    )
    if kept is not None:
        meta["kept_voxels"] = kept

    if split == "imagery":
        cats = np.floor(labels_raw).astype(np.int64)
        meta["categories"] = cats
        labels = None
        class_path = folder / CLASS_INDEX_FILE
        if class_path.is_file():
            wnid_to_class, _ = read_class_index(class_path)
            labels = np.asarray([wnid_to_class.get(int(c), -1) for c in cats], dtype=np.int64)
        return FMRIDataset(
            voxels=voxels,
            subject=name,
            split="imagery",
            labels=labels,
            repeats=np.ones(len(voxels), dtype=np.int64),
            roi=roi.removeprefix("ROI_"),
            source=str(path),
            meta=meta,
        )

    if split not in tables:
        raise DataError(
            f"no stimulus table for the {split} images (looked for "
            f"{TRAIN_LABEL_FILE if split == 'train' else TEST_LABEL_FILE} or the GOD stimulus csv)",
            path=folder,
            field=split,
        )
    table = tables[split]
    ids = _lookup_images(labels_raw, table, path, label_key)
    repeats = np.ones(len(ids), dtype=np.int64)
    if split == "test" and average_test:
        voxels, repeats = average_by_image(voxels, ids, len(table), path=path, field=label_key)
        ids = np.arange(len(table), dtype=np.int64)
    images = None
    image_labels = table.labels if class_names is not None else None
    img_path = Path(images_file) if images_file is not None else find_god_images(folder)
    img_key = f"{split}_images"
    if img_path is not None:
        with NpzArchive(img_path) as imgs:
            shape = (imgs.n_rows(img_key),)
            if shape[0] != len(table):
                raise DataError(
                    f"image count != stimulus table rows: {shape[0]} {img_key} but {len(table)} rows in "
                    f"{Path(table.source).name}",
                    path=img_path,
                    field=img_key,
                )
            if include_images:
                images = imgs.get(img_key)
            if f"{split}_labels" in imgs:
                image_labels = as_index(
                    imgs.get(f"{split}_labels", mmap=False), path=img_path, field=f"{split}_labels"
                )
    meta["image_names"] = table.file_names
    meta["image_god_labels"] = [
        format_god_label(c, n) for c, n in zip(table.categories, table.image_numbers, strict=True)
    ]
    return FMRIDataset(
        voxels=voxels,
        subject=name,
        split=split,
        image_ids=ids,
        images=images,
        labels=None if image_labels is None else image_labels[ids],
        repeats=repeats,
        roi=roi.removeprefix("ROI_"),
        source=str(path),
        meta=meta,
    )


def list_h5_files(src: str | os.PathLike) -> list[Path]:
    """``src`` itself if it is a file, else the ``.h5`` files in the folder in subject order."""
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise DataError("not found", path=src)
    files = sorted(
        src.glob("*.h5"), key=lambda p: (god_h5_subject(p) == p.stem, _num(god_h5_subject(p)), p.name)
    )
    if not files:
        raise DataError("no .h5 files in the folder", path=src)
    return files


def _num(name: str) -> int:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else 0


def _write_table(path: Path, table: GodStimulusTable) -> None:
    with atomic_write(path, "w") as fh:
        for c, n, f in zip(table.categories, table.image_numbers, table.file_names, strict=True):
            fh.write(f"{format_god_label(c, n)},{f or f'n{int(c):08d}_{int(n)}.JPEG'}\n")


def convert_god_h5(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    stimulus_dir: str | os.PathLike | None = None,
    images_file: str | os.PathLike | None = None,
    overwrite: bool = False,
    label_key: str = "Label",
    datatype_key: str = "DataType",
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Convert GOD BData ``.h5`` files (one file or a folder) to the MinD-Vis npz layout in ``out_dir``.

    The output folder is built under a temporary name and renamed into place when complete. The stimulus
    tables become ``imagenet_{training,testing}_label.csv``; the class index and the images npz are copied.

    Returns:
        The ``sbj_N.npz`` paths written.
    """
    files = list_h5_files(src)
    folder = Path(stimulus_dir) if stimulus_dir is not None else files[0].parent
    tables, _ = load_stimulus_tables(folder)
    for split in ("train", "test"):
        if split not in tables:
            raise DataError(
                f"no stimulus table for the {split} images ({TRAIN_LABEL_FILE if split == 'train' else TEST_LABEL_FILE} "
                "or stimulus_ImageNet{Training,Test}.csv)",
                path=folder,
                field=split,
            )
    img_path = Path(images_file) if images_file is not None else find_god_images(folder)
    names = [god_h5_subject(f) for f in files]
    if len(set(names)) != len(names):
        names = [f"sbj_{i + 1}" for i in range(len(files))]
    written = []
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for f, name in zip(files, names, strict=True):
            if progress is not None:
                progress(f"{f.name} -> {name}.npz")
            arrays = _convert_one(f, tables, label_key, datatype_key)
            np.savez(tmp / f"{name}.npz", **arrays)
            written.append(out_dir / f"{name}.npz")
        _write_table(tmp / TRAIN_LABEL_FILE, tables["train"])
        _write_table(tmp / TEST_LABEL_FILE, tables["test"])
        if (folder / CLASS_INDEX_FILE).is_file():
            shutil.copyfile(folder / CLASS_INDEX_FILE, tmp / CLASS_INDEX_FILE)
        if img_path is not None:
            target = img_path.name if re.match(r"^images_\w+\.npz\Z", img_path.name) else None
            if target is None:
                with NpzArchive(img_path) as imgs:
                    shape, _ = imgs.header("test_images")
                    target = f"images_{shape[1] if len(shape) == 4 else 'other'}.npz"
            shutil.copyfile(img_path, tmp / target)
        else:
            _logger.warning(
                "no images npz found in %s; the converted folder has fMRI and labels only", folder
            )
    return written


def _convert_one(
    path: Path, tables: dict[str, GodStimulusTable], label_key: str, datatype_key: str
) -> dict[str, np.ndarray]:
    with BDataFile(path) as bd:
        vox_cols = bd.voxel_columns()
        dtype = bd.sample_values(datatype_key)
        labels = bd.sample_values(label_key)
        train_rows, test_rows = dtype == 1, dtype == 2
        if not train_rows.any() or not test_rows.any():
            raise DataError(
                f"needs training (1) and test (2) samples; found {int(train_rows.sum())} and "
                f"{int(test_rows.sum())}",
                path=path,
                field=datatype_key,
            )
        arr0 = bd.read(train_rows, vox_cols)
        arr1 = bd.read(test_rows, vox_cols)
        arr3 = _lookup_images(labels[train_rows], tables["train"], path, label_key)
        test_ids = _lookup_images(labels[test_rows], tables["test"], path, label_key)
        arr2, _ = average_by_image(arr1, test_ids, len(tables["test"]), path=path, field=label_key)
        cat, num = split_god_label(labels[test_rows])
        arr4 = cat + num / 1e6
        n_all = int(vox_cols.sum())
        out = {
            "arr_0": arr0,
            "arr_1": arr1,
            "arr_2": arr2,
            "arr_3": arr3,
            "arr_4": arr4,
            "arr_5": np.full(n_all, np.nan, np.float32),
            "arr_6": np.full(n_all, np.nan, np.float32),
        }
        for k in bd.roi_keys():
            out[k.removeprefix("ROI_")] = bd.columns(k)[vox_cols]
        n_nan = int(np.isnan(arr0).sum() + np.isnan(arr1).sum())
        if n_nan:
            _logger.warning("%s: %d NaN voxel values kept as NaN (readers apply nan_policy)", path, n_nan)
    return out
