"""Every pickle-based file is read in one place, :mod:`mindvis.safeload`.

``torch.load(..., weights_only=True)`` alone is safe against code execution (``test_security_pickles``
checks that), but the loader in :mod:`mindvis.safeload` also verifies CRCs, refuses oversized archive
members and turns every failure into one :class:`mindvis.errors.CheckpointError`; so no other module calls
``torch.load`` itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mindvis.errors import CheckpointError

SRC = Path(__file__).resolve().parents[1] / "src" / "mindvis"


def torch_load_calls() -> list[str]:
    found = []
    for f in sorted(SRC.rglob("*.py")):
        if f.name == "safeload.py":
            continue
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\btorch\.load\s*\(", line) and not line.lstrip().startswith("#"):
                found.append(f"{f.relative_to(SRC)}:{i}")
    return found


def test_routed_modules_do_not_call_torch_load():
    calls = torch_load_calls()
    for module in ("train/run_folder.py", "eval/networks.py", "eval/classifier.py"):
        assert not [c for c in calls if c.startswith(module)], calls


def test_no_module_calls_torch_load():
    assert torch_load_calls() == []


def test_load_state_dict_unwraps_and_refuses(tmp_path):
    from safetensors.torch import save_file

    from mindvis.safeload import load_state_dict

    weights = {"w": torch.arange(3.0)}
    torch.save({"state_dict": weights, "epoch": 3}, tmp_path / "wrapped.pth")
    torch.save({"model": weights}, tmp_path / "model.pth")
    save_file(weights, str(tmp_path / "w.safetensors"))
    for name in ("wrapped.pth", "model.pth", "w.safetensors"):
        assert torch.equal(load_state_dict(tmp_path / name)["w"], weights["w"]), name
    assert torch.equal(load_state_dict(tmp_path / "wrapped.pth", mmap=True)["w"], weights["w"])
    torch.save([1, 2], tmp_path / "list.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    for name, msg in (
        ("list.pth", "expected a dict"),
        ("bad.safetensors", "safetensors"),
        ("missing.pth", "not found"),
        ("missing.safetensors", "not found"),
    ):
        with pytest.raises(CheckpointError, match=msg) as info:
            load_state_dict(tmp_path / name)
        assert name in str(info.value)


def test_checkpoint_progress_reads_memory_mapped(tmp_path):
    from mindvis.train.run_folder import read_checkpoint_progress

    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 4, "global_step": 40, "state_dict": {"w": torch.ones(2)}}, path)
    assert read_checkpoint_progress(path) == {"epoch": 4, "global_step": 40}
    torch.save({"weights": 1}, path)
    with pytest.raises(CheckpointError, match="not a Lightning"):
        read_checkpoint_progress(path)
