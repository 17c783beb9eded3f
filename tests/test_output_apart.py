"""No command deletes or changes what it reads: an output that is, contains or lies inside an input is refused.

Every command that takes ``--out`` is run through the command line with the output equal to, inside, and
containing each of its inputs, with and without ``--overwrite``; each input's checksum must be unchanged,
and the refusal is one line naming both paths (exit code 2).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mindvis.cli import app, main

LOG_LINE = re.compile(r"^[DIWE] \d\d:\d\d:\d\d ")  # log lines (e.g. a first matplotlib import) are not output

# command words, the options of its inputs (positional ones in capitals, #n for the n-th of a list) and
# whether each is a folder, and the other arguments it needs
COMMANDS: dict[str, tuple[list[str], dict[str, bool], list[str]]] = {
    "reconstruct-fmri": (
        ["reconstruct"],
        {"--model": True, "--fmri": False, "--images": False, "--preprocess": False},
        [],
    ),
    "reconstruct-dataset": (["reconstruct"], {"--model": True, "--data-dir": True}, ["--dataset", "god"]),
    "convert": (["convert"], {"--finetuned": False, "--label2img-dir": True, "--mbm": False}, []),
    "finetune": (["finetune"], {"--init": True, "--data-dir": True}, []),
    "pretrain": (["pretrain"], {"--data-dir": True, "--hcp-dir": True, "--god-dir": True}, []),
    "train": (
        ["train"],
        {"--prior": True, "--mbm": True, "--data-dir": True, "--preprocess": False, "--classifier": True},
        [],
    ),
    "train-prior": (["train-prior"], {"--corpus": False, "--classifier": True, "--lpips-weights": False}, []),
    "train-classifier": (["train-classifier"], {"--corpus": False, "--exclude-test": False}, []),
    "simulate": (["simulate"], {"--source": True}, []),
    "evaluate": (["evaluate"], {"INPUTS#1": True, "INPUTS#2": False, "--weights-dir": True}, []),
    "probe": (["probe"], {"MODELS": True, "--data-dir": True, "--prior": True}, ["--dataset", "god"]),
    "data-god-h5": (
        ["data", "convert", "god-h5"],
        {"SRC": False, "--stimulus-dir": True, "--images": False},
        [],
    ),
    "data-prepare-hcp": (["data", "prepare-hcp"], {"SRC": True, "--parcellation": False}, []),
}


def _make_inputs(root: Path, options: dict[str, bool]) -> dict[str, Path]:
    """One input per option, each alone in its own folder (so that the folder contains only that input)."""
    paths = {}
    for i, (option, is_dir) in enumerate(options.items()):
        home = root / f"in{i}"
        home.mkdir()
        if is_dir:
            path = home / "folder"
            path.mkdir()
            (path / "config.json").write_text('{"keep": true}\n')
            np.save(path / "weights.npy", np.arange(12.0))
        else:
            path = home / "input.npz"
            np.savez(path, x=np.arange(5.0))
        paths[option] = path
    return paths


def _digest(path: Path) -> str:
    """SHA-256 over a file, or over every file name and content under a folder."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _argv(words: list[str], inputs: dict[str, Path], extra: list[str], out: Path) -> list[str]:
    argv = list(words)
    for option, path in inputs.items():
        if option[0].isupper():
            argv.append(str(path))
        elif option == "--source":
            argv += [option, f"folder:{path}"]
        else:
            argv += [option, str(path)]
    return argv + extra + ["--out", str(out)]


CASES = [
    (name, option, how, overwrite)
    for name, (_, options, _) in COMMANDS.items()
    for option in options
    for how in ("equal", "inside", "contains")
    for overwrite in (False, True)
]


@pytest.mark.parametrize(("name", "option", "how", "overwrite"), CASES)
def test_output_apart_from_every_input(tmp_path, capsys, name, option, how, overwrite):
    words, options, extra = COMMANDS[name]
    inputs = _make_inputs(tmp_path, options)
    target = inputs[option]
    out = {"equal": target, "inside": target / "out", "contains": target.parent}[how]
    before = {o: _digest(p) for o, p in inputs.items()}
    argv = _argv(words, inputs, extra, out) + (["--overwrite"] if overwrite else [])
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if not LOG_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert str(out) in lines[0] and str(target) in lines[0] and option.split("#")[0] in lines[0], err
    assert {o: _digest(p) for o, p in inputs.items()} == before
    assert all(p.exists() for p in inputs.values())


def test_symlinked_output_is_resolved(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(model)
    fmri = tmp_path / "fmri.npy"
    np.save(fmri, np.zeros((2, 8)))
    rc = main(["reconstruct", "--model", str(model), "--fmri", str(fmri), "--out", str(link), "--overwrite"])
    assert rc == 2
    assert "is the input --model" in capsys.readouterr().err
    assert (model / "model_index.json").read_text() == "{}"


def test_every_command_with_out_is_covered():
    """A new command that takes --out must join the table above."""
    import typer.main

    group = typer.main.get_command(app)
    found = set()

    def walk(cmd, path):
        for sub_name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, sub_name])
        if any("--out" in getattr(p, "opts", []) for p in getattr(cmd, "params", [])):
            found.add(" ".join(path))

    walk(group, [])
    covered = {" ".join(words) for words, _, _ in COMMANDS.values()}
    assert found <= covered, f"commands with --out missing from the table: {sorted(found - covered)}"


def test_real_model_survives_out_equal_model(tmp_path, capsys):
    """The reported loss: ``reconstruct --model M --out M --overwrite`` replaced the model folder."""
    src = Path(__file__).parent.parent / "src" / "mindvis" / "assets" / "prior-small" / "pipeline"
    model = tmp_path / "pipeline"
    shutil.copytree(src, model)
    before = _digest(model)
    fmri = tmp_path / "fmri.npy"
    np.save(fmri, np.zeros((1, 16), np.float32))
    for out in (model, tmp_path, model / "vq"):
        rc = main(
            ["reconstruct", "--model", str(model), "--fmri", str(fmri), "--out", str(out), "--overwrite"]
        )
        assert rc == 2
    assert _digest(model) == before


def test_output_apart_accepts_siblings(tmp_path):
    from mindvis.utils.io import check_output_apart

    (tmp_path / "data").mkdir()
    check_output_apart(tmp_path / "data-out", {"--data-dir": tmp_path / "data", "--x": None})
    check_output_apart(tmp_path / "run", {"--list": [tmp_path / "a", tmp_path / "b"]})


def _eperm_dir() -> Path | None:
    """A folder that refuses new entries with EPERM even to root (sysfs), or None."""
    probe = Path("/sys/mindvis-probe")
    try:
        probe.mkdir()
    except OSError as exc:
        return Path("/sys") if exc.errno == errno.EPERM else None
    probe.rmdir()
    return None


@pytest.mark.parametrize("kind", ["eperm", "eacces"])
def test_unwritable_output_refused_before_work(tmp_path, capsys, kind):
    fmri = tmp_path / "fmri.npy"
    np.save(fmri, np.zeros((1, 16), np.float32))
    model = Path(__file__).parent.parent / "src" / "mindvis" / "assets" / "prior-small" / "pipeline"
    if kind == "eperm":
        parent = _eperm_dir()
        if parent is None:
            pytest.skip("no folder here refuses writes with EPERM")
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores folder permissions")
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
    out = parent / "mindvis-out" / "recon"
    rc = main(["reconstruct", "--model", str(model), "--fmri", str(fmri), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error:") and "cannot write the output" in err[0], err
