"""Parity of stage B (the double-conditioned LDM, its samplers and the checkpoint converter) with the original.

The fixture folder is ``$MINDVIS_PARITY_DIR`` or ``tests/fixtures/mindvis_tiny``, laid out like the reference
``tiny/`` folder. Every size and setting is read from the files (the pickled generative config, config.yaml,
the tensor shapes, the golden arrays), so the test runs unchanged on another fixture set. A missing folder
fails. Tolerances: 1e-4 relative (to the array's largest magnitude) on single forwards, 1e-3 on the sampling
chains; VQ indices must be equal.

The real-size key lists (``keys/`` beside ``tiny/``) check that our builders and key maps produce exactly the
converted key set and shapes of the full-size models, on the meta device (nothing is allocated).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import parity_dir
from mindvis.convert.ldm import (
    COND_PREFIX,
    UNET_PREFIX,
    cond_key_map,
    key_map_problems,
    load_finetuned,
    load_label2img,
    read_label2img_config,
    unet_key_map,
    vq_key_map,
)
from mindvis.models.conditioning import ClassEmbedder, ClassEmbedderConfig, DCConditioner, DCConditionerConfig
from mindvis.models.ldm import build_unet, build_vq, images_to_uint8, ldm_preset, vq_quantize
from mindvis.safeload import load_torch_file
from mindvis.sampling import ORIGINAL_SCHEDULE_BUFFERS, ddim_sample, ddim_tables, plms_sample

SINGLE_RTOL = 1e-4
CHAIN_RTOL = 1e-3


def _reference_keys_dir() -> Path:
    """Real-size key lists: ``$MINDVIS_REFERENCE_KEYS``, a copy under tests/fixtures, or the shared reference."""
    import os

    candidates = [
        os.environ.get("MINDVIS_REFERENCE_KEYS"),
        Path(__file__).parent / "fixtures" / "mindvis_keys",
        parity_dir().parent / "keys",
        Path("/work/shared/reference/mindvis/keys"),
    ]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return Path(candidates[-1])  # missing: the tests that need it fail with its name


REFERENCE_KEYS = _reference_keys_dir()


def _rel_err(actual: torch.Tensor | np.ndarray, expected: np.ndarray) -> float:
    a = actual.detach().float().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    assert a.shape == expected.shape, f"shape {a.shape} vs golden {expected.shape}"
    scale = max(float(np.abs(expected).max()), 1e-12)
    return float(np.abs(a - expected).max()) / scale


def _assert_close(actual, expected: np.ndarray, rtol: float, name: str) -> None:
    err = _rel_err(actual, expected)
    assert err <= rtol, f"{name}: max error {err:.3g} of the largest magnitude (allowed {rtol})"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # One intra-op thread: on a shared 2-core machine, two spinning OpenMP threads per process are far slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fx():
    d = parity_dir()
    assert d.is_dir(), f"parity fixture folder {d} is missing (set MINDVIS_PARITY_DIR or restore the copy)"
    for name in (
        "finetuned.pth",
        "label2img/config.yaml",
        "label2img/model.ckpt",
        "mae_checkpoint.pth",
        "golden.npz",
    ):
        assert (d / name).is_file(), f"parity fixture {d / name} is missing"
    with np.load(d / "golden.npz") as z:
        golden = {k: z[k] for k in z.files}
    conv = load_finetuned(d / "finetuned.pth", d / "label2img", mbm=d / "mae_checkpoint.pth")
    raw = load_torch_file(d / "finetuned.pth")
    torch.manual_seed(0)
    return SimpleNamespace(dir=d, g=golden, model=conv.model.eval(), source=conv.source, raw=raw)


def _t(fx, key: str) -> torch.Tensor:
    return torch.from_numpy(fx.g[key])


@pytest.fixture(scope="module")
def cond(fx):
    with torch.no_grad():
        return fx.model.condition(_t(fx, "fmri"))


# ---- conversion follows the original's conventions -------------------------------------------------------


def test_generative_config_overrides_yaml(fx):
    cfg = fx.raw["config"]
    c = fx.model.conditioner.config
    assert c.global_pool == bool(cfg.global_pool)
    assert c.use_time_cond == bool(cfg.use_time_cond)
    assert fx.model.unet_config.time_cond == bool(cfg.use_time_cond)
    assert fx.model.fmri_encoder.global_pool == bool(cfg.global_pool)
    assert fx.source["original_config"]["global_pool"] == cfg.global_pool


def test_trained_pos_embed_and_misspelt_time_conditioner_are_loaded(fx):
    from mindvis.models.mbm import sincos_pos_table

    sd = fx.raw["model_state_dict"]
    enc = fx.model.fmri_encoder
    assert torch.equal(enc.pos_embed.detach(), sd[f"{COND_PREFIX}mae.pos_embed"].float())
    table = sincos_pos_table(enc.embed_dim, enc.num_patches).unsqueeze(0)
    assert not torch.allclose(enc.pos_embed.detach(), table), "the fixture's pos_embed should be trained"
    assert torch.equal(enc.mask_token.detach(), sd[f"{COND_PREFIX}mae.mask_token"].float())
    tkeys = sorted(k for k in sd if k.startswith(f"{UNET_PREFIX}time_embed_condtion"))
    if not fx.raw["config"].use_time_cond:
        assert not tkeys and fx.model.conditioner.time_mapper is None
        return
    assert tkeys, "use_time_cond is set, so the original's time conditioner must be in the file"
    ours = dict(fx.model.conditioner.time_mapper.named_parameters())
    assert len(ours) == len(tkeys)
    for k in tkeys:
        sub = k[len(f"{UNET_PREFIX}time_embed_condtion.") :]
        assert torch.equal(ours[sub].detach(), sd[k].float()), k


def test_schedule_buffers(fx):
    sd = fx.raw["model_state_dict"]
    assert [k for k in sd if k in ORIGINAL_SCHEDULE_BUFFERS] == list(ORIGINAL_SCHEDULE_BUFFERS)
    s = fx.model.schedule
    _assert_close(s.alphas_cumprod_tensor(), fx.g["alphas_cumprod"], 1e-6, "alphas_cumprod")
    _assert_close(s.betas_tensor(), fx.g["betas"], 1e-6, "betas")
    for name, ours in s.original_buffers().items():
        ref = sd[name].double().numpy()
        fin = np.isfinite(ref)
        assert np.allclose(ours.double().numpy()[fin], ref[fin], rtol=1e-5, atol=1e-7), name


def test_label2img_checkpoint_converts_and_matches_untrained_weights(fx):
    """model.ckpt converts; every UNet weight the original's fine-tuning does not train equals finetuned's."""
    prior = load_label2img(fx.dir / "label2img").model
    assert isinstance(prior.conditioner, ClassEmbedder)
    yaml_cfg = read_label2img_config(fx.dir / "label2img" / "config.yaml")
    assert prior.conditioner.config.n_classes == yaml_cfg.class_embedder.n_classes
    fine = fx.model.unet.state_dict()
    for k, v in prior.unet.state_dict().items():
        if ".attn2." in k or (".transformer_blocks." in k and ".norm2." in k):
            continue
        assert torch.equal(v, fine[k]), k
    for k, v in prior.vq.state_dict().items():
        assert torch.equal(v, fx.model.vq.state_dict()[k]), k


# ---- single forward passes -------------------------------------------------------------------------------


def test_context(fx, cond):
    _assert_close(cond.context, fx.g["context"], SINGLE_RTOL, "context")


def test_unet_eps_with_time_conditioning(fx, cond):
    with torch.no_grad():
        eps = fx.model.eps(_t(fx, "unet_x_t"), _t(fx, "unet_t"), cond)
    _assert_close(eps, fx.g["unet_eps"], SINGLE_RTOL, "unet_eps")


def test_vq_encode_quantize_decode(fx):
    m = fx.model
    with torch.no_grad():
        h = m.encode_images(_t(fx, "image"))
        _assert_close(h, fx.g["vq_latent_prequant"], SINGLE_RTOL, "vq_latent_prequant")
        q = vq_quantize(m.vq, h, beta=m.vq_config.beta)
        np.testing.assert_array_equal(q.indices.numpy(), fx.g["vq_indices"])
        _assert_close(q.quant, fx.g["vq_latent_quant"], SINGLE_RTOL, "vq_latent_quant")
        _assert_close(q.loss, fx.g["vq_emb_loss"], SINGLE_RTOL, "vq_emb_loss")
        _assert_close(m.decode_latents(h), fx.g["vq_decoded"], SINGLE_RTOL, "vq_decoded")


def test_q_sample_and_loss(fx, cond):
    m = fx.model
    g = fx.g
    _assert_close(m.encode_images(_t(fx, "image")).detach(), g["loss_x0"], SINGLE_RTOL, "loss_x0")
    with torch.no_grad():
        xt = m.q_sample(_t(fx, "loss_x0"), _t(fx, "loss_t"), _t(fx, "loss_noise"))
        _assert_close(xt, g["q_sample"], SINGLE_RTOL, "q_sample")
        out = m.p_losses(_t(fx, "loss_x0"), cond, _t(fx, "loss_t"), noise=_t(fx, "loss_noise"))
    _assert_close(out.model_output, g["p_losses_model_out"], SINGLE_RTOL, "p_losses_model_out")
    _assert_close(out.loss, g["p_losses_loss"], SINGLE_RTOL, "p_losses_loss")
    _assert_close(out.loss_simple, g["p_losses_loss_simple"], SINGLE_RTOL, "p_losses_loss_simple")
    _assert_close(out.loss_vlb, g["p_losses_loss_vlb"], SINGLE_RTOL, "p_losses_loss_vlb")


def test_training_loss_from_images_matches(fx):
    with torch.no_grad():
        out = fx.model.training_loss(
            _t(fx, "fmri"), _t(fx, "image"), t=_t(fx, "loss_t"), noise=_t(fx, "loss_noise")
        )
    _assert_close(out.loss, fx.g["p_losses_loss"], SINGLE_RTOL, "training_loss")


# ---- samplers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["plms", "ddim"])
def test_sampler_tables(fx, name):
    g = fx.g
    steps = len(g[f"{name}_timesteps_exec"])
    eta = 0.0 if not np.any(g[f"{name}_ddim_sigmas"]) else None
    assert eta is not None, "the fixtures were made with eta 0"
    tab = ddim_tables(fx.model.schedule, steps, eta)
    np.testing.assert_array_equal(tab.timesteps, g[f"{name}_ddim_timesteps"])
    np.testing.assert_array_equal(tab.timesteps_exec, g[f"{name}_timesteps_exec"])
    for k in ("alphas", "alphas_prev", "sqrt_one_minus_alphas", "sigmas"):
        np.testing.assert_allclose(
            getattr(tab, k).numpy(), g[f"{name}_ddim_{k}"], rtol=1e-6, atol=1e-8, err_msg=k
        )


@pytest.mark.parametrize("name", ["plms", "ddim"])
def test_sampling_chain(fx, cond, name):
    g, m = fx.g, fx.model
    tab = ddim_tables(m.schedule, len(g[f"{name}_timesteps_exec"]), 0.0)
    states = []
    fn = plms_sample if name == "plms" else ddim_sample
    with torch.no_grad():
        z = fn(lambda x, t: m.eps(x, t, cond), _t(fx, "x_T"), tab, callback=states.append)
        decoded = m.decode_latents(z)
    assert [s.t for s in states] == g[f"{name}_timesteps_exec"].tolist()
    _assert_close(z, g[f"{name}_latent"], CHAIN_RTOL, f"{name}_latent")
    _assert_close(torch.stack([s.x for s in states]), g[f"{name}_steps_x"], CHAIN_RTOL, f"{name}_steps_x")
    _assert_close(
        torch.stack([s.pred_x0 for s in states]),
        g[f"{name}_steps_pred_x0"],
        CHAIN_RTOL,
        f"{name}_steps_pred_x0",
    )
    if f"{name}_steps_e_t" in g:
        _assert_close(torch.stack([s.eps for s in states]), g[f"{name}_steps_e_t"], CHAIN_RTOL, f"{name}_e_t")
    _assert_close(decoded, g[f"{name}_decoded"], CHAIN_RTOL, f"{name}_decoded")
    image01 = torch.clamp((decoded + 1) / 2, 0, 1)
    _assert_close(image01, g[f"{name}_image01"], CHAIN_RTOL, f"{name}_image01")
    # uint8 conversion truncates: equal to the golden's except where a value sits within rounding of an integer
    ours = images_to_uint8(decoded).numpy()
    ref = (255 * g[f"{name}_image01"]).transpose(0, 2, 3, 1).astype(np.uint8)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    assert (ours == ref).mean() > 0.99


@pytest.mark.parametrize("name", ["plms", "ddim"])
def test_diffusers_schedulers_agree(fx, cond, name):
    """The design claim: diffusers' PNDM (skip_prk_steps) and DDIM ("leading", offset 1) are these samplers."""
    from diffusers import DDIMScheduler, PNDMScheduler

    s = fx.model.schedule.config
    kw = dict(
        num_train_timesteps=s.num_train_timesteps,
        beta_start=s.linear_start,
        beta_end=s.linear_end,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        steps_offset=1,
    )
    sched = (
        PNDMScheduler(skip_prk_steps=True, **kw)
        if name == "plms"
        else DDIMScheduler(timestep_spacing="leading", clip_sample=False, **kw)
    )
    sched.set_timesteps(len(fx.g[f"{name}_timesteps_exec"]))
    x = _t(fx, "x_T")
    with torch.no_grad():
        for t in sched.timesteps:
            e = fx.model.eps(x, torch.full((x.shape[0],), int(t)), cond)
            x = sched.step(e, t, x).prev_sample
    _assert_close(x, fx.g[f"{name}_latent"], CHAIN_RTOL, f"diffusers {name}")


# ---- real-size key sets ----------------------------------------------------------------------------------


def _read_key_list(path: Path) -> dict[str, tuple[int, ...]]:
    if not path.is_file():
        pytest.fail(f"reference key list {path} is missing")
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        name, shape, _dtype = line.split("\t")
        out[name] = tuple(int(v) for v in re.findall(r"\d+", shape))
    return out


def _shapes(module: torch.nn.Module, prefix: str) -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def _real_size_targets(keys: dict[str, tuple[int, ...]], global_pool: bool | None):
    """Meta-device models at the label2img size (plus the encoder and conditioner the key list implies)."""
    from mindvis.models.mbm import FMRIEncoder, MBMConfig

    time_cond = any("time_embed_condtion" in k for k in keys)
    cfg = ldm_preset("label2img", time_cond=time_cond)
    with torch.device("meta"):
        target = {**_shapes(build_unet(cfg.unet), "unet."), **_shapes(build_vq(cfg.vq), "vq.")}
        km = unet_key_map(cfg.unet)
        km.update(vq_key_map(cfg.vq))
        if global_pool is None:
            emb = keys[f"{COND_PREFIX}embedding.weight"]
            ce = ClassEmbedderConfig(n_classes=emb[0], embed_dim=emb[1])
            target.update(_shapes(ClassEmbedder(ce), "conditioner."))
            km.update(cond_key_map(None, ce))
            return km, target, cfg
        proj = keys[f"{COND_PREFIX}mae.patch_embed.proj.weight"]
        pos = keys[f"{COND_PREFIX}mae.pos_embed"]
        depth = len({k.split(".")[3] for k in keys if k.startswith(f"{COND_PREFIX}mae.blocks.")})
        enc_cfg = MBMConfig(
            num_voxels=(pos[1] - 1) * proj[2],
            patch_size=proj[2],
            embed_dim=proj[0],
            depth=depth,
            num_heads=16,
        )
        enc = FMRIEncoder(enc_cfg, global_pool=global_pool)
        cc = DCConditionerConfig(
            num_tokens=1 if global_pool else enc_cfg.num_patches,
            token_dim=enc_cfg.embed_dim,
            context_dim=cfg.unet.context_dim,
            time_embed_dim=cfg.unet.time_embed_dim,
            global_pool=global_pool,
            use_time_cond=time_cond,
        )
        target.update(_shapes(enc, "fmri_encoder."))
        target.update(_shapes(DCConditioner(cc), "conditioner."))
        km.update(cond_key_map(list(enc.state_dict()), cc))
    return km, target, cfg


@pytest.mark.parametrize(
    "fname,global_pool",
    [
        ("label2img_model_ckpt_state_dict.txt", None),
        ("finetuned_model_state_dict.txt", False),
        ("finetuned_model_state_dict_global_pool_true.txt", True),
    ],
)
def test_real_size_key_sets(fname, global_pool):
    keys = _read_key_list(REFERENCE_KEYS / fname)
    km, target, _ = _real_size_targets(keys, global_pool)
    problems = key_map_problems(keys, km, target, ignore=set(ORIGINAL_SCHEDULE_BUFFERS))
    assert not problems, problems
    # every value accounted for: the original's tensors minus the twelve schedule buffers
    n_src = sum(int(np.prod(s)) for k, s in keys.items() if k not in ORIGINAL_SCHEDULE_BUFFERS)
    assert n_src == sum(int(np.prod(s)) for s in target.values())


def test_real_size_unet_parameter_count():
    """The original's UNet parameters (time conditioner included) = our UNet + our conditioner's time path."""
    keys = _read_key_list(REFERENCE_KEYS / "finetuned_model_state_dict.txt")
    with torch.device("meta"):
        unet = build_unet(ldm_preset("label2img").unet)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_time = sum(int(np.prod(s)) for k, s in keys.items() if "time_embed_condtion" in k)
    n_orig = sum(int(np.prod(s)) for k, s in keys.items() if k.startswith(UNET_PREFIX))
    assert n_unet + n_time == n_orig
    assert int(n_unet / 1e4) / 100 == 400.92  # the README's figure without time conditioning


def test_original_trainable_set_at_real_size():
    """Our ``original`` preset is the original's cond-only list without the VQ norms it caught by accident,
    without the unused cls/mask tokens, and without duplicates."""
    from mindvis.models.ldm import DCLDM
    from mindvis.models.mbm import FMRIEncoder

    ref = next(
        (
            p
            for p in (
                REFERENCE_KEYS / "train_cond_stage_only_params.txt",
                REFERENCE_KEYS.parent / "train_cond_stage_only_params.txt",
            )
            if p.is_file()
        ),
        REFERENCE_KEYS.parent / "train_cond_stage_only_params.txt",
    )
    if not ref.is_file():
        pytest.fail(f"reference list {ref} is missing")
    names = [line.split("\t")[0] for line in ref.read_text().splitlines() if line.strip()]
    keys = _read_key_list(REFERENCE_KEYS / "finetuned_model_state_dict.txt")
    km, _, cfg = _real_size_targets(keys, False)
    expected = {
        km.keys[n]
        for n in set(names)
        if not n.startswith("first_stage_model.") and not n.endswith(("cls_token", "mask_token"))
    }
    with torch.device("meta"):
        enc = FMRIEncoder(_encoder_cfg(keys), global_pool=False)
        model = DCLDM.for_fmri(cfg, enc)
    ours = [n for n, _ in model.named_trainable_parameters("original")]
    assert len(ours) == len(set(ours))
    assert set(ours) == expected


def _encoder_cfg(keys):
    from mindvis.models.mbm import MBMConfig

    proj = keys[f"{COND_PREFIX}mae.patch_embed.proj.weight"]
    pos = keys[f"{COND_PREFIX}mae.pos_embed"]
    depth = len({k.split(".")[3] for k in keys if k.startswith(f"{COND_PREFIX}mae.blocks.")})
    return MBMConfig(
        num_voxels=(pos[1] - 1) * proj[2], patch_size=proj[2], embed_dim=proj[0], depth=depth, num_heads=16
    )
