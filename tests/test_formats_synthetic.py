"""The GOD reader on the simulator's output (``mindvis.synthcortex`` writes the MinD-Vis GOD layout).

The simulator is run once on a tiny configuration with a stimulus folder written here, so nothing is
downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mindvis.data.formats.detect import describe, detect_format
from mindvis.data.formats.registry import list_subjects, load_dataset

synthetic = pytest.importorskip("mindvis.synthcortex")


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        for c in ("cats", "dogs", "cars"):
            (root / "src" / split / c).mkdir(parents=True)
            for i in range(n):
                pic = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pic).save(root / "src" / split / c / f"{i}.png")
    cfg = synthetic.SynthConfig.preset(
        "easy",
        n_subjects=2,
        n_rest_subjects=1,
        n_trs=40,
        rest_vertices=200,
        n_train=24,
        n_test=4,
        n_repeats=3,
        trials_per_run=8,
        resolution=16,
        source=f"folder:{root / 'src'}",
        corpus_size=10,
        voxels=300,
    )
    synthetic.simulate(cfg, root / "out")
    return root / "out"


def test_reads_simulator_output(sim_dir):
    god = sim_dir / "GOD"
    assert detect_format(sim_dir) == "synthetic"
    assert list_subjects("synthetic", sim_dir) == ["sbj_1", "sbj_2"]
    with np.load(god / "sbj_2.npz") as z:
        f = {k: z[k] for k in z.files}
    with np.load(god / "images_16.npz") as z:
        im = {k: z[k] for k in z.files}
    tr = load_dataset("synthetic", sim_dir, subject="sbj_2", split="train")
    np.testing.assert_array_equal(tr.voxels, f["arr_0"][:, f["VC"]].astype(np.float32))
    np.testing.assert_array_equal(tr.sample_images(), im["train_images"][f["arr_3"]])
    np.testing.assert_array_equal(tr.labels, im["train_labels"][f["arr_3"]])
    raw = load_dataset("synthetic", sim_dir, subject="sbj_2", split="test", average_test=False, roi="V1")
    np.testing.assert_array_equal(raw.voxels, f["arr_1"][:, f["V1"]].astype(np.float32))
    np.testing.assert_array_equal(raw.image_ids, f["arr_4"])
    np.testing.assert_array_equal(raw.labels, im["test_labels"][f["arr_4"]])
    avg = load_dataset("synthetic", sim_dir, subject="sbj_2", split="test")
    np.testing.assert_array_equal(avg.repeats, np.bincount(f["arr_4"]))
    assert avg.meta["class_names"] == ["cars", "cats", "dogs"]


def test_info_on_simulator_output(sim_dir):
    rep = describe(sim_dir)
    assert rep["format"] == "synthetic" and rep["problems"] == []  # includes the arr_2 = mean(arr_1) check
    assert [s["subject"] for s in rep["subjects"]] == ["sbj_1", "sbj_2"]


def test_info_on_simulator_hcp_output(sim_dir):
    rep = describe(sim_dir / "HCP" / "npz")
    assert rep["format"] == "hcp-npz" and rep["problems"] == []
    (row,) = rep["subjects"][0]["splits"]
    assert row["split"] == "rest" and row["samples"] == 40 and row["voxels"] == 200
