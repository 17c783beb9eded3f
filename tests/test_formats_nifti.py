"""Your-own-data reader: NIfTI betas (3-D per trial, or one 4-D file), an ROI mask, images and a trial CSV.

Layout mirrored (the one docs/data-formats.md documents): ``trials.csv`` with header
``trial,image,split[,subject]``; ``betas/*.nii.gz`` (float32 3-D) or ``betas.nii.gz`` (4-D); ``roi_mask.nii.gz``
(uint8 3-D); ``images/*.png`` RGB.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from mindvis.data.formats.nifti import load_nifti_dataset
from mindvis.data.formats.registry import load_dataset
from mindvis.errors import DataError

GRID = (5, 4, 3)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def write_own(root: Path, four_d: bool, n_train=6, seed=0, subjects=None) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(GRID, np.uint8)
    mask[1:4, 1:3, :2] = 1
    nib.save(nib.Nifti1Image(mask, AFFINE), root / "roi_mask.nii.gz")
    (root / "images").mkdir()
    names = [f"img{i}.png" for i in range(n_train + 2)]
    pics = {}
    for n in names:
        pics[n] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pics[n]).save(root / "images" / n)
    plan = [(names[i], "train") for i in range(n_train)] + [(names[-2], "test"), (names[-1], "test")] * 2
    vols = rng.standard_normal((len(plan), *GRID)).astype(np.float32)
    lines = ["trial,image,split" + (",subject" if subjects else "")]
    if four_d:
        nib.save(nib.Nifti1Image(np.moveaxis(vols, 0, -1), AFFINE), root / "betas.nii.gz")
        ids = [str(i) for i in range(len(plan))]
    else:
        (root / "betas").mkdir()
        ids = []
        for i, v in enumerate(vols):
            nib.save(nib.Nifti1Image(v, AFFINE), root / "betas" / f"trial_{i:03d}.nii.gz")
            ids.append(f"trial_{i:03d}.nii.gz")
    for i, (tid, (img, split)) in enumerate(zip(ids, plan, strict=True)):
        lines.append(f"{tid},{img},{split}" + (f",{subjects[i % len(subjects)]}" if subjects else ""))
    (root / "trials.csv").write_text("\n".join(lines) + "\n")
    return {"vols": vols, "mask": mask.astype(bool), "plan": plan, "pics": pics}


@pytest.mark.parametrize("four_d", [False, True])
def test_reads_both_beta_layouts(tmp_path, four_d):
    t = write_own(tmp_path, four_d)
    flat = t["vols"][:, t["mask"]]
    tr = load_nifti_dataset(tmp_path, split="train")
    assert tr.num_voxels == int(t["mask"].sum()) == 12
    np.testing.assert_array_equal(tr.voxels, flat[:6])
    np.testing.assert_array_equal(tr.sample_images(), np.stack([t["pics"][n] for n, _ in t["plan"][:6]]))
    te = load_nifti_dataset(tmp_path, split="test")
    assert te.meta["image_names"] == ["img6.png", "img7.png"]
    np.testing.assert_array_equal(te.repeats, [2, 2])
    np.testing.assert_allclose(te.voxels[0], flat[[6, 8]].mean(0), rtol=1e-6)
    raw = load_dataset("nifti", tmp_path, split="test", average_test=False)
    np.testing.assert_array_equal(raw.image_ids, [0, 1, 0, 1])


def test_subject_column(tmp_path):
    t = write_own(tmp_path, four_d=False, subjects=["s1", "s2"])
    ds = load_nifti_dataset(tmp_path, subject="s2", split="train")
    flat = t["vols"][:, t["mask"]]
    np.testing.assert_array_equal(ds.voxels, flat[[1, 3, 5]])
    assert ds.subject == "s2"


def test_bad_input(tmp_path):
    t = write_own(tmp_path, four_d=True)
    # mask on another grid
    nib.save(nib.Nifti1Image(np.ones((5, 4, 2), np.uint8), AFFINE), tmp_path / "roi_mask.nii.gz")
    with pytest.raises(
        DataError, match=r"roi_mask\.nii\.gz: \[mask\] ROI mask has shape \(5, 4, 2\) but the betas"
    ):
        load_nifti_dataset(tmp_path)
    nib.save(nib.Nifti1Image(t["mask"].astype(np.uint8), AFFINE), tmp_path / "roi_mask.nii.gz")
    (tmp_path / "images" / "img7.png").unlink()
    with pytest.raises(
        DataError, match=r"trials\.csv: \[image\] line 9: image 'img7\.png' is in no stimulus folder"
    ):
        load_nifti_dataset(tmp_path, split="test")
    csv = (tmp_path / "trials.csv").read_text().replace("trial,image,split", "trial,picture,split")
    (tmp_path / "trials.csv").write_text(csv)
    with pytest.raises(DataError, match=r"trials\.csv: \[image\] missing column 'image'"):
        load_nifti_dataset(tmp_path)


def test_nan_voxels(tmp_path):
    write_own(tmp_path, four_d=True)
    img = nib.load(tmp_path / "betas.nii.gz")
    data = np.asarray(img.dataobj).copy()
    data[2, 1, 0, 3] = np.nan  # a masked voxel in a training trial
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "betas.nii.gz")
    with pytest.raises(
        DataError, match=r"\[default/train\] 1 NaN values in 1 of 12 voxels \(1 of 6 samples\)"
    ):
        load_nifti_dataset(tmp_path)
    tr = load_nifti_dataset(tmp_path, nan_policy="drop")
    te = load_nifti_dataset(tmp_path, split="test", nan_policy="drop")
    assert tr.num_voxels == te.num_voxels == 11
