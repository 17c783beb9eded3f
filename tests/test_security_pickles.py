"""Malicious pickles in the files mindvis accepts: refused with our error, and nothing they ask for happens.

``tests/test_safeload.py`` covers raw pickles of every protocol, payloads nested in dicts, torch's zip and
legacy formats and numpy object pickles written by ``np.save``. This file adds what a real attack looks like:

* payloads planted inside the original MinD-Vis checkpoints of the fixtures (``mae_checkpoint.pth``,
  ``finetuned.pth``, ``label2img/model.ckpt``): in the top-level dict, in the pickled config object's state,
  and inside a tensor's storage record (the persistent id torch resolves to a storage);
* zip-format checkpoints whose ``data.pkl`` uses each pickle protocol 0-5, and legacy-format checkpoints with
  the payload in the header pickles that come before and after the main one;
* BOLD5000's ``img_dict.npy`` with payloads in every protocol, read through the BOLD5000 reader itself;
* pickles that use only allowed globals to crash or exhaust the process: an object array whose item list
  is shorter than its shape (numpy's ``__setstate__`` reads past the list and segfaults; checked in a
  subprocess), constructor calls that allocate terabytes, dtype and object state tampering;
* checkpoints whose structure is hostile to the loader: containers shared 2^60 times over, a list inside
  itself, deep nesting, zip members that declare huge sizes;
* a scan of the source tree: no pickle is loaded anywhere except through :mod:`mindvis.safeload` or
  ``torch.load(..., weights_only=True)``.

Every payload would create a canary file if it ran; each test checks that the canary never appears.
``MINDVIS_SECURITY_REPORT=<file.json>`` writes how many malicious files were tried and refused.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import re
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import parity_dir
from mindvis.data.formats.bold5000 import load_bold5000
from mindvis.errors import CheckpointError, DataError, MindVisError
from mindvis.safeload import NumpyUnpickler, load_pickled_numpy, load_torch_file
from test_formats_bold5000 import write_bold5000
from test_safeload import PAYLOADS, PROTOCOLS, _OsSystem

SRC = Path(__file__).resolve().parents[1] / "src" / "mindvis"
ORIGINAL_CHECKPOINTS = ("mae_checkpoint.pth", "finetuned.pth", "label2img/model.ckpt")
COUNTS: Counter[str] = Counter()


# ---- payloads -------------------------------------------------------------------------------------------------


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "canary"
    yield path
    assert not path.exists(), "a payload ran"


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    out = os.environ.get("MINDVIS_SECURITY_REPORT")
    if out:
        Path(out).write_text(json.dumps({"tried": COUNTS["tried"], "refused": COUNTS["refused"]}, indent=2))


def refused(load, path, error=MindVisError) -> MindVisError:
    """``load(path)`` must raise ``error`` with a one-line message naming ``path``."""
    COUNTS["tried"] += 1
    with pytest.raises(error) as info:
        load(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg, msg
    COUNTS["refused"] += 1
    return info.value


def payload_ops(obj) -> bytes:
    """The opcodes that push ``obj`` (protocol 2, no memo, no PROTO/STOP), to splice into another pickle."""
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=2)
    p.fast = True  # no memo: the spliced opcodes must not disturb the host pickle's memo
    p.dump(obj)
    raw = buf.getvalue()
    assert raw[:2] == b"\x80\x02" and raw[-1:] == b"."
    return raw[2:-1]


def unicode_op(text: str) -> bytes:
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def zip_records(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


def write_zip(path: Path, records: list[tuple[str, bytes]], compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in records:
            z.writestr(name, data)
    return path


def replace_data_pkl(src: Path, dst: Path, pkl: bytes) -> Path:
    return write_zip(dst, [(n, pkl if n.endswith("/data.pkl") else d) for n, d in zip_records(src)])


def data_pkl(path: Path) -> bytes:
    return next(d for n, d in zip_records(path) if n.endswith("/data.pkl"))


# ---- payloads planted in the original checkpoints -------------------------------------------------------------


def plant(pkl: bytes, where: str, ops: bytes) -> bytes:
    """Insert ``ops`` (which push one object) into an original checkpoint's pickle.

    ``top``: as a new item of the top-level dict (just before STOP). ``config``: as a new attribute in the
    state of the pickled ``config.*`` object (just before its BUILD). ``storage``: as an extra element of the
    first tensor's persistent id, the record torch resolves to the tensor's storage.
    """
    opcodes = list(pickletools.genops(pkl))
    if where == "top":
        stop = opcodes[-1][2]
        return pkl[:stop] + unicode_op("planted") + ops + b"s" + pkl[stop:]
    if where == "config":
        start = next(
            pos for op, arg, pos in opcodes if op.name == "GLOBAL" and str(arg).startswith("config ")
        )
        build = next(pos for op, arg, pos in opcodes if op.name == "BUILD" and pos > start)
        return pkl[:build] + unicode_op("planted") + ops + b"s" + pkl[build:]
    if where == "storage":
        persid = next(i for i, (op, _, _) in enumerate(opcodes) if op.name == "BINPERSID")
        # the pid tuple closes at the last TUPLE before BINPERSID (memo opcodes may sit in between)
        close = max(pos for op, _, pos in opcodes[:persid] if op.name == "TUPLE")
        return pkl[:close] + ops + pkl[close:]
    raise ValueError(where)


def _plant_cases():
    for name in ORIGINAL_CHECKPOINTS:
        for where in ("top", "config", "storage"):
            if where == "config" and name.endswith(".ckpt"):
                continue  # label2img/model.ckpt holds no config object
            yield name, where


@pytest.mark.parametrize(("name", "where"), list(_plant_cases()))
def test_planting_points_are_real(tmp_path, name, where):
    """The harness: a harmless value planted at each point loads and lands where intended."""
    src = parity_dir() / name
    if not src.is_file():
        pytest.skip(f"original checkpoint fixture {src} is absent")
    harmless = unicode_op("harmless value")
    path = replace_data_pkl(src, tmp_path / "planted.pth", plant(data_pkl(src), where, harmless))
    if where == "storage":
        # the storage record is malformed now, and torch refuses it: the planted element was read
        with pytest.raises(CheckpointError, match="corrupt"):
            load_torch_file(path)
        return
    obj = load_torch_file(path)
    if where == "top":
        assert obj["planted"] == "harmless value"
    else:
        assert obj["config"].planted == "harmless value"


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("name", "where"), list(_plant_cases()))
def test_payload_in_original_checkpoint_refused(tmp_path, canary, name, where, payload):
    src = parity_dir() / name
    if not src.is_file():
        pytest.skip(f"original checkpoint fixture {src} is absent")
    pkl = plant(data_pkl(src), where, payload_ops(payload(canary)))
    path = replace_data_pkl(src, tmp_path / f"evil{Path(name).suffix}", pkl)
    err = refused(load_torch_file, path, CheckpointError)
    assert "allow-list" in str(err)


def test_original_checkpoints_still_load():
    """The positive control: the unmodified original checkpoints load, configs as namespaces."""
    for name in ORIGINAL_CHECKPOINTS:
        src = parity_dir() / name
        if not src.is_file():
            pytest.skip(f"original checkpoint fixture {src} is absent")
        obj = load_torch_file(src)
        assert isinstance(obj, dict) and obj
        if "config" in obj:
            assert obj["config"]._class.startswith("Config_")


# ---- zip checkpoints in every protocol, legacy checkpoints, storage records -----------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda c: c.__name__)
def test_zip_checkpoint_every_protocol(tmp_path, canary, protocol, payload):
    torch.save({"epoch": 1}, tmp_path / "host.pth")
    obj = {"model": {"w": [1.0, 2.0], "extra": {"deep": [payload(canary)]}}, "epoch": 3}
    path = replace_data_pkl(
        tmp_path / "host.pth", tmp_path / "evil.pth", pickle.dumps(obj, protocol=protocol)
    )
    refused(load_torch_file, path, CheckpointError)


def _legacy_parts(path: Path) -> tuple[list[bytes], bytes]:
    """The five pickles of a legacy (non-zip) torch file and the raw storage bytes after them."""
    raw = path.read_bytes()
    buf = io.BytesIO(raw)
    parts = []
    for _ in range(5):
        start = buf.tell()
        for _op in pickletools.genops(buf):
            pass
        parts.append(raw[start : buf.tell()])
    return parts, raw[buf.tell() :]


@pytest.mark.parametrize("part", [0, 1, 2, 4], ids=["magic", "protocol", "sys_info", "storage_keys"])
@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda c: c.__name__)
def test_legacy_checkpoint_header_pickles(tmp_path, canary, part, payload):
    """The legacy format unpickles a magic number, a protocol, sys_info and the storage keys besides the
    main object; a payload in any of them is refused too."""
    good = tmp_path / "legacy.pth"
    torch.save({"w": torch.arange(4.0)}, good, _use_new_zipfile_serialization=False)
    parts, tail = _legacy_parts(good)
    assert load_torch_file(good)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    parts[part] = pickle.dumps(payload(canary), protocol=2)
    path = tmp_path / "evil_legacy.pth"
    path.write_bytes(b"".join(parts) + tail)
    refused(load_torch_file, path, CheckpointError)


def test_storage_record_holding_a_pickle_is_data(tmp_path, canary):
    """A tensor's raw storage bytes replaced by a pickle payload are never unpickled: read as numbers or refused."""
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(256)}, good)
    evil = pickle.dumps(_OsSystem(canary), protocol=2)
    for name, size in (("exact", 1024), ("short", len(evil))):
        blob = (evil * (1024 // len(evil) + 1))[:size]
        recs = [(n, blob if n.endswith("/data/0") else d) for n, d in zip_records(good)]
        path = write_zip(tmp_path / f"{name}.pth", recs)
        if size == 1024:
            w = load_torch_file(path)["w"]
            assert w.shape == (256,) and w.numpy().tobytes() == blob
        else:
            refused(load_torch_file, path, CheckpointError)


def set_declared_size(raw: bytes, filename: str, size: int) -> bytes:
    """Patch the uncompressed size of member ``filename`` in its local header and central directory entry."""
    out = bytearray(raw)
    for sig, size_at, name_len_at, name_at in ((b"PK\x03\x04", 22, 26, 30), (b"PK\x01\x02", 24, 28, 46)):
        pos = out.find(sig)
        while pos >= 0:
            n = int.from_bytes(out[pos + name_len_at : pos + name_len_at + 2], "little")
            if out[pos + name_at : pos + name_at + n] == filename.encode():
                out[pos + size_at : pos + size_at + 4] = size.to_bytes(4, "little")
            pos = out.find(sig, pos + 4)
    return bytes(out)


def test_zip_member_declaring_a_huge_size(tmp_path):
    """A deflated member that declares more than deflate can expand to is refused before it is inflated."""
    good = tmp_path / "good.pth"
    torch.save({"w": torch.arange(8.0)}, good)
    path = write_zip(tmp_path / "deflated.pth", zip_records(good), zipfile.ZIP_DEFLATED)
    assert load_torch_file(path)["w"].tolist() == list(range(8))  # deflated members are fine in themselves
    name = next(n for n, _ in zip_records(path) if n.endswith("/data.pkl"))
    bomb = tmp_path / "bomb.pth"
    bomb.write_bytes(set_declared_size(path.read_bytes(), name, 2**32 - 1))
    err = refused(load_torch_file, bomb, CheckpointError)
    assert "declares" in str(err)


# ---- hostile structure ----------------------------------------------------------------------------------------


def test_shared_self_referential_and_deep_structures(tmp_path):
    """Loading walks nested containers once each: no exponential walk, no infinite loop, no RecursionError."""
    shared: list = [1]
    for _ in range(60):
        shared = [shared, shared]  # 2^60 paths to the innermost list
    looped: list = []
    looped.append(looped)
    for name, obj in (("shared", shared), ("looped", looped)):
        torch.save({"model": obj}, tmp_path / f"{name}.pth")
        assert isinstance(load_torch_file(tmp_path / f"{name}.pth")["model"], list)
    again = load_torch_file(tmp_path / "looped.pth")["model"]
    assert again[0] is again
    # 200000 nested lists, written opcode by opcode (the pickler itself cannot nest that deep)
    depth = 200_000
    pkl = b"\x80\x02}" + unicode_op("model") + b"]" * depth + b"a" * (depth - 1) + b"s."
    torch.save({"epoch": 1}, tmp_path / "host.pth")
    deep = replace_data_pkl(tmp_path / "host.pth", tmp_path / "deep.pth", pkl)
    try:
        out = load_torch_file(deep)
    except CheckpointError as exc:  # refusing is fine too; a RecursionError or a crash is not
        assert str(deep) in str(exc)
    else:
        assert isinstance(out["model"], list)


# ---- BOLD5000 img_dict.npy ------------------------------------------------------------------------------------


def npy_object_file(obj, protocol: int) -> bytes:
    """An ``.npy`` file holding ``obj`` as a pickled 0-d object array, written with ``protocol``."""
    arr = np.empty((), dtype=object)
    arr[()] = obj
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": ()})
    return buf.getvalue() + pickle.dumps(arr, protocol=protocol)


@pytest.fixture(scope="module")
def bold_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bold5000")
    write_bold5000(folder, subjects=("CSI1",))
    return folder


IMG_DICT = "BOLD5000_Stimuli/Scene_Stimuli/Presented_Stimuli/img_dict.npy"


def _with_img_dict(bold_folder: Path, tmp_path: Path, raw: bytes) -> Path:
    import shutil

    folder = tmp_path / "BOLD5000"
    shutil.copytree(bold_folder, folder)
    (folder / IMG_DICT).write_bytes(raw)
    return folder


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_img_dict_every_protocol_loads(bold_folder, tmp_path, protocol):
    """The positive control: a genuine img_dict written with any protocol loads through the reader."""
    images = np.load(bold_folder / IMG_DICT, allow_pickle=True).item()
    folder = _with_img_dict(bold_folder, tmp_path, npy_object_file(images, protocol))
    ds = load_bold5000(folder, "CSI1", "test")
    for i, name in enumerate(ds.meta["image_names"]):
        np.testing.assert_array_equal(ds.images[i], images[name])


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda c: c.__name__)
def test_img_dict_payload_refused_by_reader(bold_folder, tmp_path, canary, protocol, payload):
    images = np.load(bold_folder / IMG_DICT, allow_pickle=True).item()
    name = next(iter(images))
    images[name] = [images[name], {"nested": payload(canary)}]
    folder = _with_img_dict(bold_folder, tmp_path, npy_object_file(images, protocol))
    err = refused(lambda f: load_bold5000(f, "CSI1", "train"), folder / IMG_DICT, DataError)
    assert "refused" in str(err)


def test_img_dict_hostile_values_refused_by_reader(bold_folder, tmp_path):
    """Image values nested 200000 deep, containing themselves, or ragged: our error, no RecursionError."""
    images = np.load(bold_folder / IMG_DICT, allow_pickle=True).item()
    name = next(iter(images))
    looped: list = []
    looped.append(looped)
    depth = 200_000
    for case, value in (("looped", looped), ("ragged", [images[name], [1, 2]]), ("deep", "DEEP_MARKER")):
        table = dict(images)
        table[name] = value
        raw = pickle.dumps(table, protocol=2)
        if case == "deep":  # the pickler cannot nest this deep: splice the opcodes in place of the marker
            raw = raw.replace(unicode_op("DEEP_MARKER"), b"]" * depth + b"a" * (depth - 1))
            assert b"DEEP_MARKER" not in raw
        folder = _with_img_dict(bold_folder, tmp_path / case, raw)
        refused(lambda f, folder=folder: load_bold5000(folder, "CSI1", "train"), folder / IMG_DICT, DataError)


# Pickles built only from allowed globals that, unchecked, crash numpy or allocate terabytes.
_recon = np._core.multiarray._reconstruct


class _Reduce:
    def __init__(self, *rv):
        self.rv = rv

    def __reduce__(self):
        return self.rv


ABUSE = {
    # numpy's object-array __setstate__ trusts the list length: 2 items for shape (10,) reads past the list
    "object_array_short_list": _Reduce(
        _recon, (np.ndarray, (0,), b"b"), (1, (10,), np.dtype("O"), False, [1, 2])
    ),
    "numeric_array_short_data": _Reduce(
        _recon, (np.ndarray, (0,), b"b"), (1, (10,), np.dtype("f8"), False, b"ab")
    ),
    "bytes_of_a_terabyte": _Reduce(bytes, (10**12,)),
    "reconstruct_a_terabyte": _Reduce(_recon, (np.ndarray, (10**12,), b"f")),
    "ndarray_constructor": _Reduce(np.ndarray, ((10**6, 10**6),)),
    "dtype_state_tampering": _Reduce(np.dtype, ("f8", False, True), (3, "<", None, None, None, 10**9, 1, 0)),
    "structured_dtype_with_objects": _Reduce(np.dtype, ([("a", "O"), ("b", "f8")],)),
    "ordereddict_class_swap": _Reduce(__import__("collections").OrderedDict, (), (None, {"__class__": dict})),
    "codec_lookup": _Reduce(__import__("_codecs").encode, ("x", "rot13")),
}


@pytest.mark.parametrize("case", list(ABUSE))
def test_allowed_globals_cannot_crash_or_exhaust(tmp_path, case):
    """Each runs in a subprocess, so a crash (the object-array case segfaults unchecked) fails the test
    instead of killing the test run."""
    path = tmp_path / "img_dict.npy"
    path.write_bytes(npy_object_file({"a.jpg": ABUSE[case]}, protocol=2))
    code = (
        "import sys, resource\n"
        "resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, resource.RLIM_INFINITY))\n"
        "from mindvis.safeload import load_pickled_numpy\n"
        "from mindvis.errors import DataError\n"
        "try:\n"
        f"    load_pickled_numpy({str(path)!r})\n"
        "except DataError as exc:\n"
        "    print('REFUSED', exc)\n"
        "else:\n"
        "    print('LOADED')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC.parent))
    COUNTS["tried"] += 1
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, f"crashed (exit {res.returncode}): {res.stderr[-2000:]}"
    assert res.stdout.startswith("REFUSED"), res.stdout + res.stderr[-2000:]
    assert str(path) in res.stdout
    COUNTS["refused"] += 1


def test_numpy_unpickler_takes_genuine_numpy_pickles():
    """Positive control: arrays of common dtypes, byte orders, scalars and containers in every protocol
    come out as the unrestricted unpickler makes them."""
    obj = {
        "u8": np.arange(24, dtype=np.uint8).reshape(2, 4, 3),
        "f4be": np.linspace(0, 1, 5).astype(">f4"),
        "i8": np.arange(3, dtype=np.int64),
        "str": np.asarray(["a", "bc"]),
        "bool": np.asarray([True, False]),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "objects": np.asarray([1, "x", None], dtype=object),
        "scalar": np.float32(2.5),
        "list": [1, 2.5, "x", b"\x00\xff", (1, 2), {3}, frozenset({4}), complex(1, 2)],
    }
    for protocol in PROTOCOLS:
        raw = pickle.dumps(obj, protocol=protocol)
        out = NumpyUnpickler(io.BytesIO(raw), encoding="latin1").load()
        ref = pickle.loads(raw)  # what the unrestricted unpickler makes of the same bytes
        for key, value in ref.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(out[key], value)
                assert (
                    out[key].dtype == value.dtype and out[key].flags.f_contiguous == value.flags.f_contiguous
                )
            else:
                assert out[key] == value and type(out[key]) is type(value)


def test_truncated_pickles_are_refused(tmp_path):
    """Every prefix of a genuine img_dict is refused with our error (the pure-Python unpickler's short reads
    included)."""
    raw = npy_object_file({"a.jpg": np.zeros((4, 4, 3), np.uint8), "b": [1, 2.0]}, protocol=2)
    path = tmp_path / "img_dict.npy"
    for cut in range(0, len(raw) - 1, 7):
        path.write_bytes(raw[:cut])
        with pytest.raises(DataError):
            load_pickled_numpy(path)


# ---- the source tree ------------------------------------------------------------------------------------------


UNSAFE = [
    (re.compile(r"\bpickle\.(load|loads|Unpickler)\b"), "pickle.load/loads/Unpickler"),
    (re.compile(r"\b(dill|cloudpickle|joblib|shelve|marshal)\b\.\w*load"), "another unpickler"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    (re.compile(r"\bpd\.read_pickle\b|\bread_pickle\("), "pandas.read_pickle"),
]


def _calls(text: str, name: str):
    """The argument text of each call ``name(...)`` (balanced parentheses)."""
    for m in re.finditer(re.escape(name) + r"\s*\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        yield text[m.start() : i], text[: m.start()].count("\n") + 1


def test_no_unrestricted_unpickling_in_the_source():
    """Every pickle reaches us through :mod:`mindvis.safeload` or ``torch.load(..., weights_only=True)``."""
    problems = []
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    for f in files:
        if f.name == "safeload.py":
            continue
        text = f.read_text(encoding="utf-8")
        for pattern, what in UNSAFE:
            for m in pattern.finditer(text):
                problems.append(f"{f.relative_to(SRC)}:{text[: m.start()].count(chr(10)) + 1}: {what}")
        for call, line in _calls(text, "torch.load"):
            if not re.search(r"weights_only\s*=\s*True", call):
                problems.append(f"{f.relative_to(SRC)}:{line}: torch.load without weights_only=True")
    assert not problems, "unrestricted unpickling:\n" + "\n".join(problems)
