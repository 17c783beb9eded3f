"""``mindvis data info`` (format detection and reports) and the ``load_dataset`` registry with MINDVIS_DATA.

The folders are the small layouts written by the other format tests (see their module docstrings).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mindvis.cli import main
from mindvis.data.formats.detect import describe, detect_format
from mindvis.data.formats.registry import list_subjects, load_dataset, resolve_data_dir
from mindvis.errors import ConfigError, DataError
from test_formats_bold5000 import write_bold5000
from test_formats_god import write_god
from test_formats_god_h5 import write_bdata, write_stimuli
from test_formats_hcp import make_hcp
from test_formats_nifti import write_own
from test_formats_nsd import write_nsd


def _info(capsys, path) -> dict:
    assert main(["data", "info", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_god_info_reports_counts_and_problems(tmp_path, capsys):
    t = write_god(tmp_path, subjects=(1, 2))
    with np.load(tmp_path / "sbj_2.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["arr_0"][0, np.flatnonzero(t[2]["VC"])[0]] = np.nan
    np.savez(tmp_path / "sbj_2.npz", **arrays)
    rep = _info(capsys, tmp_path)
    assert rep["format"] == "god"
    assert [s["subject"] for s in rep["subjects"]] == ["sbj_1", "sbj_2"]
    s1 = rep["subjects"][0]
    assert s1["rois"] == ["VC", "V1"]
    rows = {r["split"]: r for r in s1["splits"]}
    assert rows["train"]["samples"] == len(t[1]["arr3"]) and rows["train"]["voxels"] == 24
    assert rows["test"]["samples"] == 3 and rows["test"]["repeats"] == 4
    assert rows["test (not averaged)"]["samples"] == 12
    assert rows["train"]["images"] == 12 and rows["train"]["image_size"] == [8, 8]
    assert (
        len(rep["problems"]) == 1
        and "sbj_2.npz: [arr_0] 1 NaN values in 1 of 24 voxels" in rep["problems"][0]
    )
    # the table view prints too
    assert main(["data", "info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sbj_2" in out and "1 problem(s)" in out


@pytest.mark.parametrize("kind", ["bold5000", "nsd", "nifti", "god-h5", "hcp-npz", "hcp-cifti"])
def test_detects_each_layout(tmp_path, capsys, kind):
    if kind == "bold5000":
        write_bold5000(tmp_path, subjects=("CSI1",))
        path = tmp_path
    elif kind == "nsd":
        write_nsd(tmp_path)
        path = tmp_path
    elif kind == "nifti":
        write_own(tmp_path, four_d=True)
        path = tmp_path
    elif kind == "god-h5":
        stim = write_stimuli(tmp_path)
        write_bdata(tmp_path / "Subject1.h5", stim)
        path = tmp_path
    else:
        make_hcp(tmp_path, subjects=("100307",))
        path = tmp_path / "hcp"
        if kind == "hcp-npz":
            assert (
                main(
                    [
                        "data",
                        "prepare-hcp",
                        str(path),
                        "--parcellation",
                        str(tmp_path / "Glasser.dlabel.nii"),
                        "--out",
                        str(tmp_path / "npz"),
                    ]
                )
                == 0
            )
            capsys.readouterr()
            path = tmp_path / "npz"
    assert detect_format(path) == kind
    rep = _info(capsys, path)
    assert rep["format"] == kind and not rep["problems"], rep["problems"]
    if kind != "hcp-cifti":
        assert rep["subjects"] and all(s["splits"] for s in rep["subjects"])
        assert all(sp["voxels"] > 0 for s in rep["subjects"] for sp in s["splits"])


def test_info_lists_problems_of_a_broken_folder(tmp_path):
    write_bold5000(tmp_path, subjects=("CSI1",))
    run = sorted((tmp_path / "BOLD5000_Stimuli/Stimuli_Presentation_Lists/CSI1").rglob("*.txt"))[0]
    run.write_text("\n".join(run.read_text().splitlines()[1:]) + "\n")
    rep = describe(tmp_path)
    assert rep["subjects"][0]["splits"] == []
    assert len(rep["problems"]) == 2 and all("image count != trial count" in p for p in rep["problems"])


def test_unknown_folder(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert main(["data", "info", str(tmp_path)]) == 2
    assert "no known dataset layout" in capsys.readouterr().err


def test_registry_uses_mindvis_data(tmp_path, monkeypatch):
    write_god(tmp_path / "root" / "GOD", subjects=(3,))
    write_nsd(tmp_path / "root" / "NSD")
    monkeypatch.setenv("MINDVIS_DATA", str(tmp_path / "root"))
    assert resolve_data_dir("god") == tmp_path / "root" / "GOD"
    ds = load_dataset("god", split="test", roi="V1")
    assert ds.subject == "sbj_3" and ds.num_voxels == 10
    assert list_subjects("nsd") == ["subj01"]
    assert len(load_dataset("nsd", subject="subj01", split="test", include_images=False)) == 3
    # an explicit folder wins; "synthetic" looks in its GOD/ subfolder
    write_god(tmp_path / "sim" / "GOD", subjects=(1,))
    syn = load_dataset("synthetic", data_dir=tmp_path / "sim", split="train")
    assert syn.subject == "sbj_1" and syn.meta["format"] == "synthetic"
    with pytest.raises(DataError, match=r"bold5000 data folder not found \(set --data-dir or"):
        load_dataset("bold5000")
    with pytest.raises(ConfigError, match=r"unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_registry_default_home(tmp_path, monkeypatch):
    monkeypatch.delenv("MINDVIS_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    write_god(tmp_path / "mindvis_data" / "GOD", subjects=(1,))
    assert resolve_data_dir("god") == tmp_path / "mindvis_data" / "GOD"


def test_god_info_checks_averages_against_presentations(tmp_path):
    write_god(tmp_path, subjects=(1,))
    with np.load(tmp_path / "sbj_1.npz") as z:
        arrays = {k: z[k] for k in z.files}
    assert not describe(tmp_path)["problems"]
    arrays["arr_2"] = arrays["arr_2"][[1, 0, 2]]  # averaged rows out of test-image order
    np.savez(tmp_path / "sbj_1.npz", **arrays)
    problems = describe(tmp_path)["problems"]
    assert len(problems) == 1 and "[arr_2] 2 of 3 averaged test rows differ from the mean" in problems[0]


@pytest.mark.parametrize("name", ["bold5000", "nsd", "nifti"])
def test_an_roi_for_a_format_without_rois_is_a_clear_error(name, tmp_path):
    from mindvis.data.formats.registry import load_dataset
    from mindvis.errors import ConfigError

    with pytest.raises(ConfigError, match="GOD layout") as err:
        load_dataset(name, tmp_path, None, "train", roi="VC")
    assert err.value.field == "roi"
