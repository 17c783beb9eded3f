"""Parity of the stage-A model with the original MinD-Vis implementation (golden fixtures).

The fixture folder is ``$MINDVIS_PARITY_DIR`` or ``tests/fixtures/mindvis_tiny``. Every size, setting and
seed is read from the files (the pickled config, the tensor shapes, the golden arrays), so the same test
runs on another fixture set. A missing folder fails the test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import parity_dir
from mindvis.convert.mbm import convert_mbm_checkpoint
from mindvis.errors import CheckpointError, OutputExistsError
from mindvis.models.folder import load_state_dict_checked
from mindvis.models.mbm import (
    FMRIEncoder,
    MaskedBrainModel,
    load_original_mbm_checkpoint,
)

# Suggested tolerances for a float32 CPU reimplementation (reference README, section 9).
RTOL = 1e-5
ATOL = 1e-5


def test_fixture_folder_exists():
    d = parity_dir()
    assert d.is_dir(), f"parity fixture folder {d} is missing (set MINDVIS_PARITY_DIR or restore the copy)"


@pytest.fixture(scope="module")
def fixture_dir():
    d = parity_dir()
    assert d.is_dir(), f"parity fixture folder {d} is missing (set MINDVIS_PARITY_DIR or restore the copy)"
    for name in ("mae_checkpoint.pth", "golden.npz"):
        assert (d / name).is_file(), f"parity fixture {d / name} is missing"
    return d


@pytest.fixture(scope="module")
def golden(fixture_dir):
    with np.load(fixture_dir / "golden.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def original(fixture_dir):
    return load_original_mbm_checkpoint(fixture_dir / "mae_checkpoint.pth")


def _close(actual: torch.Tensor, expected: np.ndarray, name: str) -> None:
    a = actual.detach().cpu().numpy()
    assert a.shape == expected.shape, f"{name}: shape {a.shape} vs golden {expected.shape}"
    np.testing.assert_allclose(a, expected, rtol=RTOL, atol=ATOL, err_msg=name)


def _set_fused_attention(module: torch.nn.Module, fused: bool) -> None:
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


def test_sizes_come_from_the_files(original, golden):
    config, state, extra = original
    orig = extra["original_config"]
    assert extra["config_class"] == "Config_MBM_fMRI"
    # every size agrees between the pickled config, the tensors and the golden arrays
    assert config.num_voxels == (state["pos_embed"].shape[1] - 1) * config.patch_size
    assert config.num_voxels == orig["num_voxels"] == golden["fmri"].shape[-1]
    for name in ("patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_num_heads"):
        assert getattr(config, name) == orig[name], name
    assert config.decoder_depth == len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")})
    assert golden["mae_latent"].shape[-1] == config.embed_dim
    assert golden["mae_pred"].shape[1:] == (config.num_patches, config.patch_size)
    assert golden["fmri_encoder_gp0"].shape[1:] == (config.num_patches, config.embed_dim)
    assert isinstance(extra["epoch"], int) and 0 <= extra["epoch"] < orig["num_epoch"]


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit-attention"])
def test_masked_forward_matches_original(original, golden, fused):
    config, state, _ = original
    model = MaskedBrainModel(config).eval()
    load_state_dict_checked(model, state)
    _set_fused_attention(model, fused)
    x = torch.from_numpy(golden["fmri"])
    noise = torch.from_numpy(golden["mae_noise"])
    # the golden run used the config's mask ratio; the latent's length must agree with it
    assert golden["mae_latent"].shape[1] == 1 + config.num_keep()
    with torch.no_grad():
        out = model(x, mask_ratio=config.mask_ratio, noise=noise)
    np.testing.assert_array_equal(out.ids_restore.numpy(), golden["mae_ids_restore"])
    np.testing.assert_array_equal(out.mask.numpy(), golden["mae_mask"])
    _close(out.latent, golden["mae_latent"], "mae_latent")
    _close(out.pred, golden["mae_pred"], "mae_pred")
    _close(out.loss, golden["mae_loss"], "mae_loss")
    # the same result from 2-D input [N, V]
    with torch.no_grad():
        out2 = model(x.reshape(x.shape[0], -1), mask_ratio=config.mask_ratio, noise=noise)
    assert torch.equal(out2.pred, out.pred)


@pytest.mark.parametrize("global_pool", [False, True], ids=["gp0", "gp1"])
def test_fmri_encoder_matches_original(fixture_dir, golden, global_pool):
    encoder = FMRIEncoder.from_mbm(fixture_dir / "mae_checkpoint.pth", global_pool=global_pool).eval()
    x = torch.from_numpy(golden["fmri"])
    with torch.no_grad():
        y = encoder(x)
    _close(y, golden[f"fmri_encoder_gp{int(global_pool)}"], f"fmri_encoder_gp{int(global_pool)}")
    if global_pool:
        # the norm-skipping quirk: every LayerNorm stays at 1 / 0
        for name, p in encoder.named_parameters():
            if "norm" in name:
                expected = torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)
                assert torch.equal(p, expected), name


def test_global_pool_without_quirk_differs(fixture_dir, golden, original):
    """Loading the norms properly changes the output, so the golden gp1 really pins the quirk."""
    _, state, _ = original
    if all(
        torch.equal(v, torch.ones_like(v)) or torch.equal(v, torch.zeros_like(v))
        for k, v in state.items()
        if "norm" in k
    ):
        pytest.fail("fixture norms are trivial; the gp1 quirk cannot be told apart")
    encoder = FMRIEncoder.from_mbm(
        fixture_dir / "mae_checkpoint.pth", global_pool=True, original_quirks=False
    )
    with torch.no_grad():
        y = encoder.eval()(torch.from_numpy(golden["fmri"])).numpy()
    assert np.abs(y - golden["fmri_encoder_gp1"]).max() > 100 * ATOL
    assert torch.equal(encoder.norm.weight, state["norm.weight"])


def test_encoder_from_2d_single_sample(fixture_dir, golden):
    encoder = FMRIEncoder.from_mbm(fixture_dir / "mae_checkpoint.pth").eval()
    x = torch.from_numpy(golden["fmri"][:1, 0])  # [1, V]
    with torch.no_grad():
        y = encoder(x)
    _close(y, golden["fmri_encoder_gp0"][:1], "fmri_encoder_gp0[0]")


def test_converted_file_loads_strict(fixture_dir, golden, original, tmp_path):
    config, state, extra = original
    out = convert_mbm_checkpoint(fixture_dir / "mae_checkpoint.pth", tmp_path / "converted")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "source.json"]
    weights = load_file(str(out / "model.safetensors"))
    model = MaskedBrainModel(config)
    model.load_state_dict(weights, strict=True)
    assert set(weights) == set(state)
    assert list(model.state_dict()) == list(state)  # original key names in the original order
    for k, v in state.items():
        assert torch.equal(weights[k], v), k
    # and our loader reproduces the golden forward from the converted folder
    loaded = MaskedBrainModel.from_pretrained(out).eval()
    assert loaded.config == config
    with torch.no_grad():
        res = loaded(torch.from_numpy(golden["fmri"]), noise=torch.from_numpy(golden["mae_noise"]))
    _close(res.pred, golden["mae_pred"], "mae_pred (converted)")
    # refusing to overwrite leaves the folder as it was
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError):
        convert_mbm_checkpoint(fixture_dir / "mae_checkpoint.pth", out)
    assert (out / "model.safetensors").read_bytes() == before
    assert convert_mbm_checkpoint(fixture_dir / "mae_checkpoint.pth", out, overwrite=True) == out


def test_truncated_original_checkpoint(fixture_dir, tmp_path):
    raw = (fixture_dir / "mae_checkpoint.pth").read_bytes()
    for i, cut in enumerate((len(raw) // 2, len(raw) - 100, 64)):
        bad = tmp_path / f"cut{i}.pth"
        bad.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError) as info:
            load_original_mbm_checkpoint(bad)
        assert str(bad) in str(info.value)
    flipped = bytearray(raw)
    mid = len(raw) // 2
    flipped[mid : mid + 4096] = bytes(4096)
    bad = tmp_path / "zeroed.pth"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError):
        convert_mbm_checkpoint(bad, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_state_dict_that_does_not_fit(original, tmp_path):
    config, state, _ = original
    partial = {k: v for k, v in state.items() if not k.startswith("decoder_pred")}
    torch.save({"model": partial, "epoch": 0}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="decoder_pred"):
        load_original_mbm_checkpoint(
            tmp_path / "partial.pth",
            overrides={"num_heads": config.num_heads, "decoder_num_heads": config.decoder_num_heads},
        )
    wrong = dict(state)
    wrong["norm.weight"] = torch.ones(config.embed_dim + 1)
    torch.save({"model": wrong}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="norm.weight"):
        load_original_mbm_checkpoint(
            tmp_path / "wrong.pth",
            overrides={"num_heads": config.num_heads, "decoder_num_heads": config.decoder_num_heads},
        )
    # a bare state dict has no head counts: a clear error, not a guess
    torch.save(dict(state), tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match="num_heads"):
        load_original_mbm_checkpoint(tmp_path / "bare.pth")
    cfg, _, extra = load_original_mbm_checkpoint(
        tmp_path / "bare.pth",
        overrides={"num_heads": config.num_heads, "decoder_num_heads": config.decoder_num_heads},
    )
    # every size comes from the tensors (masking settings, absent from a bare state dict, take defaults)
    sizes = (
        "num_voxels",
        "patch_size",
        "embed_dim",
        "depth",
        "decoder_embed_dim",
        "decoder_depth",
        "mlp_ratio",
    )
    assert all(getattr(cfg, f) == getattr(config, f) for f in sizes)
    assert extra["epoch"] is None
