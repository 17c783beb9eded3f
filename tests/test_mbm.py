"""Masked brain model (stage A): configuration, masking, shapes, loss, saving and the fMRI encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mindvis.errors import CheckpointError, ConfigError, DataError
from mindvis.models.mbm import (
    FMRIEncoder,
    MaskedBrainModel,
    MBMConfig,
    interpolate_pos_embed,
    load_mbm,
    mbm_large_patch16,
    mbm_small,
    mbm_tiny,
    sincos_pos_table,
)

REFERENCE_KEYS = [
    Path(__file__).parent / "fixtures" / "mindvis_keys",
    Path(__file__).resolve().parents[2] / "shared" / "reference" / "mindvis" / "keys",
]


def _keys_dir() -> Path | None:
    return next((d for d in REFERENCE_KEYS if d.is_dir()), None)


def _read_key_list(path: Path, prefix: str = "") -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for line in path.read_text().splitlines():
        name, shape, _dtype = line.split("\t")
        if name.startswith(prefix):
            dims = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
            out.append((name[len(prefix) :], dims))
    return out


@pytest.fixture
def tiny() -> MaskedBrainModel:
    torch.manual_seed(0)
    return MaskedBrainModel(mbm_tiny(128)).eval()


# -- configuration ---------------------------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ConfigError, match="smaller than one patch") as info:
        MBMConfig(num_voxels=8, patch_size=16)
    assert info.value.field == "num_voxels"
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        MBMConfig(num_voxels=100, patch_size=16)
    with pytest.raises(ConfigError, match="divisible"):
        MBMConfig(num_voxels=64, embed_dim=30, num_heads=4)
    with pytest.raises(ConfigError, match="mask_ratio"):
        MBMConfig(num_voxels=64, mask_ratio=1.0)
    with pytest.raises(ConfigError):
        MBMConfig(num_voxels=True)
    with pytest.raises(ConfigError):
        MBMConfig(num_voxels=64, depth=0)
    with pytest.raises(ConfigError, match="focus_range"):
        MBMConfig(num_voxels=64, focus_range=(0, 128))
    with pytest.raises(ConfigError, match="focus_rate"):
        MBMConfig(num_voxels=64, focus_range=(0, 32), focus_rate=1.0)
    assert MBMConfig(num_voxels=4656).num_patches == 291


def test_config_json_round_trip():
    cfg = mbm_tiny(256, focus_range=(32, 96), focus_rate=0.8, mask_ratio=0.5)
    again = MBMConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert isinstance(again.focus_range, tuple)
    with pytest.raises(ConfigError, match="unknown"):
        MBMConfig.from_dict({**cfg.to_dict(), "embed_dims": 3})
    with pytest.raises(ConfigError, match="num_voxels"):
        MBMConfig.from_dict({"patch_size": 16})


def test_variants():
    large = mbm_large_patch16(4656)
    assert (large.embed_dim, large.depth, large.num_heads, large.mlp_ratio) == (1024, 24, 16, 1.0)
    assert (large.decoder_embed_dim, large.decoder_depth, large.decoder_num_heads) == (512, 8, 16)
    assert large.mask_ratio == 0.75 and large.num_patches == 291
    assert mbm_small(4656).embed_dim < large.embed_dim
    assert mbm_tiny(256, depth=3).depth == 3


# -- parameter names ---------------------------------------------------------------------------------------------


def test_parameter_names_match_original_layout():
    """Real-size key names, shapes and order against the original's key lists."""
    keys = _keys_dir()
    if keys is None:
        pytest.skip("reference key lists not available")
    expected = _read_key_list(keys / "mae_pretrain_checkpoint_model.txt")
    patch = expected[[n for n, _ in expected].index("patch_embed.proj.weight")][1][-1]
    num_voxels = (dict(expected)["pos_embed"][1] - 1) * patch
    with torch.device("meta"):
        model = MaskedBrainModel(mbm_large_patch16(num_voxels))
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected
    for name in ("finetuned_model_state_dict.txt", "finetuned_model_state_dict_global_pool_true.txt"):
        cond = _read_key_list(keys / name, prefix="cond_stage_model.mae.")
        with torch.device("meta"):
            enc = FMRIEncoder(mbm_large_patch16(num_voxels), global_pool="global_pool_true" in name)
        assert [(k, tuple(v.shape)) for k, v in enc.state_dict().items()] == cond


# -- masking ---------------------------------------------------------------------------------------------------


def test_random_masking_with_given_noise(tiny):
    N, L, D = 3, tiny.config.num_patches, 5
    x = torch.randn(N, L, D)
    noise = torch.rand(N, L)
    x_masked, mask, ids_restore = tiny.random_masking(x, 0.75, noise)
    keep = int(L * 0.25)
    assert x_masked.shape == (N, keep, D)
    assert torch.equal(mask.sum(1), torch.full((N,), float(L - keep)))
    # kept tokens are the ones with the smallest noise, in increasing-noise order
    order = noise.argsort(1)
    assert torch.equal(x_masked, torch.stack([x[n, order[n, :keep]] for n in range(N)]))
    assert torch.equal(mask.bool(), noise > noise.sort(1).values[:, keep - 1 : keep])
    # ids_restore inverts the shuffle
    assert torch.equal(order.gather(1, ids_restore), torch.arange(L).expand(N, L))
    again = tiny.random_masking(x, 0.75, noise)
    assert all(torch.equal(a, b) for a, b in zip(again, (x_masked, mask, ids_restore), strict=True))
    with pytest.raises(DataError, match="noise"):
        tiny.random_masking(x, 0.75, torch.rand(N, L + 1))


def test_focus_range_masking_is_weighted():
    """Focus masking removes range patches more often, with the marginals of sequential weighted sampling."""
    cfg = mbm_tiny(256, focus_range=(0, 64), focus_rate=0.8, mask_ratio=0.5)
    model = MaskedBrainModel(cfg)
    L, n = cfg.num_patches, 4000
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(n, L, generator=gen)
    _, mask, _ = model.random_masking(torch.zeros(n, L, 1), cfg.mask_ratio, noise)
    ours = mask.mean(0)
    # reference: weighted sampling without replacement of the removed patches (torch.multinomial)
    w = torch.full((L,), 1 - cfg.focus_rate)
    w[: 64 // cfg.patch_size] = cfg.focus_rate
    picks = torch.multinomial(w.expand(n, L), L - cfg.num_keep(), replacement=False, generator=gen)
    ref = torch.zeros(n, L).scatter_(1, picks, 1.0).mean(0)
    assert torch.allclose(ours, ref, atol=0.04), (ours, ref)
    assert ours[:4].min() > ours[4:].max()
    assert torch.equal(mask.sum(1), torch.full((n,), float(L - cfg.num_keep())))


# -- forward, loss, gradients ----------------------------------------------------------------------------------


def test_forward_shapes_and_loss(tiny):
    cfg = tiny.config
    x = torch.randn(4, cfg.num_voxels)
    noise = torch.rand(4, cfg.num_patches)
    out = tiny(x, noise=noise)
    keep = cfg.num_keep()
    assert out.latent.shape == (4, 1 + keep, cfg.embed_dim)
    assert out.pred.shape == (4, cfg.num_patches, cfg.patch_size)
    assert out.mask.shape == out.ids_restore.shape == (4, cfg.num_patches)
    # the loss is the MSE over removed patches only, against raw voxels
    target = x.reshape(4, cfg.num_patches, cfg.patch_size)
    per_patch = ((out.pred - target) ** 2).mean(-1)
    assert torch.allclose(out.loss, per_patch[out.mask.bool()].mean())
    # same result with [N, 1, V] input; kept-patch predictions do not enter the loss
    out3 = tiny(x.unsqueeze(1), noise=noise)
    assert torch.equal(out3.pred, out.pred)
    pred = out.pred.clone()
    pred[~out.mask.bool()] = 1e3
    assert torch.allclose(tiny.forward_loss(x, pred, out.mask), out.loss)
    assert tiny.forward_loss(x, out.pred, torch.zeros_like(out.mask)).item() == 0.0
    assert torch.equal(tiny.unpatchify(tiny.patchify(x)), x.unsqueeze(1))
    with pytest.raises(DataError, match="voxels"):
        tiny(torch.randn(2, cfg.num_voxels + cfg.patch_size))


def test_gradients_and_frozen_tables(tiny):
    tiny.train()
    x = torch.randn(2, tiny.config.num_voxels)
    tiny(x).loss.backward()
    assert tiny.pos_embed.grad is None and tiny.decoder_pos_embed.grad is None
    assert tiny.mask_token.grad is not None and tiny.mask_token.grad.abs().sum() > 0
    assert tiny.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in tiny.named_parameters() if p.requires_grad)


def test_sincos_table():
    t = sincos_pos_table(8, 5)
    assert t.shape == (6, 8) and torch.equal(t[0], torch.zeros(8))
    q, i = 3, 1
    w = 10000 ** (-i / 4)
    assert torch.isclose(
        t[1 + q, i], torch.tensor(float(torch.sin(torch.tensor(q * w, dtype=torch.float64))))
    )
    assert torch.isclose(
        t[1 + q, 4 + i], torch.tensor(float(torch.cos(torch.tensor(q * w, dtype=torch.float64))))
    )
    assert torch.equal(t[1, :4], torch.zeros(4)) and torch.equal(t[1, 4:], torch.ones(4))


# -- save / load -------------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip(tiny, tmp_path):
    out = tiny.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["_class_name"] == "MaskedBrainModel" and meta["num_voxels"] == tiny.config.num_voxels
    loaded = MaskedBrainModel.from_pretrained(out)
    assert loaded.config == tiny.config
    a, b = tiny.state_dict(), loaded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not loaded.pos_embed.requires_grad
    x, noise = torch.randn(2, tiny.config.num_voxels), torch.rand(2, tiny.config.num_patches)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, noise=noise).pred, tiny(x, noise=noise).pred)
    assert load_mbm(out).config == tiny.config


def test_from_pretrained_errors(tiny, tmp_path):
    out = tiny.save_pretrained(tmp_path / "m")
    raw = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        MaskedBrainModel.from_pretrained(out)
    (out / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        MaskedBrainModel.from_pretrained(out)
    (out / "model.safetensors").write_bytes(raw)
    # a config that does not fit the weights
    meta = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**meta, "decoder_depth": meta["decoder_depth"] + 1}))
    with pytest.raises(CheckpointError, match="missing"):
        MaskedBrainModel.from_pretrained(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        MaskedBrainModel.from_pretrained(out)
    (out / "config.json").unlink()
    with pytest.raises(CheckpointError):
        MaskedBrainModel.from_pretrained(out)
    with pytest.raises(CheckpointError):
        MaskedBrainModel.from_pretrained(tmp_path / "nowhere")
    (out / "config.json").write_text(json.dumps({**meta, "patch_size": 0}))
    with pytest.raises(ConfigError, match="patch_size"):
        MaskedBrainModel.from_pretrained(out)


# -- fMRI encoder --------------------------------------------------------------------------------------------------


def test_encoder_from_model(tiny):
    enc = FMRIEncoder.from_mbm(tiny).eval()
    x = torch.randn(3, tiny.config.num_voxels)
    y = enc(x)
    assert y.shape == (3, tiny.config.num_patches, tiny.config.embed_dim)
    assert enc(x[:1]).shape == (1, tiny.config.num_patches, tiny.config.embed_dim)
    sd, msd = enc.state_dict(), tiny.state_dict()
    for k, v in sd.items():
        if k == "mask_token":
            assert v.shape == (1, 1, tiny.config.embed_dim)  # encoder width, not loaded
        else:
            assert torch.equal(v, msd[k]), k
    # the tokens are the MAE encoder run without masking and without the cls token
    with torch.no_grad():
        h = tiny.patch_embed(x.unsqueeze(1)) + tiny.pos_embed[:, 1:]
        for blk in tiny.blocks:
            h = blk(h)
        assert torch.allclose(y, tiny.norm(h), atol=1e-6)
    gp = FMRIEncoder.from_mbm(tiny, global_pool=True, original_quirks=False).eval()
    with torch.no_grad():
        assert torch.allclose(gp(x), tiny.norm(h.mean(1, keepdim=True)), atol=1e-6)


def test_encoder_load_report_and_quirk(tiny):
    enc = FMRIEncoder(tiny.config, global_pool=True)
    report = enc.load_mbm_state_dict(tiny.state_dict(), original_quirks=True)
    assert "mask_token" in report.skipped and "norm.weight" in report.skipped
    assert "blocks.0.norm1.weight" in report.missing and "mask_token" in report.missing
    assert any(k.startswith("decoder_") for k in report.unexpected)
    assert torch.equal(enc.blocks[0].norm1.weight, torch.ones(tiny.config.embed_dim))
    report2 = FMRIEncoder(tiny.config, global_pool=True).load_mbm_state_dict(
        tiny.state_dict(), original_quirks=False
    )
    assert report2.missing == ["mask_token"]


def test_encoder_pos_embed_interpolation(tiny, tmp_path):
    L_old = tiny.config.num_patches
    new_voxels = tiny.config.num_voxels * 2 + tiny.config.patch_size  # 2L + 1 patches
    enc = FMRIEncoder.from_mbm(tiny, num_voxels=new_voxels)
    L_new = enc.num_patches
    assert enc.config.num_voxels == new_voxels and enc.pos_embed.shape == (
        1,
        L_new + 1,
        tiny.config.embed_dim,
    )
    assert torch.equal(enc.pos_embed[0, 0], tiny.pos_embed[0, 0])  # cls row kept
    src = [min(int(j * L_old / L_new), L_old - 1) for j in range(L_new)]  # nearest, as F.interpolate
    assert torch.equal(enc.pos_embed[0, 1:], tiny.pos_embed[0, 1:][src])
    assert enc(torch.randn(2, new_voxels)).shape == (2, L_new, tiny.config.embed_dim)
    # the same through a saved folder
    tiny.save_pretrained(tmp_path / "m")
    enc2 = FMRIEncoder.from_mbm(tmp_path / "m", num_voxels=new_voxels)
    assert torch.equal(enc2.pos_embed, enc.pos_embed)
    # shrinking works too, and equal sizes give the table itself
    pe = tiny.pos_embed.detach()
    assert interpolate_pos_embed(pe, L_old) is pe
    assert interpolate_pos_embed(pe, L_old // 2).shape == (1, L_old // 2 + 1, pe.shape[-1])


def test_encoder_save_round_trip_and_errors(tiny, tmp_path):
    enc = FMRIEncoder.from_mbm(tiny, global_pool=True)
    enc.save_pretrained(tmp_path / "e")
    again = FMRIEncoder.from_pretrained(tmp_path / "e")
    assert again.global_pool and all(
        torch.equal(a, b) for a, b in zip(enc.state_dict().values(), again.state_dict().values(), strict=True)
    )
    with pytest.raises(DataError):
        enc(torch.randn(2, 3, tiny.config.num_voxels))
    with pytest.raises(CheckpointError, match="shapes"):
        FMRIEncoder(mbm_tiny(tiny.config.num_voxels, embed_dim=32)).load_mbm_state_dict(tiny.state_dict())
    with pytest.raises(CheckpointError):
        FMRIEncoder.from_mbm(tmp_path / "missing.pth")
