"""Helpers shared by the dataset readers: lazy ``.npz`` access with memory mapping, NaN handling, data folders.

Memory mapping of ``.npz`` members
    ``np.load(..., mmap_mode="r")`` ignores ``mmap_mode`` for ``.npz`` archives: every member is read into
    memory when accessed. An ``.npz`` is a zip file, though, and a member written by ``np.savez`` (not
    ``np.savez_compressed``) is stored uncompressed, so its bytes lie contiguously in the file after a zip local
    header and a ``.npy`` header. :class:`NpzArchive` finds that offset and returns an ``np.memmap`` over it,
    read-only. Compressed members cannot be mapped and are read in full. Selecting ROI columns from a mapped
    array (:func:`take_columns`) works in row blocks, so peak memory is the selected columns plus one block.

NaN policy
    Readers take ``nan_policy``: ``"error"`` (default) raises :class:`DataError` naming the file, field and
    the count of NaN values and voxels; ``"zero"`` replaces NaN by 0; ``"drop"`` removes voxel columns that
    hold a NaN in any row (readers compute the columns over all splits of a subject, so that the training
    and test sets keep the same voxels, and store the kept column indices in ``meta["kept_voxels"]``).
"""

from __future__ import annotations

import logging
import os
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from mindvis.errors import DataError

_logger = logging.getLogger(__name__)

NanPolicy = Literal["error", "zero", "drop"]
NAN_POLICIES: tuple[str, ...] = ("error", "zero", "drop")

#: Environment variable holding the root folder of the datasets (nilearn's convention, ``NILEARN_DATA``).
DATA_ENV = "MINDVIS_DATA"

_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # 30 bytes, see the zip APPNOTE section 4.3.7


def default_data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The dataset root: ``data_dir`` if given, else ``$MINDVIS_DATA``, else ``~/mindvis_data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/mindvis_data").expanduser()


def check_nan_policy(nan_policy: str) -> NanPolicy:
    if nan_policy not in NAN_POLICIES:
        from mindvis.errors import ConfigError

        raise ConfigError(
            f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {nan_policy!r}", field="nan_policy"
        )
    return nan_policy  # type: ignore[return-value]


class NpzArchive:
    """Read-only, lazy access to the members of an ``.npz`` file.

    Members stored uncompressed come back as read-only ``np.memmap`` when ``mmap=True``; compressed ones are
    read into memory. Object (pickled) members are refused. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError("file not found", path=self.path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"not a readable .npz archive ({exc})", path=self.path) from None
        self._members = {n[:-4]: n for n in self._zip.namelist() if n.endswith(".npy")}

    def __enter__(self) -> NpzArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    @property
    def keys(self) -> list[str]:
        return list(self._members)

    def __contains__(self, key: str) -> bool:
        return key in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def is_stored(self, key: str) -> bool:
        """True if member ``key`` is stored uncompressed (so it can be memory-mapped)."""
        return self._zip.getinfo(self._require(key)).compress_type == zipfile.ZIP_STORED

    def _require(self, key: str) -> str:
        if key not in self._members:
            raise DataError(
                f"missing key {key!r}; the file has {sorted(self._members)}", path=self.path, field=key
            )
        return self._members[key]

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """``(shape, dtype)`` of member ``key`` without reading its data."""
        with self._zip.open(self._require(key)) as fh:
            shape, _fortran, dtype = _read_npy_header(fh, self.path, key)
        return shape, dtype

    def get(self, key: str, mmap: bool = True) -> np.ndarray:
        """Member ``key`` as an array (memory-mapped when stored uncompressed and ``mmap``)."""
        name = self._require(key)
        info = self._zip.getinfo(name)
        if mmap and info.compress_type == zipfile.ZIP_STORED:
            arr = self._memmap(info, key)
            if arr is not None:
                return arr
        try:
            with self._zip.open(name) as fh:
                return np.lib.format.read_array(fh, allow_pickle=False)
        except ValueError as exc:
            raise DataError(
                f"member cannot be read without pickle or is corrupt ({exc})", path=self.path, field=key
            ) from None
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DataError(f"truncated or corrupt member ({exc})", path=self.path, field=key) from None

    def _memmap(self, info: zipfile.ZipInfo, key: str) -> np.ndarray | None:
        with open(self.path, "rb") as fh:
            fh.seek(info.header_offset)
            raw = fh.read(_ZIP_LOCAL_HEADER.size)
            if len(raw) != _ZIP_LOCAL_HEADER.size:
                raise DataError("truncated zip header", path=self.path, field=key)
            fields = _ZIP_LOCAL_HEADER.unpack(raw)
            if fields[0] != b"PK\x03\x04":
                raise DataError("bad zip local header", path=self.path, field=key)
            name_len, extra_len = fields[-2], fields[-1]
            fh.seek(info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len)
            shape, fortran, dtype = _read_npy_header(fh, self.path, key)
            offset = fh.tell()
        count = int(np.prod(shape)) if shape else 1
        if count == 0:
            return None
        if offset + count * dtype.itemsize > self.path.stat().st_size:
            raise DataError(
                "member data runs past the end of the file (truncated download?)", path=self.path, field=key
            )
        return np.memmap(
            self.path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
        )


def _read_npy_header(fh, path: Path, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except ValueError as exc:
        raise DataError(f"not a valid .npy member ({exc})", path=path, field=key) from None
    if dtype.hasobject:
        raise DataError("member holds Python objects (pickle); refused", path=path, field=key)
    return tuple(int(s) for s in shape), bool(fortran), dtype


def as_bool_mask(mask: np.ndarray, n_columns: int, *, path: str | os.PathLike, field: str) -> np.ndarray:
    """Check an ROI mask against the voxel count and return it as a ``[V_all]`` bool array.

    Boolean masks must have exactly ``n_columns`` entries. 0/1 integer masks are accepted likewise.
    """
    mask = np.asarray(mask)
    if mask.ndim != 1:
        mask = mask.reshape(-1) if mask.size == n_columns else mask
    if mask.ndim != 1 or mask.shape[0] != n_columns:
        raise DataError(
            f"ROI mask has shape {tuple(np.shape(mask))}, expected one entry per voxel ({n_columns})",
            path=path,
            field=field,
        )
    if mask.dtype != np.bool_:
        if not np.isin(mask, (0, 1)).all():
            raise DataError(
                f"ROI mask must be boolean (or 0/1), got dtype {mask.dtype}", path=path, field=field
            )
        mask = mask.astype(bool)
    if not mask.any():
        raise DataError("ROI mask selects no voxels", path=path, field=field)
    return mask


def take_columns(arr: np.ndarray, columns: np.ndarray | None, block_rows: int = 256) -> np.ndarray:
    """``arr[:, columns]`` as float32, read in row blocks (bounded memory for memory-mapped ``arr``).

    Args:
        arr: ``[N, V_all]`` array (possibly a memmap).
        columns: ``[V_all]`` bool mask or ``[V]`` int indices, or ``None`` for all columns.
    Returns:
        ``[N, V]`` float32 in memory.
    """
    n = arr.shape[0]
    idx = (
        np.arange(arr.shape[1])
        if columns is None
        else (np.flatnonzero(columns) if columns.dtype == np.bool_ else np.asarray(columns))
    )
    out = np.empty((n, len(idx)), dtype=np.float32)
    for i in range(0, n, block_rows):
        out[i : i + block_rows] = np.asarray(arr[i : i + block_rows])[:, idx]
    return out


def nan_columns(voxels: np.ndarray) -> np.ndarray:
    """``[V]`` bool: columns of ``voxels: [N, V]`` holding at least one NaN."""
    return np.isnan(voxels).any(axis=0) if voxels.size else np.zeros(voxels.shape[1], dtype=bool)


def apply_nan_policy(
    voxels: np.ndarray,
    nan_policy: NanPolicy,
    *,
    path: str | os.PathLike,
    field: str,
    drop_columns: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Handle NaN in ``voxels: [N, V]`` per ``nan_policy``.

    Args:
        drop_columns: ``[V]`` bool columns to drop under ``"drop"`` (e.g. NaN columns over all splits of a
            subject); defaults to this array's own NaN columns.
    Returns:
        ``(voxels, kept)`` where ``kept`` is the ``[V']`` int index of kept columns under ``"drop"``
        (``None`` otherwise).
    """
    check_nan_policy(nan_policy)
    bad = np.isnan(voxels)
    n_bad = int(bad.sum())
    if nan_policy == "drop":
        cols = nan_columns(voxels) if drop_columns is None else np.asarray(drop_columns, dtype=bool)
        if cols.shape != (voxels.shape[1],):
            raise DataError(
                f"NaN column mask has {cols.shape} entries, expected {voxels.shape[1]}",
                path=path,
                field=field,
            )
        kept = np.flatnonzero(~cols)
        if not len(kept):
            raise DataError(
                "every voxel holds NaN; nothing left after nan_policy='drop'", path=path, field=field
            )
        if cols.any():
            _logger.warning(
                "%s [%s]: dropped %d of %d voxels holding NaN", path, field, int(cols.sum()), voxels.shape[1]
            )
        return np.ascontiguousarray(voxels[:, kept]), kept
    if not n_bad:
        return voxels, None
    n_cols = int(bad.any(axis=0).sum())
    n_rows = int(bad.any(axis=1).sum())
    if nan_policy == "error":
        raise DataError(
            f"{n_bad} NaN values in {n_cols} of {voxels.shape[1]} voxels ({n_rows} of "
            f"{voxels.shape[0]} samples); pass nan_policy='zero' or 'drop' (--nan-policy) "
            "to handle them",
            path=path,
            field=field,
        )
    _logger.warning("%s [%s]: replaced %d NaN values in %d voxels by 0", path, field, n_bad, n_cols)
    voxels = voxels if voxels.flags.writeable else voxels.copy()
    voxels[bad] = 0.0
    return voxels, None


def as_index(arr: np.ndarray, *, path: str | os.PathLike, field: str) -> np.ndarray:
    """An integer-valued array (int or float dtype) as ``[N]`` int64; anything else is a :class:`DataError`."""
    arr = np.asarray(arr).reshape(-1) if np.ndim(arr) == 2 and 1 in np.shape(arr) else np.asarray(arr)
    if arr.ndim != 1:
        raise DataError(f"expected a 1-D index, got shape {arr.shape}", path=path, field=field)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    raise DataError(f"expected integer indices, got dtype {arr.dtype}", path=path, field=field)


def average_by_image(
    voxels: np.ndarray, image_ids: np.ndarray, n_images: int, *, path: str | os.PathLike, field: str
) -> tuple[np.ndarray, np.ndarray]:
    """Average the repeats of each image.

    Args:
        voxels: ``[N, V]`` single-trial responses.
        image_ids: ``[N]`` image of each trial, in ``[0, n_images)``.
    Returns:
        ``(mean [n_images, V] float32, repeats [n_images] int64)``; the mean is accumulated in float64.
    Raises:
        DataError: an image has no trial.
    """
    counts = np.bincount(image_ids, minlength=n_images).astype(np.int64)
    if counts.shape[0] > n_images:
        raise DataError(
            f"image index {int(image_ids.max())} out of range [0, {n_images})", path=path, field=field
        )
    missing = np.flatnonzero(counts == 0)
    if len(missing):
        raise DataError(
            f"{len(missing)} of {n_images} images have no trial to average (first: image {int(missing[0])})",
            path=path,
            field=field,
        )
    out = np.empty((n_images, voxels.shape[1]), dtype=np.float32)
    for j in range(n_images):
        out[j] = np.mean(np.asarray(voxels[image_ids == j], dtype=np.float64), axis=0)
    return out, counts
