"""The restricted unpicklers refuse code execution: crafted pickles must fail with our error and do nothing.

Each payload, if it ran, would create a canary file; every test checks that the canary never appears.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mindvis.errors import CheckpointError, DataError
from mindvis.safeload import load_pickled_numpy, load_torch_file


class _OsSystem:
    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


class _Subprocess:
    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return (subprocess.call, (["touch", self.canary],))


class _Eval:
    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return (eval, (f"open({self.canary!r}, 'w').close()",))


class _Exec:
    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({self.canary!r}).touch()",))


PAYLOADS = [_OsSystem, _Subprocess, _Eval, _Exec]
PROTOCOLS = list(range(pickle.HIGHEST_PROTOCOL + 1))


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "canary"
    yield path
    assert not path.exists(), "a payload ran"


def test_payloads_really_work(canary, tmp_path):
    """Sanity check of the test itself: a plain pickle.load of the payload does create the canary."""
    other = tmp_path / "live"
    pickle.loads(pickle.dumps(_Exec(other)))
    assert other.exists()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda c: c.__name__)
def test_raw_pickle_refused(tmp_path, canary, protocol, payload):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(payload(canary), protocol=protocol))
    with pytest.raises(CheckpointError) as info:
        load_torch_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_nested_pickle_refused(tmp_path, canary, protocol):
    obj = {"model": {"w": [1, 2, {"deep": (_OsSystem(canary),)}]}, "epoch": 3}
    path = tmp_path / "nested.pth"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    with pytest.raises(CheckpointError):
        load_torch_file(path)


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda c: c.__name__)
def test_torch_zip_refused(tmp_path, canary, payload):
    path = tmp_path / "evil_zip.pth"
    torch.save({"model": {"w": torch.zeros(3)}, "config": payload(canary)}, path)
    assert zipfile.is_zipfile(path)
    with pytest.raises(CheckpointError, match="allow-list") as info:
        load_torch_file(path)
    assert str(path) in str(info.value)


def test_torch_legacy_format_refused(tmp_path, canary):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2), "x": _Subprocess(canary)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError):
        load_torch_file(path)


def test_foreign_global_named_in_error(tmp_path, canary):
    path = tmp_path / "named.pth"
    torch.save({"x": _OsSystem(canary)}, path)
    with pytest.raises(CheckpointError) as info:
        load_torch_file(path)
    assert "system" in str(info.value)


def test_config_module_other_class_refused(tmp_path, canary):
    """Only the four known config class names are allowed in module ``config``."""
    data = b"\x80\x02cconfig\nEvil\nq\x00)\x81q\x01."  # config.Evil() via NEWOBJ
    path = tmp_path / "cfg.pth"
    path.write_bytes(data)
    with pytest.raises(CheckpointError):
        load_torch_file(path)
    # calling an allowed stand-in with arguments through REDUCE does not execute anything either
    data2 = b"\x80\x02cconfig\nConfig_MBM_fMRI\nq\x00cposix\nsystem\nq\x01\x85q\x02R."
    path.write_bytes(data2)
    with pytest.raises(CheckpointError):
        load_torch_file(path)


def test_original_config_objects_become_namespaces(tmp_path):
    """A pickle of ``config.Config_MBM_fMRI`` (as the original writes it) loads as a SimpleNamespace."""
    mod = type(sys)("config")

    class Config_MBM_fMRI:  # noqa: N801 - the original's class name
        pass

    Config_MBM_fMRI.__module__ = "config"
    Config_MBM_fMRI.__qualname__ = "Config_MBM_fMRI"
    mod.Config_MBM_fMRI = Config_MBM_fMRI
    sys.modules["config"] = mod
    try:
        cfg = Config_MBM_fMRI()
        cfg.embed_dim, cfg.focus_range = 64, None
        path = tmp_path / "cfg.pth"
        torch.save({"model": {"w": torch.arange(3.0)}, "config": cfg, "epoch": 1}, path)
    finally:
        del sys.modules["config"]
    obj = load_torch_file(path)
    assert isinstance(obj["config"], SimpleNamespace)
    assert obj["config"].embed_dim == 64 and obj["config"]._class == "Config_MBM_fMRI"
    assert torch.equal(obj["model"]["w"], torch.arange(3.0)) and obj["epoch"] == 1


def test_malformed_config_object(tmp_path):
    """A config stand-in whose pickled state has a non-string attribute name: our error, not a TypeError."""
    mod = type(sys)("config")

    class Config_MBM_fMRI:  # noqa: N801 - the original's class name
        pass

    class _Odd:
        def __reduce__(self):
            return (Config_MBM_fMRI, (), {1: 2})

    Config_MBM_fMRI.__module__ = "config"
    Config_MBM_fMRI.__qualname__ = "Config_MBM_fMRI"
    mod.Config_MBM_fMRI = Config_MBM_fMRI
    sys.modules["config"] = mod
    try:
        torch.save({"config": _Odd()}, tmp_path / "odd.pth")
    finally:
        del sys.modules["config"]
    with pytest.raises(CheckpointError, match="config"):
        load_torch_file(tmp_path / "odd.pth")


def test_empty_missing_truncated_torch_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_torch_file(tmp_path / "absent.pth")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_torch_file(empty)
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.randn(64, 64)}, "epoch": 2}, good)
    raw = good.read_bytes()
    for i, cut in enumerate((1, 10, len(raw) // 3, len(raw) - 22, len(raw) - 1)):
        bad = tmp_path / f"cut{i}.pth"
        bad.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError):
            load_torch_file(bad)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        load_torch_file(garbage)


def test_damaged_tensor_bytes_detected(tmp_path):
    """Tensor data bytes changed inside the zip: caught by the CRC check, not loaded as wrong weights."""
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(256, 256)}, good)
    raw = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data/0"))
    head = bytes(raw[info.header_offset : info.header_offset + 30])  # local header: name and extra lengths
    start = (
        info.header_offset
        + 30
        + int.from_bytes(head[26:28], "little")
        + int.from_bytes(head[28:30], "little")
    )
    raw[start + 100 : start + 104] = b"\x00\x00\xc0\x7f"  # a NaN
    bad = tmp_path / "bad.pth"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="CRC"):
        load_torch_file(bad)
    assert torch.isnan(load_torch_file(bad, verify_crc=False)["w"]).any()  # what the check prevents


# -- numpy object pickles -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda c: c.__name__)
def test_numpy_object_pickle_refused(tmp_path, canary, payload):
    path = tmp_path / "img_dict.npy"
    arr = np.empty((), dtype=object)
    arr[()] = {"img": np.zeros(3), "evil": payload(canary)}
    np.save(path, arr, allow_pickle=True)
    with pytest.raises(DataError, match="refused") as info:
        load_pickled_numpy(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_raw_pickle_as_npy_refused(tmp_path, canary, protocol):
    path = tmp_path / "raw.npy"
    path.write_bytes(pickle.dumps([np.zeros(2), _OsSystem(canary)], protocol=protocol))
    with pytest.raises(DataError):
        load_pickled_numpy(path)


def test_numpy_legit_objects_load(tmp_path):
    arr = np.empty((), dtype=object)
    arr[()] = {"n01440764_10026.JPEG": np.arange(12, dtype=np.uint8).reshape(2, 2, 3), "k": [1.5, "x"]}
    path = tmp_path / "ok.npy"
    np.save(path, arr, allow_pickle=True)
    obj = load_pickled_numpy(path)
    assert np.array_equal(obj["n01440764_10026.JPEG"], np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    assert obj["k"] == [1.5, "x"]
    plain = tmp_path / "plain.npy"
    np.save(plain, np.linspace(0, 1, 5))
    assert np.array_equal(load_pickled_numpy(plain), np.linspace(0, 1, 5))


def test_numpy_truncated_and_empty(tmp_path):
    arr = np.empty((), dtype=object)
    arr[()] = {"a": np.ones((8, 8))}
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    raw = buf.getvalue()
    for i, cut in enumerate((0, 5, len(raw) // 2, len(raw) - 1)):
        bad = tmp_path / f"cut{i}.npy"
        bad.write_bytes(raw[:cut])
        with pytest.raises(DataError):
            load_pickled_numpy(bad)
    with pytest.raises(DataError, match="not found"):
        load_pickled_numpy(tmp_path / "absent.npy")
