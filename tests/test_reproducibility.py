"""Reproducibility: the same seed and configuration on the same machine give the same weights, images and metrics.

A chain of tiny steps (simulate -> benchmark classifier -> stage A pretraining -> checkpoint conversion ->
reconstruction -> evaluation) runs twice, each time in the same folder (the first result is moved aside, so
that recorded paths agree too), and the two folders are compared file by file:

* weights (``.safetensors``): tensors and metadata equal, bit for bit;
* Lightning checkpoints (``.ckpt``): the model tensors equal (the rest is trainer bookkeeping);
* JSON: equal once wall-clock fields and cache keys (:data:`CLOCK_KEYS`) are removed;
* HTML reports are skipped (they render the JSON and its timings);
* everything else (npz, npy, PNG, CSV logs, YAML, text): equal bytes.

The run folders must also record the package versions, the git commit and every seed. The whole demo
(``smoke`` preset) gets the same comparison in a ``slow`` test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMOKE_PRESET, parity_dir
from mindvis.cli import main

#: JSON keys whose values are wall-clock measurements or timestamps, not results; and cache keys, which hash
#: the modification times of their input files (``fingerprint`` of a prepared corpus).
CLOCK_KEYS = frozenset(
    {"seconds", "train_seconds", "timings", "created", "updated", "finished", "elapsed", "steps_seconds"}
    | {"fingerprint"}
)
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread_module", "quiet_cli_logging")


# ----------------------------------------------------------------------------------------------------------
# comparing two run folders
# ----------------------------------------------------------------------------------------------------------


def _drop_clock(obj):
    if isinstance(obj, dict):
        return {k: _drop_clock(v) for k, v in obj.items() if k not in CLOCK_KEYS}
    if isinstance(obj, list):
        return [_drop_clock(v) for v in obj]
    return obj


def _safetensors_content(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return fh.metadata() or {}, {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118


def _same_tensors(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(
        torch.is_tensor(a[k]) == torch.is_tensor(b[k])
        and (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else True)
        for k in a
    )


def differences(first: Path, second: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """What differs between two run folders, under the rules of this module (empty: reproducible)."""
    from mindvis.safeload import load_torch_file

    out: list[str] = []

    def files(root: Path) -> set[str]:
        return {
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".") and not any(s in p.parts for s in skip)
        }

    fa, fb = files(first), files(second)
    out += [f"only in the first run: {p}" for p in sorted(fa - fb)]
    out += [f"only in the second run: {p}" for p in sorted(fb - fa)]
    for rel in sorted(fa & fb):
        a, b = first / rel, second / rel
        if a.suffix == ".html":
            continue
        if a.suffix == ".safetensors":
            (ma, ta), (mb, tb) = _safetensors_content(a), _safetensors_content(b)
            same = ma == mb and _same_tensors(ta, tb)
        elif a.suffix == ".ckpt":
            same = _same_tensors(load_torch_file(a)["state_dict"], load_torch_file(b)["state_dict"])
        elif a.suffix == ".json":
            same = _drop_clock(json.loads(a.read_text())) == _drop_clock(json.loads(b.read_text()))
        else:
            same = a.read_bytes() == b.read_bytes()
        if not same:
            out.append(f"differs: {rel}")
    return out


def twice(workdir: Path, make) -> tuple[Path, Path]:
    """Run ``make(workdir)`` twice in the same folder; returns (first result, second result)."""
    make(workdir)
    first = workdir.with_name(workdir.name + "-first")
    shutil.move(workdir, first)
    make(workdir)
    return first, workdir


def test_differences_catches_changes(tmp_path):
    """The comparison itself: a changed tensor, pixel, metric or file set is reported; clocks are not."""
    from mindvis.utils.io import safetensors_bytes, write_json

    for name, w, px, metric in (("a", 1.0, 0, 0.5), ("b", 1.0, 0, 0.5)):
        d = tmp_path / name
        d.mkdir()
        (d / "w.safetensors").write_bytes(safetensors_bytes({"w": torch.full((3,), w)}, {"k": "v"}))
        np.save(d / "img.npy", np.full((2, 2), px, np.uint8))
        write_json(d / "m.json", {"acc": metric, "seconds": 1.0 if name == "a" else 2.0})
    assert differences(tmp_path / "a", tmp_path / "b") == []
    b = tmp_path / "b"
    (b / "w.safetensors").write_bytes(safetensors_bytes({"w": torch.full((3,), 1.0 + 1e-7)}, {"k": "v"}))
    np.save(b / "img.npy", np.full((2, 2), 1, np.uint8))
    write_json(b / "m.json", {"acc": 0.5000001})
    (b / "extra.txt").write_text("x")
    assert differences(tmp_path / "a", b) == [
        "only in the second run: extra.txt",
        "differs: img.npy",
        "differs: m.json",
        "differs: w.safetensors",
    ]


# ----------------------------------------------------------------------------------------------------------
# the tiny chain of steps
# ----------------------------------------------------------------------------------------------------------

SIM = ["--n-train", "40", "--n-test", "4", "--repeats", "2", "--rest-subjects", "2", "--trs", "60", "--voxels", "320",
       "--rest-vertices", "256", "--corpus-size", "60", "--resolution", "32", "--seed", "0"]  # fmt: skip


def tiny_chain(root: Path) -> None:
    fx = parity_dir()
    steps = {
        "simulate": ["simulate", "--out", root / "sim", *SIM],
        "classifier": ["train-classifier", "--corpus", root / "sim" / "stimuli" / "corpus.npz", "--out",
                       root / "judge", "--epochs", "2", "--threads", "1"],
        "pretrain": ["pretrain", "--data-dir", root / "sim", "--out", root / "stage_a", "--variant", "tiny",
                     "--epochs", "2", "--batch-size", "16", "--accelerator", "cpu", "--devices", "1", "--no-progress"],
        "convert": ["convert", "--finetuned", fx / "finetuned.pth", "--label2img-dir", fx / "label2img", "--mbm",
                    fx / "mae_checkpoint.pth", "--out", root / "model"],
    }  # fmt: skip
    for name, args in steps.items():
        assert main([str(a) for a in args]) == 0, name
    with np.load(fx / "golden.npz") as z:
        fmri = z["fmri"].reshape(z["fmri"].shape[0], -1)
        gt = (np.clip((z["image"].transpose(0, 2, 3, 1) + 1) / 2, 0, 1) * 255).astype(np.uint8)
    np.save(root / "fmri.npy", fmri)
    np.savez(root / "gt.npz", images=gt)
    more = {
        "reconstruct": ["reconstruct", "--model", root / "model", "--fmri", root / "fmri.npy", "--images",
                        root / "gt.npz", "--num-samples", "2", "--steps", "3", "--sampler", "plms", "--seed", "7",
                        "--device", "cpu", "--no-progress", "--out", root / "recon"],
        "evaluate": ["evaluate", root / "recon", "--out", root / "eval", "--classifier", root / "judge",
                     "--metrics", "pixel,identification,semantic", "--n-way", "2", "--trials", "50",
                     "--bootstrap", "20", "--seed", "3"],
    }  # fmt: skip
    for name, args in more.items():
        assert main([str(a) for a in args]) == 0, name


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return twice(tmp_path_factory.mktemp("repro") / "run", tiny_chain)


def test_tiny_chain_gives_identical_weights_images_and_metrics(chain):
    first, second = chain
    assert differences(first, second) == []
    # the comparison covered what matters
    covered = {p.suffix for p in first.rglob("*") if p.is_file()}
    assert {".safetensors", ".npz", ".png", ".json", ".csv"} <= covered
    metrics = json.loads((first / "eval" / "metrics.json").read_text())
    assert "semantic" in json.dumps(metrics)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def test_run_folders_record_versions_commit_and_seeds(chain):
    from mindvis.utils.steps import git_state

    run = chain[1]
    cfg = json.loads((run / "stage_a" / "config.json").read_text())
    for pkg in ("python", "mindvis", "torch", "lightning", "numpy"):
        assert cfg["versions"].get(pkg), pkg
    commit = _git_commit()
    if commit is None:
        assert cfg["git"] is None
    else:
        assert cfg["git"]["commit"] == commit and isinstance(cfg["git"]["dirty"], bool)
        assert git_state() == cfg["git"]
    assert isinstance(cfg["config"]["seed"], int)
    # every random step records its seed
    assert json.loads((run / "sim" / "synthcortex.json").read_text())["config"]["seed"] == 0
    assert json.loads((run / "judge" / "config.json").read_text())["config"]["seed"] == 0
    recon = json.loads((run / "recon" / "run.json").read_text())
    assert recon["seed"] == 7 and recon["versions"]["torch"] and recon["git"] == cfg["git"]
    with np.load(run / "recon" / "reconstructions.npz") as z:
        assert z["seeds"].size > 0
    judge = json.loads((run / "judge" / "config.json").read_text())
    assert judge["versions"]["torch"] and judge["git"] == cfg["git"]
    evaluation = json.loads((run / "eval" / "metrics.json").read_text())
    assert evaluation["settings"]["seed"] == 3 and evaluation["versions"]["torch"]
    assert evaluation["git"] == cfg["git"]


# ----------------------------------------------------------------------------------------------------------
# byte-level reproducibility of weight files
# ----------------------------------------------------------------------------------------------------------


def test_safetensors_bytes_are_canonical():
    from safetensors.torch import load

    from mindvis.utils.io import safetensors_bytes

    tensors = {"b": torch.arange(4.0), "a": torch.ones(2, 3, dtype=torch.float16), "c": torch.zeros(3)}
    meta = {"format": "pt", "mindvis_class": "X", "other": "1"}
    blobs = {safetensors_bytes(tensors, meta) for _ in range(16)}
    assert len(blobs) == 1
    back = load(blobs.pop())
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_saved_model_files_are_byte_identical(tmp_path):
    from mindvis.models.mbm import MaskedBrainModel, mbm_tiny

    torch.manual_seed(0)
    model = MaskedBrainModel(mbm_tiny(num_voxels=64, patch_size=8))
    blobs = set()
    for i in range(16):
        model.save_pretrained(tmp_path / str(i))
        blobs.add((tmp_path / str(i) / "model.safetensors").read_bytes())
    assert len(blobs) == 1


# ----------------------------------------------------------------------------------------------------------
# the whole demo (slow)
# ----------------------------------------------------------------------------------------------------------


def find_key(obj, key: str):
    """The first value stored under ``key`` anywhere in nested dicts and lists (None if there is none)."""
    todo = [obj]
    while todo:
        cur = todo.pop(0)
        if isinstance(cur, dict):
            if key in cur:
                return cur[key]
            todo.extend(cur.values())
        elif isinstance(cur, list):
            todo.extend(cur)
    return None


def run_smoke_demo(run_dir: Path) -> None:
    from mindvis.demo import get_preset, run_demo

    run_demo(get_preset(SMOKE_PRESET), run_dir, progress=False)


@pytest.mark.slow
def test_demo_smoke_is_reproducible(tmp_path):
    import yaml

    first, second = twice(tmp_path / "run", run_smoke_demo)
    # the report step always reruns (its marker records the time) and the markers record step durations
    assert differences(first, second) == []
    doc = yaml.safe_load((second / "config.yaml").read_text())
    assert doc["versions"]["torch"] and doc["versions"]["mindvis"]
    commit = _git_commit()
    assert (doc["git"] or {}).get("commit") == commit
    assert doc["mindvis_demo"]["settings"]["simulate"]["seed"] == 0
    for rec in ("stage_a1", "stage_a2", "stage_b", "prior", "classifier"):
        assert isinstance(find_key(json.loads((second / rec / "config.json").read_text()), "seed"), int), rec
    for recon in (second / "reconstructions").iterdir():
        info = json.loads((recon / "run.json").read_text())
        assert "seed" in info or "ridge" in info.get("method", ""), recon
