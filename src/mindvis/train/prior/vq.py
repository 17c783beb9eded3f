"""Training the VQ autoencoder of the prior (VQGAN-style): settings and the Lightning module."""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from mindvis.models.ldm import vq_quantize
from mindvis.train.config import VQTrainConfig
from mindvis.train.prior.evaluate import codebook_usage, psnr_ssim
from mindvis.train.prior.losses import ClassifierPerceptual, LocalLPIPS, PatchDiscriminator

_logger = logging.getLogger(__name__)


class VQAutoencoderModule(pl.LightningModule):
    """Lightning module training a diffusers ``VQModel`` (manual optimisation: autoencoder and discriminator).

    Batches are ``(images [B, 3, H, W] in [-1, 1], labels [B])``.
    """

    def __init__(self, vq: nn.Module, config: VQTrainConfig) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.vq = vq
        self.config = config
        n_codes = int(vq.config.num_vq_embeddings)
        self.register_buffer("epoch_counts", torch.zeros(n_codes), persistent=False)
        self.register_buffer("window_counts", torch.zeros(n_codes), persistent=False)
        self.register_buffer("val_counts", torch.zeros(n_codes), persistent=False)
        if config.codebook_ema:
            # running cluster sizes and sums of the online k-means (saved with the checkpoints)
            self.register_buffer("ema_count", torch.ones(n_codes))
            self.register_buffer("ema_sum", vq.quantize.embedding.weight.detach().clone())
            vq.quantize.embedding.weight.requires_grad_(False)
        self.discriminator = (
            PatchDiscriminator(config.disc_channels, config.disc_layers) if config.use_gan else None
        )
        self.lpips: nn.Module | None = None
        if config.use_lpips:
            self.lpips = LocalLPIPS(config.lpips_weights, config.lpips_net)
        elif config.use_perceptual_classifier:
            self.lpips = ClassifierPerceptual(config.perceptual_classifier)
        else:
            _logger.info(
                "no LPIPS backbone weights or perceptual classifier given: training the VQ without a "
                "perceptual loss term"
            )
        self.dead_codes_reset = 0

    # -- steps ----------------------------------------------------------------------------------------------

    def quantize(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest-code quantisation with straight-through gradients.

        Args:
            h: ``[B, D, h, w]`` pre-quantisation latent (encoder + quant_conv).
        Returns:
            ``(z_q [B, D, h, w] straight-through, indices [B, h, w], codebook loss, commitment loss)``.
        """
        with torch.no_grad():
            idx = vq_quantize(self.vq, h).indices  # [B, h, w], the same search decoding uses
        e = self.vq.quantize.embedding(idx).permute(0, 3, 1, 2)
        codebook = F.mse_loss(e, h.detach())
        commit = F.mse_loss(h, e.detach())
        return h + (e - h).detach(), idx, codebook, commit

    def reconstruct(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x: [B, 3, H, W]`` -> ``(x_rec, h, indices, codebook loss, commitment loss)``."""
        h = self.vq.encode(x).latents
        zq, idx, codebook, commit = self.quantize(h)
        x_rec = self.vq.decode(zq, force_not_quantize=True).sample
        return x_rec, h, idx, codebook, commit

    def _recon_loss(self, x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x_rec - x).abs().mean() if self.config.recon_loss == "l1" else F.mse_loss(x_rec, x)

    def _adaptive_gan_weight(self, nll: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        last = self.vq.decoder.conv_out.weight
        g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        w = g_nll.norm() / (g_adv.norm() + 1e-4)
        return w.clamp(0.0, 1e4).detach() * self.config.gan_weight

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0]
        opts = self.optimizers()
        opt_ae, opt_d = opts if isinstance(opts, list | tuple) else (opts, None)
        cfg = self.config
        gan_on = (
            self.discriminator is not None and self.global_step // (2 if opt_d else 1) >= cfg.gan_start_step
        )

        x_rec, h, idx, codebook, commit = self.reconstruct(x)
        rec = self._recon_loss(x_rec, x)
        nll = rec
        logs = {
            "train/rec": rec.detach(),
            "train/codebook": codebook.detach(),
            "train/commit": commit.detach(),
        }
        if self.lpips is not None:
            lp = self.lpips(x_rec, x)
            nll = nll + cfg.lpips_weight * lp
            logs["train/lpips"] = lp.detach()
        loss = nll + cfg.commitment_weight * commit
        if not cfg.codebook_ema:
            loss = loss + cfg.codebook_weight * codebook
        if gan_on:
            g_loss = -self.discriminator(x_rec).mean()
            w = self._adaptive_gan_weight(nll, g_loss)
            loss = loss + w * g_loss
            logs["train/g_loss"] = g_loss.detach()
            logs["train/g_weight"] = w
        opt_ae.zero_grad()
        self.manual_backward(loss)
        if cfg.grad_clip:
            self.clip_gradients(opt_ae, gradient_clip_val=cfg.grad_clip, gradient_clip_algorithm="norm")
        opt_ae.step()

        if opt_d is not None:
            opt_d.zero_grad()
            if gan_on:
                real, fake = self.discriminator(x.detach()), self.discriminator(x_rec.detach())
                d_loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
                self.manual_backward(d_loss)
                if cfg.grad_clip:
                    self.clip_gradients(
                        opt_d, gradient_clip_val=cfg.grad_clip, gradient_clip_algorithm="norm"
                    )
                logs["train/d_loss"] = d_loss.detach()
            opt_d.step()  # a step without gradients changes nothing but keeps the step count in lockstep

        counts = torch.bincount(idx.flatten(), minlength=self.epoch_counts.numel()).to(self.epoch_counts)
        if cfg.codebook_ema:
            self._ema_codebook_update(h.detach(), idx)
        self.epoch_counts += counts
        self.window_counts += counts
        if cfg.dead_code_reinit and (batch_idx + 1) % cfg.dead_code_every == 0:
            self._reinit_dead_codes(h.detach())
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, sync_dist=False)
        self.log_dict(logs, on_step=True, on_epoch=True)
        return loss.detach()

    @torch.no_grad()
    def _ema_codebook_update(self, h: torch.Tensor, idx: torch.Tensor) -> None:
        """Online k-means step: codes move to the decayed mean of the encoder outputs assigned to them.

        Args:
            h: ``[B, D, h, w]`` encoder outputs; idx: ``[B, h, w]`` their codes.
        """
        k = self.ema_count.numel()
        flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]).float()
        n = torch.bincount(idx.flatten(), minlength=k).to(flat)
        sums = torch.zeros(k, flat.shape[1], device=flat.device).index_add_(0, idx.flatten(), flat)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(n)
            torch.distributed.all_reduce(sums)
        d = self.config.codebook_decay
        self.ema_count.mul_(d).add_(n, alpha=1 - d)
        self.ema_sum.mul_(d).add_(sums, alpha=1 - d)
        total = self.ema_count.sum()
        smoothed = (
            (self.ema_count + 1e-5) / (total + k * 1e-5) * total
        )  # Laplace smoothing keeps rare codes finite
        self.vq.quantize.embedding.weight.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def _reinit_dead_codes(self, h: torch.Tensor) -> None:
        """Replace codes unused in the last window by random encoder outputs of this batch (same on all ranks)."""
        distributed = self._trainer is not None and self.trainer.world_size > 1
        counts = self.window_counts
        if distributed:
            counts = self.all_gather(counts).sum(0)
        dead = (counts == 0).nonzero().flatten()
        self.window_counts.zero_()
        if dead.numel() == 0:
            return
        vecs = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        pick = torch.randint(0, vecs.shape[0], (dead.numel(),), device=vecs.device)
        new = vecs[pick] + 0.01 * vecs.std() * torch.randn_like(vecs[pick])
        if distributed:
            new = self.trainer.strategy.broadcast(new, src=0)
        self.vq.quantize.embedding.weight.data[dead] = new.to(self.vq.quantize.embedding.weight.dtype)
        if self.config.codebook_ema:
            self.ema_sum[dead] = new.to(self.ema_sum.dtype)
            self.ema_count[dead] = 1.0
        self.dead_codes_reset += int(dead.numel())
        _logger.info("re-initialised %d dead codes", dead.numel())

    def on_train_epoch_end(self) -> None:
        counts = self.epoch_counts
        if self.trainer.world_size > 1:
            counts = self.all_gather(counts).sum(0)
        ppl, dead = codebook_usage(counts)
        self.log_dict({"train/perplexity": ppl, "train/dead_codes": float(dead)}, rank_zero_only=True)
        self.epoch_counts.zero_()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = batch[0]
        x_rec, _, idx, _, _ = self.reconstruct(x)
        psnr, ssim = psnr_ssim(x_rec, x)
        self.val_counts += torch.bincount(idx.flatten(), minlength=self.val_counts.numel()).to(
            self.val_counts
        )
        bs = x.shape[0]
        self.log("val/rec", self._recon_loss(x_rec, x), batch_size=bs, sync_dist=True)
        self.log("val/psnr", psnr.mean(), batch_size=bs, prog_bar=True, sync_dist=True)
        self.log("val/ssim", ssim.mean(), batch_size=bs, prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        counts = self.val_counts
        if self.trainer.world_size > 1:
            counts = self.all_gather(counts).sum(0)
        ppl, dead = codebook_usage(counts)
        self.log_dict({"val/perplexity": ppl, "val/dead_codes": float(dead)}, rank_zero_only=True)
        self.val_counts.zero_()

    def export_pretrained(self, directory: str | os.PathLike) -> None:
        """diffusers ``save_pretrained`` of the VQModel (``config.json`` + safetensors)."""
        self.vq.save_pretrained(str(directory), safe_serialization=True)

    def configure_optimizers(self) -> Any:
        cfg = self.config
        params = [p for p in self.vq.parameters() if p.requires_grad]  # the EMA codebook is not optimised
        opt_ae = torch.optim.Adam(params, lr=cfg.lr, betas=(0.5, 0.9))
        if self.discriminator is None:
            return opt_ae
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.disc_lr or cfg.lr, betas=(0.5, 0.9))
        return [opt_ae, opt_d]
