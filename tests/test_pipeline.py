"""MindVisPipeline (batched, seeded generation; save/load) and the samplers, on a tiny random model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mindvis.errors import CheckpointError, ConfigError, DataError, OutputExistsError
from mindvis.models.conditioning import ClassEmbedder, ClassEmbedderConfig
from mindvis.models.ldm import DCLDM, ldm_preset
from mindvis.pipeline import MindVisPipeline
from mindvis.sampling import (
    NoiseSchedule,
    ddim_sample,
    ddim_tables,
    dpmsolver_sample,
    model_calls,
    plms_sample,
    run_sampler,
    sampler_timesteps,
)

V = 64  # voxels of the tiny encoder


pytestmark = pytest.mark.usefixtures("one_thread_module")


def _tame(model: DCLDM) -> DCLDM:
    # A random UNet's eps is far from unit scale; shrink the output conv so that latents stay moderate.
    with torch.no_grad():
        model.unet.conv_out.weight.mul_(0.05)
    return model


@pytest.fixture(scope="module")
def pipe() -> MindVisPipeline:
    from mindvis.models.mbm import FMRIEncoder, mbm_tiny

    torch.manual_seed(0)
    enc = FMRIEncoder(mbm_tiny(V), global_pool=False)
    return MindVisPipeline(_tame(DCLDM.for_fmri(ldm_preset("tiny"), enc)))


@pytest.fixture(scope="module")
def fmri() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((3, V)).astype(np.float32)


# ---- schedule and samplers -------------------------------------------------------------------------------


def test_timesteps_follow_the_original():
    np.testing.assert_array_equal(sampler_timesteps(10), np.arange(1, 1000, 100))
    ts = sampler_timesteps(250)
    assert len(ts) == 250 and ts[0] == 1 and ts[-1] == 997
    # when S does not divide T: the first S of the original's range(0, T, T // S) + 1
    np.testing.assert_array_equal(sampler_timesteps(30), (np.arange(0, 1000, 33) + 1)[:30])
    np.testing.assert_array_equal(sampler_timesteps(3), [1, 334, 667])
    assert sampler_timesteps(999)[-1] == 999
    assert (
        model_calls("plms", 10) == 11 and model_calls("ddim", 10) == 10 and model_calls("dpmsolver++", 7) == 7
    )
    for bad in (0, 1000, 2.5, True):
        with pytest.raises(ConfigError):
            sampler_timesteps(bad)  # type: ignore[arg-type]


def test_schedule_tables():
    s = NoiseSchedule()
    acp = s.alphas_cumprod_tensor()
    assert acp.dtype == torch.float32 and float(acp[0]) == pytest.approx(0.9985)
    tab = ddim_tables(s, 10, eta=0.0)
    assert float(tab.alphas_prev[0]) == float(acp[0])  # the last step goes to acp[0], not 1
    assert not tab.sigmas.any()
    assert ddim_tables(s, 10, eta=1.0).sigmas.gt(0).all()
    with pytest.raises(ConfigError):
        ddim_tables(s, 10, eta=-1)


def _toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * x + 0.001 * t.float().view(-1, 1, 1, 1)


def test_samplers_are_pure_and_deterministic():
    s = NoiseSchedule()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    tab = ddim_tables(s, 8)
    for fn in (
        lambda: plms_sample(_toy_eps, x, tab),
        lambda: ddim_sample(_toy_eps, x, tab),
        lambda: dpmsolver_sample(_toy_eps, x, s, 8),
    ):
        a, b = fn(), fn()
        assert torch.equal(a, b) and torch.isfinite(a).all() and a.shape == x.shape
    # per-sample independence: the first item alone gives the same result
    assert torch.allclose(ddim_sample(_toy_eps, x[:1], tab), ddim_sample(_toy_eps, x, tab)[:1])
    with pytest.raises(ConfigError):
        ddim_sample(_toy_eps, x, ddim_tables(s, 8, eta=1.0))  # eta > 0 needs a noise source
    with pytest.raises(ConfigError):
        run_sampler("plms", _toy_eps, x, s, 8, eta=0.5)
    with pytest.raises(ConfigError):
        run_sampler("euler", _toy_eps, x, s, 8)


def test_plms_reports_each_step():
    states = []
    plms_sample(_toy_eps, torch.zeros(1, 1, 2, 2), ddim_tables(NoiseSchedule(), 5), callback=states.append)
    assert [st.t for st in states] == [801, 601, 401, 201, 1] and [st.index for st in states] == list(
        range(5)
    )


# ---- pipeline --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["plms", "ddim", "dpmsolver++"])
def test_samplers_run_batched_and_reproducible(pipe, fmri, sampler):
    out = pipe(fmri[:2], num_samples=2, num_inference_steps=3, sampler=sampler, seed=7, progress=False)
    res = pipe.image_size
    assert out.images.shape == (2, 2, res, res, 3) and out.images.dtype == np.uint8
    assert out.latents.shape == (2, 2, *pipe.model.latent_shape)
    assert out.seeds == [7, 8] and out.sampler == sampler
    again = pipe(fmri[:2], num_samples=2, num_inference_steps=3, sampler=sampler, seed=7, progress=False)
    assert np.array_equal(out.images, again.images) and torch.equal(out.latents, again.latents)
    other = pipe(fmri[:2], num_samples=2, num_inference_steps=3, sampler=sampler, seed=8, progress=False)
    assert not torch.allclose(out.latents, other.latents)
    assert not torch.allclose(out.latents[0, 0], out.latents[0, 1])  # samples of one item differ


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("plms", 0.0)])
def test_item_independent_of_batch_composition(pipe, fmri, sampler, eta):
    kw = dict(num_samples=3, num_inference_steps=3, sampler=sampler, eta=eta, progress=False)
    full = pipe(fmri, seed=100, **kw)
    alone = pipe(fmri[1:2], seed=101, **kw)  # item 1 of the first call used seed 101
    split = pipe(fmri, seed=100, batch_size=2, **kw)  # chunks cut through an item's samples
    assert torch.allclose(full.latents[1], alone.latents[0], atol=1e-4, rtol=1e-4)
    assert torch.allclose(full.latents, split.latents, atol=1e-4, rtol=1e-4)
    assert np.abs(full.images.astype(int) - split.images.astype(int)).max() <= 1


def test_generators_and_seed_lists(pipe, fmri):
    kw = dict(num_samples=1, num_inference_steps=2, sampler="ddim", progress=False)
    a = pipe(fmri[:2], generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)], **kw)
    b = pipe(fmri[:2], generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)], **kw)
    assert torch.equal(a.latents, b.latents)
    c = pipe(fmri[:2], seed=[5, 9], **kw)
    assert c.seeds == [5, 9]
    with pytest.raises(ConfigError):
        pipe(fmri[:2], seed=[1], **kw)


def test_guidance_changes_the_result(pipe, fmri):
    kw = dict(num_samples=1, num_inference_steps=2, sampler="ddim", seed=0, progress=False)
    plain = pipe(fmri[:1], **kw)
    guided = pipe(fmri[:1], guidance_scale=3.0, **kw)
    assert not torch.allclose(plain.latents, guided.latents)


def test_output_type_pt_and_progress(pipe, fmri):
    out = pipe(
        torch.from_numpy(fmri[0]),
        num_samples=1,
        num_inference_steps=2,
        sampler="ddim",
        seed=0,
        output_type="pt",
        progress=True,
        return_latents=False,
    )
    assert isinstance(out.images, torch.Tensor) and out.images.shape[:3] == (1, 1, 3) and out.latents is None


@pytest.mark.parametrize(
    "bad,msg",
    [
        (np.zeros((2, V), dtype=np.int64), "dtype"),
        (np.full((2, V), np.nan, dtype=np.float32), "NaN"),
        (np.zeros((2, V + 1), dtype=np.float32), "voxels"),
        (np.zeros((0, V), dtype=np.float32), "0 rows"),
        (np.zeros((2, 2, V), dtype=np.float32), "shape"),
    ],
)
def test_bad_fmri(pipe, bad, msg):
    with pytest.raises(DataError, match=msg):
        pipe(bad, num_inference_steps=2, progress=False)


def test_bad_options(pipe, fmri):
    for kw in (
        dict(sampler="euler"),
        dict(num_samples=0),
        dict(batch_size=0),
        dict(output_type="png"),
        dict(sampler="plms", eta=0.3),
    ):
        with pytest.raises(ConfigError):
            pipe(fmri[:1], num_inference_steps=2, progress=False, **kw)
    with pytest.raises(DataError):
        pipe(labels=[1], num_inference_steps=2, progress=False)


def test_save_load_round_trip(pipe, fmri, tmp_path):
    d = pipe.save_pretrained(tmp_path / "model", source={"note": "test"})
    index = json.loads((d / "model_index.json").read_text())
    assert set(index["components"]) == {"fmri_encoder", "conditioner", "unet", "vq", "scheduler"}
    assert index["source"] == {"note": "test"}
    loaded = MindVisPipeline.from_pretrained(d)
    for (k, v), (k2, v2) in zip(
        pipe.model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    kw = dict(num_samples=2, num_inference_steps=3, sampler="plms", seed=3, progress=False)
    a, b = pipe(fmri[:2], **kw), loaded(fmri[:2], **kw)
    assert np.array_equal(a.images, b.images) and torch.equal(a.latents, b.latents)
    with pytest.raises(OutputExistsError):
        pipe.save_pretrained(d)
    pipe.save_pretrained(d, overwrite=True)


def test_round_trip_keeps_the_token_standardisation(tmp_path, fmri):
    from mindvis.models.mbm import FMRIEncoder, mbm_tiny

    torch.manual_seed(0)
    model = DCLDM.for_fmri(ldm_preset("tiny"), FMRIEncoder(mbm_tiny(V)), standardize_tokens=True)
    with torch.no_grad():
        model.conditioner.fit_token_stats(model.fmri_encoder(torch.randn(8, V)))
    d = MindVisPipeline(_tame(model)).save_pretrained(tmp_path / "std")
    loaded = MindVisPipeline.from_pretrained(d).model.conditioner
    assert loaded.config.standardize_tokens
    for name in ("token_mean", "token_std"):
        assert torch.equal(getattr(loaded, name), getattr(model.conditioner, name))
    assert not torch.equal(loaded.token_std, torch.ones_like(loaded.token_std))


def test_from_pretrained_errors(pipe, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        MindVisPipeline.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="model_index.json"):
        MindVisPipeline.from_pretrained(tmp_path / "empty")
    d = pipe.save_pretrained(tmp_path / "m")
    (d / "unet" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="unet"):
        MindVisPipeline.from_pretrained(d)
    d2 = pipe.save_pretrained(tmp_path / "m2")
    cfg = json.loads((d2 / "vq" / "config.json").read_text())
    cfg["n_embed"] = 7
    (d2 / "vq" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantize.embedding.weight"):
        MindVisPipeline.from_pretrained(d2)


def test_class_prior_pipeline(tmp_path):
    torch.manual_seed(1)
    cfg = ldm_preset("tiny", time_cond=False)
    emb = ClassEmbedder(ClassEmbedderConfig(n_classes=4, embed_dim=cfg.unet.context_dim))
    prior = MindVisPipeline(_tame(DCLDM(cfg.unet, cfg.vq, emb)), default_sampler="ddim", default_steps=2)
    out = prior(labels=[0, 3], num_samples=1, seed=0, progress=False)
    assert out.images.shape[:2] == (2, 1) and out.num_inference_steps == 2
    loaded = MindVisPipeline.from_pretrained(prior.save_pretrained(tmp_path / "prior"))
    assert loaded.num_voxels is None and loaded.default_sampler == "ddim"
    assert torch.equal(loaded(labels=[0, 3], num_samples=1, seed=0, progress=False).latents, out.latents)
    with pytest.raises(DataError):
        prior(np.zeros((1, V), dtype=np.float32), num_samples=1, progress=False)


def test_reduced_precision_runs(pipe, fmri):
    """bf16 weights (the GPU setting) on the CPU: the sampler arithmetic stays float32."""
    import copy

    half = MindVisPipeline(copy.deepcopy(pipe.model)).to(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    out = half(fmri[:1], num_samples=1, num_inference_steps=2, sampler="ddim", seed=0, progress=False)
    assert out.latents.dtype == torch.float32 and torch.isfinite(out.latents).all()
    ref = pipe(fmri[:1], num_samples=1, num_inference_steps=2, sampler="ddim", seed=0, progress=False)
    assert torch.allclose(out.latents, ref.latents, atol=0.1 * float(ref.latents.abs().max()) + 0.1)
