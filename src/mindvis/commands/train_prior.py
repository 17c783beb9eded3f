"""``mindvis train-prior``: the image prior of stage B, trained on an image corpus.

Trains a VQ autoencoder on the images, then a class-conditional latent diffusion UNet on its frozen latents (the
analogue of the CompVis label2img model that MinD-Vis starts from). The run folder gets ``vq/`` and ``unet/``
(metrics.csv, checkpoints, grids), ``pipeline/`` (the prior, for ``mindvis train --prior``),
``samples_per_class.png`` and ``metrics.json`` (held-out VQ PSNR/SSIM, codebook use, class accuracy of samples).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from mindvis.commands._options import (
    add_options,
    config_options,
    config_values,
    set_threads,
    trainer_config,
    trainer_options,
)
from mindvis.errors import ConfigError
from mindvis.train.config import PRIOR_TRAINER, PriorTrainConfig, UNetTrainConfig, VQTrainConfig


def parse_assignments(items: list[str] | None, option: str) -> dict[str, Any]:
    """``["ch=32", "ch_mult=1,2,2"]`` -> ``{"ch": 32, "ch_mult": [1, 2, 2]}`` (JSON values; commas make lists)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected KEY=VALUE, got {item!r}", field=option)
        text = text.strip()
        try:
            value = json.loads(f"[{text}]") if "," in text and not text.startswith("[") else json.loads(text)
        except json.JSONDecodeError:
            value = text
        out[key.strip()] = value
    return out


def register(app: typer.Typer) -> None:
    @app.command("train-prior")
    @add_options(
        config_options(PriorTrainConfig)
        + config_options(VQTrainConfig, prefix="vq_")
        + config_options(UNetTrainConfig, prefix="unet_")
        + trainer_options(
            seed=PriorTrainConfig.seed,
            precision=PRIOR_TRAINER["precision"],
            precision_help="auto (bf16-mixed on GPUs, 32 on CPUs), 32, bf16-mixed, 16-mixed.",
            logger_help="csv, tensorboard, wandb or none.",
            log_every=PRIOR_TRAINER["log_every_n_steps"],
            progress_help="Show the progress bars.",
            resume_help="Continue the run in --out (finished halves are kept).",
        )
    )
    def train_prior_cmd(
        corpus: Path = typer.Option(
            ...,
            "--corpus",
            help="Images: a corpus .npz (images, labels, class_names), "
            "an image folder (one sub-folder per class), or a simulator output folder.",
        ),
        out: Path = typer.Option(
            ..., "--out", "-o", help="Run folder to create (or continue with --resume)."
        ),
        vq_model: list[str] | None = typer.Option(
            None,
            "--vq",
            help="VQ size override KEY=VALUE (ch, ch_mult, num_res_blocks, n_embed, ...); repeatable.",
        ),
        unet_model: list[str] | None = typer.Option(
            None,
            "--unet",
            help="UNet size override KEY=VALUE (model_channels, channel_mult, context_dim, ...); repeatable.",
        ),
        resize_mixed: bool = typer.Option(
            False,
            "--resize-mixed",
            help="Centre-crop and resize images of mixed sizes (otherwise they are an error).",
        ),
        ema: bool = typer.Option(True, "--ema/--no-ema", help="EMA of the UNet weights."),
        ema_decay: float = typer.Option(UNetTrainConfig.ema_decay, "--ema-decay", help="EMA decay."),
        classifier: Path | None = typer.Option(
            None, "--classifier", help="Benchmark classifier folder: scores the class of the samples."
        ),
        **shared: Any,
    ) -> None:
        """Train the image prior: a VQ autoencoder, then a class-conditional UNet on its latents."""
        set_threads(shared["threads"])
        from rich.console import Console

        from mindvis.train.prior import run_train_prior
        from mindvis.train.processes import is_primary_process

        config = PriorTrainConfig(
            **config_values(PriorTrainConfig, shared),
            seed=shared["seed"],
            num_workers=shared["num_workers"],
            vq=VQTrainConfig(**config_values(VQTrainConfig, shared, prefix="vq_")),
            unet=UNetTrainConfig(
                **config_values(UNetTrainConfig, shared, prefix="unet_"), ema_decay=ema_decay if ema else None
            ),
            vq_model=parse_assignments(vq_model, "--vq"),
            unet_model=parse_assignments(unet_model, "--unet"),
        )
        metrics = run_train_prior(
            config,
            corpus,
            out,
            classifier=classifier,
            resize_mixed=resize_mixed,
            trainer_config=trainer_config(shared),
            resume=shared["resume"],
            overwrite=shared["overwrite"],
        )
        if is_primary_process():
            console = Console()
            vq = metrics["vq"]["holdout"]
            console.print(
                f"[bold]VQ[/bold] on {vq['num_images']} held-out images: PSNR {vq['psnr']:.2f} dB, "
                f"SSIM {vq['ssim']:.3f}; codebook perplexity {vq['perplexity']:.1f} of "
                f"{vq['num_codes']} ({vq['dead_codes']} dead)"
            )
            if "class_accuracy_reconstructions" in vq:
                console.print(
                    f"[bold]classifier[/bold] on the held-out images {vq['class_accuracy_images']:.3f}, on "
                    f"their VQ reconstructions {vq['class_accuracy_reconstructions']:.3f}"
                )
            if "class_samples" in metrics:
                cs = metrics["class_samples"]
                console.print(
                    f"[bold]class samples[/bold]: classifier accuracy {cs['accuracy']:.3f} "
                    f"(chance {cs['chance']:.3f}, {cs['samples']} samples)"
                )
            console.print(f"prior: {out / 'pipeline'}; grid: {out / 'samples_per_class.png'}")
