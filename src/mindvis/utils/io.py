"""Atomic output: whatever matters is written to a temporary name, then moved into place with os.replace.

A crash or kill therefore leaves either the previous file or the complete new one, never half of one. A full
disk (or a quota or file-size limit) while writing raises :class:`DiskFullError` naming the output, and the
previous file or folder is left as it was.

Temporary names carry the writing process (``.<name>.<host>-<pid>.<random>.tmp`` / ``.partial``), so that
the leftovers of a killed process can be told apart from those of a live one and removed
(:func:`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mindvis.errors import (
    DataError,
    MindVisError,
    OutputExistsError,
    OutputNotWritableError,
    OutputOverlapError,
)

_UMASK = os.umask(0)
os.umask(_UMASK)

#: errno values that mean "the disk (or a quota or size limit) is full" rather than a bug.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskFullError(MindVisError):
    """No space left on the device (or a quota or file-size limit reached) while writing an output."""


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


_HOST = _host_tag()
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[^.]+\.(?:tmp|partial|old)$")


def _temp_prefix(name: str) -> str:
    # keep the whole temporary name within the usual 255-byte limit
    return f".{name[:180]}.{_HOST}-{os.getpid()}."


def disk_full_error(exc: OSError, path: str | os.PathLike) -> DiskFullError:
    """The :class:`DiskFullError` for an ``OSError`` whose errno is in :data:`DISK_FULL_ERRNOS`."""
    reason = exc.strerror or os.strerror(exc.errno or errno.ENOSPC)
    return DiskFullError(f"cannot write ({reason}); the previous version, if any, is unchanged", path=path)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temps(
    folder: str | os.PathLike, name: str | None = None, recursive: bool = False
) -> list[Path]:
    """Remove temporary files and folders left in ``folder`` by killed processes of this host.

    Only names made by :func:`atomic_write` / :func:`atomic_dir` whose process no longer runs are removed
    (with ``name``, only those of that target; with ``recursive``, in the sub-folders too). Returns what was
    removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None:
            if recursive and entry.is_dir(follow_symlinks=False):
                removed += remove_stale_temps(entry.path, name, recursive=True)
            continue
        if m["host"] != _HOST or (name is not None and m["name"] != name[:180]):
            continue
        if _pid_alive(int(m["pid"])):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.

    Raises:
        DiskFullError: the device, a quota or the file-size limit is full (``path`` is untouched).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(exc, path) from None
        raise
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(exc, path) from None
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, turning a missing or malformed file into a :class:`DataError`."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"not valid JSON ({exc})", path=path) from None
    except RecursionError:
        raise DataError("not usable JSON: nested too deeply", path=path) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise DataError(f"not usable JSON ({exc})", path=path) from None
    except IsADirectoryError:
        raise DataError("is a folder, expected a JSON file", path=path) from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_npz_atomic(path: str | os.PathLike, compressed: bool = False, **arrays: np.ndarray) -> None:
    """Write an ``.npz`` to ``path`` atomically and byte-reproducibly (fixed zip timestamps, no pickle).

    The name is kept exactly (no ``.npz`` is appended). Uncompressed members can be memory-mapped by readers.
    """
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with atomic_write(path, "wb") as fh, zipfile.ZipFile(fh, "w", method, allowZip64=True) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = method
            with zf.open(info, "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.asarray(arr), allow_pickle=False)


def prepare_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check that an output folder may be written: it must not exist, or be empty, or ``overwrite`` is set.

    The folder that will receive it (``path`` itself or its nearest existing parent) must also accept new
    entries, so that a folder the process may not write fails here, before any work, not after it.

    Raises:
        OutputExistsError: ``path`` is a file, or a non-empty folder without ``overwrite``.
        OutputNotWritableError: the parent folder refuses new entries (permission, read-only file system).
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise OutputExistsError("exists and is not a folder", path=path)
        if any(path.iterdir()) and not overwrite:
            raise OutputExistsError(
                "output folder exists and is not empty (pass --overwrite to replace it)", path=path
            )
    check_writable(path)
    return path


#: errno values of a folder that refuses to be written (reported as :class:`OutputNotWritableError`).
NOT_WRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def check_writable(path: str | os.PathLike) -> None:
    """Check that an output ``path`` can be created (or replaced) where it lies, by making and removing an
    empty temporary folder in its nearest existing parent.

    Raises:
        OutputExistsError: a parent of ``path`` is a file.
        OutputNotWritableError: the parent refuses new entries (EACCES, EPERM, EROFS).
        DiskFullError: the device or a quota is full.
    """
    path = Path(os.path.abspath(path))
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputExistsError(f"cannot create the output: {parent} is not a folder", path=path)
    try:
        probe = tempfile.mkdtemp(prefix=_temp_prefix(path.name), suffix=".partial", dir=parent)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(exc, path) from None
        if exc.errno in NOT_WRITABLE_ERRNOS:
            reason = exc.strerror or os.strerror(exc.errno)
            raise OutputNotWritableError(
                f"cannot write the output in {parent} ({reason})", path=path
            ) from None
        raise
    os.rmdir(probe)


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def check_output_apart(out: str | os.PathLike, inputs: Mapping[str, Any]) -> None:
    """Refuse an output that equals, contains or lies inside any input (after resolving symlinks).

    ``inputs`` maps an option name (``"--model"``) to a path, ``None`` (not given) or a list of paths. A command
    calls this before anything else, with or without ``--overwrite``: replacing ``out`` must never delete or
    change what the command reads.

    Raises:
        OutputOverlapError: naming the output, the input and its option.
    """
    target = _resolved(out)
    for option, value in inputs.items():
        values = value if isinstance(value, list | tuple) else [value]
        for item in values:
            if item is None or os.fspath(item) == "":
                continue
            source = _resolved(item)
            if source == target:
                how = "is"
            elif target in source.parents:
                how = "contains"
            elif source in target.parents:
                how = "lies inside"
            else:
                continue
            raise OutputOverlapError(
                f"the output {how} the input {option} {item}; choose an output folder apart from what the "
                "command reads (it is never replaced, even with --overwrite)",
                path=out,
            )


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False  # the filesystem cannot exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``path`` and rename it into place when complete.

    With ``overwrite`` an existing folder is replaced only after the new one is complete, in one atomic
    exchange where the filesystem supports it (Linux), else by two renames. Leftover temporary folders of
    killed processes beside ``path`` are removed first.

    Raises:
        OutputExistsError: ``path`` is not empty and ``overwrite`` is not set.
        DiskFullError: the device or a quota is full (``path`` is untouched).
    """
    path = Path(path)
    prepare_output_dir(path, overwrite=overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent, path.name)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), suffix=".partial", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(exc, path) from None
        raise
    try:
        yield tmp
        if path.exists():
            if _exchange(tmp, path):
                shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous folder
            else:
                old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), suffix=".old", dir=path.parent))
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(exc, path) from None
        raise


def safetensors_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """``safetensors.torch.save`` with a canonical header, so that equal weights always give equal bytes.

    The safetensors writer emits the ``__metadata__`` entries in hash-map order, which changes from call to
    call when there are several; here they are sorted (and the tensor entries ordered by their data offsets).
    Readers see the same file contents.
    """
    from safetensors.torch import save

    raw = save(dict(tensors), metadata=None if metadata is None else dict(metadata))
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    canon: dict[str, Any] = {}
    if "__metadata__" in header:
        canon["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    canon.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0])))
    text = json.dumps(canon, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data start stays 8-byte aligned
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
