"""The command line as a whole: help everywhere, one-line errors, crash logs, odd paths, no silent overwrites.

Every command (found from the Typer app, so a new one is covered without editing this file) is checked for:
``--help`` works; a missing input file is one ``error:`` line naming the file, exit code 2, nothing written;
usage mistakes are one line too; an unexpected exception is one short line pointing to a log file that holds
the traceback (exit code 1); environment failures (full disk, no permission) are one line and exit code 2.
A small workflow runs end to end in a folder whose name has spaces and non-ASCII letters, and every command
that writes an output folder refuses a non-empty one without ``--overwrite``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import typer

from conftest import SMOKE_PRESET, parity_dir
from mindvis.cli import COMMAND_MODULES, app, main

ODD = "dír with spaces ✓ 数据"


pytestmark = pytest.mark.usefixtures("one_thread_module", "quiet_cli_logging")


def command_paths() -> list[list[str]]:
    """Every command and command group of the app, as argument lists (``["data", "convert"]``)."""
    out: list[list[str]] = []

    def walk(cmd, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None)
        if path:
            out.append(path)
        for name, sub in (subs or {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return out


def run(capsys, *args) -> SimpleNamespace:
    capsys.readouterr()
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return SimpleNamespace(code=code, out=cap.out, err=cap.err, errors=error_lines(cap.err))


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(("error:", "internal error:"))]


def assert_one_line_error(res: SimpleNamespace, code: int = 2, *needles: str) -> str:
    assert res.code == code, (res.code, res.err[-2000:])
    assert "Traceback" not in res.err, res.err[-2000:]
    assert len(res.errors) == 1, res.err[-2000:]
    for needle in needles:
        assert needle in res.errors[0], (needle, res.errors[0])
    return res.errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------
# help and errors, every command
# ----------------------------------------------------------------------------------------------------------


def test_every_command_module_is_registered():
    names = {p[0] for p in command_paths()}
    for module in COMMAND_MODULES:
        assert module.replace("_", "-") in names, module


@pytest.mark.parametrize("path", [[], *command_paths()], ids=lambda p: " ".join(p) or "mindvis")
def test_help(capsys, path):
    res = run(capsys, *path, "--help")
    assert res.code == 0, res.err
    assert "Usage" in res.out and res.errors == []


def _missing_input_cases(root: Path) -> dict[str, tuple[list, Path]]:
    m = root / "missing ✗"
    return {
        "simulate": (["simulate", "--out", root / "o", "--preset", "no-such-preset"], Path("no-such-preset")),
        "demo": (["demo", "--preset", "no-such-preset", "--run-dir", root / "o"], Path("no-such-preset")),
        "evaluate": (["evaluate", m, "--out", root / "o"], m),
        "train-classifier": (["train-classifier", "--corpus", m / "c.npz", "--out", root / "o"], m / "c.npz"),
        "data info": (["data", "info", m], m),
        "data convert god-h5": (["data", "convert", "god-h5", m / "s.h5", "--out", root / "o"], m / "s.h5"),
        "data prepare-hcp": (
            ["data", "prepare-hcp", m, "--parcellation", m / "p.dlabel.nii", "--out", root / "o"],
            m,
        ),
        "pretrain": (["pretrain", "--hcp-dir", m, "--out", root / "o"], m),
        "finetune": (["finetune", "--init", m, "--data-dir", m, "--out", root / "o"], m),
        "train-prior": (["train-prior", "--corpus", m / "c.npz", "--out", root / "o"], m / "c.npz"),
        "train": (["train", "--prior", m, "--mbm", m, "--data-dir", m, "--out", root / "o"], m),
        "convert": (["convert", "--mbm", m / "x.pth", "--out", root / "o"], m / "x.pth"),
        "reconstruct": (
            ["reconstruct", "--model", m, "--fmri", m / "f.npy", "--out", root / "o"],
            m / "f.npy",
        ),
        "probe": (["probe", "--dataset", "synthetic", "--data-dir", m, "--out", root / "o"], m),
    }


def test_the_error_table_covers_every_command(tmp_path):
    leaves = {" ".join(p) for p in command_paths() if p not in (["data"], ["data", "convert"])}
    assert leaves == set(_missing_input_cases(tmp_path))


@pytest.mark.parametrize("name", list(_missing_input_cases(Path("x"))))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, name):
    root = tmp_path / ODD
    root.mkdir()
    args, named = _missing_input_cases(root)[name]
    res = run(capsys, *args)
    line = assert_one_line_error(res, 2)
    assert str(named) in line or named.name in line, line
    assert not (root / "o").exists()
    assert [p for p in tmp_path.rglob("*") if p != root] == []


@pytest.mark.parametrize(
    "args, needle",
    [
        (["pretrain"], "Missing option"),
        (["reconstruct", "--model", "m", "--out", "o", "--num-samples", "many"], "--num-samples"),
        (["no-such-command"], "No such command"),
        (["evaluate", "x", "--out", "o", "--no-such-option"], "No such option"),
    ],
)
def test_usage_errors_are_one_line(capsys, args, needle):
    line = assert_one_line_error(run(capsys, *args), 2, needle)
    assert "--help" in line


def test_unexpected_error_is_one_line_pointing_to_the_traceback(tmp_path, capsys, monkeypatch):
    import mindvis.data.formats.detect as detect

    def broken(*_a, **_k):
        raise RuntimeError("boom\nsecond line of the message")

    monkeypatch.setattr(detect, "describe", broken)
    monkeypatch.setenv("MINDVIS_LOG_DIR", str(tmp_path / "logs"))
    line = assert_one_line_error(run(capsys, "data", "info", tmp_path), 1, "internal error", "RuntimeError")
    assert "boom second line" in line
    (log,) = (tmp_path / "logs").iterdir()
    assert str(log) in line
    text = log.read_text()
    assert "Traceback" in text and "boom" in text and "data info" in text
    # a log folder that cannot be created: still one line, and it says so
    (tmp_path / "blocked").write_text("a file, not a folder")
    monkeypatch.setenv("MINDVIS_LOG_DIR", str(tmp_path / "blocked" / "logs"))
    line = assert_one_line_error(run(capsys, "data", "info", tmp_path), 1, "could not be written")


@pytest.mark.parametrize(
    "code, reason", [(errno.ENOSPC, "No space left"), (errno.EACCES, "Permission denied")]
)
def test_environment_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch, code, reason):
    import mindvis.data.formats.detect as detect

    where = tmp_path / ODD / "out.bin"

    def failing(*_a, **_k):
        raise OSError(code, os.strerror(code), str(where))

    monkeypatch.setattr(detect, "describe", failing)
    monkeypatch.setenv("MINDVIS_LOG_DIR", str(tmp_path / "logs"))
    assert_one_line_error(run(capsys, "data", "info", tmp_path), 2, reason, str(where))
    assert not (tmp_path / "logs").exists()


# ----------------------------------------------------------------------------------------------------------
# a workflow in an odd folder; no command overwrites a non-empty folder silently
# ----------------------------------------------------------------------------------------------------------

SIM = ["--n-train", "40", "--n-test", "4", "--repeats", "2", "--rest-subjects", "2", "--trs", "60", "--voxels", "320",
       "--rest-vertices", "256", "--corpus-size", "60", "--resolution", "32", "--seed", "0"]  # fmt: skip
PRETRAIN = ["--variant", "tiny", "--epochs", "1", "--batch-size", "16", "--accelerator", "cpu", "--devices", "1",
            "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """simulate -> pretrain -> convert -> reconstruct -> evaluate, every path with spaces and non-ASCII."""
    root = tmp_path_factory.mktemp("odd") / ODD
    fx = parity_dir()
    codes = {}
    codes["simulate"] = main(["simulate", "--out", str(root / "sim ✓"), *SIM])
    codes["pretrain"] = main(["pretrain", "--data-dir", str(root / "sim ✓"), "--out", str(root / "pré train"), *PRETRAIN])  # fmt: skip
    codes["convert"] = main(["convert", "--finetuned", str(fx / "finetuned.pth"), "--label2img-dir", str(fx / "label2img"),
                             "--mbm", str(fx / "mae_checkpoint.pth"), "--out", str(root / "modèle")])  # fmt: skip
    with np.load(fx / "golden.npz") as z:
        fmri = z["fmri"].reshape(z["fmri"].shape[0], -1)
        gt = (np.clip((z["image"].transpose(0, 2, 3, 1) + 1) / 2, 0, 1) * 255).astype(np.uint8)
    (root / "in put").mkdir(parents=True)
    np.save(root / "in put" / "fmri ✓.npy", fmri)
    np.savez(root / "in put" / "gt ✓.npz", images=gt)
    recon = ["reconstruct", "--model", str(root / "modèle"), "--fmri", str(root / "in put" / "fmri ✓.npy"),
             "--images", str(root / "in put" / "gt ✓.npz"), "--num-samples", "2", "--steps", "2", "--sampler", "ddim",
             "--no-progress", "--device", "cpu"]  # fmt: skip
    codes["reconstruct"] = main([*recon, "--out", str(root / "récon")])
    evaluate = ["evaluate", str(root / "récon"), "--metrics", "pixel,identification", "--n-way", "2", "--trials", "20",
                "--bootstrap", "10"]  # fmt: skip
    codes["evaluate"] = main([*evaluate, "--out", str(root / "éval")])
    return SimpleNamespace(root=root, codes=codes, recon=recon, evaluate=evaluate)


def test_workflow_in_a_folder_with_spaces_and_unicode(odd, capsys):
    assert odd.codes == dict.fromkeys(odd.codes, 0)
    r = odd.root
    assert (r / "sim ✓" / "GOD" / "sbj_1.npz").is_file()
    assert (r / "pré train" / "model" / "model.safetensors").is_file()
    with np.load(r / "récon" / "reconstructions.npz") as z:
        assert z["images"].shape[:2] == (len(z["ground_truth"]), 2)
    assert (r / "éval" / "metrics.json").is_file()
    res = run(capsys, "data", "info", r / "sim ✓" / "GOD", "--json")
    assert res.code == 0 and "sbj_1" in res.out


def test_no_command_overwrites_a_non_empty_folder(odd, capsys, tmp_path):
    r = odd.root
    fx = parity_dir()
    full = tmp_path / ODD / "full"
    full.mkdir(parents=True)
    (full / "keep.txt").write_text("precious")
    attempts = {
        "simulate": ["simulate", "--out", full, *SIM],
        "pretrain": ["pretrain", "--data-dir", r / "sim ✓", "--out", full, *PRETRAIN],
        "finetune": ["finetune", "--init", r / "pré train", "--data-dir", r / "sim ✓", "--out", full, "--epochs", "1",
                     "--no-progress"],
        "train-classifier": ["train-classifier", "--corpus", r / "sim ✓" / "stimuli" / "corpus.npz", "--out", full,
                             "--epochs", "1"],
        "train-prior": ["train-prior", "--corpus", r / "sim ✓" / "stimuli" / "corpus.npz", "--out", full, "--preset",
                        "tiny"],
        "train": ["train", "--prior", r / "modèle", "--mbm", r / "pré train", "--dataset", "synthetic", "--data-dir",
                  r / "sim ✓", "--out", full, "--epochs", "1"],
        "convert": ["convert", "--mbm", fx / "mae_checkpoint.pth", "--out", full],
        "reconstruct": [*odd.recon, "--out", full],
        "evaluate": [*odd.evaluate, "--out", full],
        "demo": ["demo", "--preset", SMOKE_PRESET, "--run-dir", full, "--no-progress"],
    }  # fmt: skip
    for name, args in attempts.items():
        line = assert_one_line_error(run(capsys, *args), 2, str(full))
        assert "overwrite" in line, (name, line)
        assert snapshot(full) == {"keep.txt": b"precious"}, name
    # rerunning into its own output: refused too, the output unchanged
    for name, folder, args in [
        ("reconstruct", r / "récon", odd.recon),
        ("evaluate", r / "éval", odd.evaluate),
        ("simulate", r / "sim ✓", ["simulate", *SIM]),
    ]:
        before = snapshot(folder)
        assert_one_line_error(run(capsys, *args, "--out", folder), 2, "not empty")
        assert snapshot(folder) == before, name


def test_demo_refuses_a_run_folder_of_another_preset(tmp_path, capsys):
    run_dir = tmp_path / ODD
    (run_dir / "steps").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("mindvis_demo:\n  preset: quick\n")
    before = snapshot(run_dir)
    assert_one_line_error(
        run(capsys, "demo", "--preset", SMOKE_PRESET, "--run-dir", run_dir, "--no-progress"),
        2,
        "'quick'",
        "--overwrite",
    )
    assert snapshot(run_dir) == before


def test_classifier_folder_is_reused_not_silently_replaced(odd, capsys, tmp_path):
    corpus = odd.root / "sim ✓" / "stimuli" / "corpus.npz"
    out = tmp_path / ODD / "judge"
    args = ["train-classifier", "--corpus", corpus, "--out", out, "--epochs", "1", "--threads", "1"]
    assert run(capsys, *args).code == 0
    before = snapshot(out)
    res = run(capsys, *args)
    assert res.code == 0 and "reused" in res.out
    assert snapshot(out) == before
    # other settings: retrained, and it says so (a warning, not silence)
    res = run(capsys, *args[:-2], "--seed", "1")
    assert res.code == 0 and "trained on other data or settings" in res.err
    assert set(snapshot(out)) == set(before) and snapshot(out) != before


def test_sigterm_during_training_is_not_reported_as_success(tmp_path, capsys, monkeypatch):
    """Lightning stops gracefully on SIGTERM by raising a SystemExit without a code: that is no success."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import mindvis.data.formats.detect as detect

    def terminated(*_a, **_k):
        raise SIGTERMException

    monkeypatch.setattr(detect, "describe", terminated)
    assert run(capsys, "data", "info", tmp_path).code == 143


def test_an_exit_code_returned_by_a_command_is_kept(tmp_path, capsys, monkeypatch):
    import typer

    import mindvis.data.formats.detect as detect

    def exits(*_a, **_k):
        raise typer.Exit(3)

    monkeypatch.setattr(detect, "describe", exits)
    assert run(capsys, "data", "info", tmp_path).code == 3
