"""Stage B finetuning: trainable presets, conditioning dropout, the run, resume, DDP, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mindvis.data.dataset import FMRIDataset
from mindvis.data.preprocess import prepare_voxels
from mindvis.errors import ConfigError, DataError
from mindvis.models.mbm import FMRIEncoder, MaskedBrainModel, mbm_tiny
from mindvis.train.common import TrainerConfig
from mindvis.train.config import StageBConfig
from mindvis.train.ldm import StageBModule, train_stage_b
from mindvis.train.prior import PriorTrainConfig, build_class_prior, save_prior_pipeline
from mindvis.train.stage_b_model import build_stage_b_model, check_image_size

RES = 32


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


VOXELS = 120  # raw voxels; the encoder takes 128 (8 patches of 16)


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    ldm = PriorTrainConfig(preset="tiny", resolution=RES).ldm_config(3)
    out = tmp_path_factory.mktemp("prior") / "pipeline"
    save_prior_pipeline(build_class_prior(ldm, 3), out, ["a", "b", "c"])
    return out


@pytest.fixture(scope="module")
def mbm_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("mbm") / "model"
    MaskedBrainModel(mbm_tiny(128)).save_pretrained(out)
    return out


def _datasets(n_train=12, n_test=4, seed=0) -> tuple[FMRIDataset, FMRIDataset]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n_train + n_test, 40, 40, 3), dtype=np.uint8)
    tr = FMRIDataset(
        voxels=rng.normal(size=(n_train, VOXELS)).astype(np.float32),
        subject="sbj_1",
        split="train",
        image_ids=np.arange(n_train),
        images=images,
        labels=np.arange(n_train) % 3,
        source="mem/train",
    )
    te = FMRIDataset(
        voxels=rng.normal(size=(n_test, VOXELS)).astype(np.float32),
        subject="sbj_1",
        split="test",
        image_ids=n_train + np.arange(n_test),
        images=images,
        labels=np.arange(n_test) % 3,
        source="mem/test",
    )
    return tr, te


def _model(prior_dir, mbm_dir, **kw):
    from mindvis.train.stage_b_model import build_encoder, load_prior

    cfg = StageBConfig(**kw)
    return build_stage_b_model(load_prior(prior_dir), build_encoder(mbm_dir, cfg), cfg), cfg


def _config(**kw) -> StageBConfig:
    base = dict(
        epochs=1,
        val_every=1,
        batch_size=4,
        num_samples=2,
        sampler="ddim",
        sample_steps=2,
        lr=1e-3,
        n_way=(2,),
        eval_trials=5,
    )
    base.update(kw)
    return StageBConfig(**base)


def _trainer(**kw) -> TrainerConfig:
    return TrainerConfig(accelerator="cpu", devices=1, progress_bar=False, log_every_n_steps=1, **kw)


@pytest.mark.parametrize("trainable", ["original", "cond-only", "full"])
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_trainable_presets_freeze_exactly_what_they_say(prior_dir, mbm_dir, trainable):
    torch.manual_seed(0)
    model, cfg = _model(prior_dir, mbm_dir, trainable=trainable)
    module = StageBModule(model, cfg)

    def expected(name: str) -> bool:
        top = name.split(".", 1)[0]
        if top == "vq":
            return False
        if top in ("fmri_encoder", "conditioner"):
            return name not in ("fmri_encoder.cls_token", "fmri_encoder.mask_token")
        if trainable == "full":
            return True
        if trainable == "cond-only":
            return False
        return ".attn2." in name or (".transformer_blocks." in name and ".norm2." in name)

    params = dict(model.named_parameters())
    want = {n for n in params if expected(n)}
    assert {n for n, p in params.items() if p.requires_grad} == want
    assert module.num_trainable == sum(params[n].numel() for n in want)
    if trainable == "original":
        names = sorted(want)
        assert any(n.startswith("conditioner.time_mapper") for n in names)  # the time-conditioning layers
        assert any(".attn2.to_k." in n for n in names) and any(".norm2." in n for n in names)
        assert not any(".attn1." in n or ".ff." in n or "resnets" in n for n in names)
    # one training step computes weight gradients for exactly those parameters: the rest is really frozen
    tr, _ = _datasets()
    x_tr, _, _ = prepare_voxels(tr, tr, 128, 16)
    batch = {"fmri": torch.from_numpy(x_tr[:2]), "image": torch.rand(2, 3, RES, RES) * 2 - 1}
    model.zero_grad(set_to_none=True)
    module.training_step(batch, 0).backward()
    with_grad = {n for n, p in params.items() if p.grad is not None}
    assert with_grad <= want
    assert with_grad >= {n for n in want if n != "fmri_encoder.pos_embed"}


def test_conditioning_dropout_uses_the_null_condition(prior_dir, mbm_dir):
    torch.manual_seed(0)
    model, cfg = _model(prior_dir, mbm_dir)
    module = StageBModule(model, cfg)
    fmri = torch.randn(64, 128)
    with torch.no_grad():
        full = module._condition(fmri, 0.0)
        dropped = module._condition(fmri, 0.5)
        null = model.conditioner.null_conditioning(64, full.context)
    is_null = torch.tensor([torch.equal(dropped.context[i], null.context[i]) for i in range(64)])
    is_cond = torch.tensor([torch.equal(dropped.context[i], full.context[i]) for i in range(64)])
    assert torch.all(is_null ^ is_cond) and 10 < int(is_null.sum()) < 54
    assert torch.equal(dropped.time_cond[is_null], null.time_cond[is_null])


def test_validation_samples_use_the_guidance_scale(prior_dir, mbm_dir):
    with pytest.raises(ConfigError, match="cond_dropout"):
        _config(guidance_scale=3.0)
    with pytest.raises(ConfigError, match="finite"):
        _config(guidance_scale=float("nan"), cond_dropout=0.1)
    torch.manual_seed(0)
    model, _ = _model(prior_dir, mbm_dir)
    fmri, index = torch.randn(2, 128), torch.arange(2)
    images = {}
    for scale in (1.0, 1.0, 4.0):
        module = StageBModule(model, _config(guidance_scale=scale, cond_dropout=0.1))
        images.setdefault(scale, []).append(module.generate(fmri, index))
    assert np.array_equal(images[1.0][0], images[1.0][1])  # same seeds: same images
    assert not np.array_equal(images[1.0][0], images[4.0][0])


def test_token_standardisation_matches_the_prior_context_spread(prior_dir, mbm_dir):
    from mindvis.train.stage_b_model import fit_token_stats, load_prior, prior_context_std

    prior = load_prior(prior_dir)
    want = prior_context_std(prior)
    rows = prior.conditioner.embedding.weight[:-1].detach().double()
    assert want == pytest.approx(float(rows.std(dim=0).mean()))
    model, _ = _model(prior_dir, mbm_dir, standardize_tokens=True)
    fmri = torch.randn(32, 128)
    fit_token_stats(model, fmri.numpy(), want)
    with torch.no_grad():
        ctx = model.condition(fmri).context
    assert float(ctx.std(dim=0).mean()) == pytest.approx(want, rel=1e-3)
    plain, _ = _model(prior_dir, mbm_dir)
    assert prior_context_std(plain) is None  # an fMRI model has no class embeddings


def test_context_warm_start_moves_the_context_onto_the_class_embeddings(prior_dir, mbm_dir):
    from mindvis.models.ldm import prior_class_table
    from mindvis.train.align import align_context
    from mindvis.train.stage_b_model import load_prior

    prior = load_prior(prior_dir)
    table = prior_class_table(prior)
    assert torch.equal(table, prior.conditioner.embedding.weight[:-1].detach())  # the null row left out
    k = table.shape[0]
    rng = np.random.default_rng(0)
    labels = np.arange(48) % k
    centres = rng.normal(size=(k, 128)).astype(np.float32)
    voxels = centres[labels] + 0.3 * rng.normal(size=(48, 128)).astype(np.float32)
    torch.manual_seed(0)
    model, _ = _model(prior_dir, mbm_dir)
    unet_before = {n: p.clone() for n, p in model.unet.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def loss_now() -> float:
        with torch.no_grad():
            ctx = model.condition(torch.as_tensor(voxels)).context
        return float((ctx - table[labels][:, None, :]).pow(2).mean())

    before = loss_now()
    held = (voxels[:6] + 0.3 * rng.normal(size=(6, 128)).astype(np.float32), labels[:6])
    r = align_context(
        model, voxels, labels, table, epochs=30, lr=3e-3, batch_size=8, eval_sets={"held": held}
    )
    assert len(r["loss"]) == 30 and r["samples"] == 48 and r["chance"] == pytest.approx(1 / k)
    assert loss_now() < 0.5 * before
    assert r["accuracy"]["train"] > 0.9 and r["accuracy"]["held"] > 0.6
    assert all(torch.equal(p, unet_before[n]) for n, p in model.unet.named_parameters())  # UNet untouched
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags

    unknown = np.full(48, -1)
    with pytest.raises(DataError, match="class labels"):
        align_context(model, voxels, unknown, table, epochs=1)
    with pytest.raises(DataError, match="outside the prior"):
        align_context(model, voxels, labels + k, table, epochs=1)
    with pytest.raises(ConfigError, match="class-conditional prior"):
        prior_class_table(model)
    with pytest.raises(ConfigError):
        StageBConfig(align_epochs=-1)


def test_stage_b_run_with_warm_start_records_it(prior_dir, mbm_dir, tmp_path):
    tr, te = _datasets()
    out = tmp_path / "run"
    train_stage_b(prior_dir, mbm_dir, tr, te, out, _config(align_epochs=2), _trainer())
    rec = json.loads((out / "align.json").read_text())
    assert rec["epochs"] == 2 and len(rec["loss"]) == 2 and set(rec["accuracy"]) == {"train", "test"}
    assert json.loads((out / "config.json").read_text())["config"]["align_epochs"] == 2


def test_prior_classes_context_basis(prior_dir, mbm_dir, tmp_path):
    from mindvis.models.ldm import prior_class_table
    from mindvis.pipeline import MindVisPipeline
    from mindvis.train.stage_b_model import load_prior

    prior = load_prior(prior_dir)
    table = prior_class_table(prior)
    model, _ = _model(prior_dir, mbm_dir, context_basis="prior-classes", standardize_tokens=True)
    assert torch.equal(model.conditioner.basis, table)
    # guidance compares against the prior's own null condition
    null_ctx = model.conditioner.null_conditioning(2, table).context
    assert torch.allclose(null_ctx[:, :1], prior.conditioner.null_conditioning(2, table).context)
    with torch.no_grad():
        ctx = model.condition(torch.randn(3, 128)).context
    # every token lies in the convex hull of the class embeddings: its weights are recoverable and sum to 1
    w = torch.linalg.lstsq(
        torch.cat([table.T, torch.ones(1, len(table))]),
        torch.cat([ctx.reshape(-1, ctx.shape[-1]).T, torch.ones(1, ctx.shape[0] * ctx.shape[1])]),
    ).solution
    assert float(w.min()) > -1e-4
    assert torch.allclose(table.T @ w, ctx.reshape(-1, ctx.shape[-1]).T, atol=1e-4)

    tr, te = _datasets()
    out = tmp_path / "basis"
    train_stage_b(
        prior_dir,
        mbm_dir,
        tr,
        te,
        out,
        _config(context_basis="prior-classes", standardize_tokens=True),
        _trainer(),
    )
    saved = MindVisPipeline.from_pretrained(out / "model").model.conditioner
    assert saved.config.basis_size == len(table) and torch.equal(saved.basis, table)
    assert not (out / "align.json").exists()  # no labels needed

    with pytest.raises(ConfigError) as e:
        StageBConfig(context_basis="classes")
    assert e.value.field == "context_basis"
    for bad in (dict(basis_balance=-0.1, context_basis="prior-classes"), dict(basis_balance=0.1)):
        with pytest.raises(ConfigError) as e:
            StageBConfig(**bad)
        assert e.value.field == "basis_balance"
    fmri_prior = MindVisPipeline.from_pretrained(out / "model").model  # not class-conditional
    with pytest.raises(ConfigError, match="prior-classes context") as e:
        build_stage_b_model(fmri_prior, model.fmri_encoder, StageBConfig(context_basis="prior-classes"))
    assert e.value.field == "context_basis"


def test_mixture_entropy():
    from mindvis.train.ldm import mixture_entropy

    k = 6
    uniform = torch.full((4, 3, k), 1.0 / k)
    assert float(mixture_entropy(uniform)) == pytest.approx(np.log(k), rel=1e-6)
    same_row = torch.zeros(4, 3, k)
    same_row[..., 2] = 1.0
    assert float(mixture_entropy(same_row)) == pytest.approx(0.0, abs=1e-6)
    # confident samples spread evenly over the rows have the uniform batch mean
    spread = torch.eye(k)[torch.arange(2 * k) % k][:, None, :]
    assert float(mixture_entropy(spread)) == pytest.approx(np.log(k), rel=1e-6)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_basis_balance_subtracts_the_weighted_mixture_entropy(prior_dir, mbm_dir):
    from mindvis.train.ldm import mixture_entropy

    kw = dict(context_basis="prior-classes", standardize_tokens=True, trainable="cond-only")
    torch.manual_seed(0)
    model, plain_cfg = _model(prior_dir, mbm_dir, **kw)
    batch = {"fmri": torch.randn(4, 128), "image": torch.rand(4, 3, RES, RES) * 2 - 1}
    losses = {}
    for weight in (0.0, 0.5):
        module = StageBModule(model, StageBConfig(**kw, basis_balance=weight))
        torch.manual_seed(1)
        losses[weight] = module.training_step(batch, 0)
    with torch.no_grad():
        entropy = mixture_entropy(model.condition(batch["fmri"]).weights)
    assert float(losses[0.5]) == pytest.approx(float(losses[0.0]) - 0.5 * float(entropy), rel=1e-5)
    # the term reaches the conditioner
    model.zero_grad()
    losses[0.5].backward()
    assert model.conditioner.dim_mapper.weight.grad is not None
    assert plain_cfg.basis_balance == 0.0


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_validate_now_gives_the_figures_lightning_validation_logs(prior_dir, mbm_dir):
    import lightning.pytorch as pl

    from mindvis.data.paired import PairedFMRIDataset

    torch.manual_seed(0)
    tr, te = _datasets()
    model, cfg = _model(
        prior_dir, mbm_dir, num_samples=2, sampler="ddim", sample_steps=2, n_way=(2,), eval_trials=5
    )
    _, x_te, _ = prepare_voxels(tr, te, model.fmri_encoder.config.num_voxels, 16, None)
    val = PairedFMRIDataset.from_fmri_dataset(te, RES, voxels=x_te, train=False)
    module = StageBModule(model, cfg, val_gt=val.ground_truth())
    loader = torch.utils.data.DataLoader(val, batch_size=2, shuffle=False)
    now = module.validate_now(loader)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (logged,) = trainer.validate(module, dataloaders=loader, verbose=False)
    assert set(now) == set(logged) and "val/ident_pcc_2way" in now
    for key, value in now.items():
        assert value == pytest.approx(logged[key], rel=1e-5, abs=1e-6), key


def test_validate_start_records_the_model_before_and_after_the_warm_start(prior_dir, mbm_dir, tmp_path):
    tr, te = _datasets()
    out = tmp_path / "run"
    train_stage_b(prior_dir, mbm_dir, tr, te, out, _config(align_epochs=3, validate_start=True), _trainer())
    rec = json.loads((out / "validation_start.json").read_text())
    points = rec["points"]
    assert rec["val_items"] == te.num_samples
    assert [p["point"] for p in points] == ["before training", "after the warm start"]
    for p in points:
        assert set(p) >= {"val/loss", "val/ident_pcc_2way"} and all(
            np.isfinite(v) for k, v in p.items() if k != "point"
        )
    assert points[0]["val/loss"] != points[1]["val/loss"]  # the warm start changed the conditioning
    # without a warm start there is one point; by default, none
    train_stage_b(prior_dir, mbm_dir, tr, te, tmp_path / "r2", _config(validate_start=True), _trainer())
    assert len(json.loads((tmp_path / "r2" / "validation_start.json").read_text())["points"]) == 1
    train_stage_b(prior_dir, mbm_dir, tr, te, tmp_path / "r3", _config(), _trainer())
    assert not (tmp_path / "r3" / "validation_start.json").exists()


def test_stage_b_run_outputs_and_resume(prior_dir, mbm_dir, tmp_path):
    from mindvis.pipeline import MindVisPipeline

    tr, te = _datasets()
    out = tmp_path / "run"
    r1 = train_stage_b(prior_dir, mbm_dir, tr, te, out, _config(), _trainer())
    assert r1.epochs_done == 1 and r1.global_step == 3 and r1.monitor == "val/ident_pcc_2way"
    for rel in (
        "config.json",
        "preprocessing.json",
        "metrics.csv",
        "metrics.json",
        "checkpoints/last.ckpt",
        "samples/epoch0000.png",
        "model/model_index.json",
        "model/preprocess.json",
        "best/model_index.json",
    ):
        assert (out / rel).exists(), rel
    assert np.isfinite(r1.metrics["val/pixel_ssim"]) and 0 <= r1.metrics["val/ident_pcc_2way"] <= 1
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "val/ident_pcc_2way" in header and "train/loss_step" in header
    pipe = MindVisPipeline.from_pretrained(out / "model")
    assert pipe.num_voxels == 128 and pipe.model.unet_config.time_cond
    from mindvis.data.preprocess import load_preprocessor

    pre = load_preprocessor(out / "model" / "preprocess.json")
    imgs = pipe(
        pre.transform(te.voxels[:2]),
        num_samples=1,
        num_inference_steps=2,
        sampler="ddim",
        seed=0,
        progress=False,
    ).images
    assert imgs.shape == (2, 1, RES, RES, 3)

    r2 = train_stage_b(prior_dir, mbm_dir, tr, te, out, _config(epochs=2), _trainer(), resume=True)
    assert r2.epochs_done == 2 and r2.global_step == 6
    assert (out / "samples" / "epoch0001.png").is_file()
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    epochs = {line.split(",")[0] for line in rows}
    assert {"0", "1"} <= epochs  # the log of the first epoch is kept and the second appended
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["global_step"] == 6 and saved["trainable"] == "original"


def test_bad_input_errors(prior_dir, mbm_dir, tmp_path):
    from mindvis.data.preprocess import FMRIPreprocessor
    from mindvis.train.stage_b_model import load_prior

    tr, te = _datasets()
    with pytest.raises(ConfigError, match="latent size mismatch"):
        train_stage_b(prior_dir, mbm_dir, tr, te, tmp_path / "a", _config(image_size=64), _trainer())
    with pytest.raises(ConfigError, match="latent size mismatch"):
        check_image_size(load_prior(prior_dir), 36)
    assert check_image_size(load_prior(prior_dir), None) == RES
    empty = te.subset(np.arange(0))
    with pytest.raises(DataError, match="empty"):
        train_stage_b(prior_dir, mbm_dir, tr, empty, tmp_path / "b", _config(), _trainer())
    unpaired = FMRIDataset(voxels=tr.voxels, subject="sbj_1", split="train")
    with pytest.raises(DataError, match="no paired images"):
        train_stage_b(prior_dir, mbm_dir, unpaired, te, tmp_path / "c", _config(), _trainer())
    with pytest.raises(DataError, match="one entry per sample"):  # image/fMRI count mismatch
        FMRIDataset(
            voxels=tr.voxels, subject="sbj_1", split="train", image_ids=tr.image_ids[:5], images=tr.images
        )
    wrong = FMRIPreprocessor(patch_size=16).fit(np.random.default_rng(0).normal(size=(10, 300)))
    with pytest.raises(DataError):
        train_stage_b(prior_dir, mbm_dir, tr, te, tmp_path / "d", _config(), _trainer(), preprocessor=wrong)
    with pytest.raises(ConfigError):
        StageBConfig(trainable="everything")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        StageBConfig(use_time_cond=False, use_cross_attn=False)
    with pytest.raises(ConfigError):
        StageBConfig(sparse_rate=1.0)
    assert StageBConfig(sparse_rate=0.2).augment.sparse_rate == 0.2  # our dropout stays an option
    for bad in (
        dict(val_schedule="sometimes"),
        dict(quick_items=0),
        dict(quick_samples=0),
        dict(full_val_every=0),
        dict(full_val_threshold=1.5),
        dict(monitor="val/quick/ident_pcc_2way"),
    ):
        with pytest.raises(ConfigError) as e:
            StageBConfig(**bad)
        assert e.value.field == next(iter(bad))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_original_defaults_and_derived_batch_size():
    cfg = StageBConfig()
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.clip_grad, cfg.val_every) == (5.3e-5, 5, 500, 0.5, 5)
    assert (cfg.sampler, cfg.sample_steps, cfg.num_samples, cfg.cond_dropout) == ("plms", 250, 5, 0.0)
    # the original's voxel dropout is a no-op: 0 is its behaviour (0.2 is ours, an option)
    assert (cfg.crop_ratio, cfg.crop_p, cfg.sparse_rate) == (0.2, 0.5, 0.0)
    assert cfg.augment.sparse_rate == 0.0
    # the original's validation: quick pass of 5 items x 3 samples, full pass above 0.15 or every 15th
    assert (cfg.val_schedule, cfg.quick_items, cfg.quick_samples) == ("original", 5, 3)
    assert (cfg.full_val_every, cfg.full_val_threshold) == (15, 0.15)
    assert StageBConfig(dataset="bold5000").batch_size == 25
    assert StageBConfig(dataset="bold5000", batch_size=7).batch_size == 7


def test_random_encoder_ablation(prior_dir, mbm_dir):
    pretrained, _ = _model(prior_dir, mbm_dir)
    random_enc, _ = _model(prior_dir, mbm_dir, encoder_init="random", seed=1)
    mbm = MaskedBrainModel.from_pretrained(mbm_dir)
    ref = FMRIEncoder.from_mbm(mbm)
    blk = "blocks.0.attn.qkv.weight"
    assert torch.equal(pretrained.fmri_encoder.state_dict()[blk], ref.state_dict()[blk])
    assert not torch.equal(random_enc.fmri_encoder.state_dict()[blk], ref.state_dict()[blk])


@pytest.mark.slow
def test_two_process_cpu_ddp(prior_dir, mbm_dir, tmp_path):
    """``mindvis train --devices 2 --strategy ddp`` on the CPU (gloo): both ranks train, rank 0 writes."""
    from mindvis.synthcortex import SynthConfig, simulate

    sim = tmp_path / "sim"
    simulate(
        SynthConfig.preset(
            "realistic",
            n_train=16,
            n_test=4,
            n_repeats=2,
            voxels=250,
            n_rest_subjects=1,
            n_trs=50,
            corpus_size=20,
            calibration_images=10,
            calibration_voxels=20,
        ),
        sim,
    )
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "mindvis.cli",
        "train",
        "--prior",
        str(prior_dir),
        "--mbm",
        str(mbm_dir),
        "--dataset",
        "synthetic",
        "--data-dir",
        str(sim),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--sampler",
        "ddim",
        "--num-samples",
        "1",
        "--val-every",
        "1",
        "--image-size",
        str(RES),
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "metrics.json").read_text())
    # 16 training pairs, 2 processes x batch 4: 2 optimizer steps per epoch
    assert saved["global_step"] == 2 and saved["epochs_done"] == 1
    assert (out / "model" / "model_index.json").is_file()
    assert np.isfinite(saved["metrics"]["val/pixel_ssim"])


def test_stage_a_preprocessing_is_found_and_applied(tmp_path):
    from mindvis.data.preprocess import FMRIPreprocessor, find_preprocessing, load_preprocessor

    run = tmp_path / "stageA2"
    (run / "model").mkdir(parents=True)
    assert find_preprocessing(run) is None
    tr, te = _datasets()
    fitted = FMRIPreprocessor(patch_size=16, length=128).fit(tr.voxels * 3.0 + 1.0)
    fitted.save(run / "preprocessing.json")
    assert find_preprocessing(run) == run / "preprocessing.json"
    assert find_preprocessing(run / "model") == run / "preprocessing.json"
    pre = load_preprocessor(find_preprocessing(run / "model"))
    x_tr, x_te, used = prepare_voxels(tr, te, 128, 16, pre)
    assert used is pre and x_tr.shape == (12, 128) and x_te.shape == (4, 128)
    assert np.allclose(x_tr[:, :VOXELS], pre.transform(tr.voxels)[:, :VOXELS])
    # without one, a preprocessor is fitted on the training split: global mean 0, std 1, wrap-padded
    x_tr2, _, own = prepare_voxels(tr, te, 128, 16)
    assert abs(float(x_tr2[:, :VOXELS].mean())) < 1e-5 and abs(float(x_tr2[:, :VOXELS].std()) - 1) < 1e-4
    assert np.array_equal(x_tr2[:, VOXELS:], x_tr2[:, : 128 - VOXELS])


@pytest.mark.slow
def test_stage_b_compiled_run_matches_eager(prior_dir, mbm_dir, tmp_path, caplog):
    """``--compile``: the UNet and the encoder run compiled; the exported weights keep their names and match."""
    from mindvis.models.folder import load_safetensors

    tr, te = _datasets()
    train_stage_b(prior_dir, mbm_dir, tr, te, tmp_path / "eager", _config(), _trainer())
    with caplog.at_level("INFO", logger="mindvis.train.common"):
        train_stage_b(prior_dir, mbm_dir, tr, te, tmp_path / "compiled", _config(), _trainer(compile=True))
    assert "torch.compile: unet, fmri_encoder" in caplog.text
    for part in ("unet/model.safetensors", "fmri_encoder/model.safetensors"):
        a = load_safetensors(tmp_path / "eager/model" / part)
        b = load_safetensors(tmp_path / "compiled/model" / part)
        assert sorted(a) == sorted(b)
        fa = torch.cat([a[k].flatten().float() for k in sorted(a)])
        fb = torch.cat([b[k].flatten().float() for k in sorted(a)])
        assert float((fa - fb).norm() / fa.norm()) < 1e-3


def test_model_records_the_guidance_scale_it_was_validated_with(prior_dir, mbm_dir, tmp_path):
    """A model trained with conditioning dropout samples with its validation guidance by default; others at 1."""
    from mindvis.errors import CheckpointError
    from mindvis.pipeline import MODEL_INDEX, MindVisPipeline

    tr, te = _datasets()
    cfg = _config(cond_dropout=0.2, guidance_scale=2.5)
    train_stage_b(prior_dir, mbm_dir, tr, te, tmp_path / "cfg", cfg, _trainer())
    pipe = MindVisPipeline.from_pretrained(tmp_path / "cfg" / "model")
    assert pipe.default_guidance_scale == cfg.guidance_scale
    from mindvis.data.preprocess import load_preprocessor

    x = load_preprocessor(tmp_path / "cfg" / "model" / "preprocess.json").transform(te.voxels[:2])
    kw = dict(num_samples=1, num_inference_steps=2, sampler="ddim", seed=0, progress=False)
    implicit = pipe(x, **kw).images
    np.testing.assert_array_equal(implicit, pipe(x, guidance_scale=cfg.guidance_scale, **kw).images)
    assert not np.array_equal(implicit, pipe(x, guidance_scale=1.0, **kw).images)

    # a model trained without conditioning dropout (so validated without guidance) samples without it
    train_stage_b(prior_dir, mbm_dir, tr, te, tmp_path / "plain", _config(), _trainer())
    assert MindVisPipeline.from_pretrained(tmp_path / "plain" / "model").default_guidance_scale == 1.0

    index = tmp_path / "cfg" / "model" / MODEL_INDEX
    index.write_text(
        index.read_text().replace('"default_guidance_scale": 2.5', '"default_guidance_scale": "x"')
    )
    with pytest.raises(CheckpointError, match="default_guidance_scale|expected a number"):
        MindVisPipeline.from_pretrained(tmp_path / "cfg" / "model")
