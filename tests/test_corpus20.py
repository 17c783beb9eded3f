"""The 20-class ``fashion+animal`` source, the streamed corpus, memory-mapped readers and the judge preset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mindvis import synthcortex as syn
from mindvis.errors import ConfigError
from mindvis.eval.classifier import (
    CLASSIFIER_PRESETS,
    BenchmarkClassifier,
    ClassifierConfig,
)
from mindvis.eval.classifier_training import (
    _stratified_split,
    load_training_corpus,
    train_benchmark_classifier,
)
from mindvis.synthcortex import sources
from mindvis.synthcortex import stimuli as stim
from test_stimuli import _clear_caches, _write_animal, write_fake_fashion_mnist

SMALL = {
    "n_subjects": 1,
    "n_rest_subjects": 0,
    "n_train": 40,
    "n_test": 20,
    "n_repeats": 2,
    "voxels": 300,
    "resolution": 16,
    "corpus_size": 130,
    "calibration_images": 20,
    "calibration_voxels": 50,
}


@pytest.fixture
def both_sources(tmp_path, monkeypatch):
    """Small stand-ins of both sources: Fashion-MNIST 400/200 objects, Animal-MNIST 10 x 12 objects."""
    monkeypatch.setenv("MINDVIS_FASHION_MNIST", str(write_fake_fashion_mnist(tmp_path / "fm", 400, 200)))
    _write_animal(tmp_path / "am", n_per_class=12)
    monkeypatch.setenv("MINDVIS_ANIMAL_MNIST", str(tmp_path / "am"))
    _clear_caches()
    sources._load_combined.cache_clear()
    yield tmp_path
    _clear_caches()
    sources._load_combined.cache_clear()


def test_combined_source_has_20_classes_and_disjoint_splits(both_sources):
    assert sources.parse_source("fashion+animal") == ("fashion+animal", None)
    train = sources.load_objects("fashion+animal", "train")
    test = sources.load_objects("fashion+animal", "test")
    fm_train, am_train = (
        sources.load_objects("fashion-mnist", "train"),
        sources.load_objects("animal-mnist", "train"),
    )
    assert train.class_names == sources.FASHION_MNIST_CLASSES + sources.ANIMAL_MNIST_CLASSES
    assert len(train) == len(fm_train) + len(am_train) and len(test) == 200 + 20
    # Animal-MNIST's classes follow Fashion-MNIST's, each source keeps its own split
    assert (train.labels[len(fm_train) :] == am_train.labels + 10).all()
    np.testing.assert_array_equal(train.images[len(fm_train) :], am_train.images)
    imgs, labels, names = stim.make_stimulus_set(40, resolution=16, source="fashion+animal", split="test")
    assert imgs.shape == (40, 16, 16, 3) and len(names) == 20
    assert np.bincount(labels, minlength=20).tolist() == [2] * 20


def test_equal_classes_reuses_small_classes():
    labels = np.repeat(np.arange(3), [50, 50, 4])
    bank = sources.ObjectBank(np.zeros((104, 28, 28), np.uint8), labels, ("a", "b", "c"), "x", "train")
    rng = np.random.default_rng(0)
    idx = stim.sample_objects(bank, 60, rng, exclude=np.array([0, 100]), equal_classes=True)
    assert np.bincount(labels[idx], minlength=3).tolist() == [20, 20, 20]
    assert 0 not in idx and 100 not in idx
    assert set(idx[labels[idx] == 2]) == {101, 102, 103}  # three objects, each reused
    # without it, the small class runs out (the behaviour of the single sources is unchanged)
    plain = stim.sample_objects(bank, 60, np.random.default_rng(0))
    assert np.bincount(labels[plain], minlength=3)[2] == 4


def test_compose_into_memmap_gives_the_same_images(tmp_path, both_sources):
    bank = sources.load_objects("fashion+animal", "train")
    idx = np.arange(0, len(bank), 37)
    ref = stim.compose(bank, idx, np.random.default_rng(3), 16, chunk=8)
    out = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.uint8, (len(idx), 16, 16, 3))
    got = stim.compose(bank, idx, np.random.default_rng(3), 16, chunk=5, out=out)
    assert got.images is out
    np.testing.assert_array_equal(np.asarray(out), ref.images)
    np.testing.assert_array_equal(got.shape, ref.shape)
    with pytest.raises(ConfigError, match="out"):
        stim.compose(bank, idx, np.random.default_rng(3), 16, out=np.zeros((2, 16, 16, 3), np.uint8))


def test_streamed_corpus_is_balanced_memory_mapped_and_read_by_the_trainers(tmp_path, both_sources):
    from mindvis.data.formats.common import NpzArchive
    from mindvis.train.prior import load_image_corpus

    cfg = syn.SynthConfig.preset("realistic", source="fashion+animal", **SMALL)
    man = syn.simulate(cfg, tmp_path / "out")
    path = tmp_path / "out" / "stimuli" / "corpus.npz"
    assert sorted(p.name for p in path.parent.iterdir()) == ["corpus.npz"]  # no scratch file left
    assert len(man["class_names"]) == 20
    with NpzArchive(path) as z:
        assert z.is_stored("images")
        labels, objects = z.get("labels", mmap=False), z.get("object_index", mmap=False)
    assert sorted(np.bincount(labels, minlength=20).tolist()) == [6] * 10 + [7] * 10
    # the streamed file equals the in-memory corpus
    plan = syn.make_stimuli(cfg)
    with NpzArchive(path) as z:
        np.testing.assert_array_equal(np.asarray(z.get("images")), plan.corpus.images)
    np.testing.assert_array_equal(objects, plan.corpus.object_index)
    assert len(np.intersect1d(objects, plan.train.object_index)) == 0
    corpus = load_image_corpus(path, 16)
    assert isinstance(corpus.images, np.memmap) and corpus.num_classes == 20
    images, labs, names, _, groups = load_training_corpus(path, groups=True)
    assert isinstance(images, np.memmap) and len(names) == 20
    np.testing.assert_array_equal(groups, objects)
    assert len(load_training_corpus(path)) == 4


def test_single_source_corpus_unchanged_format(tmp_path, both_sources):
    cfg = syn.SynthConfig.preset("realistic", source="fashion-mnist", **SMALL)
    syn.simulate(cfg, tmp_path / "out")
    with np.load(tmp_path / "out" / "stimuli" / "corpus.npz") as z:
        assert sorted(z.files) == ["class_names", "images", "labels"]
        plan = syn.make_stimuli(cfg)
        np.testing.assert_array_equal(z["images"], plan.corpus.images)


def test_holdout_by_object_keeps_objects_on_one_side():
    labels = np.repeat(np.arange(2), 60)
    groups = np.concatenate([np.arange(60) % 10, 100 + np.arange(60) % 12])
    tr, ho = _stratified_split(labels, 0.2, 0, groups)
    assert len(np.intersect1d(groups[tr], groups[ho])) == 0
    assert set(np.unique(labels[ho])) == {0, 1} and len(tr) + len(ho) == 120


def test_deep_judge_trains_saves_and_loads(tmp_path):
    from test_eval_classifier import synthetic_corpus

    images, labels, names = synthetic_corpus(20, 16)
    groups = np.arange(len(labels)) // 2
    cfg = ClassifierConfig(
        **{**CLASSIFIER_PRESETS["judge"], "widths": (8, 8, 16, 16), "epochs": 2, "input_size": 16}
    )
    res = train_benchmark_classifier(images, labels, names, tmp_path / "clf", cfg, groups=groups)
    info = res.classifier.info
    assert info["holdout_by_object"] and 0.0 <= info["held_out_accuracy"] <= 1.0
    again = BenchmarkClassifier.load(tmp_path / "clf")
    assert again.config.arch == "deep" and again.config.label_smoothing == cfg.label_smoothing
    np.testing.assert_allclose(
        again.predict(images[:4]).probs, res.classifier.predict(images[:4]).probs, atol=1e-5
    )
    with pytest.raises(ConfigError, match="arch"):
        ClassifierConfig(arch="vit")


def test_build_prior_records_relative_paths(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import build_prior
    finally:
        sys.path.pop(0)
    work = tmp_path / "w"
    obj = {"corpus": {"source": str(work / "sim" / "corpus.npz")}, "x": [str(work.resolve())]}
    rel = build_prior._relative(obj, work)
    assert json.dumps(rel).count(str(tmp_path)) == 0 and rel["corpus"]["source"] == "<work>/sim/corpus.npz"
    s = build_prior.settings_for()
    assert s["simulate"]["source"] == "fashion+animal" and s["simulate"]["corpus-size"] >= 50000
    assert s["classifier"]["preset"] == "judge" and s["prior"]["ema"] is True
    # the VQ's perceptual term comes from a CNN other than the judge
    assert s["prior"]["perceptual-classifier"] == "perceptual"
    assert (s["perceptual"]["preset"], s["perceptual"].get("seed", 0)) != (s["classifier"]["preset"], 0)
    # every flag of the build is an option of its command
    from typer.main import get_command

    from mindvis.cli import app

    commands = get_command(app).commands
    for step, command in (
        ("simulate", "simulate"),
        ("classifier", "train-classifier"),
        ("perceptual", "train-classifier"),
        ("prior", "train-prior"),
    ):
        flags = {o for p in commands[command].params for o in (*p.opts, *p.secondary_opts)}
        for arg in build_prior._args(s[step]):
            if arg.startswith("--"):
                assert arg in flags, (step, arg)


def test_stand_ins_are_scored_on_never_seen_test_composites(tmp_path, both_sources):
    """The judge/prior evaluation (tiny judge, untrained tiny prior): every figure and number is written."""
    import torch

    from mindvis.eval.prior_benchmark import FIGURES, confusion_matrix, evaluate_stand_ins
    from mindvis.train.prior import PriorTrainConfig, build_class_prior

    torch.manual_seed(0)
    images, labels, names = stim.make_stimulus_set(200, 32, seed=0, source="fashion+animal", split="train")
    cfg = ClassifierConfig(**{**CLASSIFIER_PRESETS["judge"], "widths": (8, 8, 16, 16), "epochs": 1})
    judge = train_benchmark_classifier(images, labels, names, None, cfg).classifier
    k = len(names)
    prior = build_class_prior(PriorTrainConfig(preset="tiny", resolution=32).ldm_config(k), k).eval()
    out = tmp_path / "eval"
    res = evaluate_stand_ins(
        judge,
        prior,
        "fashion+animal",
        32,
        out,
        test_images=60,
        vq_images=30,
        per_class=1,
        steps=2,
        probe_items=20,
        probe_draws=2,
    )
    m = np.asarray(res["judge"]["confusion"])
    assert m.shape == (20, 20) and m.sum() == 60
    assert res["judge"]["accuracy"] == pytest.approx(np.trace(m) / 60)
    assert set(res["class_samples"]) == {"guidance_1", "guidance_3"}
    assert all(v["samples"] == 20 for v in res["class_samples"].values())
    assert res["vq"]["judge_accuracy_kept"] >= 0.0 and res["class_signal"]["items"] == 20
    assert json.loads((out / "evaluation.json").read_text())["judge"]["accuracy"] == res["judge"]["accuracy"]
    for name in FIGURES.values():
        assert (out / name).stat().st_size > 0
    np.testing.assert_array_equal(confusion_matrix([0, 1, 1], [0, 0, 1], 2), [[1, 0], [1, 1]])
    with pytest.raises(ConfigError, match="classes"):
        evaluate_stand_ins(judge, None, "fashion-mnist", 32, tmp_path / "e2", test_images=10)
