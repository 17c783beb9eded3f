"""The benchmark classifier: trains on training images, beats chance, caches by data hash; pretrained loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mindvis.errors import CheckpointError, WeightsUnavailable
from mindvis.eval.classifier import (
    BenchmarkClassifier,
    ClassifierConfig,
    TorchvisionClassifier,
    load_classifier,
)
from mindvis.eval.classifier_training import load_training_corpus, train_benchmark_classifier

TINY = dict(input_size=16, widths=(8, 16, 16, 16), epochs=4, batch_size=32, lr=5e-3)


def synthetic_corpus(n_per_class: int = 40, size: int = 24, seed: int = 0):
    """4 classes: horizontal stripes, vertical stripes, a bright square, a dark disc; random colours and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for c in range(4):
        for _ in range(n_per_class):
            ph = rng.integers(0, 4)
            if c == 0:
                mask = ((yy + ph) // 3) % 2 == 0
            elif c == 1:
                mask = ((xx + ph) // 3) % 2 == 0
            elif c == 2:
                o = rng.integers(2, size // 2)
                mask = (yy >= o) & (yy < o + size // 2) & (xx >= o) & (xx < o + size // 2)
            else:
                cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 4) ** 2
            fg, bg = rng.integers(120, 256, 3), rng.integers(0, 100, 3)
            img = np.where(mask[..., None], fg, bg) + rng.integers(-20, 21, (size, size, 3))
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(c)
    return np.stack(images), np.array(labels), ["hstripes", "vstripes", "square", "disc"]


def test_trains_beats_chance_saves_and_caches(tmp_path):
    torch.manual_seed(0)
    images, labels, names = synthetic_corpus()
    out = tmp_path / "clf"
    res = train_benchmark_classifier(images, labels, names, out, ClassifierConfig(**TINY), source="synthetic")
    info = res.classifier.info
    assert not res.cached
    assert info["held_out_accuracy"] > 0.6  # chance is 0.25
    assert info["n_train"] + info["n_holdout"] == len(images)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training_data_sha256"] == info["training_data_sha256"]
    assert (out / "model.safetensors").is_file()

    again = train_benchmark_classifier(images, labels, names, out, ClassifierConfig(**TINY))
    assert again.cached
    loaded = load_classifier(str(out))
    p1 = res.classifier.predict(images[:5])
    p2 = loaded.predict(images[:5])
    np.testing.assert_allclose(p1.probs, p2.probs, atol=1e-6)
    assert p2.probs.shape == (5, 4) and p2.features.shape == (5, 16)
    np.testing.assert_allclose(p2.probs.sum(axis=1), 1.0, atol=1e-6)
    assert loaded.describe()["held_out_accuracy"] == info["held_out_accuracy"]

    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    assert not train_benchmark_classifier(changed, labels, names, out, ClassifierConfig(**TINY)).cached


def test_an_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    import mindvis.eval.classifier_training as clf_mod

    images, labels, names = synthetic_corpus(n_per_class=16)
    cfg = ClassifierConfig(**{**TINY, "epochs": 3})
    whole = train_benchmark_classifier(images, labels, names, tmp_path / "whole", cfg)

    save = clf_mod._save_training_state
    saved: list[int] = []

    def kill_after_first(path, *args):
        save(path, *args)
        saved.append(1)
        if len(saved) == 1:
            raise KeyboardInterrupt  # killed right after epoch 1's state reached the disk

    monkeypatch.setattr(clf_mod, "_save_training_state", kill_after_first)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train_benchmark_classifier(images, labels, names, out, cfg)
    assert [p.name for p in out.iterdir()] == ["training-state.pt"]  # no half classifier
    # the other settings would start again; a second run with the same ones resumes after epoch 1
    resumed = train_benchmark_classifier(images, labels, names, out, cfg)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert len(saved) == 2  # epoch 2's state only: epoch 1 was not trained again, the last is the classifier
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    a = whole.classifier.model.state_dict()
    b = BenchmarkClassifier.load(out).model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)

    # a state of other settings is ignored, not resumed
    monkeypatch.setattr(clf_mod, "_save_training_state", kill_after_first)
    saved.clear()
    other = tmp_path / "other"
    with pytest.raises(KeyboardInterrupt):
        train_benchmark_classifier(images, labels, names, other, cfg)
    fresh = train_benchmark_classifier(
        images, labels, names, other, ClassifierConfig(**{**TINY, "epochs": 2})
    )
    assert [h["epoch"] for h in fresh.history] == [1, 2] and len(saved) == 2


def test_corpus_layouts_and_test_exclusion(tmp_path):
    images, labels, names = synthetic_corpus(n_per_class=10)
    np.savez(tmp_path / "corpus.npz", images=images, labels=labels, class_names=np.array(names))
    np.savez(
        tmp_path / "god.npz",
        train_images=images[:30],
        train_labels=labels[:30],
        test_images=images[30:],
        test_labels=labels[30:],
    )
    im, lab, got_names, _ = load_training_corpus(tmp_path / "corpus.npz")
    assert len(im) == 40 and got_names == names
    im, lab, _, desc = load_training_corpus(tmp_path / "god.npz")
    assert len(im) == 30 and "train_images" in desc  # the test split is never read
    im, lab, _, desc = load_training_corpus(tmp_path / "corpus.npz", exclude=tmp_path / "god.npz")
    assert len(im) == 30 and "minus 10" in desc


def test_missing_or_wrong_weights_are_refused(tmp_path):
    with pytest.raises(WeightsUnavailable):
        load_classifier("torchvision:vit_h_14")
    with pytest.raises(WeightsUnavailable):
        load_classifier("torchvision:vit_h_14", tmp_path / "absent.pth")
    with pytest.raises(WeightsUnavailable):
        BenchmarkClassifier.load(tmp_path)
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_classifier("torchvision:mobilenet_v3_small", bad)


def test_torchvision_classifier_from_a_local_file(tmp_path):
    """Loading path of a pretrained judge, exercised with a seeded weights file (plumbing only)."""
    from torchvision.models import mobilenet_v3_small

    torch.manual_seed(0)
    path = tmp_path / "mnv3.pth"
    torch.save(mobilenet_v3_small().state_dict(), path)
    clf = TorchvisionClassifier("mobilenet_v3_small", path)
    out = clf.predict(np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8))
    assert out.probs.shape == (3, 1000) and out.features.shape == (3, 1024)
    assert len(clf.class_names) == 1000


def test_blur_augmentation_smooths_the_chosen_share_and_is_checked():
    from mindvis.errors import ConfigError
    from mindvis.eval.classifier_training import _augment

    x = torch.rand(64, 3, 16, 16)  # white noise: any resolution drop lowers its pixel variance
    with pytest.raises(ConfigError, match="blur"):
        ClassifierConfig(blur=1.5)
    gen = torch.Generator().manual_seed(0)
    sharp = _augment(x, gen, blur=0.0)
    gen = torch.Generator().manual_seed(0)
    # blur 0 draws no extra random numbers: the augmentation of existing judges is unchanged
    assert torch.equal(_augment(x, gen, blur=0.0), sharp)
    var = _augment(x, torch.Generator().manual_seed(1), blur=1.0).var(dim=(1, 2, 3))
    var_sharp = sharp.var(dim=(1, 2, 3))
    assert float(var.max()) < float(var_sharp.min())
    half = _augment(x, torch.Generator().manual_seed(2), blur=0.5).var(dim=(1, 2, 3))
    smoothed = int((half < float(var_sharp.min()) * 0.95).sum())
    assert 16 <= smoothed <= 48
