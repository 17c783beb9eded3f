"""Fuzzing the dataset readers with corrupt and hostile files (hypothesis).

Every reader gets a small valid folder in its real layout (written by the writers of the ``test_formats_*``
tests), which each example copies and then damages with one to three mutations:

* bytes: truncation, emptied file, overwritten or appended bytes, random garbage;
* arrays (npz / npy / HDF5 / NIfTI / pickled dict / tar members): other dtypes (including strings and
  objects), other shapes, empty arrays, NaN and Inf, extreme integers, arrays drawn from scratch, and
  headers that declare huge sizes (an npy header claiming 10^12 elements, an HDF5 dataset or NIfTI image
  of terabytes) over a few real bytes;
* text (csv / txt / json): lines dropped, duplicated, rewritten, non-UTF-8 bytes, random JSON;
* the file system: deleted files, names that are not UTF-8, junk files with plausible names, symlinks out
  of the data folder (to an identical copy, dangling, looping, to ``/dev/zero``, to a folder), FIFOs.

The contract checked for every call: it returns a valid dataset (float32 voxels, finite under
``nan_policy="error"``, uint8 images, indices in range) or raises a :class:`MindVisError` whose message is one
line and names a file. Anything else fails the test: another exception, a call running longer than
``CALL_SECONDS`` (a SIGALRM timer), or more than ``MEMORY_BUDGET`` bytes allocated (tracemalloc peak; an
address-space limit turns a runaway allocation into a MemoryError instead of exhausting the machine).

A symlink to an identical copy outside the folder must load exactly as the original does: data folders are
often symlinked (git-annex, shared storage), so links to regular files are followed. Links to anything that
is not a regular file are refused.

The default run tries a few examples per reader with a fixed seed; ``-m slow`` runs many random ones
(``MINDVIS_FUZZ_EXAMPLES``, default 400 per reader). Set ``MINDVIS_FUZZ_REPORT=<file.json>`` to write the
per-reader counts of inputs tried, loaded and refused. Below the fuzzing, one deterministic regression test
per failure it (or a targeted hostile input) found keeps each fix in place.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import tarfile
import tempfile
import tracemalloc
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st
from hypothesis.errors import UnsatisfiedAssumption
from hypothesis.extra import numpy as hnp

from mindvis.data.dataset import FMRIDataset
from mindvis.data.formats.bold5000 import load_bold5000
from mindvis.data.formats.detect import describe, detect_format
from mindvis.data.formats.god import god_roi_names, list_god_subjects, load_god
from mindvis.data.formats.god_h5 import convert_god_h5, load_god_h5
from mindvis.data.formats.hcp_cifti import prepare_hcp, read_parcellation
from mindvis.data.formats.nifti import load_nifti_dataset
from mindvis.data.formats.nsd import load_nsd
from mindvis.data.formats.registry import load_dataset
from mindvis.data.hcp import list_hcp_subjects, load_hcp_subject
from mindvis.errors import MindVisError
from test_formats_bold5000 import write_bold5000
from test_formats_god import write_god
from test_formats_god_h5 import write_bdata, write_stimuli
from test_formats_hcp import make_hcp
from test_formats_nifti import write_own
from test_formats_nsd import write_nsd
from test_hcp import write_hcp_subject

CALL_SECONDS = 30
MEMORY_BUDGET = 256 * 2**20
ADDRESS_HEADROOM = 4 * 2**30
#: "Huge" declared sizes: far beyond any machine's memory, so an allocation of them fails at once.
HUGE = 10**12

FAST = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)
THOROUGH = settings(
    max_examples=int(os.environ.get("MINDVIS_FUZZ_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)

TRIED: Counter[str] = Counter()
CALLS: Counter[str] = Counter()
LOADED: Counter[str] = Counter()
REFUSED: Counter[str] = Counter()


# ---- resource guards -----------------------------------------------------------------------------------------


class Hang(Exception):
    """A reader call ran past CALL_SECONDS."""


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def guarded(seconds: float = CALL_SECONDS) -> Iterator[dict]:
    """Bound time (SIGALRM), address space (RLIMIT_AS, Linux) and measure the allocation peak (tracemalloc)."""
    stats: dict[str, int] = {}

    def on_alarm(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    vm = _vm_size()
    if vm:
        cap = vm + ADDRESS_HEADROOM
        if old_limit[1] == resource.RLIM_INFINITY or cap < old_limit[1]:
            resource.setrlimit(resource.RLIMIT_AS, (cap, old_limit[1]))
    tracemalloc.start()
    try:
        yield stats
    finally:
        stats["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        resource.setrlimit(resource.RLIMIT_AS, old_limit)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)


def check_dataset(ds: FMRIDataset, nan_policy: str) -> None:
    """The invariants of a dataset a reader returned."""
    assert isinstance(ds, FMRIDataset)
    assert ds.voxels.dtype == np.float32 and ds.voxels.ndim == 2
    if nan_policy in ("error", "drop"):
        assert np.isfinite(np.asarray(ds.voxels)).all(), "non-finite voxels passed the NaN policy"
    if ds.images is not None:
        assert ds.images.dtype == np.uint8 and ds.images.ndim == 4 and ds.images.shape[-1] == 3
    if ds.image_ids is not None and len(ds.image_ids):
        assert ds.image_ids.dtype.kind in "iu" and ds.image_ids.min() >= 0
        if ds.images is not None:
            assert ds.image_ids.max() < len(ds.images)


def check_result(result: Any, nan_policy: str) -> None:
    if isinstance(result, FMRIDataset):
        check_dataset(result, nan_policy)
    elif isinstance(result, dict) and "problems" in result:  # describe(): every problem is one line
        for p in result["problems"]:
            assert isinstance(p, str) and "\n" not in p, f"multi-line problem: {p!r}"
    elif isinstance(result, list | tuple):
        for r in result:
            check_result(r, nan_policy)


def call_reader(scenario: str, label: str, fn: Callable[[], Any], nan_policy: str) -> str:
    """Run one reader call under the guards; return ``"ok"`` or ``"refused"``, fail on anything else."""
    CALLS[scenario] += 1
    try:
        with guarded() as stats:
            result = fn()
    except MindVisError as exc:
        msg = str(exc)
        assert "\n" not in msg, f"{label}: message is not one line: {msg!r}"
        assert exc.path, f"{label}: message names no file: {msg!r}"
        REFUSED[scenario] += 1
        assert stats["peak"] <= MEMORY_BUDGET, f"{label}: allocated {stats['peak']} bytes before refusing"
        return "refused"
    except Hang as exc:
        raise AssertionError(f"{label}: hang ({exc})") from exc
    except BaseException as exc:  # noqa: BLE001 - the point: nothing but our error type may escape
        raise AssertionError(f"{label}: {type(exc).__module__}.{type(exc).__name__}: {exc}") from exc
    assert stats["peak"] <= MEMORY_BUDGET, f"{label}: allocated {stats['peak']} bytes"
    check_result(result, nan_policy)
    LOADED[scenario] += 1
    return "ok"


# ---- containers of arrays ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArrayTarget:
    """One array inside a file: an npz member, an npy file, an HDF5 dataset, a NIfTI image, a value of a
    pickled dict (``img_dict.npy``) or an npy member of a tar shard."""

    file: str
    kind: str  # "npz" | "npy" | "h5" | "nii" | "pickle" | "tar"
    key: str | None = None


def regular(path: Path) -> Path:
    """``path`` if it is a regular file not yet touched by an earlier mutation, else reject the example."""
    assume(path.is_file() and not path.is_symlink())
    return path


def read_array(folder: Path, t: ArrayTarget) -> np.ndarray:
    try:
        return _read_array(folder, t)
    except Exception:  # noqa: BLE001 - damaged by an earlier mutation of the same example
        assume(False)


def _read_array(folder: Path, t: ArrayTarget) -> np.ndarray:
    path = regular(folder / t.file)
    if t.kind == "npz":
        with np.load(path) as z:
            return z[t.key]
    if t.kind == "npy":
        return np.load(path)
    if t.kind == "h5":
        with h5py.File(path, "r") as h5:
            return h5[t.key][()]
    if t.kind == "nii":
        return np.asanyarray(nib.load(path).dataobj)
    if t.kind == "pickle":
        return np.asarray(np.load(path, allow_pickle=True).item()[t.key])
    if t.kind == "tar":
        with tarfile.open(path) as tar:
            return np.load(io.BytesIO(tar.extractfile(t.key).read()))
    raise ValueError(t.kind)


def npy_bytes(arr: Any) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def npy_header_bytes(shape: tuple[int, ...], dtype: str = "<f4", payload: bytes = b"\0" * 64) -> bytes:
    """An npy file whose header declares ``shape`` but which holds only ``payload``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def _rewrite_npz(path: Path, key: str, member: bytes | None, compress: bool | None = None) -> None:
    with zipfile.ZipFile(path) as z:
        members = {i.filename: (z.read(i.filename), i.compress_type) for i in z.infolist()}
    name = f"{key}.npy"
    if member is None:
        members.pop(name, None)
    else:
        ctype = members.get(name, (b"", zipfile.ZIP_STORED))[1]
        if compress is not None:
            ctype = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        members[name] = (member, ctype)
    with zipfile.ZipFile(path, "w") as z:
        for n, (data, ctype) in members.items():
            z.writestr(n, data, compress_type=ctype)


def _rewrite_tar(path: Path, key: str, member: bytes | None, declared: int | None = None) -> None:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name == key:
                if member is None:
                    continue
                data = member
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if declared is not None:  # patch the size field of the member's header (octal, 12 bytes at offset 124)
        raw = bytearray(path.read_bytes())
        pos = 0
        while pos < len(raw):
            name = raw[pos : pos + 100].rstrip(b"\0").decode()
            size = int(raw[pos + 124 : pos + 136].rstrip(b"\0 ") or b"0", 8)
            if name == key:
                raw[pos + 124 : pos + 136] = f"{declared:011o}".encode() + b"\0"
                chk = sum(raw[pos : pos + 148]) + 8 * 32 + sum(raw[pos + 156 : pos + 512])
                raw[pos + 148 : pos + 156] = f"{chk:06o}".encode() + b"\0 "
                break
            pos += 512 + (size + 511) // 512 * 512
        path.write_bytes(bytes(raw))


def write_array(folder: Path, t: ArrayTarget, arr: Any, compress: bool | None = None) -> None:
    """Replace the target's array by ``arr`` (``None`` deletes it); unwritable values reject the example."""
    path = regular(folder / t.file)
    try:
        if t.kind == "npz":
            _rewrite_npz(path, t.key, None if arr is None else npy_bytes(arr), compress)
        elif t.kind == "npy":
            if arr is None:
                path.unlink()
            else:
                path.write_bytes(npy_bytes(arr))
        elif t.kind == "h5":
            with h5py.File(path, "r+") as h5:
                del h5[t.key]
                if arr is not None:
                    a = np.asarray(arr)
                    if a.dtype.kind == "U":
                        a = np.char.encode(a, "utf-8")
                    h5.create_dataset(t.key, data=a)
        elif t.kind == "nii":
            if arr is None:
                path.unlink()
            else:
                old = nib.load(path)
                nib.save(nib.Nifti1Image(np.asarray(arr), old.affine), path)
        elif t.kind == "pickle":
            table = np.load(path, allow_pickle=True).item()
            if arr is None:
                table.pop(t.key, None)
            else:
                table[t.key] = arr
            np.save(path, np.asarray(table, dtype=object), allow_pickle=True)
        elif t.kind == "tar":
            _rewrite_tar(path, t.key, None if arr is None else npy_bytes(arr))
    except (TypeError, ValueError, nib.spatialimages.HeaderDataError, OSError):
        assume(False)


def write_huge(folder: Path, t: ArrayTarget, dims: int) -> None:
    """Make the target declare a huge size (``HUGE`` elements or more) over a few real bytes."""
    path = regular(folder / t.file)
    shape = (HUGE,) if dims == 1 else (10**6,) * dims
    if t.kind in ("npz", "npy", "tar"):
        member = npy_header_bytes(shape)
        if t.kind == "npz":
            _rewrite_npz(path, t.key, member)
        elif t.kind == "npy":
            path.write_bytes(member)
        else:
            _rewrite_tar(path, t.key, member)
    elif t.kind == "h5":
        with h5py.File(path, "r+") as h5:
            del h5[t.key]
            h5.create_dataset(t.key, shape=(10**6,) * max(dims, 2), dtype="f4", chunks=(1,) * max(dims, 2))
    elif t.kind == "nii":
        set_nifti_dims(path, (10**4,) * max(dims, 3))
    elif t.kind == "pickle":
        path.write_bytes(npy_header_bytes(shape, dtype="|O"))
    else:
        assume(False)


def set_nifti_dims(path: Path, dims: tuple[int, ...]) -> None:
    """Rewrite the ``dim`` field of a NIfTI-1/2 header (``.nii`` or ``.nii.gz``) in place."""
    import gzip

    raw = bytearray(gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes())
    n2 = int.from_bytes(raw[:4], "little") == 540
    fmt, off = ("<q", 16) if n2 else ("<h", 40)
    import struct

    size = struct.calcsize(fmt)
    raw[off : off + size] = struct.pack(fmt, len(dims))
    for i, d in enumerate(dims, 1):
        raw[off + i * size : off + (i + 1) * size] = struct.pack(fmt, min(d, 32767) if not n2 else d)
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))


# ---- mutations -----------------------------------------------------------------------------------------------

SPECIALS = [np.nan, np.inf, -np.inf, 1e38, -1e300, 0.0]
DTYPES = [
    "float16",
    "float32",
    "float64",
    "int8",
    "int64",
    "uint8",
    "bool",
    "complex64",
    "U4",
    "S4",
    "object",
]


@dataclass
class Mutation:
    kind: str
    what: str
    apply: Callable[[Path, Path], None] = field(repr=False)

    def __repr__(self) -> str:
        return self.what


def _perturb(orig: np.ndarray, how: str, k: int, fill: float, dtype: str) -> Any:
    a = np.asarray(orig)
    if how == "cast":
        if dtype == "object":
            return a.astype(object)
        with np.errstate(all="ignore"):
            return a.astype(dtype)
    if how == "special":  # NaN, Inf or an extreme value somewhere
        b = a.astype(np.float64).copy() if a.dtype.kind != "f" else a.copy()
        if b.size:
            b.reshape(-1)[k % b.size] = fill
        return b
    if how == "int_extreme":
        b = a.astype(np.int64)
        if b.size:
            b.reshape(-1)[k % b.size] = [-1, -(2**40), 2**62, 2**31][k % 4]
        return b
    if how == "empty":
        return a[:0] if a.ndim else a.reshape(1)[:0]
    if how == "shorter":
        return a[: max(0, len(a) - 1 - k)] if a.ndim else a
    if how == "longer":
        return np.concatenate([a, a[: k + 1]]) if a.ndim else a
    if how == "flat":
        return a.reshape(-1)
    if how == "extra_dim":
        return a[None]
    if how == "transpose":
        return a.T
    if how == "scalar":
        return a.reshape(-1)[0] if a.size else np.float32(0)
    if how == "narrower":
        return a[..., : max(0, a.shape[-1] - 1 - k)] if a.ndim >= 2 else a
    raise ValueError(how)


PERTURB = [
    "cast",
    "special",
    "int_extreme",
    "empty",
    "shorter",
    "longer",
    "flat",
    "extra_dim",
    "transpose",
    "scalar",
    "narrower",
]


def fresh_arrays() -> st.SearchStrategy:
    dtypes = st.sampled_from(["<f4", "<f8", "<f2", "<i8", "|u1", "|b1", "<c8", "<U3"])
    return dtypes.flatmap(
        lambda dt: hnp.arrays(
            dt,
            hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
            elements=hnp.from_dtype(np.dtype(dt), allow_nan=True, allow_infinity=True)
            if np.dtype(dt).kind in "fc"
            else None,
        )
    )


@st.composite
def array_mutation(draw, targets: list[ArrayTarget]) -> Mutation:
    t = draw(st.sampled_from(targets))
    mode = draw(st.sampled_from(["perturb", "perturb", "fresh", "delete", "huge", "object"]))
    if mode == "perturb":
        how = draw(st.sampled_from(PERTURB))
        k = draw(st.integers(0, 50))
        fill = draw(st.sampled_from(SPECIALS))
        dtype = draw(st.sampled_from(DTYPES))
        compress = draw(st.sampled_from([None, True, False]))

        def apply(folder, outside):
            write_array(folder, t, _perturb(read_array(folder, t), how, k, fill, dtype), compress)

        return Mutation("array", f"{t.file}[{t.key}]: {how} k={k} fill={fill} dtype={dtype}", apply)
    if mode == "fresh":
        arr = draw(fresh_arrays())
        return Mutation("array", f"{t.file}[{t.key}] = {arr!r}", lambda f, o: write_array(f, t, arr))
    if mode == "delete":
        return Mutation("array", f"{t.file}[{t.key}] deleted", lambda f, o: write_array(f, t, None))
    if mode == "object":
        obj = draw(st.sampled_from([None, "text", {"a": 1}, [1, [2]], 3.5, b"\x00\xff"]))
        return Mutation(
            "array",
            f"{t.file}[{t.key}] = {obj!r}",
            lambda f, o: write_array(f, t, np.asarray(obj, dtype=object)),
        )
    dims = draw(st.integers(1, 4))
    return Mutation(
        "huge", f"{t.file}[{t.key}] declares a huge size ({dims}-D)", lambda f, o: write_huge(f, t, dims)
    )


@st.composite
def byte_mutation(draw, files: list[str]) -> Mutation:
    name = draw(st.sampled_from(files))
    mode = draw(st.sampled_from(["truncate", "truncate", "empty", "overwrite", "append", "garbage"]))
    frac = draw(st.floats(0, 1, exclude_max=True))
    blob = draw(st.binary(min_size=1, max_size=64))
    count = draw(st.integers(1, 8))

    def apply(folder, outside):
        path = regular(folder / name)
        raw = bytearray(path.read_bytes())
        if mode == "truncate":
            raw = raw[: int(frac * len(raw))]
        elif mode == "empty":
            raw = bytearray()
        elif mode == "overwrite" and raw:
            for i in range(count):
                pos = int(((frac + i * 0.618) % 1.0) * len(raw))
                raw[pos : pos + len(blob)] = blob[: len(raw) - pos]
        elif mode == "append":
            raw += blob
        elif mode == "garbage":
            raw = bytearray(blob * count)
        path.write_bytes(bytes(raw))

    return Mutation("bytes", f"{name}: {mode} frac={frac:.3f} blob={blob!r} x{count}", apply)


@st.composite
def text_mutation(draw, files: list[str]) -> Mutation:
    name = draw(st.sampled_from(files))
    mode = draw(
        st.sampled_from(
            ["drop", "duplicate", "replace", "non_utf8", "bom_crlf", "json", "swap_fields", "blank"]
        )
    )
    k = draw(st.integers(0, 100))
    text = draw(st.text(max_size=40))
    value = draw(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
            max_leaves=10,
        )
    )

    def apply(folder, outside):
        path = regular(folder / name)
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        i = k % max(len(lines), 1)
        if mode == "drop":
            del lines[i]
        elif mode == "duplicate":
            lines.insert(i, lines[i])
        elif mode == "replace":
            lines[i] = text.encode("utf-8", "surrogatepass")
        elif mode == "non_utf8":
            lines[i] = lines[i] + b"\xff\xfe\x80"
        elif mode == "bom_crlf":
            lines = [b"\xef\xbb\xbf" + lines[0]] + lines[1:]
            lines = [ln + b"\r" for ln in lines]
        elif mode == "json":
            lines = [json.dumps(value).encode()]
        elif mode == "swap_fields":
            sep = b"\t" if b"\t" in lines[i] else b","
            lines[i] = sep.join(reversed(lines[i].split(sep)))
        elif mode == "blank":
            lines = [b""] * (k % 3)
        path.write_bytes(b"\n".join(lines))

    return Mutation("text", f"{name}: text {mode} k={k} text={text!r} value={value!r}", apply)


@st.composite
def fs_mutation(draw, files: list[str], extras: list[str]) -> Mutation:
    mode = draw(
        st.sampled_from(
            [
                "delete",
                "link_copy",
                "dangling",
                "loop",
                "dev_zero",
                "to_dir",
                "fifo",
                "non_utf8_name",
                "junk_file",
            ]
        )
    )
    name = draw(st.sampled_from(files))
    junk = draw(st.sampled_from(extras)) if extras else "junk.bin"
    blob = draw(st.binary(max_size=64))

    def apply(folder, outside):
        path = folder / name if mode == "junk_file" else regular(folder / name)
        if mode == "delete":
            path.unlink()
        elif mode == "link_copy":  # an identical file outside the data folder
            target = outside / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)
            path.symlink_to(target)
        elif mode == "dangling":
            path.unlink()
            path.symlink_to(outside / "absent" / path.name)
        elif mode == "loop":
            path.unlink()
            path.symlink_to(path)
        elif mode == "dev_zero":
            path.unlink()
            path.symlink_to("/dev/zero")
        elif mode == "to_dir":
            path.unlink()
            path.mkdir()
        elif mode == "fifo":
            path.unlink()
            os.mkfifo(path)
        elif mode == "non_utf8_name":
            os.rename(os.fsencode(path), os.fsencode(path) + b"\xff")
        elif mode == "junk_file":
            p = os.fsencode(folder / junk)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as fh:
                fh.write(blob)

    return Mutation(mode, f"{name if mode != 'junk_file' else junk!r}: {mode} blob={blob!r}", apply)


# ---- scenarios: one per reader --------------------------------------------------------------------------------


@dataclass
class Scenario:
    build: Callable[[Path], None]
    calls: Callable[[Path, Path, str], list[tuple[str, Callable[[], Any]]]]
    arrays: list[ArrayTarget]
    texts: list[str] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)
    byte_files: list[str] | None = None  # default: every file


def _god_calls(folder: Path, out: Path, nan: str):
    return [
        ("load_god train", lambda: load_god(folder, 1, "train", nan_policy=nan)),
        ("load_god test", lambda: load_god(folder, 1, "test", nan_policy=nan)),
        ("load_god test raw", lambda: load_god(folder, 1, "test", average_test=False, nan_policy=nan)),
        ("load_dataset god", lambda: load_dataset("god", folder, split="train", nan_policy=nan)),
        ("god_roi_names", lambda: god_roi_names(folder / "sbj_1.npz")),
        ("list_god_subjects", lambda: list_god_subjects(folder)),
        ("describe", lambda: describe(folder, check_images=True)),
    ]


def _god_h5_calls(folder: Path, out: Path, nan: str):
    h5 = folder / "Subject1.h5"
    return [
        ("load_god_h5 train", lambda: load_god_h5(h5, "train", nan_policy=nan)),
        ("load_god_h5 test", lambda: load_god_h5(h5, "test", nan_policy=nan)),
        ("load_god_h5 test raw", lambda: load_god_h5(h5, "test", average_test=False, nan_policy=nan)),
        ("load_god_h5 imagery", lambda: load_god_h5(h5, "imagery", nan_policy=nan)),
        ("convert_god_h5", lambda: convert_god_h5(folder, out)),
        ("describe", lambda: describe(folder, check_images=True)),
    ]


def _bold_calls(folder: Path, out: Path, nan: str):
    return [
        ("load_bold5000 train", lambda: load_bold5000(folder, "CSI1", "train", nan_policy=nan)),
        ("load_bold5000 test", lambda: load_bold5000(folder, "CSI1", "test", nan_policy=nan)),
        (
            "load_bold5000 test raw",
            lambda: load_bold5000(folder, 1, "test", average_test=False, nan_policy=nan),
        ),
        ("describe", lambda: describe(folder, check_images=True)),
    ]


def _nsd_calls(folder: Path, out: Path, nan: str):
    return [
        ("load_nsd train", lambda: load_nsd(folder, 1, "train", nan_policy=nan)),
        ("load_nsd test", lambda: load_nsd(folder, 1, "test", nan_policy=nan)),
        ("load_nsd test shards", lambda: load_nsd(folder, 1, "test", nan_policy=nan, test_images="shards")),
        ("load_nsd test raw", lambda: load_nsd(folder, 1, "test", average_test=False, nan_policy=nan)),
        ("describe", lambda: describe(folder, check_images=True)),
    ]


def _nifti_calls(folder: Path, out: Path, nan: str):
    return [
        ("load_nifti train", lambda: load_nifti_dataset(folder, split="train", nan_policy=nan)),
        ("load_nifti test", lambda: load_nifti_dataset(folder, split="test", nan_policy=nan)),
        (
            "load_nifti test raw",
            lambda: load_nifti_dataset(folder, split="test", average_test=False, nan_policy=nan),
        ),
        ("describe", lambda: describe(folder, check_images=True)),
    ]


def _cifti_calls(folder: Path, out: Path, nan: str):
    def prepare():
        report = prepare_hcp(folder / "hcp", folder / "Glasser.dlabel.nii", out, workers=1)
        for msg in report.failed.values():
            assert "\n" not in msg
        return [load_hcp_subject(out, s, window=None, nan_policy=nan) for s in report.done]

    return [
        ("read_parcellation", lambda: read_parcellation(folder / "Glasser.dlabel.nii")),
        ("prepare_hcp", prepare),
        ("describe", lambda: describe(folder / "hcp")),
    ]


def _hcp_calls(folder: Path, out: Path, nan: str):
    return [
        ("load_hcp_subject", lambda: load_hcp_subject(folder / "HCP", "100307", nan_policy=nan)),
        (
            "load_hcp_subject frames",
            lambda: load_hcp_subject(folder / "HCP", "100307", window=None, nan_policy=nan),
        ),
        ("list_hcp_subjects", lambda: list_hcp_subjects(folder / "HCP")),
        ("describe", lambda: describe(folder / "HCP" / "npz")),
        ("detect_format", lambda: detect_format(folder / "HCP" / "npz")),
    ]


_BOLD_BETAS = "BOLD5000_GLMsingle_ROI_betas/py/CSI1_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_{}.npy"
_BOLD_IMG = "BOLD5000_Stimuli/Scene_Stimuli/Presented_Stimuli/img_dict.npy"
_BOLD_LISTS = "BOLD5000_Stimuli/Stimuli_Presentation_Lists/CSI1/CSI1_sess01/CSI1_sess01_run0{}.txt"
_NSD_BETAS = "betas_all_subj01_fp32_renorm.hdf5"


def _build_nsd(folder: Path) -> None:
    write_nsd(folder, n_trials=30, n_vox=12)


def _build_cifti(folder: Path) -> None:
    make_hcp(folder, subjects=("100307",))


def _build_hcp(folder: Path) -> None:
    write_hcp_subject(folder, "100307", frames=40, widths=(5, 4, 3, 2))


SCENARIOS: dict[str, Scenario] = {
    "god": Scenario(
        build=lambda f: write_god(f, subjects=(1,)),
        calls=_god_calls,
        arrays=[
            ArrayTarget("sbj_1.npz", "npz", k)
            for k in ("arr_0", "arr_1", "arr_2", "arr_3", "arr_4", "arr_5", "VC")
        ]
        + [ArrayTarget("images_256.npz", "npz", k) for k in ("train_images", "test_images")],
        texts=["imagenet_class_index.json", "imagenet_training_label.csv", "imagenet_testing_label.csv"],
        extras=["sbj_2.npz", "images_64.npz", "sbj_\udcff.npz", "sbj_1.npz\n", "stimulus_ImageNetTest.csv"],
    ),
    "god-h5": Scenario(
        build=lambda f: write_bdata(f / "Subject1.h5", write_stimuli(f)),
        calls=_god_h5_calls,
        arrays=[
            ArrayTarget("Subject1.h5", "h5", k)
            for k in ("dataset", "metadata/key", "metadata/value", "metadata/description")
        ]
        + [ArrayTarget("images_256.npz", "npz", "test_images")],
        texts=["stimulus_ImageNetTraining.csv", "stimulus_ImageNetTest.csv", "imagenet_class_index.json"],
        extras=["Subject2.h5", "Subject\udcff.h5", "imagenet_testing_label.csv"],
    ),
    "bold5000": Scenario(
        build=lambda f: write_bold5000(f, subjects=("CSI1",)),
        calls=_bold_calls,
        arrays=[ArrayTarget(_BOLD_BETAS.format(k), "npy") for k in ("LHEarlyVis", "RHLOC", "RHRSC")]
        + [ArrayTarget(_BOLD_IMG, "pickle", f"COCO_train2014_{i:012d}.jpg") for i in (0, 2)],
        texts=["BOLD5000_Stimuli/Scene_Stimuli/repeated_stimuli_113_list.txt", _BOLD_LISTS.format(1)],
        extras=[
            _BOLD_BETAS.format("LHEarlyVis").replace("GLMbetas-", "GLMbetas-x"),
            _BOLD_BETAS.format("LHPPA").replace("CSI1_", "CSI\udcff_"),
            _BOLD_BETAS.format("RHOPA") + "\n",
            _BOLD_LISTS.format(9),
            _BOLD_LISTS.format("\udcff"),
        ],
    ),
    "nsd": Scenario(
        build=_build_nsd,
        calls=_nsd_calls,
        arrays=[
            ArrayTarget(_NSD_BETAS, "h5", "betas"),
            ArrayTarget("coco_images_224_float16.hdf5", "h5", "images"),
            ArrayTarget("shared1000.npy", "npy"),
            ArrayTarget("wds/subj01/test/0.tar", "tar", "sample000000.behav.npy"),
            ArrayTarget("wds/subj01/train/0.tar", "tar", "sample000003.behav.npy"),
        ],
        extras=["behav_subj01.npy", "wds/subj01/test/1.tar", "betas_all_subj02_fp32_renorm.hdf5"],
    ),
    "nifti-3d": Scenario(
        build=lambda f: write_own(f, four_d=False),
        calls=_nifti_calls,
        arrays=[ArrayTarget("roi_mask.nii.gz", "nii"), ArrayTarget("betas/trial_002.nii.gz", "nii")],
        texts=["trials.csv"],
        extras=["images/img0.png", "images/img7.png", "betas/trial_001.nii.gz", "roi_mask.nii"],
    ),
    "nifti-4d": Scenario(
        build=lambda f: write_own(f, four_d=True),
        calls=_nifti_calls,
        arrays=[ArrayTarget("roi_mask.nii.gz", "nii"), ArrayTarget("betas.nii.gz", "nii")],
        texts=["trials.csv"],
        extras=["images/img6.png", "betas.nii", "roi_mask_default.nii.gz"],
    ),
    "hcp-cifti": Scenario(
        build=_build_cifti,
        calls=_cifti_calls,
        arrays=[],
        extras=["hcp/100408_x.dtseries.nii", "hcp/\udcff.dtseries.nii"],
    ),
    "hcp-npz": Scenario(
        build=_build_hcp,
        calls=_hcp_calls,
        arrays=[ArrayTarget("HCP/npz/100307/HCP_visual_voxel.npz", "npz", k) for k in ("V1", "V4")],
        extras=["HCP/npz/100408/HCP_visual_voxel.npz", "HCP/npz/\udcff/HCP_visual_voxel.npz"],
    ),
}


def mutations_for(scn: Scenario, files: list[str]) -> st.SearchStrategy[Mutation]:
    options = [byte_mutation(scn.byte_files or files), fs_mutation(files, scn.extras)]
    if scn.arrays:
        options += [array_mutation(scn.arrays)] * 2
    if scn.texts:
        options.append(text_mutation(scn.texts))
    return st.one_of(options)


class Bases(dict):
    """The valid folders, one per scenario: ``{name: (folder, files)}`` (short repr for failure reports)."""

    def __repr__(self) -> str:
        return "<valid base folders>"


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Bases:
    out = Bases()
    for name, scn in SCENARIOS.items():
        folder = tmp_path_factory.mktemp(f"base-{name}")
        scn.build(folder)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        out[name] = (folder, files)
    yield out
    report = os.environ.get("MINDVIS_FUZZ_REPORT")
    if report:
        rows = {
            n: {"inputs": TRIED[n], "calls": CALLS[n], "loaded": LOADED[n], "refused": REFUSED[n]}
            for n in TRIED
        }
        Path(report).write_text(json.dumps(rows, indent=2))


def run_example(name: str, base: Path, files: list[str], data) -> None:
    scn = SCENARIOS[name]
    muts = data.draw(st.lists(mutations_for(scn, files), min_size=1, max_size=3), label="mutations")
    nan = data.draw(st.sampled_from(["error", "zero", "drop"]), label="nan_policy")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data dir ü"  # spaces and non-ASCII in every path
        shutil.copytree(base, folder, symlinks=True)
        outside = Path(tmp) / "outside"
        outside.mkdir()
        for m in muts:
            try:
                m.apply(folder, outside)
            except UnsatisfiedAssumption:
                raise
            except Exception:  # noqa: BLE001 - an earlier mutation left nothing this one can work on
                reject()
        TRIED[name] += 1
        outcomes = {}
        for label, fn in scn.calls(folder, Path(tmp) / "out", nan):
            outcomes[label] = call_reader(name, f"{name}: {label} after {muts}", fn, nan)
        if all(m.kind == "link_copy" for m in muts):
            # a symlink to an identical regular file outside the folder loads like the original
            assert all(v == "ok" for v in outcomes.values()), f"{name}: symlinked copy refused: {outcomes}"


@pytest.mark.parametrize("name", list(SCENARIOS))
@FAST
@given(data=st.data())
def test_fuzz_reader(bases, name, data):
    base, files = bases[name]
    run_example(name, base, files, data)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
@THOROUGH
@given(data=st.data())
def test_fuzz_reader_thorough(bases, name, data):
    base, files = bases[name]
    run_example(name, base, files, data)


def test_valid_bases_load(bases):
    """Sanity check of the harness: the unmodified folders load through every call."""
    for name, (base, _) in bases.items():
        with tempfile.TemporaryDirectory() as tmp:
            for label, fn in SCENARIOS[name].calls(base, Path(tmp) / "out", "error"):
                assert call_reader(name, f"{name}: {label}", fn, "error") == "ok"


# ---- regressions: one deterministic test per failure the fuzzing found -----------------------------------------
#
# Each was a bare library exception, a hang or a runaway allocation before the reader was fixed.


def refused_with(fn: Callable[[], Any], *needles: str, budget: int = MEMORY_BUDGET) -> str:
    """``fn()`` raises our error (one line, naming a file, containing ``needles``) within the guards."""
    with pytest.raises(MindVisError) as info, guarded() as stats:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and info.value.path, msg
    for needle in needles:
        assert needle in msg, msg
    assert stats["peak"] <= budget, f"allocated {stats['peak']} bytes: {msg}"
    return msg


def _bold(tmp_path: Path) -> Path:
    write_bold5000(tmp_path, subjects=("CSI1",))
    return tmp_path


def test_npy_header_declaring_a_terabyte(tmp_path):
    folder = _bold(tmp_path)
    beta = folder / _BOLD_BETAS.format("RHLOC")
    beta.write_bytes(npy_header_bytes((HUGE, 3)))
    refused_with(lambda: load_bold5000(folder, "CSI1", "train"), "RHLOC.npy", "header declares shape")


def test_npy_header_length_field_is_not_trusted(tmp_path):
    """A 4-byte header length of 662 MB made numpy allocate it before failing to read it."""
    folder = _bold(tmp_path)
    beta = folder / _BOLD_BETAS.format("LHLOC")
    raw = bytearray(beta.read_bytes())
    raw[7] = 1  # format version 1.1 is read with a 4-byte header length
    beta.write_bytes(bytes(raw))
    refused_with(lambda: load_bold5000(folder, "CSI1", "train"), "LHLOC.npy", "header length")


@pytest.mark.parametrize("header", [b"{'descr': '<f4', \x00", b"{'descr': '<f4', 'shape': (3,"])
def test_npy_header_that_does_not_parse(tmp_path, header):
    folder = _bold(tmp_path)
    beta = folder / _BOLD_BETAS.format("LHEarlyVis")
    beta.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header)
    refused_with(lambda: load_bold5000(folder, "CSI1", "train"), "LHEarlyVis.npy", "not a valid .npy")


def test_npz_members_declaring_huge_sizes(tmp_path):
    write_god(tmp_path, subjects=(1,))
    npz = tmp_path / "sbj_1.npz"
    _rewrite_npz(npz, "arr_0", npy_header_bytes((HUGE, 40)), compress=True)  # deflated, header says 4 TB
    refused_with(lambda: load_god(tmp_path, 1, "train"), "sbj_1.npz", "[arr_0]", "header declares")
    _rewrite_npz(npz, "arr_0", npy_header_bytes((HUGE, 40)), compress=False)  # stored
    refused_with(lambda: load_god(tmp_path, 1, "train"), "sbj_1.npz", "[arr_0]")
    # a scalar where rows are expected
    _rewrite_npz(npz, "arr_0", npy_bytes(np.zeros((23, 40), np.float32)))
    _rewrite_npz(npz, "arr_1", npy_bytes(np.float16(np.nan)))
    refused_with(lambda: load_god(tmp_path, 1, "test"), "[arr_1]", "scalar")


def test_npz_needing_a_newer_zip_version(tmp_path):
    """zipfile raises NotImplementedError for a member whose "version needed to extract" it does not know."""
    write_god(tmp_path, subjects=(1,))
    npz = tmp_path / "sbj_1.npz"
    raw = bytearray(npz.read_bytes())
    central = raw.find(b"PK\x01\x02")
    raw[central + 6 : central + 8] = (64).to_bytes(2, "little")
    npz.write_bytes(bytes(raw))
    refused_with(lambda: load_god(tmp_path, 1, "train"), "sbj_1.npz", "zip file version")


@pytest.mark.parametrize("label", [np.nan, np.inf, 1e300])
def test_npz_labels_out_of_range(tmp_path, label):
    write_god(tmp_path, subjects=(1,))
    with np.load(tmp_path / "sbj_1.npz") as z:
        arr4 = z["arr_4"].copy()
    arr4[2] = label
    _rewrite_npz(tmp_path / "sbj_1.npz", "arr_4", npy_bytes(arr4))
    refused_with(
        lambda: load_god(tmp_path, 1, "test", average_test=False), "[arr_4]", "out of range (first: row 2"
    )


def test_npz_text_voxels_refused(tmp_path):
    write_god(tmp_path, subjects=(1,))
    _rewrite_npz(tmp_path / "sbj_1.npz", "arr_0", npy_bytes(np.full((23, 40), "1.5")))
    refused_with(lambda: load_god(tmp_path, 1, "train"), "[arr_0]", "expected real numbers")


def test_h5_datasets_declaring_huge_shapes(tmp_path):
    stim = write_stimuli(tmp_path)
    h5path = tmp_path / "Subject1.h5"
    write_bdata(h5path, stim)
    for key in ("dataset", "metadata/key"):
        with h5py.File(h5path, "r+") as h5:
            del h5[key]
            h5.create_dataset(key, shape=(10**6, 10**6), dtype="f4", chunks=(1, 1))
        refused_with(lambda: load_god_h5(h5path, "train"), "Subject1.h5", "header declares")
        write_bdata(h5path, stim)
    nsd = tmp_path / "nsd"
    write_nsd(nsd, n_trials=30, n_vox=12)
    with h5py.File(nsd / _NSD_BETAS, "r+") as h5:
        del h5["betas"]
        h5.create_dataset("betas", shape=(10**6, 10**6), dtype="f4", chunks=(1, 1))
    refused_with(lambda: load_nsd(nsd, 1, "train"), _NSD_BETAS, "[betas]", "header declares")


@pytest.mark.parametrize("frac", [0.0, 0.3, 0.7, 0.95])
def test_truncated_h5_files(tmp_path, frac):
    stim = write_stimuli(tmp_path)
    h5path = tmp_path / "Subject1.h5"
    write_bdata(h5path, stim)
    raw = h5path.read_bytes()
    h5path.write_bytes(raw[: int(frac * len(raw))])
    refused_with(lambda: load_god_h5(h5path, "train"), "Subject1.h5")


def test_h5_text_metadata_not_utf8_and_text_data(tmp_path):
    stim = write_stimuli(tmp_path)
    h5path = tmp_path / "Subject1.h5"
    write_bdata(h5path, stim)
    with h5py.File(h5path, "r+") as h5:
        keys = [k + (b"\xff" if k == b"Run" else b"") for k in h5["metadata/key"][()]]
        del h5["metadata/key"]
        h5.create_dataset("metadata/key", data=np.asarray(keys, dtype="S"))
    assert len(load_god_h5(h5path, "train")) > 0  # a key that is not UTF-8 is only a name
    with h5py.File(h5path, "r+") as h5:
        shape = h5["dataset"].shape
        del h5["dataset"]
        h5.create_dataset("dataset", data=np.full(shape, b"x", dtype="S1"))
    refused_with(lambda: load_god_h5(h5path, "train"), "[/dataset]", "expected real numbers")


def test_h5_nan_labels_refused(tmp_path):
    stim = write_stimuli(tmp_path)
    h5path = tmp_path / "Subject1.h5"
    t = write_bdata(h5path, stim)
    with h5py.File(h5path, "r+") as h5:
        label_col = int(np.flatnonzero(h5["metadata/value"][6] == 1)[0])
        data = h5["dataset"][()]
        data[np.flatnonzero(t["kinds"] == 3)[0], label_col] = np.nan
        h5["dataset"][...] = data
    refused_with(lambda: load_god_h5(h5path, "imagery"), "[Label]", "NaN")


@pytest.mark.parametrize("case", ["truncated", "not_gzip", "empty", "huge_dims", "huge_dims_gz", "complex"])
def test_damaged_nifti_files(tmp_path, case):
    write_own(tmp_path, four_d=True)
    mask = tmp_path / "roi_mask.nii.gz"
    raw = mask.read_bytes()
    if case == "truncated":
        mask.write_bytes(raw[: len(raw) // 2])
    elif case == "not_gzip":
        mask.write_bytes(b"\x00" + raw[1:])
    elif case == "empty":
        mask.write_bytes(b"")
    elif case == "huge_dims":
        plain = tmp_path / "roi_mask.nii"
        mask.unlink()
        nib.save(nib.Nifti1Image(np.ones((5, 4, 3), np.uint8), np.eye(4)), plain)
        set_nifti_dims(plain, (10**4, 10**4, 10**4))
        mask = plain
    elif case == "huge_dims_gz":
        set_nifti_dims(mask, (10**4, 10**4, 10**4))
    elif case == "complex":
        nib.save(nib.Nifti1Image(np.ones((5, 4, 3), np.complex64), np.eye(4)), mask)
    refused_with(lambda: load_nifti_dataset(tmp_path), mask.name)


def test_image_decompression_bomb_refused(tmp_path):
    write_own(tmp_path, four_d=True)
    png = tmp_path / "images" / "img0.png"
    raw = bytearray(png.read_bytes())
    assert raw[12:16] == b"IHDR"
    raw[16:24] = (100_000).to_bytes(4, "big") * 2  # width and height: 10^10 pixels
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")
    png.write_bytes(bytes(raw))
    refused_with(lambda: load_nifti_dataset(tmp_path), "img0.png", "DecompressionBombError")


@pytest.mark.parametrize(
    "target",
    [
        "imagenet_testing_label.csv",
        "imagenet_class_index.json",
        "bold:BOLD5000_Stimuli/Scene_Stimuli/repeated_stimuli_113_list.txt",
        "bold:" + _BOLD_LISTS.format(2),
        "nifti:trials.csv",
    ],
)
def test_text_files_that_are_not_utf8(tmp_path, target):
    kind, _, name = target.rpartition(":")
    if kind == "bold":
        write_bold5000(tmp_path, subjects=("CSI1",))
        load = lambda: load_bold5000(tmp_path, "CSI1", "test")  # noqa: E731
    elif kind == "nifti":
        write_own(tmp_path, four_d=True)
        load = lambda: load_nifti_dataset(tmp_path)  # noqa: E731
    else:
        write_god(tmp_path, subjects=(1,))
        load = lambda: load_god(tmp_path, 1, "test", average_test=False)  # noqa: E731
    path = tmp_path / name
    lines = path.read_bytes().split(b"\n")
    lines[min(1, len(lines) - 1)] += b"\xff\xfe"
    path.write_bytes(b"\n".join(lines))
    refused_with(load, Path(name).name, "is not UTF-8")


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "folder", "loop", "dangling"])
def test_special_files_in_place_of_data(tmp_path, kind):
    """A FIFO blocked the BOLD5000 reader forever and a link to /dev/zero read without end; folders, link
    loops and dangling links raised bare OSErrors."""
    folder = _bold(tmp_path / "bold")
    god_h5 = tmp_path / "h5"
    write_bdata(god_h5 / "Subject1.h5", write_stimuli(god_h5))
    targets = [
        (folder / _BOLD_BETAS.format("LHEarlyVis"), lambda: load_bold5000(folder, "CSI1", "train")),
        (folder / _BOLD_LISTS.format(1), lambda: load_bold5000(folder, "CSI1", "train")),
        (god_h5 / "images_256.npz", lambda: convert_god_h5(god_h5, tmp_path / "out")),
    ]
    for path, load in targets:
        saved = path.read_bytes()
        path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "dev_zero":
            path.symlink_to("/dev/zero")
        elif kind == "folder":
            path.mkdir()
        elif kind == "loop":
            path.symlink_to(path)
        else:
            path.symlink_to(tmp_path / "absent")
        if path.name == "images_256.npz":  # an optional file: ignored, the conversion goes on without it
            with guarded():
                convert_god_h5(god_h5, tmp_path / "out")
            shutil.rmtree(tmp_path / "out")
        else:
            refused_with(load, path.name)
        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        path.write_bytes(saved)
    detect_format(god_h5)  # the BData check never opens a FIFO named .h5
    os.mkfifo(god_h5 / "Subject2.h5")
    with guarded():
        assert detect_format(god_h5) == "god-h5"


def test_symlinked_copies_load_like_the_originals(tmp_path):
    """Links to regular files outside the data folder are followed: data folders are often symlinked."""
    folder = _bold(tmp_path / "bold")
    before = load_bold5000(folder, "CSI1", "test")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for rel in (_BOLD_BETAS.format("RHRSC"), _BOLD_IMG, _BOLD_LISTS.format(1)):
        target = outside / Path(rel).name
        shutil.move(folder / rel, target)
        (folder / rel).symlink_to(target)
    after = load_bold5000(folder, "CSI1", "test")
    np.testing.assert_array_equal(after.voxels, before.voxels)
    np.testing.assert_array_equal(after.images, before.images)


def test_inf_is_handled_like_nan(tmp_path):
    write_god(tmp_path, subjects=(1,))
    with np.load(tmp_path / "sbj_1.npz") as z:
        arrays = {k: z[k] for k in z.files}
    vc = np.flatnonzero(arrays["VC"])
    arrays["arr_0"] = arrays["arr_0"].copy()
    arrays["arr_0"][2, vc[3]] = np.inf
    arrays["arr_0"][4, vc[5]] = np.nan
    np.savez(tmp_path / "sbj_1.npz", **arrays)
    refused_with(lambda: load_god(tmp_path, 1, "train"), "[arr_0]", "2 non-finite values (1 NaN, 1 Inf)")
    drop = load_god(tmp_path, 1, "train", nan_policy="drop")
    assert drop.num_voxels == len(vc) - 2 and np.isfinite(drop.voxels).all()
    zero = load_god(tmp_path, 1, "train", nan_policy="zero")
    assert np.isfinite(zero.voxels).all() and zero.voxels[2, 3] == 0


@pytest.mark.parametrize("value", [np.nan, np.inf, -1.0, 1e300, 2.5])
def test_nsd_behaviour_values(tmp_path, value):
    """Inf raised a bare OverflowError, a negative image id silently wrapped to the last image."""
    write_nsd(tmp_path, n_trials=30, n_vox=12)
    shard = tmp_path / "wds/subj01/test/0.tar"
    name = "sample000000.behav.npy"
    with tarfile.open(shard) as tar:
        behav = np.load(io.BytesIO(tar.extractfile(name).read()))
    behav[0, 0] = value
    _rewrite_tar(shard, name, npy_bytes(behav))
    refused_with(lambda: load_nsd(tmp_path, 1, "test"), "behav.npy (image id)")


def test_nsd_tar_member_declaring_a_huge_size(tmp_path):
    write_nsd(tmp_path, n_trials=30, n_vox=12)
    shard = tmp_path / "wds/subj01/train/0.tar"
    name = "sample000001.behav.npy"
    with tarfile.open(shard) as tar:
        data = tar.extractfile(name).read()
    _rewrite_tar(shard, name, data, declared=2**33 - 1)  # the most an 11-digit octal size field holds
    refused_with(lambda: load_nsd(tmp_path, 1, "train"), "0.tar")


@pytest.mark.parametrize("cut", ["header", "checksum"])
def test_nsd_damaged_tar_header_mid_shard(tmp_path, cut):
    """tarfile stops quietly at a bad header after the first: the trials after it were silently dropped."""
    write_nsd(tmp_path, n_trials=30, n_vox=12)
    shard = tmp_path / "wds/subj01/train/0.tar"
    raw = bytearray(shard.read_bytes())
    pos = raw.find(b"sample000004.behav.npy")
    if cut == "header":
        shard.write_bytes(bytes(raw[: pos + 300]))
    else:
        raw[pos + 148 : pos + 150] = b"77"
        shard.write_bytes(bytes(raw))
    refused_with(lambda: load_nsd(tmp_path, 1, "train"), "0.tar")


def test_nsd_nan_pixels(tmp_path):
    write_nsd(tmp_path, n_trials=30, n_vox=12)
    with h5py.File(tmp_path / "coco_images_224_float16.hdf5", "r+") as h5:
        h5["images"][3, 0, 0, 0] = np.nan
    refused_with(lambda: load_nsd(tmp_path, 1, "test"), "[images]", "NaN or Inf pixels")


@pytest.mark.parametrize(
    "index",
    [
        {"0": ["n01440764", "tench"], "99999999": ["n01443537", "goldfish"]},  # a list of 10^8 names
        {"²": ["n01440764", "tench"]},  # str.isdigit() but not int()-able
        {"0": ["n²", "tench"]},
        "[" * 100_000,  # nesting beyond the JSON parser's recursion limit
    ],
)
def test_hostile_class_index(tmp_path, index):
    write_god(tmp_path, subjects=(1,))
    path = tmp_path / "imagenet_class_index.json"
    path.write_text(index if isinstance(index, str) else json.dumps(index))
    refused_with(lambda: load_god(tmp_path, 1, "train"), "imagenet_class_index.json")


def test_label_with_thousands_of_digits(tmp_path):
    write_god(tmp_path, subjects=(1,))
    path = tmp_path / "imagenet_testing_label.csv"
    lines = path.read_text().splitlines()
    lines[0] = "9" * 5000 + ".1," + "n" + "9" * 5000 + "_1.JPEG"
    path.write_text("\n".join(lines) + "\n")
    refused_with(lambda: load_god(tmp_path, 1, "test", average_test=False), "imagenet_testing_label.csv")


def test_two_beta_files_for_one_roi(tmp_path):
    folder = _bold(tmp_path)
    src = folder / _BOLD_BETAS.format("LHPPA")
    shutil.copy(src, folder / _BOLD_BETAS.format("LHPPA").replace("GLMbetas-", "GLMbetas-copy-"))
    refused_with(lambda: load_bold5000(folder, "CSI1", "train"), "two ROI beta files for CSI1 LHPPA")


@pytest.mark.parametrize("value", ["ragged", "text", "nan"])
def test_img_dict_values_that_are_not_images(tmp_path, value):
    folder = _bold(tmp_path)
    path = folder / _BOLD_IMG
    table = np.load(path, allow_pickle=True).item()
    name = "COCO_train2014_000000000000.jpg"
    table[name] = {
        "ragged": [table[name], [1, 2]],
        "text": np.full((6, 6, 3), "x"),
        "nan": np.full((6, 6, 3), np.nan),
    }[value]
    np.save(path, np.asarray(table, dtype=object), allow_pickle=True)
    refused_with(lambda: load_bold5000(folder, "CSI1", "train"), "img_dict.npy", f"[{name}]")


def test_cifti_entity_expansion_refused(tmp_path):
    """A "billion laughs" XML header in a CIFTI file stops at the XML parser's amplification limit."""
    from nibabel import cifti2 as ci  # noqa: F401 - registers the CIFTI image classes

    make_hcp(tmp_path, subjects=("100307",))
    dlabel = tmp_path / "Glasser.dlabel.nii"
    img = nib.load(dlabel)
    xml = img.header.to_xml()
    entities = "".join(f'<!ENTITY e{i + 1} "{("&e" + str(i) + ";") * 10}">' for i in range(9))
    doctype = f'<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE CIFTI [<!ENTITY e0 "lol">{entities}]>'
    evil = doctype.encode() + xml.replace(b"<MapName>MMP</MapName>", b"<MapName>&e9;</MapName>", 1)
    assert evil != doctype.encode() + xml
    img.header.to_xml = lambda *args, **kwargs: evil
    nib.save(img, dlabel)
    refused_with(lambda: read_parcellation(dlabel), "Glasser.dlabel.nii")


def test_truncated_cifti_series_is_a_failed_subject(tmp_path):
    make_hcp(tmp_path, subjects=("100307", "100408"))
    series = next((tmp_path / "hcp" / "100408").rglob("*MSMAll.dtseries.nii"))
    raw = series.read_bytes()
    series.write_bytes(raw[: len(raw) - 200])
    with guarded():
        report = prepare_hcp(tmp_path / "hcp", tmp_path / "Glasser.dlabel.nii", tmp_path / "out", workers=1)
    assert list(report.done) == ["100307"]
    assert "100408" in report.failed and "\n" not in report.failed["100408"]
