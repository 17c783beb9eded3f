"""The image prior: VQ autoencoder training, the class-conditional UNet on its latents, the run and its outputs."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from mindvis.errors import ConfigError, DataError, WeightsUnavailable
from mindvis.train.common import TrainerConfig
from mindvis.train.config import UNetTrainConfig, VQTrainConfig
from mindvis.train.prior import (
    ClassPriorModule,
    ImageCorpus,
    ImageLabelDataset,
    LatentLabelDataset,
    LocalLPIPS,
    PriorTrainConfig,
    VQAutoencoderModule,
    build_class_prior,
    codebook_usage,
    encode_corpus,
    load_image_corpus,
    psnr_ssim,
    sample_class_grid,
    train_prior,
)
from mindvis.train.prior.run import _Loaders

RES = 32  # tiny preset at 32 px: 8 x 8 x 3 latents


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _corpus(n=24, k=3, res=RES, seed=0) -> ImageCorpus:
    """Class k images: a bright square in a class-specific corner over noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    images = rng.integers(0, 80, size=(n, res, res, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        y, x = divmod(int(c), 2)
        images[i, y * res // 2 : (y + 1) * res // 2, x * res // 2 : (x + 1) * res // 2, c % 3] = 230
    return ImageCorpus(images, labels.astype(np.int64), [f"c{i}" for i in range(k)], "memory")


def _trainer(**kw) -> TrainerConfig:
    return TrainerConfig(
        accelerator="cpu", devices=1, progress_bar=False, logger="csv", log_every_n_steps=1, **kw
    )


def _config(**kw) -> PriorTrainConfig:
    base = dict(
        preset="tiny",
        resolution=RES,
        vq_epochs=1,
        unet_epochs=1,
        vq_batch_size=8,
        unet_batch_size=16,
        val_every=1,
        holdout=0.2,
        final_samples_per_class=1,
        unet=UNetTrainConfig(sample_steps=2, samples_per_class=1, ema_decay=0.9),
    )
    base.update(kw)
    return PriorTrainConfig(**base)


def _fit(module, data, tmp_path, epochs=1):
    from mindvis.train.common import build_trainer, fit

    trainer = build_trainer(_trainer(max_epochs=epochs), tmp_path, enable_checkpointing=False, export=False)
    fit(trainer, module, data)
    return trainer


# ---------------------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------------------


def test_load_corpus_npz_and_folder(tmp_path, caplog):
    from PIL import Image

    c = _corpus(n=6)
    np.savez(tmp_path / "c.npz", images=c.images, labels=c.labels, class_names=np.array(c.class_names))
    loaded = load_image_corpus(tmp_path / "c.npz")
    assert np.array_equal(loaded.images, c.images) and loaded.class_names == c.class_names
    assert load_image_corpus(tmp_path / "c.npz", resolution=16).images.shape == (6, 16, 16, 3)

    np.savez(tmp_path / "nolabels.npz", images=c.images)
    with caplog.at_level(logging.WARNING):
        unl = load_image_corpus(tmp_path / "nolabels.npz")
    assert unl.num_classes == 1 and (unl.labels == 0).all()
    np.savez(tmp_path / "bad.npz", images=c.images, labels=c.labels[:3])
    with pytest.raises(DataError, match="count mismatch"):
        load_image_corpus(tmp_path / "bad.npz")

    folder = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(c.images[i]).save(folder / cls / f"{i}.png")
    f = load_image_corpus(folder)
    assert f.class_names == ["cat", "dog"] and list(f.labels) == [0, 0, 1, 1]

    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(folder / "dog" / "odd.png")
    with pytest.raises(DataError, match="mixed sizes"):
        load_image_corpus(folder)
    with caplog.at_level(logging.WARNING):
        mixed = load_image_corpus(folder, resolution=RES, resize_mixed=True)
    assert mixed.images.shape == (5, RES, RES, 3)
    assert any("resized" in r.message for r in caplog.records)

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_image_corpus(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        load_image_corpus(tmp_path / "missing.npz")


def test_corpus_split_is_disjoint_and_seeded():
    c = _corpus(n=20)
    tr, ho = c.split(0.2, seed=3)
    assert len(ho.images) == 4 and len(tr.images) == 16
    tr2, ho2 = c.split(0.2, seed=3)
    assert np.array_equal(ho.images, ho2.images)


# ---------------------------------------------------------------------------------------------------------
# VQ
# ---------------------------------------------------------------------------------------------------------


def test_codebook_usage():
    assert codebook_usage(torch.ones(8)) == pytest.approx((8.0, 0))
    ppl, dead = codebook_usage(torch.tensor([5.0, 0, 0, 0]))
    assert ppl == pytest.approx(1.0) and dead == 3
    assert codebook_usage(torch.zeros(4)) == (0.0, 4)


def test_psnr_ssim_of_identical_and_different_images():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    psnr, ssim = psnr_ssim(x, x)
    assert torch.all(psnr > 90) and torch.allclose(ssim, torch.ones(2))
    psnr2, ssim2 = psnr_ssim(x, -x)
    assert torch.all(psnr2 < 10) and torch.all(ssim2 < 0.5)


def test_vq_losses_and_straight_through_gradients():
    from mindvis.models.ldm import build_vq, vq_quantize

    cfg = _config().ldm_config(3)
    torch.manual_seed(0)
    module = VQAutoencoderModule(build_vq(cfg.vq), VQTrainConfig(codebook_ema=False))
    x = torch.rand(2, 3, RES, RES) * 2 - 1
    x_rec, h, idx, codebook, commit = module.reconstruct(x)
    assert x_rec.shape == x.shape and idx.shape == (2, RES // 4, RES // 4)
    assert torch.equal(idx, vq_quantize(module.vq, h).indices)  # the same codes decoding would use
    e = module.vq.quantize.embedding(idx).permute(0, 3, 1, 2)
    assert codebook.item() == pytest.approx(torch.mean((e - h) ** 2).item(), rel=1e-5)
    assert commit.item() == pytest.approx(codebook.item(), rel=1e-5)
    (x_rec.abs().mean()).backward()
    assert module.vq.encoder.conv_in.weight.grad is not None  # straight-through to the encoder
    assert module.vq.quantize.embedding.weight.grad is None  # the codebook only learns from its own term


def test_ema_codebook_moves_codes_to_their_cluster_means():
    from mindvis.models.ldm import build_vq

    torch.manual_seed(0)
    module = VQAutoencoderModule(
        build_vq(_config().ldm_config(3).vq), VQTrainConfig(codebook_ema=True, codebook_decay=0.5)
    )
    emb = module.vq.quantize.embedding.weight
    assert not emb.requires_grad  # not optimised by the loss
    old = emb.detach().clone()
    h = torch.zeros(1, 3, 2, 2)
    h[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0])
    h[0, :, 0, 1] = torch.tensor([3.0, 2.0, 1.0])
    idx = torch.tensor([[[5, 5], [7, 7]]])
    h[0, :, 1, :] = old[7][:, None]
    module._ema_codebook_update(h, idx)
    # code 5: count 0.5 + 0.5 * 2, sum 0.5 * e5 + 0.5 * (4, 4, 4); after smoothing about (e5 + (4, 4, 4)) / 3
    assert torch.allclose(emb[5], (old[5] + torch.tensor([4.0, 4.0, 4.0])) / 3, atol=1e-3)
    assert torch.allclose(emb[7], old[7], atol=1e-3)  # its assigned vectors equal the code
    assert torch.allclose(emb[0], old[0], rtol=1e-3, atol=1e-6)  # unassigned codes keep their value


def test_vq_training_with_gan_and_dead_code_reinit(tmp_path):
    from mindvis.models.ldm import build_vq

    torch.manual_seed(0)
    c = _corpus(n=16)
    cfg = _config().ldm_config(3)
    module = VQAutoencoderModule(
        build_vq(cfg.vq), VQTrainConfig(lr=1e-3, gan_weight=0.5, dead_code_reinit=True, dead_code_every=1)
    )
    before_codes = module.vq.quantize.embedding.weight.detach().clone()
    before_disc = [p.detach().clone() for p in module.discriminator.parameters()]
    data = _Loaders(ImageLabelDataset(c, flip=True), ImageLabelDataset(c), 8, seed=0)
    trainer = _fit(module, data, tmp_path)
    # with 64 codes and 8 images of 8 x 8 latents, most codes are unused in a window and get re-initialised
    assert module.dead_codes_reset > 0
    assert not torch.allclose(module.vq.quantize.embedding.weight, before_codes)
    assert any(
        not torch.equal(a, b) for a, b in zip(before_disc, module.discriminator.parameters(), strict=True)
    )
    logged = trainer.callback_metrics
    for key in (
        "train/rec_epoch",
        "train/d_loss_epoch",
        "train/perplexity",
        "val/psnr",
        "val/ssim",
        "val/dead_codes",
    ):
        assert key in logged and np.isfinite(float(logged[key])), key


def test_classifier_perceptual_term_trains_the_vq(tmp_path):
    """The perceptual term on a corpus classifier's features: zero for equal images, larger for unlike ones,
    gradients to the reconstruction only; a VQ step with it runs, and it cannot be combined with LPIPS."""
    from mindvis.eval.classifier import ClassifierConfig
    from mindvis.eval.classifier_training import train_benchmark_classifier
    from mindvis.models.ldm import build_vq
    from mindvis.train.prior.losses import ClassifierPerceptual
    from test_eval_classifier import TINY, synthetic_corpus

    images, labels, names = synthetic_corpus(n_per_class=8, size=RES)
    train_benchmark_classifier(
        images, labels, names, tmp_path / "clf", ClassifierConfig(**{**TINY, "epochs": 1})
    )
    term = ClassifierPerceptual(tmp_path / "clf")
    x = torch.rand(4, 3, RES, RES) * 2 - 1
    assert float(term(x, x)) == pytest.approx(0.0, abs=1e-6)
    near, far = float(term(x + 0.02 * torch.randn_like(x), x)), float(term(-x, x))
    assert 0 < near < far
    rec = x.clone().requires_grad_(True)
    term(rec, x.flip(0)).backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0
    assert all(p.grad is None for p in term.parameters())  # the classifier stays frozen
    with pytest.raises(ConfigError, match="one perceptual term"):
        VQTrainConfig(lpips_weights="a.pth", perceptual_classifier=str(tmp_path / "clf"))

    torch.manual_seed(0)
    cfg = VQTrainConfig(lr=1e-3, perceptual_classifier=str(tmp_path / "clf"))
    module = VQAutoencoderModule(build_vq(_config().ldm_config(3).vq), cfg)
    assert isinstance(module.lpips, ClassifierPerceptual) and module.lpips.training is False
    c = _corpus(n=8)
    trainer = _fit(module, _Loaders(ImageLabelDataset(c), ImageLabelDataset(c), 4, seed=0), tmp_path / "run")
    assert np.isfinite(float(trainer.callback_metrics["train/lpips_epoch"]))


def test_lpips_needs_real_local_weights(tmp_path, caplog):
    import torchvision

    with caplog.at_level(logging.INFO, logger="mindvis.train.prior"):
        from mindvis.models.ldm import build_vq

        VQAutoencoderModule(build_vq(_config().ldm_config(3).vq), VQTrainConfig())
    assert any("without a perceptual loss" in r.message for r in caplog.records)

    with pytest.raises(WeightsUnavailable, match="not found"):
        LocalLPIPS(tmp_path / "none.pth", net="squeeze")
    torch.manual_seed(0)
    backbone = torchvision.models.squeezenet1_1(weights=None).state_dict()
    torch.save(backbone, tmp_path / "squeeze.pth")
    lp = LocalLPIPS(tmp_path / "squeeze.pth", net="squeeze")
    assert torch.equal(lp.model.net.slices[0][0].weight, backbone["features.0.weight"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lp(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert lp(x, -x).item() > 0
    assert not lp.training and not any(p.requires_grad for p in lp.parameters())
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsUnavailable, match="not a torchvision squeeze backbone"):
        LocalLPIPS(tmp_path / "wrong.pth", net="squeeze")


# ---------------------------------------------------------------------------------------------------------
# class-conditional UNet
# ---------------------------------------------------------------------------------------------------------


def test_class_prior_trains_with_ema_and_samples(tmp_path):
    torch.manual_seed(0)
    c = _corpus(n=16)
    ldm = _config().ldm_config(3)
    prior = build_class_prior(ldm, 3)
    assert prior.conditioner.config.n_classes == 4  # 3 classes + the null class
    latents = encode_corpus(prior.vq, c.images, flip=True)
    assert latents.shape == (32, 3, RES // 4, RES // 4)
    labels = torch.as_tensor(np.tile(c.labels, 2))
    module = ClassPriorModule(
        prior,
        UNetTrainConfig(lr=1e-3, ema_decay=0.5, sample_steps=2, samples_per_class=2),
        c.class_names,
        sample_dir=tmp_path / "samples",
        classifier=lambda im: np.zeros(len(im), int),
    )
    vq_before = [p.detach().clone() for p in prior.vq.parameters()]
    unet_before = [p.detach().clone() for p in prior.unet.parameters()]
    data = _Loaders(
        LatentLabelDataset(latents, labels), LatentLabelDataset(latents[:6], labels[:6]), 8, seed=0
    )
    trainer = _fit(module, data, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(vq_before, prior.vq.parameters(), strict=True))  # frozen VQ
    changed = [not torch.equal(a, b) for a, b in zip(unet_before, prior.unet.parameters(), strict=True)]
    assert any(changed)
    ema = list(module.ema["unet"].parameters())
    live = list(prior.unet.parameters())
    moved = [i for i, ch in enumerate(changed) if ch]
    # the average lies away from the live weights (it lags behind them)
    assert any(not torch.allclose(ema[i], live[i]) for i in moved)
    assert (tmp_path / "samples" / "samples_epoch0000.png").is_file()
    assert float(trainer.callback_metrics["val/sample_acc"]) == pytest.approx(
        1 / 3
    )  # always predicts class 0
    assert np.isfinite(float(trainer.callback_metrics["val/loss"]))

    exported = module.export_model()
    a, la = sample_class_grid(exported, 3, 2, 2, "ddim", seed=4)
    b, lb = sample_class_grid(exported, 3, 2, 2, "ddim", seed=4)
    assert a.shape == (6, RES, RES, 3) and a.dtype == np.uint8 and list(la) == [0, 0, 1, 1, 2, 2]
    assert np.array_equal(a, b)
    guided, _ = sample_class_grid(exported, 3, 2, 2, "ddim", seed=4, guidance_scale=3.0)
    assert guided.shape == a.shape and not np.array_equal(guided, a)


# ---------------------------------------------------------------------------------------------------------
# the whole run
# ---------------------------------------------------------------------------------------------------------


def test_train_prior_run_outputs_and_resume(tmp_path):
    from mindvis.pipeline import MindVisPipeline

    torch.manual_seed(0)
    c = _corpus(n=20)
    out = tmp_path / "prior"
    judge = lambda im: np.zeros(len(im), int)  # noqa: E731 - a classifier that always says class 0
    metrics = train_prior(c, out, _config(), _trainer(), classifier=judge)
    for rel in (
        "config.json",
        "metrics.json",
        "samples_per_class.png",
        "vq/metrics.csv",
        "vq/model",
        "vq/recon_holdout.png",
        "unet/metrics.csv",
        "unet/checkpoints/last.ckpt",
        "pipeline/model_index.json",
    ):
        assert (out / rel).exists(), rel
    saved = json.loads((out / "metrics.json").read_text())
    vq = saved["vq"]["holdout"]
    assert (
        vq["num_images"] == 4 and np.isfinite(vq["psnr"]) and 0 <= vq["ssim"] <= 1 and vq["num_codes"] == 64
    )
    _, held = c.split(_config().holdout, _config().seed)
    # the judge's accuracy on the held-out images and on their reconstructions (it always says 0)
    assert vq["class_accuracy_images"] == pytest.approx(float(np.mean(held.labels == 0)))
    assert vq["class_accuracy_reconstructions"] == vq["class_accuracy_images"]
    assert saved["class_samples"]["accuracy"] == pytest.approx(1 / 3)
    assert saved["class_samples"]["chance"] == pytest.approx(1 / 3)
    assert metrics["vq"] == saved["vq"]

    pipe = MindVisPipeline.from_pretrained(out / "pipeline")
    assert not pipe.model.is_fmri_conditioned and pipe.model.conditioner.config.n_classes == 4
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["source"]["class_names"] == c.class_names
    images = pipe(
        labels=[0, 2], num_samples=1, num_inference_steps=2, sampler="ddim", seed=0, progress=False
    ).images
    assert images.shape == (2, 1, RES, RES, 3)

    with pytest.raises(Exception, match="not empty"):
        train_prior(c, out, _config(), _trainer())

    # resume with more UNet epochs: the VQ is kept, the UNet continues from its checkpoint
    vq_stage = (out / "vq" / "stage.json").read_text()
    vq_weights = (
        (out / "vq" / "model" / "model.safetensors").read_bytes()
        if (out / "vq" / "model" / "model.safetensors").exists()
        else None
    )
    step1 = json.loads((out / "unet" / "stage.json").read_text())["global_step"]
    # settings that change what is learned are refused on resume, with the setting named, and nothing is written
    listing = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(ConfigError, match=r"cannot change prior\.unet\.lr when resuming"):
        train_prior(
            c,
            out,
            _config(
                unet_epochs=2,
                unet=UNetTrainConfig(sample_steps=2, samples_per_class=1, ema_decay=0.9, lr=1e-2),
            ),
            _trainer(),
            resume=True,
        )
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == listing
    train_prior(c, out, _config(unet_epochs=2), _trainer(), resume=True)
    assert (out / "vq" / "stage.json").read_text() == vq_stage
    if vq_weights is not None:
        assert (out / "vq" / "model" / "model.safetensors").read_bytes() == vq_weights
    step2 = json.loads((out / "unet" / "stage.json").read_text())["global_step"]
    assert step2 == 2 * step1


def test_prior_config_errors():
    with pytest.raises(ConfigError, match="resolution"):
        train_prior(_corpus(res=16), "/nonexistent/never-written", _config(), _trainer())
    with pytest.raises(ConfigError):
        PriorTrainConfig(preset="huge")
    with pytest.raises(ConfigError, match="unknown model field"):
        PriorTrainConfig(vq_model={"bogus": 1})
    with pytest.raises(ConfigError):
        PriorTrainConfig(holdout=0.0)
    with pytest.raises(ConfigError):
        VQTrainConfig(recon_loss="l3")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        UNetTrainConfig(ema_decay=1.5)
    from mindvis.train.prior import warn_instance_norm

    # 32 channels in 32 GroupNorm groups normalise each channel alone: the time embedding is erased
    assert len(warn_instance_norm(PriorTrainConfig(preset="tiny").ldm_config(3))) == 2
    fixed = PriorTrainConfig(preset="tiny", vq_model={"norm_groups": 8}, unet_model={"norm_groups": 8})
    assert warn_instance_norm(fixed.ldm_config(3)) == []
    cfg = PriorTrainConfig(preset="tiny", resolution=32, unet_model={"model_channels": 64})
    assert cfg.ldm_config(3).unet.model_channels == 64 and cfg.ldm_config(3).unet.sample_size == 8
