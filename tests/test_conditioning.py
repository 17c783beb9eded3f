"""The double conditioner, the class embedder, the LDM configs and the DCLDM training helpers (tiny sizes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mindvis.errors import ConfigError, DataError
from mindvis.models.conditioning import (
    ClassEmbedder,
    ClassEmbedderConfig,
    Conditioning,
    DCConditioner,
    DCConditionerConfig,
)
from mindvis.models.ldm import DCLDM, LDMConfig, UNetConfig, VQConfig, ldm_preset

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _cfg(**kw) -> DCConditionerConfig:
    base = dict(num_tokens=16, token_dim=24, context_dim=32, time_embed_dim=40)
    return DCConditionerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_model() -> DCLDM:
    from mindvis.models.mbm import FMRIEncoder, mbm_tiny

    torch.manual_seed(0)
    enc = FMRIEncoder(mbm_tiny(64), global_pool=False)
    return DCLDM.for_fmri(ldm_preset("tiny"), enc).eval()


# ---- DCConditioner ---------------------------------------------------------------------------------------


def test_token_path_shapes():
    c = DCConditioner(_cfg())
    out = c(torch.randn(3, 16, 24))
    assert out.context.shape == (3, 77, 32)
    assert out.time_cond.shape == (3, 40)
    assert list(dict(c.named_parameters())) == [
        "channel_mapper.0.weight",
        "channel_mapper.0.bias",
        "channel_mapper.1.weight",
        "channel_mapper.1.bias",
        "dim_mapper.weight",
        "dim_mapper.bias",
        "time_mapper.0.weight",
        "time_mapper.0.bias",
        "time_mapper.1.weight",
        "time_mapper.1.bias",
        "time_mapper.2.weight",
        "time_mapper.2.bias",
    ]
    assert c.channel_mapper[0].weight.shape == (8, 16, 1) and c.channel_mapper[1].weight.shape == (77, 8, 1)
    assert c.time_mapper[0].weight.shape == (38, 77, 1) and c.time_mapper[1].weight.shape == (1, 38, 1)


def test_channel_mapper_is_linear_over_tokens():
    """No nonlinearity between the two token convs: the map is affine in the tokens."""
    c = DCConditioner(_cfg(use_time_cond=False))
    a, b = torch.randn(1, 16, 24), torch.randn(1, 16, 24)
    mid = c.context_from_tokens((a + b) / 2)
    assert torch.allclose(mid, (c.context_from_tokens(a) + c.context_from_tokens(b)) / 2, atol=1e-5)


def test_global_pool_path():
    c = DCConditioner(_cfg(num_tokens=1, global_pool=True))
    assert c.channel_mapper is None and isinstance(c.time_mapper, torch.nn.Linear)
    out = c(torch.randn(2, 1, 24))
    assert out.context.shape == (2, 1, 32) and out.time_cond.shape == (2, 40)


def test_ablations():
    tokens = torch.randn(2, 16, 24)
    no_time = DCConditioner(_cfg(use_time_cond=False))
    out = no_time(tokens)
    assert out.time_cond is None and no_time.time_dim is None and no_time.time_mapper is None
    time_only = DCConditioner(_cfg(use_cross_attn=False))
    out = time_only(tokens)
    assert out.context.shape == (2, 1, 32) and not out.context.any()
    assert not torch.allclose(out.time_cond[0], out.time_cond[1])  # the time path still sees the fMRI
    with pytest.raises(ConfigError):
        _cfg(use_time_cond=False, use_cross_attn=False)


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(global_pool=True), "num_tokens"),
        (dict(num_tokens=1), "num_tokens"),
        (dict(context_dim=0), "context_dim"),
        (dict(use_time_cond="yes"), "use_time_cond"),
    ],
)
def test_config_validation(kw, field):
    with pytest.raises(ConfigError) as e:
        _cfg(**kw)
    assert e.value.field == field


def test_wrong_token_shape():
    with pytest.raises(DataError):
        DCConditioner(_cfg())(torch.randn(2, 15, 24))


def test_token_standardisation():
    torch.manual_seed(0)
    plain = DCConditioner(_cfg())
    std = DCConditioner(_cfg(standardize_tokens=True))
    std.load_state_dict(plain.state_dict(), strict=False)
    assert {"token_mean", "token_std"} <= set(std.state_dict()) and "token_mean" not in plain.state_dict()
    # a large shared part, small per-sample variation, and one constant channel
    tokens = 5.0 + 0.1 * torch.randn(200, 16, 24)
    tokens[:, 3, 7] = 2.0
    x = tokens[:4]
    # before fitting: identity (mean 0, std 1)
    assert torch.allclose(std(x).context, plain(x).context)
    std.fit_token_stats(tokens)
    z = (x - tokens.mean(0)) / std.token_std
    assert torch.allclose(std(x).context, plain(z).context, atol=1e-5)
    # the constant channel is divided by the floor, not by ~0
    floor = 0.1 * float(tokens.std(0).mean())
    assert float(std.token_std[3, 7]) == pytest.approx(floor, rel=1e-4)
    assert float(std.token_std.min()) >= floor * (1 - 1e-6)
    with pytest.raises(ConfigError):
        plain.fit_token_stats(tokens)
    with pytest.raises(DataError):
        std.fit_token_stats(tokens[:1])
    # scaled to a wanted spread of the context across samples
    for want in (0.3, 2.0):
        std.fit_token_stats(tokens, context_std=want)
        got = float(std(tokens).context.std(dim=0).mean())
        assert got == pytest.approx(want, rel=1e-3)
    with pytest.raises(ConfigError):
        std.fit_token_stats(tokens, context_std=0.0)


def test_context_basis_confines_every_token_to_a_mixture_of_the_rows():
    torch.manual_seed(0)
    k = 5
    cond = DCConditioner(_cfg(basis_size=k))
    assert tuple(cond.basis.shape) == (k, 32) and cond.dim_mapper.out_features == k
    basis = torch.randn(k, 32)
    cond.set_basis(basis)
    tokens = torch.randn(6, 16, 24)
    out = cond(tokens)
    assert out.context.shape == (6, 77, 32) and out.time_cond.shape == (6, 40)
    weights = out.weights
    assert weights.shape == (6, 77, k) and DCConditioner(_cfg())(tokens).weights is None
    assert torch.allclose(weights.sum(-1), torch.ones(6, 77)) and (weights >= 0).all()
    assert torch.allclose(out.context, weights @ basis, atol=1e-6)
    logits = cond.dim_mapper(cond.channel_mapper(tokens))
    assert torch.allclose(weights, torch.softmax(logits, -1), atol=1e-6)
    # a saturated mixture is exactly one row
    with torch.no_grad():
        cond.dim_mapper.weight.zero_()
        cond.dim_mapper.bias.copy_(torch.tensor([0.0, 0.0, 80.0, 0.0, 0.0]))
    assert torch.allclose(cond(tokens).context, basis[2].expand(6, 77, 32), atol=1e-5)
    # the basis is saved with the weights
    again = DCConditioner(_cfg(basis_size=k))
    again.load_state_dict(cond.state_dict())
    assert torch.equal(again.basis, basis)
    # guidance's null context: zeros until set, then the given row in every token
    assert torch.equal(cond.null_conditioning(2, tokens).context, torch.zeros(2, 77, 32))
    null = torch.randn(32)
    cond.set_basis(basis, null=null)
    nc = cond.null_conditioning(2, tokens)
    assert torch.equal(nc.context, null.expand(2, 77, 32)) and torch.equal(nc.time_cond, torch.zeros(2, 40))
    with pytest.raises(DataError):
        cond.set_basis(torch.randn(k + 1, 32))
    with pytest.raises(DataError):
        cond.set_basis(basis, null=torch.randn(31))
    with pytest.raises(ConfigError):
        DCConditioner(_cfg()).set_basis(basis)
    for bad in (1, -1, True):
        with pytest.raises(ConfigError) as e:
            _cfg(basis_size=bad)
        assert e.value.field == "basis_size"
    with pytest.raises(ConfigError, match="basis"):
        DCConditioner(_cfg(basis_size=k, standardize_tokens=True)).fit_token_stats(tokens, context_std=1.0)


def test_config_round_trip():
    c = _cfg(global_pool=True, num_tokens=1, use_cross_attn=False)
    assert DCConditionerConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError):
        DCConditionerConfig.from_dict({**c.to_dict(), "bogus": 1})


def test_conditioning_helpers():
    c = Conditioning(torch.arange(6.0).view(2, 3, 1), torch.arange(4.0).view(2, 2))
    r = c.repeat_interleave(3)
    assert (
        r.context.shape == (6, 3, 1)
        and torch.equal(r.context[2], c.context[0])
        and torch.equal(r.context[3], c.context[1])
    )
    assert torch.equal(c.index(torch.tensor([1])).time_cond, c.time_cond[1:])
    both = Conditioning.cat([c, c])
    assert len(both) == 4 and both.time_cond.shape == (4, 2)
    assert Conditioning.cat([c, Conditioning(c.context)]).time_cond is None


def test_class_embedder():
    e = ClassEmbedder(ClassEmbedderConfig(n_classes=5, embed_dim=8))
    out = e(torch.tensor([0, 4]))
    assert out.context.shape == (2, 1, 8) and out.time_cond is None
    assert torch.equal(out.context[1, 0], e.embedding.weight[4])
    with pytest.raises(DataError):
        e(torch.tensor([5]))
    with pytest.raises(DataError):
        e(torch.tensor([0.5]))
    assert torch.equal(e.null_conditioning(1, out.context).context[0, 0], e.embedding.weight[4])


# ---- configs ---------------------------------------------------------------------------------------------


def test_presets_build_consistent_configs():
    for name in ("tiny", "small", "label2img"):
        cfg = ldm_preset(name)
        assert cfg.unet.sample_size == cfg.vq.latent_size
        assert LDMConfig(**{"unet": cfg.unet.to_dict(), "vq": cfg.vq.to_dict()}) == cfg
    real = ldm_preset("label2img")
    assert real.unet.block_channels == (192, 384, 576, 960)
    assert real.unet.attention_levels == (False, True, True, True)
    assert real.vq.resolution == 256 and real.vq.n_embed == 8192 and real.vq.downsample_factor == 4
    with pytest.raises(ConfigError):
        ldm_preset("huge")


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(model_channels=48), "model_channels"),
        (dict(attention_resolutions=(16,)), "attention_resolutions"),
        (dict(sample_size=12), "sample_size"),
        (dict(num_heads=5), "num_heads"),
        (dict(channel_mult=()), "channel_mult"),
    ],
)
def test_unet_config_validation(kw, field):
    with pytest.raises(ConfigError) as e:
        dataclasses.replace(ldm_preset("tiny").unet, **kw)
    assert e.value.field == field


def test_vq_and_ldm_config_validation():
    with pytest.raises(ConfigError):
        VQConfig(attn_resolutions=(16,))
    with pytest.raises(ConfigError):
        VQConfig(resolution=66)
    with pytest.raises(ConfigError) as e:
        LDMConfig(
            unet=UNetConfig(
                sample_size=32, model_channels=32, channel_mult=(1, 1), attention_resolutions=(2,)
            ),
            vq=VQConfig(resolution=64, ch=32, ch_mult=(1, 1, 1)),
        )
    assert e.value.field == "unet.sample_size"
    with pytest.raises(ConfigError):
        UNetConfig.from_dict({"model_channels": 32, "nonsense": 1})


# ---- DCLDM -----------------------------------------------------------------------------------------------


def test_time_vector_reaches_the_unet(tiny_model):
    m = tiny_model
    cond = m.condition(torch.randn(2, 64))
    x, t = torch.randn(2, *m.latent_shape), torch.tensor([10, 500])
    with torch.no_grad():
        base = m.eps(x, t, cond)
        shifted = m.eps(x, t, Conditioning(cond.context, cond.time_cond + 1.0))
        again = m.eps(x, t, Conditioning(cond.context, cond.time_cond))
    assert torch.equal(base, again)
    assert not torch.allclose(base, shifted)


def test_model_consistency_checks():
    from mindvis.models.mbm import FMRIEncoder, mbm_tiny

    cfg = ldm_preset("tiny")
    enc = FMRIEncoder(mbm_tiny(32))
    cc = DCConditionerConfig(
        num_tokens=2, token_dim=64, context_dim=cfg.unet.context_dim, time_embed_dim=cfg.unet.time_embed_dim
    )
    with pytest.raises(ConfigError) as e:  # the UNet has no time input but the conditioner gives one
        DCLDM(dataclasses.replace(cfg.unet, time_cond=False), cfg.vq, DCConditioner(cc), fmri_encoder=enc)
    assert e.value.field == "time_cond"
    with pytest.raises(ConfigError):  # context width mismatch
        DCLDM(cfg.unet, cfg.vq, DCConditioner(dataclasses.replace(cc, context_dim=32)), fmri_encoder=enc)
    with pytest.raises(ConfigError):  # an fMRI model needs a DCConditioner
        DCLDM(cfg.unet, cfg.vq, ClassEmbedder(ClassEmbedderConfig(3, 64)), fmri_encoder=enc)


def test_trainable_presets(tiny_model):
    m = tiny_model
    orig = [n for n, _ in m.named_trainable_parameters("original")]
    assert "fmri_encoder.pos_embed" in orig
    assert "fmri_encoder.cls_token" not in orig and "fmri_encoder.mask_token" not in orig
    unet_part = [n for n in orig if n.startswith("unet.")]
    assert unet_part and all(".attn2." in n or ".transformer_blocks.0.norm2." in n for n in unet_part)
    n_attn = sum(1 for n, _ in m.unet.named_modules() if n.endswith(".attn2"))
    assert sum(1 for n in unet_part if ".attn2." in n) == 5 * n_attn  # to_q, to_k, to_v, to_out.0 w + b
    assert not any(".resnets." in n for n in orig)
    assert any(n.startswith("conditioner.time_mapper") for n in orig)
    cond = [n for n, _ in m.named_trainable_parameters("cond_stage")]
    assert set(cond) < set(orig) and all(n.startswith(("fmri_encoder.", "conditioner.")) for n in cond)
    every = m.named_trainable_parameters("all")
    assert any(n.startswith("vq.") for n, _ in every)
    assert not any(n.startswith("vq.") for n, _ in m.named_trainable_parameters("unet_and_cond"))
    with pytest.raises(ConfigError):
        m.trainable_parameters("bogus")  # type: ignore[arg-type]


def test_training_loss_and_gradients(tiny_model):
    m = tiny_model
    names = set(m.set_trainable("original"))
    m.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(0)
    fmri, images = torch.randn(2, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    out = m.training_loss(fmri, images, generator=g)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.t.shape == (2,) and int(out.t.min()) >= 0 and int(out.t.max()) < m.num_timesteps
    out.loss.backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got <= names
    assert any(n.startswith("fmri_encoder.blocks") for n in got) and any(".attn2." in n for n in got)
    # reproducible with the same t and noise
    again = m.training_loss(fmri, images, t=out.t, noise=out.noise)
    assert torch.allclose(again.loss, out.loss)
    m.set_trainable("all")
    m.zero_grad(set_to_none=True)
