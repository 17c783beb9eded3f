"""GOD npz reader: tiny files written here in exactly the MinD-Vis layout (names, keys, dtypes, shapes).

Layout mirrored (real sizes in brackets): ``sbj_N.npz`` with ``arr_0`` float32 [1200, V_all] training fMRI,
``arr_1`` [1750, V_all] non-averaged test, ``arr_2`` [50, V_all] averaged test, ``arr_3`` int [1200] train
image index, ``arr_4`` [1750] GOD label ``<category>.<image>`` (float64) of each ``arr_1`` row, ``arr_5``/``arr_6``
[V_all] float, bool ROI masks ``VC``, ``V1``; ``images_256.npz`` with ``train_images``/``test_images`` uint8
[M, 256, 256, 3]; ``imagenet_class_index.json``; ``imagenet_{training,testing}_label.csv`` rows
``1518878.014910,n01518878_14910.JPEG``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mindvis.data.formats.common import NpzArchive
from mindvis.data.formats.god import list_god_subjects, load_god, load_god_subjects
from mindvis.errors import DataError

N_TRAIN_IMG, N_TEST_IMG, REPS, V_ALL, RES = 12, 3, 4, 40, 8
WNIDS = [1440764, 1443537, 1484850, 1491361, 1494475]  # five ImageNet classes (0..4)


def _labels(rng, n, offset):
    cats = np.asarray(WNIDS)[rng.integers(0, len(WNIDS), n)]
    nums = offset + np.arange(n) * 7 + 3
    return cats, nums


def write_god(folder: Path, subjects=(1, 2), seed=0, arr4_as="label", compressed=False) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tr_cat, tr_num = _labels(rng, N_TRAIN_IMG, 100)
    te_cat, te_num = _labels(rng, N_TEST_IMG, 900000)
    class_index = {str(i): [f"n{w:08d}", f"class{i}"] for i, w in enumerate(WNIDS)}
    class_index["5"] = ["n09999999", "n09999998", "two_wnids"]
    (folder / "imagenet_class_index.json").write_text(json.dumps(class_index))
    for name, cats, nums in (("training", tr_cat, tr_num), ("testing", te_cat, te_num)):
        rows = [f"{c}.{n:06d},n{c:08d}_{n}.JPEG" for c, n in zip(cats, nums, strict=True)]
        (folder / f"imagenet_{name}_label.csv").write_text("\n".join(rows) + "\n")
    train_images = rng.integers(0, 256, (N_TRAIN_IMG, RES, RES, 3), dtype=np.uint8)
    test_images = rng.integers(0, 256, (N_TEST_IMG, RES, RES, 3), dtype=np.uint8)
    np.savez(folder / "images_256.npz", train_images=train_images, test_images=test_images)
    truth = {
        "train_images": train_images,
        "test_images": test_images,
        "train_class": np.asarray([WNIDS.index(c) for c in tr_cat]),
        "test_class": np.asarray([WNIDS.index(c) for c in te_cat]),
    }
    for s in subjects:
        arr3 = rng.permutation(np.repeat(np.arange(N_TRAIN_IMG), 2))[: 2 * N_TRAIN_IMG - 1]
        arr0 = rng.standard_normal((len(arr3), V_ALL)).astype(np.float32)
        order = rng.permutation(np.repeat(np.arange(N_TEST_IMG), REPS))  # shuffled presentations
        arr1 = rng.standard_normal((len(order), V_ALL)).astype(np.float32)
        arr2 = np.stack([arr1[order == j].mean(0) for j in range(N_TEST_IMG)]).astype(np.float32)
        arr4 = (te_cat[order] + te_num[order] / 1e6) if arr4_as == "label" else order.astype(np.int64)
        vc = np.zeros(V_ALL, bool)
        vc[rng.choice(V_ALL, 24, replace=False)] = True
        v1 = np.zeros(V_ALL, bool)
        v1[:10] = True
        save = np.savez_compressed if compressed else np.savez
        save(
            folder / f"sbj_{s}.npz",
            arr0,
            arr1,
            arr2,
            arr3,
            arr4,
            rng.random(V_ALL),
            rng.random(V_ALL),
            VC=vc,
            V1=v1,
        )
        truth[s] = dict(arr0=arr0, arr1=arr1, arr2=arr2, arr3=arr3, order=order, VC=vc, V1=v1)
    return truth


def test_train_split_pairs_through_arr3(tmp_path):
    t = write_god(tmp_path)
    ds = load_god(tmp_path, subject="sbj_1", split="train")
    s = t[1]
    assert ds.voxels.dtype == np.float32 and ds.voxels.shape == (len(s["arr3"]), int(s["VC"].sum()))
    np.testing.assert_array_equal(ds.voxels, s["arr0"][:, s["VC"]])
    np.testing.assert_array_equal(ds.image_ids, s["arr3"])
    np.testing.assert_array_equal(ds.sample_images(), t["train_images"][s["arr3"]])
    np.testing.assert_array_equal(ds.labels, t["train_class"][s["arr3"]])
    assert ds.subject == "sbj_1" and ds.split == "train" and ds.roi == "VC"
    assert ds.meta["class_names"][5] == "two_wnids"


def test_test_split_averaged_and_not(tmp_path):
    t = write_god(tmp_path)
    s = t[2]
    avg = load_god(tmp_path, subject=2, split="test")
    np.testing.assert_array_equal(avg.voxels, s["arr2"][:, s["VC"]])
    np.testing.assert_array_equal(avg.image_ids, np.arange(N_TEST_IMG))
    np.testing.assert_array_equal(avg.repeats, np.full(N_TEST_IMG, REPS))
    np.testing.assert_array_equal(avg.labels, t["test_class"])
    raw = load_god(tmp_path, subject="2", split="test", average_test=False)
    np.testing.assert_array_equal(raw.voxels, s["arr1"][:, s["VC"]])
    # each presentation is paired with the image it showed (presentations are shuffled, not repeated blocks)
    np.testing.assert_array_equal(raw.image_ids, s["order"])
    np.testing.assert_array_equal(raw.sample_images(), t["test_images"][s["order"]])
    assert not np.array_equal(raw.image_ids, np.repeat(np.arange(N_TEST_IMG), REPS))
    # averaging the non-averaged rows by image gives the averaged rows
    again = np.stack([raw.voxels[raw.image_ids == j].mean(0) for j in range(N_TEST_IMG)])
    np.testing.assert_allclose(again, avg.voxels, rtol=1e-5, atol=1e-6)


def test_arr4_as_indices_and_other_roi(tmp_path):
    t = write_god(tmp_path, arr4_as="index")
    raw = load_god(tmp_path, subject=1, split="test", average_test=False, roi="V1", include_images=False)
    assert raw.images is None and raw.meta["test_index"] == "index"
    np.testing.assert_array_equal(raw.image_ids, t[1]["order"])
    assert raw.num_voxels == 10


def test_subjects_listed_and_loaded(tmp_path):
    write_god(tmp_path, subjects=(2, 10, 1))
    assert list_god_subjects(tmp_path) == ["sbj_1", "sbj_2", "sbj_10"]
    sets = load_god_subjects(tmp_path, split="test")
    assert [d.subject for d in sets] == ["sbj_1", "sbj_2", "sbj_10"]


def test_uncompressed_members_are_memory_mapped(tmp_path):
    write_god(tmp_path, subjects=(1,))
    with NpzArchive(tmp_path / "sbj_1.npz") as npz:
        assert isinstance(npz.get("arr_0"), np.memmap)
    ds = load_god(tmp_path, subject=1, split="train")
    assert isinstance(ds.images, np.memmap) and not ds.images.flags.writeable


def test_compressed_members_are_read(tmp_path):
    t = write_god(tmp_path, subjects=(1,), compressed=True)
    ds = load_god(tmp_path, subject=1, split="train")
    np.testing.assert_array_equal(ds.voxels, t[1]["arr0"][:, t[1]["VC"]])


def test_other_images_name_and_labels_in_images_npz(tmp_path):
    t = write_god(tmp_path, subjects=(1,))
    (tmp_path / "images_256.npz").unlink()
    test_labels = np.asarray([7, 8, 9])
    np.savez(
        tmp_path / "images_64.npz",
        train_images=t["train_images"],
        test_images=t["test_images"],
        test_labels=test_labels,
    )
    ds = load_god(tmp_path, subject=1, split="test", average_test=False)
    np.testing.assert_array_equal(ds.labels, test_labels[t[1]["order"]])


# ---- bad input -------------------------------------------------------------------------------------------


def _rewrite(path: Path, **changes):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    for k, v in changes.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    np.savez(path, **arrays)


def test_missing_key(tmp_path):
    write_god(tmp_path, subjects=(1,))
    _rewrite(tmp_path / "sbj_1.npz", arr_3=None)
    with pytest.raises(DataError, match=r"sbj_1\.npz.*\[arr_3\].*missing key"):
        load_god(tmp_path, subject=1, split="train")
    with pytest.raises(DataError, match=r"\[ROI_X\].*missing ROI mask key"):
        load_god(tmp_path, subject=1, split="test", roi="ROI_X")


def test_roi_mask_of_wrong_length(tmp_path):
    write_god(tmp_path, subjects=(1,))
    _rewrite(tmp_path / "sbj_1.npz", VC=np.ones(V_ALL + 3, bool))
    with pytest.raises(DataError, match=r"sbj_1\.npz.*\[VC\].*expected one entry per voxel \(40\)"):
        load_god(tmp_path, subject=1, split="train")


def test_image_count_differs_from_trial_count(tmp_path):
    t = write_god(tmp_path, subjects=(1,))
    _rewrite(tmp_path / "sbj_1.npz", arr_3=t[1]["arr3"][:-2])
    with pytest.raises(DataError, match=r"\[arr_3\] image count != trial count"):
        load_god(tmp_path, subject=1, split="train")
    np.savez(tmp_path / "images_256.npz", train_images=t["train_images"], test_images=t["test_images"][:2])
    with pytest.raises(DataError, match=r"\[arr_2\] image count != trial count"):
        load_god(tmp_path, subject=1, split="test")


def test_label_in_no_stimulus_table(tmp_path):
    write_god(tmp_path, subjects=(1,))
    with np.load(tmp_path / "sbj_1.npz") as z:
        arr4 = z["arr_4"].copy()
    arr4[5] = 1234567.000001
    _rewrite(tmp_path / "sbj_1.npz", arr_4=arr4)
    with pytest.raises(DataError, match=r"\[arr_4\] label 1234567\.000001 \(row 5\) is in no stimulus table"):
        load_god(tmp_path, subject=1, split="test", average_test=False)


def test_nan_policy(tmp_path):
    t = write_god(tmp_path, subjects=(1,))
    s = t[1]
    arr0 = s["arr0"].copy()
    cols = np.flatnonzero(s["VC"])[[2, 5]]
    arr0[3, cols[0]] = np.nan
    arr0[7, cols[1]] = np.nan
    arr0[9, cols[1]] = np.nan
    _rewrite(tmp_path / "sbj_1.npz", arr_0=arr0)
    with pytest.raises(DataError, match=r"\[arr_0\] 3 NaN values in 2 of 24 voxels \(3 of 23 samples\)"):
        load_god(tmp_path, subject=1, split="train")
    zero = load_god(tmp_path, subject=1, split="train", nan_policy="zero")
    assert not np.isnan(zero.voxels).any() and zero.voxels[3, 2] == 0
    drop_train = load_god(tmp_path, subject=1, split="train", nan_policy="drop")
    drop_test = load_god(tmp_path, subject=1, split="test", nan_policy="drop")
    assert drop_train.num_voxels == drop_test.num_voxels == 22  # the same voxels are dropped in both splits
    np.testing.assert_array_equal(drop_test.voxels, s["arr2"][:, s["VC"]][:, drop_test.meta["kept_voxels"]])
    assert 2 not in drop_train.meta["kept_voxels"] and 5 not in drop_train.meta["kept_voxels"]


def test_missing_subject_names_what_exists(tmp_path):
    write_god(tmp_path, subjects=(1,))
    with pytest.raises(DataError, match=r"sbj_4\.npz.*subjects here: sbj_1"):
        load_god(tmp_path, subject=4)
