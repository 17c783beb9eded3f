"""NSD reader (MindEye2 files): tiny files in exactly that layout, and a memory measurement of subset reads.

Layout mirrored: ``betas_all_subj01_fp32_renorm.hdf5`` with dataset ``betas`` float32 [trials, voxels];
``coco_images_224_float16.hdf5`` with ``images`` float16 [n_images, 3, H, W] in [0, 1] (real: 73000 x 3 x 224
x 224); ``shared1000.npy`` bool [n_images]; ``wds/subj01/{train,test}/0.tar`` webdataset shards whose members
``<key>.behav.npy`` are float [1, 17] (column 0 = image id, column 5 = beta row) beside ``<key>.past_behav.npy``.
"""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest

from mindvis.data.formats.nsd import list_nsd_subjects, load_nsd
from mindvis.errors import DataError

N_IMG, RES = 40, 12


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def write_shard(path: Path, trials: list[tuple[int, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for k, (img, row) in enumerate(trials):
            behav = np.full((1, 17), -1.0)
            behav[0, 0], behav[0, 5] = img, row
            for name, arr in (
                (f"sample{k:06d}.behav.npy", behav),
                (f"sample{k:06d}.past_behav.npy", behav * 0),
            ):
                data = _npy_bytes(arr)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_nsd(root: Path, n_trials=120, n_vox=50, seed=0, subject="subj01") -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    betas = rng.standard_normal((n_trials, n_vox)).astype(np.float32)
    with h5py.File(root / f"betas_all_{subject}_fp32_renorm.hdf5", "w") as h5:
        h5.create_dataset("betas", data=betas, chunks=(min(64, n_trials), n_vox))
    images = rng.random((N_IMG, 3, RES, RES)).astype(np.float16)
    with h5py.File(root / "coco_images_224_float16.hdf5", "w") as h5:
        h5.create_dataset("images", data=images)
    shared = np.zeros(N_IMG, bool)
    shared[[3, 17, 29]] = True
    np.save(root / "shared1000.npy", shared)
    # trial i saw image img[i]; shared images are shown 3 times, others once or twice
    img = np.concatenate([np.repeat([3, 17, 29], 3), rng.choice(np.flatnonzero(~shared), n_trials - 9)])
    img = img[rng.permutation(n_trials)]
    rows = np.arange(n_trials)
    test = shared[img]
    write_shard(root / "wds" / subject / "train" / "0.tar", list(zip(img[~test], rows[~test], strict=True)))
    write_shard(root / "wds" / subject / "test" / "0.tar", list(zip(img[test], rows[test], strict=True)))
    return {"betas": betas, "images": images, "img": img, "test": test}


def test_splits_pairing_and_averaging(tmp_path):
    t = write_nsd(tmp_path)
    assert list_nsd_subjects(tmp_path) == ["subj01"]
    te = load_nsd(tmp_path, subject=1, split="test")
    np.testing.assert_array_equal(te.meta["nsd_ids"], [3, 17, 29])
    np.testing.assert_array_equal(te.repeats, [3, 3, 3])
    np.testing.assert_allclose(te.voxels[1], t["betas"][t["img"] == 17].mean(0), rtol=1e-6)
    expect = (
        np.clip(np.rint(t["images"][17].astype(np.float32) * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    )
    np.testing.assert_array_equal(te.images[1], expect)
    assert te.images.shape == (3, RES, RES, 3) and te.images.dtype == np.uint8
    tr = load_nsd(tmp_path, subject="subj01", split="train")
    np.testing.assert_array_equal(tr.voxels, t["betas"][~t["test"]])
    np.testing.assert_array_equal(tr.meta["nsd_ids"][tr.image_ids], t["img"][~t["test"]])
    raw = load_nsd(tmp_path, subject="subj01", split="test", average_test=False, include_images=False)
    np.testing.assert_array_equal(raw.voxels, t["betas"][t["test"]])
    # without the shared-1000 mask the test shards decide
    (tmp_path / "shared1000.npy").unlink()
    again = load_nsd(tmp_path, split="test", include_images=False)
    np.testing.assert_array_equal(again.voxels, te.voxels)


def test_flat_behaviour_array(tmp_path):
    t = write_nsd(tmp_path)
    behav = np.zeros((len(t["img"]), 17))
    behav[:, 0], behav[:, 5] = t["img"], np.arange(len(t["img"]))
    np.save(tmp_path / "behav_subj01.npy", behav)
    import shutil

    shutil.rmtree(tmp_path / "wds")
    tr = load_nsd(tmp_path, split="train", include_images=False)
    np.testing.assert_array_equal(tr.voxels, t["betas"][~t["test"]])


def test_subset_read_does_not_load_the_whole_file(tmp_path):
    """Reading the test split (27 of 4000 trials) allocates a small fraction of the betas array.

    tracemalloc sees numpy's allocations; the full read beside it shows the measurement catches a whole load.
    """
    t = write_nsd(tmp_path, n_trials=4000, n_vox=1000)
    full_bytes = t["betas"].nbytes  # 16 MB
    del t
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        ds = load_nsd(tmp_path, split="test", average_test=False, include_images=False)
        _, subset_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with h5py.File(tmp_path / "betas_all_subj01_fp32_renorm.hdf5", "r") as h5:
            whole = h5["betas"][:]
        _, whole_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ds) == 9 and whole.nbytes == full_bytes
    assert whole_peak >= full_bytes
    assert subset_peak < full_bytes / 10, f"subset read peaked at {subset_peak} bytes of {full_bytes}"


def test_bad_input(tmp_path):
    write_nsd(tmp_path)
    with h5py.File(tmp_path / "betas_all_subj01_fp32_renorm.hdf5", "r+") as h5:
        b = h5["betas"][:100]
        del h5["betas"]
        h5.create_dataset("betas", data=b)  # fewer rows than the trial table points at
    with pytest.raises(DataError, match=r"wds/subj01.*\[behav\] image count != trial count"):
        load_nsd(tmp_path, split="train")
    with h5py.File(tmp_path / "betas_all_subj01_fp32_renorm.hdf5", "r+") as h5:
        del h5["betas"]
        h5.create_dataset("data", data=b)
    with pytest.raises(DataError, match=r"fp32_renorm\.hdf5: \[betas\] missing key 'betas'"):
        load_nsd(tmp_path, split="train")
    with pytest.raises(DataError, match=r"subj02.*subjects here: subj01"):
        load_nsd(tmp_path, subject=2)
