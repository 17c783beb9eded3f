"""Evaluation inputs: reconstruction folders, npz files, image folders, and clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mindvis.errors import DataError
from mindvis.eval.images import load_eval_images, pair_images
from mindvis.eval.suite import evaluate_reconstructions


def _data(n=4, s=2, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (n, s, size, size, 3), dtype=np.uint8),
        rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
    )


def test_reconstruction_folder_layout(tmp_path):
    rec, gt = _data()
    np.savez(tmp_path / "reconstructions.npz", images=rec, ground_truth=gt)
    got = load_eval_images(tmp_path)
    assert np.array_equal(got.recons, rec) and np.array_equal(got.gt, gt)
    np.savez(tmp_path / "one.npz", images=rec[:, 0])  # [N, H, W, 3]: one sample per item
    np.savez(tmp_path / "gt.npz", test_images=gt)
    got = load_eval_images(tmp_path / "one.npz", tmp_path / "gt.npz")
    assert got.recons.shape == (4, 1, 16, 16, 3)


def test_two_image_folders_with_sample_names(tmp_path):
    rec, gt = _data(n=3, s=2)
    (tmp_path / "rec").mkdir()
    (tmp_path / "gt").mkdir()
    for i in range(3):
        Image.fromarray(gt[i]).save(tmp_path / "gt" / f"img{i:02d}.png")
        for k in range(2):
            Image.fromarray(rec[i, k]).save(tmp_path / "rec" / f"img{i:02d}_s{k}.png")
    got = load_eval_images(tmp_path / "rec", tmp_path / "gt")
    assert np.array_equal(got.recons, rec) and np.array_equal(got.gt, gt)
    assert got.ids == ["img00", "img01", "img02"]


def test_count_mismatch_is_an_error(tmp_path):
    rec, gt = _data()
    with pytest.raises(DataError, match="count mismatch: 4 reconstructed items but 3"):
        pair_images(rec, gt[:3])


def test_ordering_mismatch_is_an_error(tmp_path):
    rec, gt = _data(n=3)
    np.savez(tmp_path / "r.npz", images=rec, ids=np.array(["a", "b", "c"]))
    np.savez(tmp_path / "g.npz", images=gt, ids=np.array(["a", "c", "b"]))
    with pytest.raises(DataError, match="ordering mismatch: item 1 is 'b' in the reconstructions but 'c'"):
        load_eval_images(tmp_path / "r.npz", tmp_path / "g.npz")


def test_grayscale_versus_rgb(tmp_path):
    rec, gt = _data()
    gray = gt[..., 0]
    with pytest.raises(DataError, match="color mismatch: ground truth are grayscale"):
        pair_images(rec, gray)
    ok = pair_images(rec, gray, gray_to_rgb=True)
    assert ok.gt.shape == (4, 16, 16, 3) and np.array_equal(ok.gt[..., 2], gray)
    with pytest.raises(DataError, match="must be uint8"):
        pair_images(rec.astype(np.float32) / 255, gt)


def test_corrupt_image_file_is_named(tmp_path):
    rec, gt = _data(n=2, s=1)
    for d in ("rec", "gt"):
        (tmp_path / d).mkdir()
    for i in range(2):
        Image.fromarray(gt[i]).save(tmp_path / "gt" / f"{i}.png")
    Image.fromarray(rec[0, 0]).save(tmp_path / "rec" / "0.png")
    (tmp_path / "rec" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match=r"1\.png.*cannot decode"):
        load_eval_images(tmp_path / "rec", tmp_path / "gt")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="bad.npz"):
        load_eval_images(tmp_path / "bad.npz", tmp_path / "gt")


def test_missing_ground_truth_is_explained(tmp_path):
    rec, _ = _data()
    np.savez(tmp_path / "r.npz", images=rec)
    with pytest.raises(DataError, match="no ground truth"):
        load_eval_images(tmp_path / "r.npz")


def test_different_sizes_are_resized_per_metric():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    small = gt[:, ::2, ::2][:, None]  # reconstructions at half resolution
    res = evaluate_reconstructions(
        small, gt, metrics=["pixel", "identification"], bootstrap=20, trials=20, n_way=(2, 5)
    )
    assert res["data"]["recon_size"] == [16, 16] and res["data"]["gt_size"] == [32, 32]
    assert any("resize reconstructions to the ground truth size" in n for n in res["notes"])
    pcc = next(e for e in res["metrics"] if e["key"] == "ident_pcc_2way")
    assert pcc["aggregates"]["mean"]["value"] == 1.0
