"""HCP preprocessing from CIFTI: a tiny synthetic dtseries and dlabel parcellation written with nibabel.

Layout mirrored: ``<subject>/MNINonLinear/Results/rfMRI_REST1_LR/rfMRI_REST1_LR_Atlas_MSMAll.dtseries.nii``
(CIFTI-2 dense series: series axis x brain model axis over CORTEX_LEFT/RIGHT surface vertices with the medial
wall left out, plus a subcortical voxel structure) and a Glasser-style ``dlabel.nii`` with labels ``L_V1_ROI``,
``R_V1_ROI``... over every vertex of the same mesh (here 40 vertices per hemisphere instead of 32492).
Output: ``<out>/<subject>/HCP_visual_voxel.npz`` with keys V1..V4, float32 [TRs, vertices].
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import cifti2 as ci

from mindvis.cli import main
from mindvis.data.formats.hcp_cifti import prepare_hcp, read_parcellation
from mindvis.data.hcp import load_hcp_subject
from mindvis.errors import DataError

NV, T = 40, 23
AREAS = ("V1", "V2", "V3", "V4")


def parcel_of_vertex() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    # 0 = unlabelled, 1..4 = V1..V4, 5 = another area (MT)
    return {"L": rng.integers(0, 6, NV), "R": rng.integers(0, 6, NV)}


def write_dlabel(path: Path, nv: int = NV) -> dict[str, np.ndarray]:
    parc = parcel_of_vertex()
    bm = ci.BrainModelAxis.from_surface(np.arange(nv), nv, "CortexLeft") + ci.BrainModelAxis.from_surface(
        np.arange(nv), nv, "CortexRight"
    )
    names = {0: ("???", (1, 1, 1, 0))}
    for hemi, off in (("L", 0), ("R", 10)):
        for k, a in enumerate((*AREAS, "MT"), 1):
            names[off + k] = (f"{hemi}_{a}_ROI", (k / 6, 0.5, 0.5, 1.0))
    data = np.concatenate([parc["L"][:nv], np.where(parc["R"][:nv] > 0, parc["R"][:nv] + 10, 0)])[None]
    img = ci.Cifti2Image(data.astype(np.float32), header=(ci.LabelAxis(["MMP"], [names]), bm))
    img.nifti_header.set_intent("ConnDenseLabel")
    nib.save(img, path)
    return parc


def write_dtseries(path: Path, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    left = np.setdiff1d(np.arange(NV), [4, 5, 6])  # a "medial wall" left out of the time series
    right = np.setdiff1d(np.arange(NV), [30, 31])
    bm = (
        ci.BrainModelAxis.from_surface(left, NV, "CortexLeft")
        + ci.BrainModelAxis.from_surface(right, NV, "CortexRight")
        + ci.BrainModelAxis.from_mask(np.ones((2, 2, 1), bool), affine=np.eye(4), name="thalamus_left")
    )
    data = rng.standard_normal((T, len(bm))).astype(np.float32)
    img = ci.Cifti2Image(data, header=(ci.SeriesAxis(0, 0.72, T), bm))
    img.nifti_header.set_intent("ConnDenseSeries")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return data, {"L": left, "R": right}


def expected(data, verts, parc, k):
    cols = [i for i, v in enumerate(verts["L"]) if parc["L"][v] == k]
    cols += [len(verts["L"]) + i for i, v in enumerate(verts["R"]) if parc["R"][v] == k]
    return data[:, cols]


def make_hcp(root: Path, subjects=("100307", "100408")):
    parc = write_dlabel(root / "Glasser.dlabel.nii")
    truth = {}
    for i, s in enumerate(subjects):
        run = root / "hcp" / s / "MNINonLinear/Results/rfMRI_REST1_LR"
        truth[s] = write_dtseries(run / "rfMRI_REST1_LR_Atlas_MSMAll.dtseries.nii", seed=i)
        write_dtseries(run / "rfMRI_REST1_LR_Atlas.dtseries.nii", seed=99)  # the MSMAll file is preferred
    return parc, truth


def test_prepare_writes_visual_areas(tmp_path):
    parc, truth = make_hcp(tmp_path)
    out = tmp_path / "npz"
    seen = []
    rep = prepare_hcp(
        tmp_path / "hcp",
        tmp_path / "Glasser.dlabel.nii",
        out,
        workers=2,
        progress=lambda s, st: seen.append((s, st)),
    )
    assert sorted(rep.done) == ["100307", "100408"] and not rep.failed
    assert sorted(seen) == [("100307", "done"), ("100408", "done")]
    for s, (data, verts) in truth.items():
        with np.load(out / s / "HCP_visual_voxel.npz") as z:
            assert sorted(z.files) == list(AREAS)
            for k, a in enumerate(AREAS, 1):
                assert z[a].dtype == np.float32
                np.testing.assert_array_equal(z[a], expected(data, verts, parc, k))
    # the pretraining reader takes the files as they are
    ds = load_hcp_subject(out, "100408", window=None)
    assert ds.split == "rest" and ds.voxels.shape[0] == T and not ds.paired
    data, verts = truth["100408"]
    np.testing.assert_array_equal(
        ds.voxels, np.concatenate([expected(data, verts, parc, k) for k in (1, 2, 3, 4)], 1)
    )
    # second run skips finished subjects; a corrupt output is redone
    (out / "100307" / "HCP_visual_voxel.npz").write_bytes(b"broken")
    rep2 = prepare_hcp(tmp_path / "hcp", tmp_path / "Glasser.dlabel.nii", out)
    assert rep2.skipped == ["100408"] and list(rep2.done) == ["100307"]


def test_cli_prepare_hcp(tmp_path, capsys):
    make_hcp(tmp_path, subjects=("100307",))
    args = [
        "data",
        "prepare-hcp",
        str(tmp_path / "hcp"),
        "--parcellation",
        str(tmp_path / "Glasser.dlabel.nii"),
        "--out",
        str(tmp_path / "npz"),
    ]
    assert main(args) == 0
    assert "1 written, 0 already done, 0 failed" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 written, 1 already done" in capsys.readouterr().out


def test_bad_parcellation(tmp_path):
    make_hcp(tmp_path, subjects=("100307",))
    with pytest.raises(DataError, match=r"Glasser\.dlabel\.nii: \[V9\] no label for area 'V9'"):
        read_parcellation(tmp_path / "Glasser.dlabel.nii", areas=("V1", "V9"))
    write_dlabel(tmp_path / "small.dlabel.nii", nv=30)  # a different mesh
    rep = prepare_hcp(tmp_path / "hcp", tmp_path / "small.dlabel.nii", tmp_path / "out")
    assert (
        "parcellation mesh of CIFTI_STRUCTURE_CORTEX_LEFT has 30 vertices but the time series' mesh has 40"
        in (rep.failed["100307"])
    )
    (tmp_path / "x.dlabel.nii").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match=r"x\.dlabel\.nii.*not a CIFTI-2 label file"):
        read_parcellation(tmp_path / "x.dlabel.nii")
