"""FID: the exact Fréchet distance, its statistics path on features of a small local network, honest absence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mindvis.errors import WeightsUnavailable
from mindvis.eval.fid import (
    InceptionFeatures,
    feature_statistics,
    fid_summary,
    frechet_distance,
    frechet_distance_features,
    load_inception,
)
from mindvis.eval.suite import evaluate_reconstructions


def test_frechet_distance_low_rank_identity_matches_sqrtm():
    rng = np.random.default_rng(0)
    for n, m, d in ((40, 30, 64), (300, 200, 16)):
        a = rng.normal(size=(n, d))
        b = rng.normal(size=(m, d)) * 1.3 + 0.2
        ref = frechet_distance(*feature_statistics(a), *feature_statistics(b))
        assert frechet_distance_features(a, b) == pytest.approx(ref, rel=1e-6)


def test_frechet_distance_hand_cases():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50, 8))
    assert frechet_distance_features(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = np.arange(8.0)
    assert frechet_distance_features(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)


def _small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    ).eval()


def _features(net, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        return net(x).double().numpy()


def test_fid_statistics_path_on_small_network_features():
    """The statistics path runs on real features of a small local network (not a substitute for FID)."""
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    close = np.clip(gt[:, None].astype(int) + rng.integers(-10, 11, (24, 3, 32, 32, 3)), 0, 255).astype(
        np.uint8
    )
    far = (rng.random((24, 3, 32, 32, 3)) * 80).astype(np.uint8)
    net = _small_net()
    fg = _features(net, gt)
    fc = _features(net, close.reshape(-1, 32, 32, 3)).reshape(24, 3, -1)
    ff = _features(net, far.reshape(-1, 32, 32, 3)).reshape(24, 3, -1)
    s_close = fid_summary(fc, fg, n_boot=50, rng=np.random.default_rng(0))
    s_far = fid_summary(ff, fg, n_boot=50, rng=np.random.default_rng(0))
    assert len(s_close["per_slot"]) == 3
    assert s_close["best_slot"] == min(s_close["per_slot"])
    assert s_close["mean"] == pytest.approx(np.mean(s_close["per_slot"]))
    assert s_close["mean"] < s_far["mean"]
    lo, hi = s_close["ci95"]["mean"]
    assert lo <= s_close["mean"] <= hi
    again = fid_summary(fc, fg, n_boot=50, rng=np.random.default_rng(0))
    assert again == s_close


def test_missing_inception_weights_are_reported_not_faked(tmp_path):
    with pytest.raises(WeightsUnavailable, match="no weights"):
        load_inception(None)
    with pytest.raises(WeightsUnavailable):
        load_inception(tmp_path / "absent.pth")
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    res = evaluate_reconstructions(gt[:, None], gt, metrics=["fid"], bootstrap=10)
    assert res["fid"] == {}
    reasons = {u["key"]: u["reason"] for u in res["unavailable"]}
    assert reasons["fid_64"].startswith("no weights") and reasons["fid_2048"].startswith("no weights")


@pytest.mark.slow
@pytest.mark.parametrize("num_classes", [1008, 1000])
def test_inception_feature_plumbing_with_a_weights_file(tmp_path, num_classes):
    """Loading and both feature taps, with a seeded weights file (a plumbing check; no FID is reported from it)."""
    from torchvision.models.inception import Inception3

    torch.manual_seed(0)
    net = Inception3(num_classes=num_classes, aux_logits=False, init_weights=False)
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    inc = InceptionFeatures(path)
    assert inc.variant == ("tf-fid" if num_classes == 1008 else "torchvision")
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    feats = inc.extract(images)
    assert feats["64"].shape == (3, 64) and feats["2048"].shape == (3, 2048)
    assert np.isfinite(feats["2048"]).all()


@pytest.mark.slow
def test_lpips_and_alexnet_metrics_plumbing_with_a_weights_file(tmp_path):
    """LPIPS matches torchmetrics' implementation given the same backbone; NSD AlexNet metrics get computed."""
    import torchvision
    from torchmetrics.functional.image.lpips import _LPIPS

    from mindvis.eval.networks import LPIPSAlex, MetricWeights, nsd_network_scores

    torch.manual_seed(0)
    alex = torchvision.models.alexnet()
    path = tmp_path / "alexnet.pth"
    torch.save(alex.state_dict(), path)
    ref = _LPIPS(pretrained=True, net="alex", pnet_rand=True).eval()
    for sl in (ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5):
        for name, module in sl.named_children():
            module.load_state_dict(alex.features[int(name)].state_dict())
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    rec = rng.integers(0, 256, (4, 2, 64, 64, 3), dtype=np.uint8)
    mat = LPIPSAlex(path).matrix(rec, gt)
    to = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1  # noqa: E731
    for i, s, j in ((0, 0, 0), (1, 1, 2), (3, 0, 1)):
        assert mat[i, s, j] == pytest.approx(float(ref(to(rec[i, s]), to(gt[j]))), abs=1e-5)
    scores = nsd_network_scores(rec, gt, MetricWeights(alexnet=path))
    assert scores["nsd_alexnet2"]["values"].shape == (4, 2)
    assert scores["nsd_inception"]["values"] is None and scores["nsd_inception"]["reason"].startswith(
        "no weights"
    )
