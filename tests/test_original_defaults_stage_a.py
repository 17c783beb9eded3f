"""Stage A and voxel preprocessing follow the original MinD-Vis code where a user would notice (tiny inputs).

The reference functions below restate, in a few lines, what the original's ``dataset.py`` and
``stageA2_mbm_finetune.py`` (github.com/zjc062/mind-vis) do:

* ``pad_to_patch_size``: ``np.pad(x, ((0, 0), (0, p - V % p)), "wrap")``, a whole extra patch when ``V % p == 0``;
* ``create_Kamitani_dataset``: ``tr = normalize(pad(train))`` (statistics after padding) and
  ``tt = normalize(pad(test), np.mean(tr), np.std(tr))``: the test fMRI normalised with the statistics of the
  already normalised training fMRI; with ``include_nonavg_test=True`` the test rows are ``arr_2`` then ``arr_1``;
* stage A2 tunes on ``tt`` only (wrap-padded or cropped to the model's voxel count), 15 epochs, 2 of warmup.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import parity_dir
from mindvis.cli import main
from mindvis.data.preprocess import (
    FMRIPreprocessor,
    choose_pad_mode,
    is_original_checkpoint,
    load_preprocessor,
    padded_length,
)
from mindvis.data.pretrain import MBMDataConfig, build_corpus, split_rows
from mindvis.models.mbm import MaskedBrainModel, mbm_tiny
from mindvis.train.mbm import MBMTrainConfig
from test_hcp import write_god_subject

P = 16


# ----------------------------------------------------------------------------------------------------------
# the original's preprocessing, restated
# ----------------------------------------------------------------------------------------------------------


def orig_pad_to_patch_size(x: np.ndarray, p: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, p - x.shape[1] % p)), "wrap")


def orig_normalize(x: np.ndarray, mean=None, std=None) -> np.ndarray:
    mean = np.mean(x) if mean is None else mean
    std = np.std(x) if std is None else std
    return (x - mean) / (std * 1.0)


def orig_kamitani(npz: dict, roi: str, p: int, include_nonavg_test: bool) -> tuple[np.ndarray, np.ndarray]:
    mask = npz[roi]
    tr = npz["arr_0"][..., mask]
    tt = npz["arr_2"][..., mask]
    if include_nonavg_test:
        tt = np.concatenate([tt, npz["arr_1"][..., mask]], axis=0)
    tr = orig_normalize(orig_pad_to_patch_size(tr, p))
    tt = orig_normalize(orig_pad_to_patch_size(tt, p), np.mean(tr), np.std(tr))
    return tr, tt


def _data(n=12, v=32, seed=0, shift=3.0, scale=2.0):
    rng = np.random.default_rng(seed)
    return (shift + scale * rng.standard_normal((n, v))).astype(np.float32)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(autouse=True)
def _fresh_cli_logging(quiet_cli_logging):
    yield


# ----------------------------------------------------------------------------------------------------------
# item 3: padding to the patch size
# ----------------------------------------------------------------------------------------------------------


def test_original_padding_adds_a_whole_patch_when_v_is_a_multiple_of_p():
    x = _data(v=32)  # V % 16 == 0
    assert padded_length(32, P, "original") == 48 and padded_length(32, P, "wrap") == 32
    assert padded_length(37, P, "original") == padded_length(37, P, "wrap") == 48
    pre = FMRIPreprocessor(patch_size=P, pad_mode="original").fit(x)
    out = pre.transform(x)
    expected = orig_normalize(orig_pad_to_patch_size(x, P))
    assert out.shape == expected.shape == (12, 48)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # the statistics are fitted after padding: the wrapped copies of the first 16 voxels count twice
    padded = orig_pad_to_patch_size(x, P).astype(np.float64)
    assert pre.mean_ == pytest.approx(padded.mean(), rel=1e-9) and pre.std_ == pytest.approx(padded.std())
    assert pre.mean_ != pytest.approx(x.astype(np.float64).mean(), rel=1e-6)
    # ours keeps V and fits on the unpadded vectors
    ours = FMRIPreprocessor(patch_size=P).fit(x)
    assert ours.transform(x).shape == (12, 32)
    # and survives the JSON round trip
    back = FMRIPreprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    np.testing.assert_array_equal(back.transform(x), out)


def test_original_pad_mode_is_chosen_for_original_models_or_the_original_count():
    assert choose_pad_mode(32, P, 48, original=False) == "original"  # the original rule's count, not ours
    assert choose_pad_mode(32, P, 32, original=False) == "wrap"
    assert choose_pad_mode(37, P, 48, original=False) == "wrap"  # both rules give 48: ours
    assert choose_pad_mode(37, P, 48, original=True) == "original"
    assert choose_pad_mode(32, P, None, original=False) == "wrap"
    assert is_original_checkpoint({"format": "MinD-Vis stage-A checkpoint"})
    assert is_original_checkpoint({"format": "MinD-Vis finetuned stage-B checkpoint"})
    assert not is_original_checkpoint({"format": "CompVis label2img LDM"}) and not is_original_checkpoint(
        None
    )


def _finetune_args(init, data_dir, out, *extra):
    return ["finetune", "--init", str(init), "--data-dir", str(data_dir), "--out", str(out), "--epochs", "1",
            "--batch-size", "8", "--accelerator", "cpu", "--devices", "1", "--no-progress", *extra]  # fmt: skip


def test_finetune_from_an_original_checkpoint_pads_by_the_original_rule(tmp_path):
    """The fixture's original stage-A model takes 256 voxels; a 240-voxel ROI (15 whole patches) gets the
    original's extra patch, with the statistics fitted after padding."""
    ckpt = parity_dir() / "mae_checkpoint.pth"
    arrays = write_god_subject(tmp_path / "data", "sbj_1", n_train=20, n_img=2, reps=3, v_all=260, n_vc=240)
    assert main(_finetune_args(ckpt, tmp_path / "data", tmp_path / "a2")) == 0
    cfg = json.loads((tmp_path / "a2" / "config.json").read_text())["config"]
    assert cfg["data"]["pad_mode"] == "original"
    pre = load_preprocessor(tmp_path / "a2" / "preprocessing.json")
    assert (pre.pad_mode, pre.n_voxels_padded_, pre.n_voxels_out_) == ("original", 256, 256)
    tr, tt = orig_kamitani(arrays, "VC", P, include_nonavg_test=True)
    assert pre.mean_ == pytest.approx(
        orig_pad_to_patch_size(arrays["arr_0"][:, arrays["VC"]], P).astype(np.float64).mean(), rel=1e-9
    )
    # what A2 tuned on is the original's test_set.fmri
    rows = np.load(tmp_path / "a2" / "data" / "voxels.npy")
    np.testing.assert_allclose(rows, tt, rtol=1e-5, atol=1e-5)


def test_auto_pad_mode_matches_a_model_with_the_original_count(tmp_path):
    MaskedBrainModel(mbm_tiny(48, patch_size=P)).save_pretrained(tmp_path / "m48")
    write_god_subject(tmp_path / "d32", "sbj_1", n_train=16, n_img=2, reps=2, v_all=40, n_vc=32)
    write_god_subject(tmp_path / "d40", "sbj_1", n_train=16, n_img=2, reps=2, v_all=50, n_vc=40)
    for data, mode in (("d32", "original"), ("d40", "wrap")):
        out = tmp_path / f"a2_{data}"
        assert main(_finetune_args(tmp_path / "m48", tmp_path / data, out, "--a2-data", "train")) == 0
        assert json.loads((out / "config.json").read_text())["config"]["data"]["pad_mode"] == mode, data
    # a model from one of our runs: the padding that run recorded, whatever the count
    run = tmp_path / "a1run"
    MaskedBrainModel(mbm_tiny(48, patch_size=P)).save_pretrained(run / "model")
    ours = FMRIPreprocessor(patch_size=P, length=48).fit(_data(v=32))
    (run / "preprocessing.json").write_text(json.dumps({"subjects": {"god/sbj_1": ours.to_dict()}}))
    out = tmp_path / "a2_run"
    assert main(_finetune_args(run, tmp_path / "d32", out, "--a2-data", "train")) == 0
    assert json.loads((out / "config.json").read_text())["config"]["data"]["pad_mode"] == "wrap"
    # an explicit --pad-mode wins
    out = tmp_path / "a2_wrap"
    assert (
        main(
            _finetune_args(
                tmp_path / "m48", tmp_path / "d32", out, "--a2-data", "train", "--pad-mode", "wrap"
            )
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["config"]["data"]["pad_mode"] == "wrap"


# ----------------------------------------------------------------------------------------------------------
# item 4: test-set normalisation
# ----------------------------------------------------------------------------------------------------------


def test_original_test_normalisation_uses_the_normalised_training_statistics():
    train, test = _data(v=37, seed=0), _data(n=5, v=37, seed=1, shift=9.0, scale=5.0)
    tr = orig_normalize(orig_pad_to_patch_size(train, P))
    expected = orig_normalize(orig_pad_to_patch_size(test, P), np.mean(tr), np.std(tr))
    pre = FMRIPreprocessor(patch_size=P, pad_mode="original", test_normalize="original").fit(train)
    assert pre.test_mean_ == pytest.approx(0.0, abs=1e-6) and pre.test_std_ == pytest.approx(1.0, abs=1e-6)
    got = pre.transform(test, split="test")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # in effect not normalised: the test fMRI stays (nearly) as stored
    np.testing.assert_allclose(got, orig_pad_to_patch_size(test, P), rtol=1e-5, atol=1e-5)
    # the training split, and every split under ours, get the training statistics
    np.testing.assert_allclose(pre.transform(train), tr, rtol=1e-5, atol=1e-5)
    ours = FMRIPreprocessor(patch_size=P, pad_mode="original").fit(train)
    np.testing.assert_array_equal(ours.transform(test, split="test"), ours.transform(test))
    assert abs(ours.transform(test, split="test").mean()) > 1.0  # ours shows the test set's shift
    # the rule is explicit in the JSON and survives the round trip; older files read as ours
    d = pre.to_dict()
    assert d["params"]["test_normalize"] == "original" and d["fitted"]["test_mean"] == pre.test_mean_
    back = FMRIPreprocessor.from_dict(json.loads(json.dumps(d)))
    np.testing.assert_array_equal(back.transform(test, split="test"), got)
    old = ours.to_dict()
    old["_format_version"] = 1
    del old["params"]["test_normalize"], old["fitted"]["test_mean"], old["fitted"]["test_std"]
    assert FMRIPreprocessor.from_dict(old).test_normalize == "train"


# ----------------------------------------------------------------------------------------------------------
# item 1: stage A2 data
# ----------------------------------------------------------------------------------------------------------


def test_a2_defaults_are_the_originals(tmp_path):
    cfg = MBMTrainConfig.for_stage("finetune", init="x", data={"god_dir": str(tmp_path)})
    assert (cfg.epochs, cfg.warmup_epochs, cfg.batch_size, cfg.lr) == (15, 2.0, 16, 5.3e-5)
    d = cfg.data
    assert (d.god_fmri, d.test_normalize, d.val_holdout) == ("test", "original", False)


def test_a2_original_corpus_is_the_test_fmri_as_the_original_feeds_it(tmp_path):
    arrays = write_god_subject(tmp_path, "sbj_1", n_train=20, n_img=3, reps=4, v_all=50, n_vc=37)
    data = MBMDataConfig(
        god_dir=str(tmp_path / "GOD"),
        patch_size=P,
        god_fmri="test",
        test_normalize="original",
        pad_mode="original",
    )
    corpus = build_corpus(data, tmp_path / "c")
    _, tt = orig_kamitani(arrays, "VC", P, include_nonavg_test=True)
    assert corpus.num_samples == 3 + 12  # averaged rows, then the single trials; no training row
    block = corpus.blocks[0]
    assert (block.start, block.train_stop, block.stop) == (0, 0, 15)
    np.testing.assert_allclose(np.asarray(corpus.voxels), tt, rtol=1e-5, atol=1e-5)
    # the original reports the correlation on the data it tunes on: no row is held out
    train_rows, val_rows = split_rows(corpus, 0.2, 100, seed=0, holdout=False)
    assert len(train_rows) == 15 and len(val_rows) == 3 and set(val_rows) <= set(train_rows)
    held_train, held_val = split_rows(corpus, 0.2, 100, seed=0)
    assert len(held_train) == 12 and not set(held_val) & set(held_train)
    # ours: the training fMRI (the recipe of the finetune command's --a2-data train)
    ours = build_corpus(MBMDataConfig(god_dir=str(tmp_path / "GOD"), patch_size=P), tmp_path / "c2")
    assert ours.num_samples == 20


# ----------------------------------------------------------------------------------------------------------
# reconstruct with a converted original model: what the original fed it
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = parity_dir()
    out = tmp_path_factory.mktemp("conv") / "model"
    args = ["convert", "--finetuned", d / "finetuned.pth", "--label2img-dir", d / "label2img", "--mbm",
            d / "mae_checkpoint.pth", "--out", out]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    return out


def test_reconstruct_feeds_a_converted_original_model_what_the_original_fed_it(
    converted, tmp_path, monkeypatch
):
    from mindvis.errors import DataError
    from mindvis.pipeline import MindVisPipeline
    from mindvis.reconstruct import fit_to_model

    assert MindVisPipeline.from_pretrained(converted).num_voxels == 256
    arrays = write_god_subject(tmp_path / "data", "sbj_1", n_train=20, n_img=2, reps=3, v_all=260, n_vc=240)
    fed: list[np.ndarray] = []
    call = MindVisPipeline.__call__

    def spy(self, fmri, *args, **kwargs):
        fed.append(np.array(fmri, dtype=np.float32))
        return call(self, fmri, *args, **kwargs)

    monkeypatch.setattr(MindVisPipeline, "__call__", spy)
    tr, _ = orig_kamitani(arrays, "VC", P, include_nonavg_test=False)
    mask = arrays["VC"]
    expected_test = orig_normalize(
        orig_pad_to_patch_size(arrays["arr_2"][:, mask], P), np.mean(tr), np.std(tr)
    )
    for split, expected in (("test", expected_test), ("train", tr)):
        out = tmp_path / f"rec_{split}"
        args = ["reconstruct", "--model", converted, "--dataset", "god", "--data-dir", tmp_path / "data" / "GOD",
                "--split", split, "--limit", 2, "--num-samples", 1, "--steps", 1, "--sampler", "ddim",
                "--no-progress", "--out", out]  # fmt: skip
        assert main([str(a) for a in args]) == 0, split
        np.testing.assert_allclose(fed[-1], expected[:2], rtol=1e-5, atol=1e-5, err_msg=split)
        assert "original" in json.loads((out / "run.json").read_text())["preprocess"]
    # the test fMRI reaches the model as stored (padded by the original rule), not normalised
    np.testing.assert_allclose(fed[0], orig_pad_to_patch_size(arrays["arr_2"][:, mask], P)[:2], atol=1e-5)
    # a raw file is not preprocessed; its count error says when the original rule would fit
    with pytest.raises(DataError, match="original's padding rule"):
        fit_to_model(np.zeros((1, 240), np.float32), 256, False, "x.npy", patch_size=P)
