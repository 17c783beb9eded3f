"""GOD BData .h5 reader and the h5 -> npz converter: tiny files written here in the bdpy layout.

Layout mirrored: ``/dataset`` float64 [samples, columns] where voxel columns and the per-sample columns
``DataType`` (1 train, 2 test perception, 3 imagery), ``Run`` and ``Label`` (``<category>.<image>``) are mixed;
``/metadata/key`` and ``/metadata/description`` fixed-length byte strings (the released files were written by
Python 2), ``/metadata/value`` float64 [keys, columns] with NaN where a key does not apply; metadata keys
``VoxelData``, ``ROI_V1``, ``ROI_VC``, ``voxel_x``, ``DataType``, ``Run``, ``Label``. Stimulus tables as the GOD
release ships them: tab-separated ``stimulus_ImageNet{Training,Test}.csv`` rows ``<file>\\t<label>\\t<index>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from mindvis.cli import main
from mindvis.data.formats.god import load_god
from mindvis.data.formats.god_h5 import convert_god_h5, load_god_h5
from mindvis.errors import DataError

WNIDS = [1440764, 1443537, 1484850]
N_TRAIN, N_TEST, V, RES = 6, 3, 30, 8


def write_stimuli(folder: Path, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, name in (("train", N_TRAIN, "Training"), ("test", N_TEST, "Test")):
        cats = np.asarray(WNIDS)[rng.integers(0, len(WNIDS), n)]
        nums = rng.choice(np.arange(1000, 30000), n, replace=False)
        rows = [
            f"n{c:08d}_{m}.JPEG\t{c}.{m:06d}\t{i + 1}"
            for i, (c, m) in enumerate(zip(cats, nums, strict=True))
        ]
        (folder / f"stimulus_ImageNet{name}.csv").write_text("\n".join(rows) + "\n")
        out[split] = (cats, nums)
    (folder / "imagenet_class_index.json").write_text(
        json.dumps({str(i): [f"n{w:08d}", f"c{i}"] for i, w in enumerate(WNIDS)})
    )
    out["train_images"] = rng.integers(0, 256, (N_TRAIN, RES, RES, 3), dtype=np.uint8)
    out["test_images"] = rng.integers(0, 256, (N_TEST, RES, RES, 3), dtype=np.uint8)
    np.savez(folder / "images_256.npz", train_images=out["train_images"], test_images=out["test_images"])
    return out


def write_bdata(path: Path, stim: dict, seed: int = 1, nan_at=None, str_kind="S") -> dict:
    rng = np.random.default_rng(seed)
    train_ids = rng.permutation(np.repeat(np.arange(N_TRAIN), 2))
    test_ids = rng.permutation(np.repeat(np.arange(N_TEST), 4))
    n_img = 4
    kinds = np.concatenate([np.full(len(train_ids), 1), np.full(len(test_ids), 2), np.full(n_img, 3)])
    ids = np.concatenate([train_ids, test_ids, np.zeros(n_img, int)])
    order = rng.permutation(len(kinds))  # samples of the three types interleaved
    kinds, ids = kinds[order], ids[order]
    labels = np.empty(len(kinds))
    for i, (k, j) in enumerate(zip(kinds, ids, strict=True)):
        if k == 3:
            labels[i] = float(WNIDS[i % len(WNIDS)])
        else:
            cats, nums = stim["train" if k == 1 else "test"]
            labels[i] = cats[j] + nums[j] / 1e6
    # columns: 12 voxels, DataType, 10 voxels, Run, Label, 8 voxels
    layout = ["v"] * 12 + ["DataType"] + ["v"] * 10 + ["Run", "Label"] + ["v"] * 8
    n_col = len(layout)
    vox = np.asarray([c == "v" for c in layout])
    data = np.zeros((len(kinds), n_col))
    data[:, vox] = rng.standard_normal((len(kinds), V))
    data[:, layout.index("DataType")] = kinds
    data[:, layout.index("Run")] = rng.integers(1, 5, len(kinds))
    data[:, layout.index("Label")] = labels
    if nan_at is not None:
        data[nan_at] = np.nan
    vc = vox.copy()
    vc[np.flatnonzero(vox)[::3]] = False  # VC: 20 of the 30 voxels
    v1 = np.zeros(n_col, bool)
    v1[np.flatnonzero(vox)[:7]] = True

    def flag(mask):
        return np.where(mask, 1.0, np.nan)

    keys = ["VoxelData", "ROI_V1", "ROI_VC", "voxel_x", "DataType", "Run", "Label"]
    values = np.stack(
        [
            flag(vox),
            flag(v1),
            flag(vc),
            np.where(vox, np.arange(n_col) * 3.0, np.nan),
            flag(np.asarray(layout) == "DataType"),
            flag(np.asarray(layout) == "Run"),
            flag(np.asarray(layout) == "Label"),
        ]
    )
    with h5py.File(path, "w") as h5:
        h5.create_dataset("/dataset", data=data)
        h5.create_group("/metadata")
        if str_kind == "S":
            h5.create_dataset("/metadata/key", data=np.asarray(keys, dtype="S"))
            h5.create_dataset(
                "/metadata/description", data=np.asarray([f"about {k}" for k in keys], dtype="S")
            )
        else:
            h5.create_dataset("/metadata/key", data=keys, dtype=h5py.string_dtype())
        h5.create_dataset("/metadata/value", data=values)
        h5.create_group("/vmap")
    return {"data": data, "kinds": kinds, "ids": ids, "vox": vox, "vc": vc, "v1": v1}


def test_reads_splits_and_pairs_labels(tmp_path):
    stim = write_stimuli(tmp_path)
    t = write_bdata(tmp_path / "Subject3.h5", stim)
    tr = load_god_h5(tmp_path / "Subject3.h5", split="train")
    rows = t["kinds"] == 1
    assert tr.subject == "sbj_3" and tr.roi == "VC"
    np.testing.assert_array_equal(tr.voxels, t["data"][rows][:, t["vc"]].astype(np.float32))
    np.testing.assert_array_equal(tr.image_ids, t["ids"][rows])
    np.testing.assert_array_equal(tr.sample_images(), stim["train_images"][t["ids"][rows]])
    np.testing.assert_array_equal(tr.labels, [WNIDS.index(c) for c in stim["train"][0][t["ids"][rows]]])
    te = load_god_h5(tmp_path / "Subject3.h5", split="test", average_test=False, roi="ROI_V1")
    assert te.num_voxels == 7
    np.testing.assert_array_equal(te.image_ids, t["ids"][t["kinds"] == 2])
    avg = load_god_h5(tmp_path / "Subject3.h5", split="test")
    np.testing.assert_array_equal(avg.repeats, [4, 4, 4])
    np.testing.assert_allclose(
        avg.voxels[1], t["data"][(t["kinds"] == 2) & (t["ids"] == 1)][:, t["vc"]].mean(0), rtol=1e-6
    )
    im = load_god_h5(tmp_path / "Subject3.h5", split="imagery")
    assert im.split == "imagery" and im.images is None and len(im) == 4
    np.testing.assert_array_equal(im.labels, [WNIDS.index(int(c)) for c in im.meta["categories"]])


def test_round_trip_h5_to_npz_is_identical(tmp_path):
    src = tmp_path / "h5"
    stim = write_stimuli(src)
    write_bdata(src / "Subject1.h5", stim, seed=5)
    write_bdata(src / "Subject2.h5", stim, seed=6, str_kind="vlen")
    out = tmp_path / "npz"
    assert main(["data", "convert", "god-h5", str(src), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "imagenet_class_index.json",
        "imagenet_testing_label.csv",
        "imagenet_training_label.csv",
        "images_256.npz",
        "sbj_1.npz",
        "sbj_2.npz",
    ]
    with np.load(out / "sbj_1.npz") as z:
        assert z["arr_0"].dtype == np.float32 and z["arr_0"].shape == (2 * N_TRAIN, V)
        assert z["arr_1"].shape == (4 * N_TEST, V) and z["arr_2"].shape == (N_TEST, V)
        assert z["VC"].dtype == bool and z["VC"].shape == (V,) and set(z.files) >= {"V1", "VC", "arr_6"}
    for s in (1, 2):
        for split, avg in (("train", True), ("test", True), ("test", False)):
            a = load_god_h5(src / f"Subject{s}.h5", split=split, average_test=avg)
            b = load_god(out, subject=s, split=split, average_test=avg)
            assert a.subject == b.subject
            for field in ("voxels", "image_ids", "labels", "repeats", "images"):
                np.testing.assert_array_equal(
                    getattr(a, field), getattr(b, field), err_msg=f"{s} {split} {field}"
                )
            assert a.meta["image_god_labels"] == b.meta["image_god_labels"]
    # NaN handling agrees too
    write_bdata(src / "Subject1.h5", stim, seed=5, nan_at=(3, 5))
    out2 = tmp_path / "npz2"
    convert_god_h5(src / "Subject1.h5", out2)
    a = load_god_h5(src / "Subject1.h5", split="test", nan_policy="drop")
    b = load_god(out2, subject=1, split="test", nan_policy="drop")
    np.testing.assert_array_equal(a.voxels, b.voxels)
    assert a.num_voxels == 19


def test_convert_refuses_existing_output(tmp_path, capsys):
    src = tmp_path / "h5"
    stim = write_stimuli(src)
    write_bdata(src / "Subject1.h5", stim)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["data", "convert", "god-h5", str(src), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["data", "convert", "god-h5", str(src), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists()


def test_label_in_no_stimulus_table(tmp_path):
    stim = write_stimuli(tmp_path)
    t = write_bdata(tmp_path / "Subject1.h5", stim)
    with h5py.File(tmp_path / "Subject1.h5", "r+") as h5:
        row = int(np.flatnonzero(t["kinds"] == 1)[2])
        col = int(np.flatnonzero(h5["/metadata/value"][6] == 1)[0])
        h5["/dataset"][row, col] = 1234567.000042
    with pytest.raises(
        DataError,
        match=r"Subject1\.h5.*\[Label\] label 1234567\.000042 \(row 2\) is in no "
        r"stimulus table",
    ):
        load_god_h5(tmp_path / "Subject1.h5", split="train")
    with pytest.raises(DataError, match=r"\[Label\].*no stimulus table"):
        convert_god_h5(tmp_path / "Subject1.h5", tmp_path / "out")


def test_missing_key_and_bad_shapes(tmp_path):
    stim = write_stimuli(tmp_path)
    write_bdata(tmp_path / "Subject1.h5", stim)
    with pytest.raises(DataError, match=r"\[ROI_FFA\] missing ROI key"):
        load_god_h5(tmp_path / "Subject1.h5", roi="FFA")
    with h5py.File(tmp_path / "Subject1.h5", "r+") as h5:
        vals = h5["/metadata/value"][()]
        del h5["/metadata/value"]
        h5.create_dataset("/metadata/value", data=vals[:, :-2])  # one entry short per key
    with pytest.raises(DataError, match=r"\[/metadata/value\] metadata value has shape \(7, 31\), expected"):
        load_god_h5(tmp_path / "Subject1.h5")
    with h5py.File(tmp_path / "Subject1.h5", "r+") as h5:
        del h5["/metadata/value"]
    with pytest.raises(DataError, match=r"Subject1\.h5.*\[/metadata/value\] missing key"):
        load_god_h5(tmp_path / "Subject1.h5")


def test_image_count_differs_from_table(tmp_path):
    stim = write_stimuli(tmp_path)
    write_bdata(tmp_path / "Subject1.h5", stim)
    np.savez(
        tmp_path / "images_256.npz", train_images=stim["train_images"][:-1], test_images=stim["test_images"]
    )
    with pytest.raises(
        DataError, match=r"images_256\.npz.*\[train_images\] image count != stimulus table rows"
    ):
        load_god_h5(tmp_path / "Subject1.h5", split="train")


def test_nan_reported_with_counts(tmp_path):
    stim = write_stimuli(tmp_path)
    t = write_bdata(tmp_path / "Subject1.h5", stim)
    row = int(np.flatnonzero(t["kinds"] == 1)[0])
    write_bdata(tmp_path / "Subject1.h5", stim, nan_at=(row, 1))  # voxel 1 is in VC
    with pytest.raises(DataError, match=r"1 NaN values in 1 of 20 voxels \(1 of 12 samples\)"):
        load_god_h5(tmp_path / "Subject1.h5", split="train")
    z = load_god_h5(tmp_path / "Subject1.h5", split="train", nan_policy="zero")
    assert np.isfinite(z.voxels).all()
