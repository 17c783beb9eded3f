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
    Inf counts as NaN: both are non-finite values no model can train on.

Hostile and damaged files
    Every size a file declares (an ``.npy`` header's shape, a zip member's uncompressed size, an HDF5
    dataset's shape, a NIfTI header's dimensions) is checked against the bytes the file can hold before
    anything is allocated (:func:`check_declared_size`): a plain file holds its size, deflate (zip, gzip)
    expands data at most :data:`MAX_DEFLATE_RATIO` times. Files are opened only when they are regular files
    (:func:`regular_file`; links are followed, so a data folder may be symlinked, but a link to a device, a
    FIFO or a folder is refused). :func:`reading` turns the exceptions of numpy, zipfile, h5py and nibabel on a
    damaged file into :class:`DataError` naming the file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import stat
import struct
import tarfile
import tokenize
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mindvis.data.dataset import FMRIDataset, Split
from mindvis.errors import ConfigError, DataError, MindVisError

_logger = logging.getLogger(__name__)

NanPolicy = Literal["error", "zero", "drop"]
NAN_POLICIES: tuple[str, ...] = ("error", "zero", "drop")

#: Environment variable holding the root folder of the datasets (nilearn's convention, ``NILEARN_DATA``).
DATA_ENV = "MINDVIS_DATA"

_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # 30 bytes, see the zip APPNOTE section 4.3.7

#: Deflate (zip, gzip) cannot expand data by more than about 1032:1, so a compressed file of ``n`` bytes
#: holds at most this many times ``n`` bytes of data.
MAX_DEFLATE_RATIO = 1032
#: HDF5 datasets up to this size are not checked against their stored bytes (fill values, tiny files).
H5_UNCHECKED_BYTES = 64 * 2**20


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else "no detail"
    return f"{type(exc).__name__}: {line[:200]}"


def _human(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{nbytes} bytes"  # pragma: no cover


#: What numpy, zipfile, tarfile, zlib, h5py and nibabel raise on a damaged or foreign file.
READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    RuntimeError,
    NotImplementedError,
    RecursionError,
    OverflowError,
    struct.error,
    zlib.error,
    zipfile.BadZipFile,
    tarfile.TarError,
)


def _nibabel_errors() -> tuple[type[BaseException], ...]:
    try:
        from nibabel.filebasedimages import ImageFileError
        from nibabel.spatialimages import HeaderDataError
    except ImportError:  # pragma: no cover
        return ()
    return (ImageFileError, HeaderDataError)


@contextlib.contextmanager
def reading(path: str | os.PathLike, field: str | None = None, what: str = "file") -> Iterator[None]:
    """Turn the exceptions a library raises on a damaged ``path`` into :class:`DataError` naming it.

    Wrap only the statements that read the file: a :class:`MindVisError` raised inside passes unchanged.
    """
    try:
        yield
    except MindVisError:
        raise
    except (*READ_ERRORS, *_nibabel_errors()) as exc:
        raise DataError(
            f"unreadable or corrupt {what} ({_first_line(exc)})", path=path, field=field
        ) from None


def regular_file(path: str | os.PathLike, field: str | None = None, what: str = "file") -> Path:
    """``path`` if it is a regular file (links followed), else :class:`DataError`.

    A FIFO would block the reader forever and a device such as ``/dev/zero`` never ends, so neither is opened.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"{what} not found ({_first_line(exc)})", path=path, field=field) from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise DataError(f"{what} is {kind}", path=path, field=field)
    return path


def read_text(path: str | os.PathLike, field: str | None = None, what: str = "text file") -> str:
    """The UTF-8 text of a regular file (a leading byte-order mark is dropped); anything else is a DataError."""
    path = regular_file(path, field, what)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the {what} ({_first_line(exc)})", path=path, field=field) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"line {line} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})",
            path=path,
            field=field,
        ) from None


def check_declared_size(
    shape: tuple[int, ...],
    dtype: np.dtype,
    available: int,
    *,
    path: str | os.PathLike,
    field: str | None = None,
    what: str = "the file",
) -> int:
    """Refuse an array size the file cannot hold, before anything is allocated.

    Args:
        shape, dtype: what a header declares.
        available: the most bytes of data ``what`` can hold.
    Returns:
        The declared size in bytes.
    Raises:
        DataError: a negative dimension, or more bytes declared than available (truncated or hostile file).
    """
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise DataError(f"declared shape {shape} has a negative dimension", path=path, field=field)
    nbytes = math.prod(shape) * int(np.dtype(dtype).itemsize)
    if nbytes > available:
        raise DataError(
            f"header declares shape {shape} {np.dtype(dtype)} ({_human(nbytes)}) but {what} holds at most "
            f"{_human(max(available, 0))} (truncated or corrupt)",
            path=path,
            field=field,
        )
    return nbytes


def check_h5_dataset(dset, *, path: str | os.PathLike, field: str | None = None) -> None:
    """Refuse an HDF5 dataset whose declared size its stored bytes cannot account for, before reading it.

    A hostile file can declare a dataset of terabytes (chunked, never written) in a few kilobytes. Datasets
    up to :data:`H5_UNCHECKED_BYTES` pass; larger ones must store at least ``1 / MAX_DEFLATE_RATIO`` of
    their size.
    """
    with reading(path, field, "HDF5 dataset"):
        shape, dtype = dset.shape, dset.dtype
        stored = int(dset.id.get_storage_size())
    if shape is None:
        raise DataError("dataset has no dataspace (no values)", path=path, field=field)
    check_declared_size(
        shape,
        dtype,
        max(H5_UNCHECKED_BYTES, stored * MAX_DEFLATE_RATIO),
        path=path,
        field=field,
        what=f"a dataset storing {_human(stored)}",
    )


def h5_numeric_dataset(h5, key: str, *, path: str | os.PathLike, field: str | None = None):
    """``h5[key]`` of an open HDF5 file or group, checked before it is read: present, a dataset (not a group),
    a declared size its stored bytes can account for (:func:`check_h5_dataset`), real numbers.

    Args:
        field: the name used in messages (default ``key``).
    Raises:
        DataError: naming ``path`` and ``field``.
    """
    import h5py

    field = key if field is None else field
    if key not in h5:
        raise DataError(f"missing key {key!r}", path=path, field=field)
    dset = h5[key]
    if not isinstance(dset, h5py.Dataset):
        raise DataError("expected a dataset, found a group", path=path, field=field)
    check_h5_dataset(dset, path=path, field=field)
    check_numeric(dset.dtype, path=path, field=field)
    return dset


def check_nifti_image(img, *, path: str | os.PathLike, field: str | None = None) -> None:
    """Check a nibabel image before its data is read: real numeric dtype, declared size within the file.

    A NIfTI header can declare any dimensions; the data of an uncompressed file must fit in the file, and
    a gzipped file expands at most :data:`MAX_DEFLATE_RATIO` times.
    """
    with reading(path, field, "NIfTI image"):
        proxy = img.dataobj
        shape = tuple(int(n) for n in proxy.shape)
        dtype = np.dtype(img.get_data_dtype())
        offset = int(getattr(proxy, "offset", 0))
        fname = img.file_map["image"].filename
    check_numeric(dtype, path=path, field=field)
    if fname is None:  # in memory
        return
    size = regular_file(fname, field, "NIfTI image").stat().st_size
    name = str(fname).lower()
    if name.endswith(".gz"):
        available = size * MAX_DEFLATE_RATIO
    elif name.endswith((".nii", ".img")):
        available = size - offset
    else:
        raise DataError("unsupported NIfTI file (expected .nii, .nii.gz or .img)", path=path, field=field)
    check_declared_size(shape, dtype, available, path=path, field=field)


def check_numeric(dtype: np.dtype, *, path: str | os.PathLike, field: str | None = None) -> None:
    """Refuse dtypes that are not real numbers (strings, complex, records, objects)."""
    if np.dtype(dtype).kind not in "biuf":
        raise DataError(f"expected real numbers, got dtype {np.dtype(dtype)}", path=path, field=field)


def load_npy(
    source: str | os.PathLike | bytes,
    *,
    path: str | os.PathLike | None = None,
    field: str | None = None,
    mmap: bool = False,
) -> np.ndarray:
    """A plain ``.npy`` (a file, or its bytes) as an array; pickled objects are refused.

    The declared shape is checked against the bytes present before the array is allocated.

    Args:
        source: the file, or the file's bytes (e.g. a tar member).
        path: the file named in messages (default ``source``).
        mmap: memory-map the file read-only instead of reading it.
    """
    if isinstance(source, bytes | bytearray):
        where = Path(path) if path is not None else Path("<bytes>")
        fh: io.IOBase = io.BytesIO(source)
        size = len(source)
    else:
        where = regular_file(source, field, "array file")
        fh = open(where, "rb")  # noqa: SIM115 - closed below
        size = where.stat().st_size
    try:
        shape, fortran, dtype = _read_npy_header(fh, where, field)
        check_declared_size(shape, dtype, size - fh.tell(), path=where, field=field)
        with reading(where, field, "array file"):
            if mmap and not isinstance(source, bytes | bytearray):
                return np.load(where, mmap_mode="r", allow_pickle=False)
            fh.seek(0)
            return np.load(fh, allow_pickle=False)
    finally:
        fh.close()


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
        raise ConfigError(
            f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {nan_policy!r}", field="nan_policy"
        )
    return nan_policy  # type: ignore[return-value]


def zip_member_problem(info: zipfile.ZipInfo, archive_size: int) -> str | None:
    """Why the sizes a zip member declares cannot be true, or ``None`` when they can.

    A stored member holds its compressed size; a deflated one at most :data:`MAX_DEFLATE_RATIO` times it;
    other compression methods are refused (numpy and torch write stored or deflated members only).
    """
    if info.compress_type == zipfile.ZIP_STORED:
        limit = info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        limit = info.compress_size * MAX_DEFLATE_RATIO + 1024
    else:
        return f"uses zip compression method {info.compress_type}; expected stored or deflated members"
    if info.compress_size > archive_size or info.file_size > limit:
        return (
            f"declares {_human(info.file_size)} uncompressed from {_human(info.compress_size)} in a "
            f"{_human(archive_size)} file (truncated, corrupt or hostile archive)"
        )
    return None


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
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
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
        name = self._require(key)
        with reading(self.path, key, "npz member"), self._zip.open(name) as fh:
            shape, _fortran, dtype = _read_npy_header(fh, self.path, key)
            check_declared_size(
                shape,
                dtype,
                self._member_capacity(self._zip.getinfo(name), key) - fh.tell(),
                path=self.path,
                field=key,
                what="the member",
            )
        return shape, dtype

    def n_rows(self, key: str) -> int:
        """Length of the first axis of member ``key`` (from its header); a 0-d member is a DataError."""
        shape, _ = self.header(key)
        if not shape:
            raise DataError(
                "expected an array with at least one axis, got a scalar", path=self.path, field=key
            )
        return shape[0]

    def _member_capacity(self, info: zipfile.ZipInfo, key: str) -> int:
        """The most bytes member ``info`` can hold: its size, checked against what its compression allows."""
        problem = zip_member_problem(info, self.path.stat().st_size)
        if problem:
            raise DataError(f"member {problem}", path=self.path, field=key)
        return info.file_size

    def get(self, key: str, mmap: bool = True) -> np.ndarray:
        """Member ``key`` as an array (memory-mapped when stored uncompressed and ``mmap``)."""
        name = self._require(key)
        info = self._zip.getinfo(name)
        self.header(key)  # checks the declared size before numpy allocates it
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
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:
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
        count = math.prod(shape)
        if count == 0:
            return None
        if offset + count * dtype.itemsize > self.path.stat().st_size:
            raise DataError(
                "member data runs past the end of the file (truncated download?)", path=self.path, field=key
            )
        return np.memmap(
            self.path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
        )


#: numpy refuses headers longer than this (``numpy.lib.format._MAX_HEADER_SIZE``), but only after reading them
_MAX_NPY_HEADER = 10000


def _read_npy_header(fh, path: Path, key: str | None) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        start = fh.tell()
        head = fh.read(12)
        fh.seek(start)
        if len(head) >= 10 and head[:6] == b"\x93NUMPY":
            hlen = int.from_bytes(head[8:10] if head[6:8] == b"\x01\x00" else head[8:12], "little")
            if hlen > _MAX_NPY_HEADER:
                raise DataError(
                    f"not a valid .npy array (header length {hlen} > {_MAX_NPY_HEADER})", path=path, field=key
                )
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except (
        ValueError,
        EOFError,
        OSError,
        SyntaxError,
        tokenize.TokenError,
        zipfile.BadZipFile,
        zlib.error,
    ) as exc:
        raise DataError(f"not a valid .npy array ({_first_line(exc)})", path=path, field=key) from None
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
    """``[V]`` bool: columns of ``voxels: [N, V]`` holding at least one NaN (or Inf)."""
    return ~np.isfinite(voxels).all(axis=0) if voxels.size else np.zeros(voxels.shape[1], dtype=bool)


def apply_nan_policy(
    voxels: np.ndarray,
    nan_policy: NanPolicy,
    *,
    path: str | os.PathLike,
    field: str,
    drop_columns: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Handle NaN (and Inf, counted as NaN) in ``voxels: [N, V]`` per ``nan_policy``.

    Args:
        drop_columns: ``[V]`` bool columns to drop under ``"drop"`` (e.g. NaN columns over all splits of a
            subject); defaults to this array's own NaN columns.
    Returns:
        ``(voxels, kept)`` where ``kept`` is the ``[V']`` int index of kept columns under ``"drop"``
        (``None`` otherwise).
    """
    check_nan_policy(nan_policy)
    bad = ~np.isfinite(voxels)
    n_bad = int(bad.sum())
    n_inf = int(np.isinf(voxels).sum()) if n_bad else 0
    what = "NaN values" if not n_inf else f"non-finite values ({n_bad - n_inf} NaN, {n_inf} Inf)"
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
                "%s [%s]: dropped %d of %d voxels holding NaN or Inf",
                path,
                field,
                int(cols.sum()),
                voxels.shape[1],
            )
        voxels = np.ascontiguousarray(voxels[:, kept])
        if not np.isfinite(voxels).all():
            raise DataError(
                "NaN or Inf left in voxels that the drop mask keeps", path=path, field=field
            )  # the reader's drop mask missed some columns
        return voxels, kept
    if not n_bad:
        return voxels, None
    n_cols = int(bad.any(axis=0).sum())
    n_rows = int(bad.any(axis=1).sum())
    if nan_policy == "error":
        raise DataError(
            f"{n_bad} {what} in {n_cols} of {voxels.shape[1]} voxels ({n_rows} of "
            f"{voxels.shape[0]} samples); pass nan_policy='zero' or 'drop' (--nan-policy) "
            "to handle them",
            path=path,
            field=field,
        )
    _logger.warning("%s [%s]: replaced %d %s in %d voxels by 0", path, field, n_bad, what, n_cols)
    voxels = voxels if voxels.flags.writeable else voxels.copy()
    voxels[bad] = 0.0
    return voxels, None


def reader_dataset(
    voxels: np.ndarray,
    kept: np.ndarray | None,
    meta: dict[str, Any],
    *,
    subject: str,
    split: Split,
    roi: str,
    source: str,
    image_ids: np.ndarray | None = None,
    images: np.ndarray | None = None,
    repeats: np.ndarray | None = None,
) -> FMRIDataset:
    """The :class:`FMRIDataset` a reader returns, with ``kept`` (the ``[V']`` voxel columns that
    ``nan_policy="drop"`` kept, from :func:`apply_nan_policy`; ``None`` otherwise) stored as
    ``meta["kept_voxels"]``.

    Args:
        voxels: ``[N, V']`` responses after the NaN policy.
    """
    if kept is not None:
        meta["kept_voxels"] = kept
    return FMRIDataset(
        voxels=voxels,
        subject=subject,
        split=split,
        image_ids=image_ids,
        images=images,
        repeats=repeats,
        roi=roi,
        source=source,
        meta=meta,
    )


def as_index(arr: np.ndarray, *, path: str | os.PathLike, field: str) -> np.ndarray:
    """An integer-valued array (int or float dtype) as ``[N]`` int64; anything else is a :class:`DataError`."""
    arr = np.asarray(arr).reshape(-1) if np.ndim(arr) == 2 and 1 in np.shape(arr) else np.asarray(arr)
    if arr.ndim != 1:
        raise DataError(f"expected a 1-D index, got shape {arr.shape}", path=path, field=field)
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise DataError(f"index {int(arr.max())} is out of range", path=path, field=field)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        bad = np.flatnonzero(~(np.isfinite(arr) & (arr == np.round(arr)) & (np.abs(arr) <= 2.0**53)))
        if not len(bad):
            return arr.astype(np.int64)
        raise DataError(
            f"expected integer indices, got {arr[bad[0]]!r} at position {int(bad[0])}", path=path, field=field
        )
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
