"""BOLD5000 reader: a tiny folder in exactly the layout MinD-Vis reads.

Layout mirrored: ``BOLD5000_GLMsingle_ROI_betas/py/CSI{n}_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_{LH,RH}{EarlyVis,
LOC,OPA,PPA,RSC}.npy`` float32 [trials, voxels]; ``BOLD5000_Stimuli/Scene_Stimuli/Presented_Stimuli/img_dict.npy``
(np.save of a dict name -> uint8 [H, W, 3], i.e. a pickled 0-d object array); ``Scene_Stimuli/
repeated_stimuli_113_list.txt``; ``Stimuli_Presentation_Lists/CSI{n}/CSI{n}_sess{NN}/*.txt`` one name per line,
``rep_`` before repeated images.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest

from mindvis.data.formats.bold5000 import BOLD5000_ROIS, list_bold5000_subjects, load_bold5000
from mindvis.errors import DataError

RES = 6
ROI_SIZES = {"EarlyVis": 5, "LOC": 4, "OPA": 3, "PPA": 3, "RSC": 2}


def write_bold5000(root: Path, subjects=("CSI1", "CSI2"), seed=0) -> dict:
    rng = np.random.default_rng(seed)
    names = [f"COCO_train2014_{i:012d}.jpg" for i in range(8)] + [f"n0144{i}_{i}.JPEG" for i in range(4)]
    repeated = [names[2], names[9], "never_shown.jpg"]
    stim = root / "BOLD5000_Stimuli"
    (stim / "Scene_Stimuli/Presented_Stimuli").mkdir(parents=True)
    images = {n: rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8) for n in names}
    np.save(stim / "Scene_Stimuli/Presented_Stimuli/img_dict.npy", images, allow_pickle=True)
    (stim / "Scene_Stimuli/repeated_stimuli_113_list.txt").write_text("\n".join(repeated) + "\n")
    fmri = root / "BOLD5000_GLMsingle_ROI_betas/py"
    fmri.mkdir(parents=True)
    truth = {"images": images, "repeated": repeated}
    for s in subjects:
        others = [n for n in names if n not in repeated]
        seq = list(rng.permutation(others)) + [repeated[0]] * 3 + [repeated[1]] * 2
        seq = [seq[i] for i in rng.permutation(len(seq))]
        # two sessions of two runs, in files that sort in presentation order
        chunks = np.array_split(np.arange(len(seq)), 4)
        for k, idx in enumerate(chunks):
            d = stim / "Stimuli_Presentation_Lists" / s / f"{s}_sess{k // 2 + 1:02d}"
            d.mkdir(parents=True, exist_ok=True)
            lines = [("rep_" if seq[i] in repeated else "") + seq[i] for i in idx]
            (d / f"{s}_sess{k // 2 + 1:02d}_run{k % 2 + 1:02d}.txt").write_text("\n".join(lines) + "\n")
        cols = []
        for roi in BOLD5000_ROIS:
            for hemi in ("LH", "RH"):
                a = rng.standard_normal((len(seq), ROI_SIZES[roi])).astype(np.float32)
                np.save(fmri / f"{s}_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_{hemi}{roi}.npy", a)
                cols.append(a)
        truth[s] = {"seq": seq, "betas": np.concatenate(cols, axis=1)}
    return truth


def test_train_and_test_splits(tmp_path):
    t = write_bold5000(tmp_path)
    assert list_bold5000_subjects(tmp_path) == ["CSI1", "CSI2"]
    s = t["CSI2"]
    is_test = np.asarray([n in t["repeated"] for n in s["seq"]])
    tr = load_bold5000(tmp_path, subject="CSI2", split="train")
    assert tr.num_voxels == 2 * sum(ROI_SIZES.values())
    np.testing.assert_array_equal(tr.voxels, s["betas"][~is_test])
    train_names = [n for n, r in zip(s["seq"], is_test, strict=True) if not r]
    np.testing.assert_array_equal(tr.sample_images(), np.stack([t["images"][n] for n in train_names]))
    te = load_bold5000(tmp_path, subject=2, split="test")
    assert te.meta["image_names"] == t["repeated"][:2]  # the never-shown repeated image is left out
    np.testing.assert_array_equal(te.repeats, [3, 2])
    seq = np.asarray(s["seq"])
    np.testing.assert_allclose(te.voxels[0], s["betas"][seq == t["repeated"][0]].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(te.images[1], t["images"][t["repeated"][1]])
    raw = load_bold5000(tmp_path, subject="CSI2", split="test", average_test=False, include_images=False)
    assert len(raw) == 5 and raw.images is None
    np.testing.assert_array_equal(raw.voxels, s["betas"][is_test])
    np.testing.assert_array_equal(np.asarray(raw.meta["image_names"])[raw.image_ids], seq[is_test])


def test_roi_subset_order(tmp_path):
    t = write_bold5000(tmp_path, subjects=("CSI1",))
    ds = load_bold5000(tmp_path, subject="CSI1", split="train", rois=("LOC",), include_images=False)
    is_test = np.asarray([n in t["repeated"] for n in t["CSI1"]["seq"]])
    lo = 2 * ROI_SIZES["EarlyVis"]
    np.testing.assert_array_equal(ds.voxels, t["CSI1"]["betas"][~is_test, lo : lo + 2 * ROI_SIZES["LOC"]])


def test_pickle_with_non_array_global_is_refused(tmp_path):
    write_bold5000(tmp_path, subjects=("CSI1",))
    path = tmp_path / "BOLD5000_Stimuli/Scene_Stimuli/Presented_Stimuli/img_dict.npy"
    np.save(path, {"x.jpg": datetime.date(2020, 1, 1)}, allow_pickle=True)
    with pytest.raises(DataError, match=r"img_dict\.npy.*refused.*datetime\.date"):
        load_bold5000(tmp_path, subject="CSI1", split="test")


def test_image_count_differs_from_trial_count(tmp_path):
    write_bold5000(tmp_path, subjects=("CSI1",))
    run = sorted((tmp_path / "BOLD5000_Stimuli/Stimuli_Presentation_Lists/CSI1").rglob("*.txt"))[-1]
    run.write_text("\n".join(run.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(DataError, match=r"CSI1.*\[trials\] image count != trial count"):
        load_bold5000(tmp_path, subject="CSI1")


def test_image_in_no_stimulus_table(tmp_path):
    write_bold5000(tmp_path, subjects=("CSI1",))
    run = sorted((tmp_path / "BOLD5000_Stimuli/Stimuli_Presentation_Lists/CSI1").rglob("*.txt"))[0]
    lines = run.read_text().splitlines()
    lines[1] = "unknown_image.jpg"
    run.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DataError,
        match=r"img_dict\.npy: \[unknown_image\.jpg\] image 'unknown_image\.jpg' "
        r"\(presented at .*run01\.txt:2\) is in no stimulus table",
    ):
        load_bold5000(tmp_path, subject="CSI1", split="train")


def test_missing_roi_file_and_nan(tmp_path):
    write_bold5000(tmp_path, subjects=("CSI1",))
    fmri = tmp_path / "BOLD5000_GLMsingle_ROI_betas/py"
    f = fmri / "CSI1_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_RHOPA.npy"
    a = np.load(f)
    a[0, 1] = np.nan
    np.save(f, a)
    with pytest.raises(DataError, match=r"1 NaN values in 1 of"):
        load_bold5000(tmp_path, subject="CSI1", split="train", include_images=False)
    d_tr = load_bold5000(tmp_path, subject="CSI1", split="train", include_images=False, nan_policy="drop")
    d_te = load_bold5000(tmp_path, subject="CSI1", split="test", include_images=False, nan_policy="drop")
    assert d_tr.num_voxels == d_te.num_voxels == 2 * sum(ROI_SIZES.values()) - 1
    f.unlink()
    with pytest.raises(DataError, match=r"\[RHOPA\] missing ROI beta file"):
        load_bold5000(tmp_path, subject="CSI1")
