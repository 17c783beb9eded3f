"""``mindvis simulate`` on the command line: output, the calibration report, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mindvis.cli import main
from mindvis.synthcortex import sources

SMALL_ARGS = [
    "--voxels",
    "800",
    "--rest-vertices",
    "500",
    "--n-train",
    "60",
    "--n-test",
    "6",
    "--repeats",
    "4",
    "--trs",
    "100",
    "--corpus-size",
    "20",
    "--rest-subjects",
    "2",
    "--resolution",
    "32",
]


@pytest.fixture(autouse=True)
def stimulus_source(tmp_path_factory, monkeypatch):
    """Use the installed Fashion-MNIST; where it is missing, a Fashion-MNIST-format stand-in."""
    if not (
        sources._idx_files(sources.FASHION_MNIST_SYSTEM_DIR, "train")
        and sources._idx_files(sources.FASHION_MNIST_SYSTEM_DIR, "test")
    ):
        from test_stimuli import write_fake_fashion_mnist

        folder = tmp_path_factory.getbasetemp() / "fmnist-standin"
        if not folder.exists():
            write_fake_fashion_mnist(folder, 600, 300)
        monkeypatch.setenv("MINDVIS_FASHION_MNIST", str(folder))
    sources._load_fashion_mnist.cache_clear()


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["-q", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_lists_the_options(capsys):
    rc, out, _ = _run(capsys, "simulate", "--help")
    assert rc == 0
    for opt in (
        "--out",
        "--preset",
        "--seed",
        "--subjects",
        "--rest-subjects",
        "--n-train",
        "--n-test",
        "--repeats",
        "--resolution",
        "--source",
        "--overwrite",
        "--report",
    ):
        assert opt in out


def test_simulate_writes_god_and_hcp(tmp_path, capsys):
    out_dir = tmp_path / "synth"
    rc, out, err = _run(capsys, "simulate", "--out", str(out_dir), "--seed", "3", *SMALL_ARGS)
    assert rc == 0, err
    assert "written to" in out and "sbj_1.npz" in out
    with np.load(out_dir / "GOD" / "sbj_1.npz") as z:
        assert z["arr_0"].shape[0] == 60 and z["arr_1"].shape[0] == 24 and z["arr_2"].shape[0] == 6
        assert z["VC"].sum() == z["arr_0"].shape[1]
    assert (out_dir / "GOD" / "images_32.npz").is_file()
    assert len(list((out_dir / "HCP" / "npz").glob("*/HCP_visual_voxel.npz"))) == 2
    man = json.loads((out_dir / "synthcortex.json").read_text())
    assert man["config"]["seed"] == 3 and man["config"]["n_train"] == 60
    assert not (out_dir / "calibration.json").exists()


def test_report_prints_the_calibration(tmp_path, capsys):
    out_dir = tmp_path / "synth"
    rc, out, err = _run(
        capsys,
        "simulate",
        "--out",
        str(out_dir),
        "--report",
        "--preset",
        "easy",
        *SMALL_ARGS,
        "--rest-subjects",
        "0",
    )
    assert rc == 0, err
    assert "Noise ceiling" in out and "Kay 2008" in out and "ridge" in out
    cal = json.loads((out_dir / "calibration.json").read_text())
    assert cal["preset"] == "easy" and 0 <= cal["identification_true_model"]["averaged"] <= 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--preset", "noisy"], "unknown preset 'noisy'"),
        (["--voxels", "10"], "impossible voxel count"),
        (["--source", "imagenet"], "unknown stimulus source"),
        (["--repeats", "1"], "n_repeats"),
    ],
)
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, args, needle):
    out_dir = tmp_path / "synth"
    rc, _, err = _run(capsys, "simulate", "--out", str(out_dir), *SMALL_ARGS, *args)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert not out_dir.exists()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out_dir = tmp_path / "synth"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("old")
    rc, _, err = _run(capsys, "simulate", "--out", str(out_dir), *SMALL_ARGS)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--overwrite" in err
    assert (out_dir / "old.txt").exists()
    rc, _, err = _run(
        capsys, "simulate", "--out", str(out_dir), "--overwrite", *SMALL_ARGS, "--rest-subjects", "0"
    )
    assert rc == 0, err
    assert not (out_dir / "old.txt").exists() and (out_dir / "synthcortex.json").is_file()


def test_missing_stimulus_source_exits_2(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "no-fmnist"
    empty.mkdir()
    monkeypatch.setenv("MINDVIS_FASHION_MNIST", str(empty))
    sources._load_fashion_mnist.cache_clear()
    out_dir = tmp_path / "synth"
    rc, _, err = _run(capsys, "simulate", "--out", str(out_dir), *SMALL_ARGS)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(empty) in lines[0] and "Fashion-MNIST" in lines[0]
    assert not out_dir.exists() and list(tmp_path.iterdir()) == [empty]


def test_console_script_error_has_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("mindvis")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mindvis.cli"]
    env = {**os.environ, "MINDVIS_FASHION_MNIST": str(tmp_path)}
    res = subprocess.run(
        [*cmd, "simulate", "--out", str(tmp_path / "x"), "--preset", "loud"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_simulate_options_are_generated_from_synthconfig():
    """Every ``setting`` of SynthConfig is an option of ``mindvis simulate`` with the field's default and help,
    and the noise preset's values do not depend on which of them are given (presets change only noise fields)."""
    import typer

    from mindvis.cli import app
    from mindvis.config import settings_of
    from mindvis.synthcortex.config import PRESETS, SynthConfig

    cmd = typer.main.get_command(app).commands["simulate"]
    params = {p.name: p for p in cmd.params}
    for f in settings_of(SynthConfig):
        assert params[f.name].default == f.default and params[f.name].help == f.metadata["help"], f.name
    assert {"--subjects", "--rest-subjects", "--repeats", "--trs"} <= {o for p in cmd.params for o in p.opts}
    options = {f.name for f in settings_of(SynthConfig)}
    assert all(not (set(values) & options) for values in PRESETS.values())
