"""The MinD-Vis n-way protocol, identification, pairwise and NSD pixel metrics against hand-computed cases."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from mindvis.errors import ConfigError
from mindvis.eval import metrics as M
from mindvis.utils.images import to_float_resized


def _probs_with_rank(n_items: int, n_classes: int, beaters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities [N, 1, C] whose target class (0) is beaten by exactly beaters[i] classes."""
    probs = np.zeros((n_items, 1, n_classes))
    for i, m in enumerate(beaters):
        probs[i, 0] = np.arange(n_classes, 0, -1, dtype=float)  # class c is beaten by c classes
        probs[i, 0, [0, m]] = probs[i, 0, [m, 0]]  # put the target at rank m
    probs /= probs.sum(axis=2, keepdims=True)
    return probs, np.zeros(n_items, dtype=np.int64)


def test_n_way_known_probabilities_give_known_accuracy():
    c = 10
    beaters = np.array([0, 1, 3, 9])
    probs, target = _probs_with_rank(4, c, beaters)
    assert M.semantic_beaters(probs, target)[:, 0].tolist() == beaters.tolist()
    # exact: P(no beater among n-1 of C-1) = C(C-1-m, n-1) / C(C-1, n-1); top-1
    for n in (2, 5, 10):
        want = [comb(c - 1 - m, n - 1) / comb(c - 1, n - 1) for m in beaters]
        exact = M.n_way_top_k_expected(probs, target, n, 1)[:, 0]
        np.testing.assert_allclose(exact, want, atol=1e-12)
        mc = M.n_way_top_k(probs, target, n, 1, trials=20000, rng=np.random.default_rng(1))[:, 0]
        np.testing.assert_allclose(mc, want, atol=0.015)
    # 2-way with one beater among 9 others: 8/9; the lowest class never wins; the top class always does
    assert M.n_way_top_k_expected(probs, target, 2)[:, 0].tolist() == pytest.approx([1.0, 8 / 9, 6 / 9, 0.0])
    # top-2 out of 10: success unless both drawn... with n = C every class is drawn: rank < k
    np.testing.assert_allclose(M.n_way_top_k(probs, target, 10, 2, trials=50)[:, 0], [1, 1, 0, 0])


def test_n_way_matches_explicit_class_drawing():
    """The hypergeometric shortcut has the distribution of drawing classes without replacement."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(12), size=(3, 1))
    target = np.array([0, 5, 11])
    for i in range(3):
        others = [c for c in range(12) if c != target[i]]
        hits = 0
        for _ in range(4000):
            pick = rng.choice(others, 4, replace=False)
            vals = np.concatenate([[probs[i, 0, target[i]]], probs[i, 0, pick]])
            hits += (vals[1:] > vals[0]).sum() < 2
        brute = hits / 4000
        ours = M.n_way_top_k(probs, target, 5, 2, trials=4000, rng=np.random.default_rng(i))[i, 0]
        assert abs(brute - ours) < 0.04
        assert abs(M.n_way_top_k_expected(probs, target, 5, 2)[i, 0] - brute) < 0.03


def test_n_way_chance_is_one_over_n_on_random_predictions():
    rng = np.random.default_rng(3)
    n_items, c = 400, 20
    probs = rng.dirichlet(np.ones(c), size=(n_items, 2))
    target = rng.integers(0, c, n_items)
    for n in (2, 5, 20):
        acc = M.n_way_top_k(probs, target, n, 1, trials=100, rng=M.metric_rng(0, f"chance{n}"))
        lo, hi = M.bootstrap_ci(acc, "mean", n_boot=500, rng=np.random.default_rng(0))
        assert lo <= 1.0 / n <= hi


def test_perfect_reconstructions_score_one():
    rng = np.random.default_rng(0)
    probs_gt = rng.dirichlet(np.ones(10), size=8)
    target = probs_gt.argmax(axis=1)
    recon_probs = np.repeat(probs_gt[:, None], 3, axis=1)  # every sample classified like its ground truth
    assert M.n_way_top_k(recon_probs, target, 10, 1, trials=100).mean() == 1.0


def test_n_way_infeasible_n_is_refused():
    probs = np.full((2, 1, 10), 0.1)
    with pytest.raises(ConfigError, match="50-way needs at least 50 classes"):
        M.n_way_top_k(probs, np.zeros(2, dtype=int), 50)
    with pytest.raises(ConfigError):
        M.n_way_top_k(probs, np.zeros(2, dtype=int), 5, k=6)


def test_aggregates_mean_best_slot_best_per_image():
    v = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # 3 images x 2 slots
    assert M.aggregate(v, "mean") == pytest.approx(4 / 6)
    assert M.aggregate(v, "best_slot") == pytest.approx(2 / 3)  # each slot averages 2/3
    assert M.aggregate(v, "best_per_image") == pytest.approx(1.0)
    assert M.aggregate(v, "best_slot", higher_is_better=False) == pytest.approx(2 / 3)
    assert M.aggregate(v, "best_per_image", higher_is_better=False) == pytest.approx(1 / 3)


def test_identification_hand_cases():
    n = 6
    sim = np.tile(-np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]).astype(float)[:, None, :], (1, 2, 1))
    assert M.two_way_identification(sim).tolist() == [[1.0, 1.0]] * n
    assert M.two_way_identification(-sim).max() == 0.0
    # make item 0's true similarity beaten by exactly 2 others
    sim2 = sim.copy()
    sim2[0, :, 1] = 1.0
    sim2[0, :, 2] = 2.0
    assert M.two_way_identification(sim2)[0, 0] == pytest.approx(3 / 5)
    assert M.identification_beaters(sim2)[0, 0] == 2
    want = comb(5 - 2, 3 - 1) / comb(5, 3 - 1)
    assert M.n_way_identification_expected(sim2, 3)[0, 0] == pytest.approx(want)
    mc = M.n_way_identification(sim2, 3, trials=20000, rng=np.random.default_rng(0))[0, 0]
    assert abs(mc - want) < 0.015
    # ties count against the reconstruction
    flat = np.zeros((n, 1, n))
    assert M.two_way_identification(flat).max() == 0.0
    with pytest.raises(ConfigError):
        M.n_way_identification(sim, n + 1)


def test_identification_chance_on_random_similarity():
    rng = np.random.default_rng(5)
    sim = rng.normal(size=(60, 2, 60))
    two = M.two_way_identification(sim)
    lo, hi = M.bootstrap_ci(two, n_boot=500, rng=np.random.default_rng(1))
    assert lo <= 0.5 <= hi
    ten = M.n_way_identification(sim, 10, trials=200, rng=np.random.default_rng(2))
    lo, hi = M.bootstrap_ci(ten, n_boot=500, rng=np.random.default_rng(1))
    assert lo <= 0.1 <= hi


def _images(n=6, s=2, h=24, w=20, seed=0):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    noise = rng.integers(-50, 51, (n, s, h, w, 3))
    rec = np.clip(gt[:, None].astype(int) + noise, 0, 255).astype(np.uint8)
    return rec, gt


def test_pixel_matrices_match_direct_computation():
    rec, gt = _images()
    pcc, mse, ssim = M.pcc_matrix(rec, gt), M.mse_matrix(rec, gt), M.ssim_matrix(rec, gt)
    for i, s, j in [(0, 0, 0), (1, 1, 3), (5, 0, 2)]:
        a, b = rec[i, s].astype(float), gt[j].astype(float)
        assert pcc[i, s, j] == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-9)
        assert mse[i, s, j] == pytest.approx(np.mean((a / 255 - b / 255) ** 2), abs=1e-9)
        ref = structural_similarity(rec[i, s], gt[j], channel_axis=-1, data_range=255)
        assert ssim[i, s, j] == pytest.approx(ref, abs=2e-5)


def test_pairwise_metrics_perfect_and_swapped():
    _, gt = _images(n=5)
    perfect = gt[:, None]
    for sim, hib in (
        (M.pcc_matrix(perfect, gt), True),
        (M.ssim_matrix(perfect, gt), True),
        (M.mse_matrix(perfect, gt), False),
    ):
        s = sim if hib else -sim
        assert M.two_way_identification(s).min() == 1.0
    swapped = gt[np.roll(np.arange(5), 1)][:, None]  # each reconstruction is another item's image
    s = M.pcc_matrix(swapped, gt)
    assert M.two_way_identification(s).max() < 1.0
    assert (M.two_way_identification(-M.mse_matrix(swapped, gt)) <= 0.75).all()


def test_mse_uint8_original_wraps_modulo_256_like_numpy_uint8():
    """The original's np.square(pred - gt).mean() on uint8: difference and square both wrap modulo 256."""
    px = lambda *v: np.array(v, dtype=np.uint8).reshape(1, 1, len(v) // 3, 3)  # noqa: E731
    pred, gt = px(0, 10, 0), px(255, 20, 16)
    # (0 - 255) % 256 = 1 -> 1; (10 - 20) % 256 = 246 -> 246**2 % 256 = 100; (0 - 16) % 256 = 240 -> 0
    assert (pred - gt).ravel().tolist() == [1, 246, 240]
    assert np.square(pred - gt).dtype == np.uint8 and np.square(pred - gt).ravel().tolist() == [1, 100, 0]
    assert M.mse_uint8_original(pred, gt) == 101 / 3
    assert M.mse_uint8_original(px(0, 0, 0), px(255, 255, 255)) == 1.0
    assert M.mse_uint8_original(px(10, 10, 10), px(20, 20, 20)) == 100.0
    assert M.mse_uint8_original(px(20, 20, 20), px(10, 10, 10)) == 100.0  # (-246)^2 = 246^2 mod 256
    mat = M.mse_uint8_original_matrix(pred[None], gt)
    assert mat.shape == (1, 1, 1) and mat[0, 0, 0] == 101 / 3
    # the true MSE on [0, 1] values is unchanged: (255/255)^2, (10/255)^2, (16/255)^2
    want = np.mean([1.0, (10 / 255) ** 2, (16 / 255) ** 2])
    assert M.mse_matrix(pred[None], gt)[0, 0, 0] == pytest.approx(want, abs=1e-12)
    with pytest.raises(ConfigError, match="uint8"):
        M.mse_uint8_original_matrix(pred[None].astype(np.int16), gt)
    with pytest.raises(ConfigError, match="uint8"):
        M.mse_uint8_original(pred.astype(float), gt)


def test_mse_uint8_original_matrix_equals_the_original_per_pair():
    rec, gt = _images(n=4, s=3, h=9, w=7)
    for block in (1, 200, 1 << 22):  # one reconstruction per block, a few, all at once
        mat = M.mse_uint8_original_matrix(rec, gt, block_bytes=block)
        for i in range(4):
            for s in range(3):
                for j in range(4):
                    assert mat[i, s, j] == np.square(rec[i, s] - gt[j]).mean()  # bit-identical


def test_mse_uint8_original_identification_differs_from_true_mse():
    """16 apart wraps to 0 in uint8, so the original's pairwise MSE cannot tell the true image from it."""
    gt = np.stack([np.full((8, 8, 3), 0, np.uint8), np.full((8, 8, 3), 16, np.uint8)])
    rec = gt[:, None].copy()
    true = M.two_way_identification(-M.mse_matrix(rec, gt))
    wrapped = M.mse_uint8_original_matrix(rec, gt)
    assert wrapped.ravel().tolist() == [0.0, 0.0, 0.0, 0.0]
    assert true.min() == 1.0 and M.two_way_identification(-wrapped).max() == 0.0


def test_nsd_pixcorr_and_ssim_match_reference_formulas():
    rec, gt = _images(n=3, s=1, h=32, w=32)
    out = M.nsd_pixel_metrics(rec, gt, chance_pairing=np.array([1, 2, 0]))
    r = to_float_resized(rec[:, 0], 425).double().permute(0, 2, 3, 1).numpy()
    g = to_float_resized(gt, 425).double().permute(0, 2, 3, 1).numpy()
    for i in range(3):
        ref = structural_similarity(
            rgb2gray(r[i]),
            rgb2gray(g[i]),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        assert out["ssim"][i, 0] == pytest.approx(ref, abs=1e-5)
        assert out["pixcorr"][i, 0] == pytest.approx(np.corrcoef(r[i].ravel(), g[i].ravel())[0, 1], abs=1e-6)
    assert out["pixcorr_chance"][0, 0] == pytest.approx(
        np.corrcoef(r[0].ravel(), g[1].ravel())[0, 1], abs=1e-6
    )


def test_random_choices_are_deterministic_given_seed():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), size=(20, 3))
    target = rng.integers(0, 10, 20)
    a = M.n_way_top_k(probs, target, 5, trials=50, rng=M.metric_rng(7, "x"))
    b = M.n_way_top_k(probs, target, 5, trials=50, rng=M.metric_rng(7, "x"))
    c = M.n_way_top_k(probs, target, 5, trials=50, rng=M.metric_rng(8, "x"))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    ci1 = M.bootstrap_ci(a, "best_slot", rng=M.metric_rng(7, "boot"))
    ci2 = M.bootstrap_ci(a, "best_slot", rng=M.metric_rng(7, "boot"))
    assert ci1 == ci2
    assert ci1[0] <= M.aggregate(a, "best_slot") <= ci1[1]
    assert M.bootstrap_ci(a, n_boot=0) is None
