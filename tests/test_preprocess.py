"""Voxel preprocessing: fit/transform contract, normalisation, patch padding, length alignment, NaN policy, JSON."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mindvis.data.dataset import FMRIDataset
from mindvis.data.preprocess import (
    FMRIPreprocessor,
    NotFittedError,
    load_preprocessor,
    pad_columns,
    padded_length,
)
from mindvis.errors import ConfigError, DataError
from mindvis.utils.io import write_json


def _data(n=40, v=37, seed=0, scale=3.0, shift=5.0):
    rng = np.random.default_rng(seed)
    return (shift + scale * rng.standard_normal((n, v))).astype(np.float32)


def test_global_normaliser_uses_training_statistics_only():
    train, test = _data(seed=0), _data(seed=1, shift=9.0)
    pre = FMRIPreprocessor(patch_size=8).fit(train)
    mean, std = train.astype(np.float64).mean(), train.astype(np.float64).std()
    assert pre.mean_ == pytest.approx(mean, rel=1e-9)
    assert pre.std_ == pytest.approx(std, rel=1e-9)
    out = pre.transform(test)
    assert out.dtype == np.float32 and out.shape == (40, 40)
    np.testing.assert_allclose(out[:, :37], (test - mean) / std, rtol=1e-5, atol=1e-5)
    # the test set is not re-centred: its own mean stays visible
    assert out[:, :37].mean() > 1.0


def test_voxel_zscore():
    train = _data(v=20) * np.linspace(0.5, 4, 20, dtype=np.float32)
    pre = FMRIPreprocessor(normalize="voxel", patch_size=4).fit(train)
    out = pre.transform(train)
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(0), 1, atol=1e-4)


def test_constant_voxels_are_only_centred(caplog):
    train = _data(v=8)
    train[:, 3] = 2.0
    with caplog.at_level(logging.WARNING):
        pre = FMRIPreprocessor(normalize="voxel", patch_size=4).fit(train)
    assert "constant" in caplog.text
    np.testing.assert_allclose(pre.transform(train)[:, 3], 0.0)


@pytest.mark.parametrize("normalize", ["global", "voxel"])
def test_streaming_statistics_match_numpy_on_memmaps(tmp_path, monkeypatch, normalize):
    import mindvis.data.streaming as streaming

    monkeypatch.setattr(streaming, "BLOCK_ROWS", 7)  # many uneven blocks
    assert len(list(streaming.row_blocks(53))) == 8
    x = _data(n=53, v=19, seed=3)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    pre = FMRIPreprocessor(normalize=normalize, patch_size=4).fit(mm)
    axis = None if normalize == "global" else 0
    np.testing.assert_allclose(pre.mean_, x.astype(np.float64).mean(axis=axis), rtol=1e-10)
    np.testing.assert_allclose(pre.std_, x.astype(np.float64).std(axis=axis), rtol=1e-10)
    out = np.empty((53, 20), np.float32)
    pre.transform(mm, out=out)
    np.testing.assert_allclose(
        out, FMRIPreprocessor(normalize=normalize, patch_size=4).fit_transform(x), atol=1e-6
    )


def test_not_fitted_and_wrong_voxel_count():
    pre = FMRIPreprocessor()
    with pytest.raises(NotFittedError, match="not fitted"):
        pre.transform(_data())
    pre.fit(_data(v=37))
    with pytest.raises(DataError, match="expected 37 voxels"):
        pre.transform(_data(v=36), source="other.npz")


def test_init_only_stores_parameters():
    pre = FMRIPreprocessor(pad_mode="bogus")  # validated at fit, as in scikit-learn
    assert pre.get_params()["pad_mode"] == "bogus"
    assert not pre.is_fitted
    with pytest.raises(ConfigError, match="pad_mode"):
        pre.fit(_data())
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        FMRIPreprocessor(patch_size=16, length=40).fit(_data())


@pytest.mark.parametrize(
    "mode,v,expected_len", [("wrap", 37, 48), ("constant", 37, 48), ("cut", 37, 32), ("wrap", 32, 32)]
)
def test_padding_modes(mode, v, expected_len):
    x = _data(v=v)
    pre = FMRIPreprocessor(normalize="none", patch_size=16, pad_mode=mode, pad_value=-7.0).fit(x)
    out = pre.transform(x)
    assert out.shape == (40, expected_len) and pre.n_voxels_out_ == expected_len
    assert expected_len == padded_length(v, 16, mode)
    keep = min(v, expected_len)
    np.testing.assert_array_equal(out[:, :keep], x[:, :keep])
    if mode == "wrap" and expected_len > v:
        np.testing.assert_array_equal(out, np.pad(x, ((0, 0), (0, expected_len - v)), mode="wrap"))
    if mode == "constant":
        assert np.all(out[:, v:] == -7.0)


def test_common_length_pads_or_crops(caplog):
    short, long_ = _data(v=20), _data(v=70)
    a = FMRIPreprocessor(normalize="none", patch_size=16, length=64).fit(short)
    # as the original: wrap to whole patches (32) first, then wrap that vector to the common length
    np.testing.assert_array_equal(a.transform(short), pad_columns(pad_columns(short, 32, "wrap"), 64, "wrap"))
    np.testing.assert_array_equal(a.transform(short)[:, 32:52], short)
    with caplog.at_level(logging.WARNING):
        b = FMRIPreprocessor(normalize="none", patch_size=16, length=64).fit(long_)
    assert "cropping" in caplog.text
    np.testing.assert_array_equal(b.transform(long_), long_[:, :64])


def test_fewer_voxels_than_one_patch():
    with pytest.raises(DataError, match="fewer than one patch"):
        FMRIPreprocessor(patch_size=16).fit(_data(v=10), source="tiny.npz")
    with pytest.raises(DataError, match="fewer than one patch"):
        padded_length(10, 16)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_values_are_an_error_by_default(bad):
    x = _data()
    x[3, 5] = bad
    with pytest.raises(DataError) as info:
        FMRIPreprocessor().fit(x, source="subject.npz")
    msg = str(info.value)
    assert msg.startswith("subject.npz:") and "non-finite" in msg and "--nan-policy" in msg
    clean = FMRIPreprocessor().fit(_data())
    with pytest.raises(DataError, match="non-finite"):
        clean.transform(x)


def test_nan_policy_zero_and_drop():
    x = _data(v=20)
    x[2, 4] = np.nan
    x[7, 9] = np.inf
    zero = FMRIPreprocessor(patch_size=4, nan_policy="zero").fit(x)
    finite = x[np.isfinite(x)].astype(np.float64)
    assert zero.mean_ == pytest.approx(finite.mean()) and zero.std_ == pytest.approx(finite.std())
    out = zero.transform(x)
    assert np.isfinite(out).all() and out[2, 4] == 0 and out[7, 9] == 0

    drop = FMRIPreprocessor(patch_size=4, nan_policy="drop").fit(x)
    np.testing.assert_array_equal(drop.kept_voxels_, [i for i in range(20) if i not in (4, 9)])
    test = _data(v=20, seed=5)
    out = drop.transform(test)
    assert out.shape == (40, 20)  # 18 kept voxels, wrapped to 20
    np.testing.assert_allclose(
        out[:, :18], (np.delete(test, [4, 9], axis=1) - drop.mean_) / drop.std_, atol=1e-5
    )


def test_json_round_trip(tmp_path):
    x = _data(v=30)
    x[:, 2] = np.nan
    for kw in (dict(), dict(normalize="voxel", nan_policy="drop"), dict(pad_mode="constant", length=48)):
        pre = FMRIPreprocessor(patch_size=8, **({"nan_policy": "zero"} | kw)).fit(x)
        path = pre.save(tmp_path / "pre.json")
        back = FMRIPreprocessor.load(path)
        assert back.get_params() == pre.get_params()
        np.testing.assert_array_equal(back.transform(x), pre.transform(x))
    unfitted = FMRIPreprocessor.from_dict(FMRIPreprocessor(patch_size=8).to_dict())
    assert not unfitted.is_fitted


def test_json_errors(tmp_path):
    good = FMRIPreprocessor(patch_size=8).fit(_data()).to_dict()
    with pytest.raises(ConfigError, match="unknown preprocessing parameter"):
        FMRIPreprocessor.from_dict({**good, "params": {**good["params"], "zscore": True}})
    with pytest.raises(ConfigError, match="fitted"):
        FMRIPreprocessor.from_dict({**good, "fitted": {**good["fitted"], "std": -1.0}}, source="p.json")
    with pytest.raises(ConfigError, match="newer"):
        FMRIPreprocessor.from_dict({**good, "_format_version": 99})
    with pytest.raises(DataError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        load_preprocessor(tmp_path / "bad.json")


def test_bundle_subject_selection(tmp_path):
    a = FMRIPreprocessor(patch_size=8).fit(_data(v=20))
    write_json(tmp_path / "b.json", {"subjects": {"god/sbj_1": a.to_dict()}})
    assert load_preprocessor(tmp_path / "b.json", subject="god/sbj_1").n_voxels_in_ == 20
    assert load_preprocessor(tmp_path / "b.json", subject="sbj_1").n_voxels_in_ == 20
    with pytest.raises(ConfigError, match="choose a subject"):
        load_preprocessor(tmp_path / "b.json")


def test_fmri_dataset_in_and_out():
    ds = FMRIDataset(voxels=_data(v=21), subject="sbj_1", split="train", source="sbj_1.npz")
    pre = FMRIPreprocessor(patch_size=8).fit(ds)
    out = pre.transform_dataset(ds)
    assert out.num_voxels == 24 and out.subject == "sbj_1" and out.meta["preprocessing"]["fitted"]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    v=st.integers(4, 50),
    p=st.sampled_from([4, 8, 16]),
    mode=st.sampled_from(["wrap", "constant", "cut"]),
    extra=st.integers(0, 3),
)
def test_output_is_whole_patches(n, v, p, mode, extra):
    x = np.random.default_rng(v * 7 + n).standard_normal((n, v)).astype(np.float32)
    if v < p:
        with pytest.raises(DataError):
            FMRIPreprocessor(patch_size=p, pad_mode=mode).fit(x)
        return
    length = None if extra == 0 else p * extra
    pre = FMRIPreprocessor(patch_size=p, pad_mode=mode, length=length).fit(x)
    out = pre.transform(x)
    assert out.shape[1] % p == 0 and out.shape[1] == (length or padded_length(v, p, mode))
    assert np.isfinite(out).all()
    kept = padded_length(v, p, "cut") if mode == "cut" else v  # cut drops the last V mod p voxels first
    keep = min(kept, out.shape[1])
    np.testing.assert_allclose(out[:, :keep], ((x - pre.mean_) / pre.std_)[:, :keep], atol=1e-5)
