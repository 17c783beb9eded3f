"""Hostile and careless inputs through the command line: one-line errors, never NaN images or a crash."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from conftest import parity_dir
from mindvis.cli import main
from test_formats_god import write_god

LOG_LINE = re.compile(r"^[DIWE] \d\d:\d\d:\d\d ")


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not LOG_LINE.match(line)]
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = parity_dir()
    out = tmp_path_factory.mktemp("hostile") / "model"
    args = ["convert", "--finetuned", d / "finetuned.pth", "--label2img-dir", d / "label2img"]
    assert main([str(a) for a in [*args, "--mbm", d / "mae_checkpoint.pth", "--out", out]]) == 0
    return out


def _voxels(model, value: float) -> np.ndarray:
    import json

    num = json.loads((model / "fmri_encoder" / "config.json").read_text())["num_voxels"]
    x = np.random.default_rng(0).standard_normal((2, num)).astype(np.float32)
    x[1, :5] = value
    return x


def _reconstruct(model, fmri, out, *extra):
    args = ["reconstruct", "--model", model, "--fmri", fmri, "--out", out, "--num-samples", "1"]
    return main([str(a) for a in [*args, "--steps", "2", "--sampler", "ddim", "--no-progress", *extra]])


@pytest.mark.parametrize("value", [3e38, -3e38])
def test_huge_fmri_values_write_no_nan_images(model, tmp_path, capsys, value):
    fmri = tmp_path / "fmri.npy"
    np.save(fmri, _voxels(model, value))
    rc = _reconstruct(model, fmri, tmp_path / "out")
    assert rc == 2
    line = _error_line(capsys)
    assert "NaN or infinite" in line and "items 1" in line and "fmri.npy" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_fmri_refused(model, tmp_path, capsys, value):
    fmri = tmp_path / "fmri.npy"
    np.save(fmri, _voxels(model, value))
    assert _reconstruct(model, fmri, tmp_path / "out") == 2
    line = _error_line(capsys)
    assert "fmri.npy" in line and "NaN" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scale", ["-1e30", "1e30", "nan", "inf"])
def test_absurd_guidance_refused(model, tmp_path, capsys, scale):
    fmri = tmp_path / "fmri.npy"
    np.save(fmri, _voxels(model, 0.0))
    assert _reconstruct(model, fmri, tmp_path / "out", "--guidance-scale", scale) == 2
    assert "--guidance-scale" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_finite_run_still_writes(model, tmp_path, capsys):
    fmri = tmp_path / "fmri.npy"
    np.save(fmri, _voxels(model, 0.0))
    assert _reconstruct(model, fmri, tmp_path / "out") == 0
    with np.load(tmp_path / "out" / "reconstructions.npz") as z:
        imgs = z[z.files[0]] if "images" not in z.files else z["images"]
    assert imgs.dtype == np.uint8 and imgs.shape[:2] == (2, 1)


@pytest.mark.parametrize("seed", [str(2**64), str(2**70), "-1"])
@pytest.mark.parametrize("command", ["reconstruct", "simulate", "pretrain", "train", "evaluate"])
def test_seed_beyond_range_is_one_line(tmp_path, capsys, command, seed):
    rc = main([command, "--out", str(tmp_path / "o"), "--seed", seed])
    assert rc == 2
    line = _error_line(capsys)
    assert "--seed" in line
    assert not (tmp_path / "o").exists()


def test_data_info_keeps_brackets(tmp_path, capsys):
    folder = tmp_path / "[bold]GOD"
    t = write_god(folder, subjects=(1, 2))
    with np.load(folder / "sbj_2.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["arr_0"][0, np.flatnonzero(t[2]["VC"])[0]] = np.nan
    np.savez(folder / "sbj_2.npz", **arrays)
    capsys.readouterr()
    assert main(["data", "info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "[arr_0]" in out and "[bold]GOD" in out


def test_data_info_markup_in_problem_does_not_crash(tmp_path, capsys):
    folder = tmp_path / "[/red]"
    write_god(folder, subjects=(1,))
    (folder / "imagenet_class_index.json").unlink()
    capsys.readouterr()
    assert main(["data", "info", str(folder)]) == 0
    assert "[/red]" in capsys.readouterr().out


def test_data_info_on_fifo(tmp_path, capsys):
    fifo = tmp_path / "sbj_1.npz"
    os.mkfifo(fifo)
    assert main(["data", "info", str(fifo)]) == 2
    line = _error_line(capsys)
    assert "not a regular file" in line and str(fifo) in line
