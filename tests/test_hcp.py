"""HCP windows, mixup augmentation, and the combined HCP+GOD pretraining corpus (memory-mapped).

Tiny files are written here in the real layouts: ``HCP/npz/<subject>/HCP_visual_voxel.npz`` with keys V1..V4,
float32 [TRs, vertices] (real: 1200 TRs); ``GOD/sbj_N.npz`` with ``arr_0`` [train, V_all], ``arr_1``
[test presentations, V_all], ``arr_2`` [test images, V_all], ``arr_3``, ``arr_4`` and a bool ``VC`` mask.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from mindvis.data.hcp import (
    augment_mixup,
    average_windows,
    hcp_shape,
    list_hcp_subjects,
    load_hcp_subject,
    mixup,
    mixup_pairs,
    window_bounds,
    window_length,
)
from mindvis.data.pretrain import (
    MBMDataConfig,
    MBMDataset,
    VoxelCorpus,
    augmentation_pairs,
    build_corpus,
    plan_sources,
    split_rows,
)
from mindvis.data.sampler import EpochShuffleSampler
from mindvis.errors import DataError

AREAS = ("V1", "V2", "V3", "V4")


def write_hcp_subject(
    root: Path, subject: str, frames: int = 60, widths=(9, 7, 6, 5), seed: int = 0, **override
):
    """``root/HCP/npz/<subject>/HCP_visual_voxel.npz``; returns the arrays written."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((frames, 3)).cumsum(0) * 0.3  # slow shared signal
    arrays = {}
    for area, w in zip(AREAS, widths, strict=True):
        arrays[area] = (latent @ rng.standard_normal((3, w)) + 0.3 * rng.standard_normal((frames, w))).astype(
            np.float32
        )
    arrays.update(override)
    folder = root / "HCP" / "npz" / subject
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "HCP_visual_voxel.npz", **arrays)
    return arrays


def write_god_subject(
    root: Path, subject: str = "sbj_1", n_train=24, n_img=4, reps=3, v_all=50, n_vc=40, seed=1
):
    """``root/GOD/<subject>.npz`` in the MinD-Vis layout; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder = root / "GOD"
    folder.mkdir(parents=True, exist_ok=True)
    w = rng.standard_normal((3, v_all))

    def fmri(n):
        return (rng.standard_normal((n, 3)) @ w + 0.3 * rng.standard_normal((n, v_all))).astype(np.float32)

    order = np.repeat(np.arange(n_img), reps)
    arr1 = fmri(len(order))
    vc = np.zeros(v_all, bool)
    vc[rng.permutation(v_all)[:n_vc]] = True
    arrays = dict(
        arr_0=fmri(n_train),
        arr_1=arr1,
        arr_2=np.stack([arr1[order == j].mean(0) for j in range(n_img)]),
        arr_3=np.arange(n_train) % 8,
        arr_4=order,
        VC=vc,
    )
    np.savez(folder / f"{subject}.npz", **arrays)
    if not (folder / "images_256.npz").exists():
        np.savez(
            folder / "images_256.npz",
            train_images=rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8),
            test_images=rng.integers(0, 256, (n_img, 4, 4, 3), dtype=np.uint8),
        )
    return arrays


# ----------------------------------------------------------------------------------------------------------
# windows and augmentation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames,window", [(1200, 10), (23, 5), (9, 3), (31, 10), (7, 10)])
def test_windows_follow_array_split(frames, window):
    ts = np.random.default_rng(0).standard_normal((frames, 6)).astype(np.float32)
    starts, sizes = window_bounds(frames, window)
    out = average_windows(ts, window)
    if frames < window:
        assert out.shape == (0, 6) and len(starts) == 0
        return
    chunks = np.array_split(ts, frames // window, axis=0)
    assert [len(c) for c in chunks] == sizes.tolist() and sizes.sum() == frames
    np.testing.assert_allclose(out, np.stack([c.mean(0) for c in chunks]), rtol=1e-6, atol=1e-6)


def test_window_length():
    assert window_length(8.0, 0.75) == 10
    assert window_length(8.0, 0.72) == 11
    assert window_length(0.5, 0.75) == 1


def test_mixup_is_the_original_interpn_mix():
    scipy_interp = pytest.importorskip("scipy.interpolate")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 33))
    pairs = mixup_pairs(len(x), 2.5, rng)
    assert pairs.shape == (18, 2)
    ours = mixup(x, pairs, 0.5)
    # the original evaluates interpn on the 2-point grid {0, 1} x voxels at (ratio, voxel), one pair at a time
    for (a, b), row in zip(pairs, ours, strict=True):
        grid = (np.r_[0, 1], np.arange(x.shape[1]))
        xi = np.c_[np.full(x.shape[1], 0.5), np.arange(x.shape[1])]
        np.testing.assert_allclose(row, scipy_interp.interpn(grid, np.stack([x[a], x[b]]), xi), atol=1e-12)


def test_augment_sizes_and_reproducibility():
    x = np.random.default_rng(1).standard_normal((10, 4)).astype(np.float32)
    assert augment_mixup(x, 1, np.random.default_rng(0)) is x
    out = augment_mixup(x, 2, np.random.default_rng(0))
    assert out.shape == (20, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:10], x)
    np.testing.assert_array_equal(out, augment_mixup(x, 2, np.random.default_rng(0)))
    assert augment_mixup(x, 1.55, np.random.default_rng(0)).shape == (15, 4)
    with pytest.raises(Exception, match="aug_times"):
        mixup_pairs(10, 0.5, np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------------------
# HCP files
# ----------------------------------------------------------------------------------------------------------


def test_load_hcp_subject(tmp_path):
    arrays = write_hcp_subject(tmp_path, "100307", frames=45)
    for where in (tmp_path / "HCP", tmp_path / "HCP" / "npz"):
        assert list_hcp_subjects(where) == ["100307"]
    path = tmp_path / "HCP" / "npz" / "100307" / "HCP_visual_voxel.npz"
    assert hcp_shape(path) == (45, 27)
    ds = load_hcp_subject(tmp_path / "HCP", "100307", window=10)
    full = np.concatenate([arrays[a] for a in AREAS], axis=1)
    assert ds.split == "rest" and ds.voxels.shape == (4, 27)
    np.testing.assert_allclose(ds.voxels, average_windows(full, 10), atol=1e-6)
    raw = load_hcp_subject(tmp_path / "HCP", "100307", rois=("V2", "V1"), window=None)
    np.testing.assert_array_equal(raw.voxels, np.concatenate([arrays["V2"], arrays["V1"]], axis=1))


def test_hcp_errors(tmp_path):
    write_hcp_subject(tmp_path, "a", V3=np.zeros((59, 6), np.float32))
    with pytest.raises(DataError, match="different numbers of TRs"):
        load_hcp_subject(tmp_path / "HCP", "a")
    arrays = write_hcp_subject(tmp_path, "b")
    del arrays["V4"]
    np.savez(tmp_path / "HCP" / "npz" / "b" / "HCP_visual_voxel.npz", **arrays)
    with pytest.raises(DataError, match="missing key 'V4'"):
        load_hcp_subject(tmp_path / "HCP", "b")
    write_hcp_subject(tmp_path, "c", frames=6)
    with pytest.raises(DataError, match="fewer than one averaging window"):
        load_hcp_subject(tmp_path / "HCP", "c", window=10)
    with pytest.raises(DataError, match="not found"):
        load_hcp_subject(tmp_path / "HCP", "zzz")


def test_hcp_nan_policies(tmp_path):
    v1 = write_hcp_subject(tmp_path, "a")["V1"].copy()
    v1[3, 2] = np.nan
    v1[4, 5] = np.inf
    write_hcp_subject(tmp_path, "a", V1=v1)
    with pytest.raises(DataError, match=r"2 non-finite values \(1 NaN, 1 Inf\)"):
        load_hcp_subject(tmp_path / "HCP", "a")
    zero = load_hcp_subject(tmp_path / "HCP", "a", nan_policy="zero")
    assert np.isfinite(zero.voxels).all() and zero.voxels[0, 2] == 0
    drop = load_hcp_subject(tmp_path / "HCP", "a", nan_policy="drop")
    assert drop.num_voxels == 25 and list(drop.meta["kept_voxels"][:6]) == [0, 1, 3, 4, 6, 7]


# ----------------------------------------------------------------------------------------------------------
# combined pretraining corpus
# ----------------------------------------------------------------------------------------------------------


def make_sources(root: Path, n_hcp: int = 3) -> MBMDataConfig:
    for i in range(n_hcp):
        write_hcp_subject(root, f"10{i}", frames=60, widths=(9, 7, 6, 5 + i), seed=i)
    write_god_subject(root, "sbj_1", seed=7)
    write_god_subject(root, "sbj_2", n_vc=35, seed=8)
    return MBMDataConfig(hcp_dir=str(root / "HCP"), god_dir=str(root / "GOD"), patch_size=8, window_trs=10)


def test_plan_and_build_corpus(tmp_path):
    cfg = make_sources(tmp_path)
    plans = plan_sources(cfg)
    assert [p.name for p in plans] == ["hcp/100", "hcp/101", "hcp/102", "god/sbj_1", "god/sbj_2"]
    assert [p.rows for p in plans] == [6, 6, 6, 24, 24] and [p.voxels for p in plans] == [27, 28, 29, 40, 35]
    corpus = build_corpus(cfg, tmp_path / "corpus")
    assert isinstance(corpus.voxels, np.memmap) and not corpus.voxels.flags.writeable
    assert corpus.voxels.shape == (66, 40)  # longest subject padded to whole patches of 8
    god = corpus.blocks[3]
    rows = np.asarray(corpus.voxels[god.start : god.stop])
    # each subject is normalised with its own training statistics
    raw = np.load(tmp_path / "GOD" / "sbj_1.npz")
    vc = raw["VC"]
    train = raw["arr_0"][:, vc]
    np.testing.assert_allclose(rows, (train - train.mean()) / train.std(), atol=1e-4)
    hcp = np.asarray(corpus.voxels[0:6])
    assert abs(hcp[:, :27].mean()) < 1e-5 and hcp[:, :27].std() == pytest.approx(1, abs=1e-4)
    np.testing.assert_array_equal(hcp[:, 27:32], hcp[:, 0:5])  # wrap padding to 32, then to the common 40
    # the preprocessing of every subject is kept and can be reapplied
    pre = corpus.preprocessors["god/sbj_1"]
    np.testing.assert_allclose(pre.transform(train), rows, atol=1e-6)


def test_corpus_with_test_fmri_and_reuse(tmp_path, caplog):
    cfg = make_sources(tmp_path, n_hcp=1)
    cfg.hcp_dir, cfg.include_test_fmri, cfg.god_subjects = None, True, ["sbj_1"]
    corpus = build_corpus(cfg, tmp_path / "c")
    block = corpus.blocks[0]
    assert (block.start, block.train_stop, block.stop) == (0, 24, 36)
    import logging

    with caplog.at_level(logging.INFO):
        again = build_corpus(cfg, tmp_path / "c")
    assert "reusing" in caplog.text and again.fingerprint == corpus.fingerprint
    write_god_subject(tmp_path, "sbj_1", seed=99)  # the source changed: rebuilt
    rebuilt = build_corpus(cfg, tmp_path / "c")
    assert rebuilt.fingerprint != corpus.fingerprint


def test_corpus_errors_leave_nothing_behind(tmp_path):
    cfg = make_sources(tmp_path)
    v2 = np.load(tmp_path / "HCP/npz/101/HCP_visual_voxel.npz")["V2"].copy()
    v2[10, 1] = np.nan
    write_hcp_subject(tmp_path, "101", seed=1, widths=(9, 7, 6, 6), V2=v2)
    with pytest.raises(DataError, match="101.*non-finite"):
        build_corpus(cfg, tmp_path / "corpus")
    assert not (tmp_path / "corpus").exists() and list(tmp_path.glob(".corpus*")) == []
    # inconsistent subject: one area has a different number of TRs
    write_hcp_subject(tmp_path, "101", V4=np.zeros((50, 5), np.float32))
    with pytest.raises(DataError, match="different numbers of TRs"):
        plan_sources(cfg)
    write_hcp_subject(tmp_path, "101", seed=1)
    write_god_subject(tmp_path, "sbj_2", n_vc=5)
    with pytest.raises(DataError, match="fewer than one patch"):
        plan_sources(cfg)
    cfg.god_subjects = ["sbj_9"]
    with pytest.raises(DataError, match="sbj_9"):
        plan_sources(cfg)


def test_dataset_rows_mixup_and_pickling(tmp_path):
    cfg = make_sources(tmp_path)
    corpus = build_corpus(cfg, tmp_path / "corpus")
    train, val = split_rows(corpus, 0.1, 1000, seed=3)
    assert len(val) == 7 and not set(train) & set(val) and len(train) + len(val) == corpus.num_samples
    np.testing.assert_array_equal(split_rows(corpus, 0.1, 1000, seed=3)[1], val)
    pairs = augmentation_pairs(corpus, train, 2.0, seed=3)
    assert len(pairs) == len(train)
    owner = np.searchsorted([b.stop for b in corpus.blocks], pairs, side="right")
    assert (owner[:, 0] == owner[:, 1]).all() and np.isin(
        pairs, train
    ).all()  # within one subject's training rows
    ds = MBMDataset(corpus.voxels_path, train, pairs, ratio=0.5)
    assert len(ds) == 2 * len(train)
    vox = np.asarray(corpus.voxels)
    idx = [0, len(train) + 3, 5, len(train)]
    items = ds.__getitems__(idx)
    for i, item in zip(idx, items, strict=True):
        if i < len(train):
            expect = vox[train[i]]
        else:
            a, b = pairs[i - len(train)]
            expect = 0.5 * vox[a] + 0.5 * vox[b]
        np.testing.assert_allclose(item["fmri"].numpy(), expect, atol=1e-6)
        np.testing.assert_array_equal(ds[i]["fmri"].numpy(), item["fmri"].numpy())
        assert int(item["index"]) == i
    state = pickle.dumps(ds)
    assert len(state) < 20_000  # the path travels, not the data
    assert np.array_equal(pickle.loads(state)[5]["fmri"].numpy(), ds[5]["fmri"].numpy())
    with pytest.raises(IndexError):
        ds.fetch(np.asarray([len(ds)]))


def test_epoch_sampler_matches_distributed_sampler():
    from torch.utils.data.distributed import DistributedSampler

    n, seed = 24, 5
    single = EpochShuffleSampler(n, seed)
    ranks = [DistributedSampler(range(n), num_replicas=2, rank=r, shuffle=True, seed=seed) for r in range(2)]
    for epoch in (0, 3):
        single.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        order = list(single)
        r0, r1 = list(ranks[0]), list(ranks[1])
        # global batch k of 2 processes x 3 samples = samples 6k..6k+5 of the single-process order
        for k in range(n // 6):
            assert sorted(r0[3 * k : 3 * k + 3] + r1[3 * k : 3 * k + 3]) == sorted(order[6 * k : 6 * k + 6])
    single.set_epoch(0)
    assert list(single) != order  # epochs differ
    assert VoxelCorpus  # exported
