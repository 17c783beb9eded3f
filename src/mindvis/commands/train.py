"""``mindvis train``: MinD-Vis stage B, the double-conditioned LDM finetuned on fMRI-image pairs.

Starts from an image prior (a ``mindvis train-prior`` pipeline folder, or a converted CompVis label2img) and a
stage A model (a ``mindvis finetune`` run folder, a model folder, or an original ``.pth``), and trains on a
paired dataset (GOD layout, the simulator's output, BOLD5000, NSD, NIfTI). The run folder gets ``model/`` and
``best/`` (pipeline folders for ``mindvis reconstruct``), ``metrics.csv``, ``samples/epochNNNN.png``,
``preprocessing.json``, ``config.json`` and ``metrics.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def trainer_config(
    accelerator: str,
    devices: str,
    num_nodes: int,
    strategy: str,
    precision: str,
    logger: str,
    progress: bool,
    log_every: int,
) -> Any:
    """The :class:`~mindvis.train.common.TrainerConfig` of the command-line options."""
    from mindvis.train.common import TrainerConfig

    return TrainerConfig(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        logger=logger,
        progress_bar=progress,
        log_every_n_steps=log_every,
    )


def load_classifier_option(path: Path | None) -> Any:
    """A benchmark classifier folder (``mindvis`` classifier format), or ``None``."""
    if path is None:
        return None
    from mindvis.eval.classifier import BenchmarkClassifier

    return BenchmarkClassifier.load(path)


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        prior: Path = typer.Option(
            ..., "--prior", help="Image prior pipeline folder (mindvis train-prior or a converted label2img)."
        ),
        mbm: Path = typer.Option(
            ...,
            "--mbm",
            help="Stage A model: a mindvis finetune run folder, a model folder, or an original .pth.",
        ),
        out: Path = typer.Option(
            ..., "--out", "-o", help="Run folder to create (or continue with --resume)."
        ),
        dataset: str = typer.Option("god", "--dataset", help="god, synthetic, bold5000, nsd or nifti."),
        data_dir: Path | None = typer.Option(
            None, "--data-dir", help="Dataset folder (default: found under $MINDVIS_DATA)."
        ),
        subject: str | None = typer.Option(None, "--subject", help="Subject (default: the first)."),
        roi: str | None = typer.Option(None, "--roi", help="ROI of the GOD layout [default: VC]."),
        preprocess: Path | None = typer.Option(
            None,
            "--preprocess",
            help="Fitted preprocessing JSON (default: "
            "the stage A run's preprocessing.json, else fitted on train).",
        ),
        trainable: str = typer.Option(
            "original",
            "--trainable",
            help="original (encoder, conditioner, cross-attention + norm2), cond-only, or full (whole UNet).",
        ),
        epochs: int = typer.Option(500, "--epochs", help="Training epochs."),
        batch_size: int | None = typer.Option(
            None, "--batch-size", help="Batch per device [default: 5 for GOD, 25 for BOLD5000]."
        ),
        lr: float = typer.Option(5.3e-5, "--lr", help="AdamW learning rate."),
        weight_decay: float = typer.Option(0.01, "--weight-decay", help="AdamW weight decay."),
        clip_grad: float = typer.Option(0.5, "--clip-grad", help="Gradient-norm clip (0: off)."),
        image_size: int | None = typer.Option(
            None, "--image-size", help="Resolution [default: the prior's]."
        ),
        crop_ratio: float = typer.Option(0.2, "--crop-ratio", help="Random crop removes this fraction."),
        crop_p: float = typer.Option(0.5, "--crop-p", help="Probability of the random crop."),
        sparse_rate: float = typer.Option(
            0.2,
            "--sparse-rate",
            help="Fraction of voxels zeroed per training "
            "sample (0 reproduces the original, whose dropout is a no-op).",
        ),
        cond_dropout: float = typer.Option(
            0.0, "--cond-dropout", help="Conditioning dropout for classifier-free guidance (0: off)."
        ),
        global_pool: bool = typer.Option(
            False, "--global-pool/--no-global-pool", help="Mean-pool fMRI tokens."
        ),
        time_cond: bool = typer.Option(
            True, "--time-cond/--no-time-cond", help="Time-embedding conditioning."
        ),
        cross_attn: bool = typer.Option(
            True, "--cross-attn/--no-cross-attn", help="Cross-attention conditioning."
        ),
        random_encoder: bool = typer.Option(
            False,
            "--random-encoder",
            help="Ablation: a randomly initialised encoder of the stage A model's size (no pretraining).",
        ),
        val_every: int = typer.Option(5, "--val-every", help="Validate every N epochs."),
        num_samples: int = typer.Option(5, "--num-samples", help="Images per test item at validation."),
        sampler: str = typer.Option("plms", "--sampler", help="plms, ddim or dpmsolver++."),
        steps: int = typer.Option(250, "--steps", help="Sampler steps at validation."),
        val_items: int | None = typer.Option(
            None, "--val-items", help="Test items generated at validation (default: all)."
        ),
        monitor: str = typer.Option(
            "auto",
            "--monitor",
            help="Metric for the best checkpoint, e.g. "
            "val/ident_pcc_2way (auto: semantic n-way with a classifier, else that).",
        ),
        classifier: Path | None = typer.Option(
            None, "--classifier", help="Benchmark classifier folder for the semantic metrics."
        ),
        seed: int = typer.Option(2022, "--seed", help="Random seed."),
        num_workers: int = typer.Option(0, "--num-workers", help="Data-loader workers."),
        threads: int = typer.Option(
            0, "--threads", help="CPU threads of torch (0: its default, one per core)."
        ),
        accelerator: str = typer.Option("auto", "--accelerator", help="auto, cpu, gpu..."),
        devices: str = typer.Option("auto", "--devices", help="auto, a count, or indices like 0,1."),
        num_nodes: int = typer.Option(1, "--num-nodes", help="Machines."),
        strategy: str = typer.Option(
            "auto", "--strategy", help="auto (DDP with several devices), ddp, fsdp..."
        ),
        precision: str = typer.Option(
            "32", "--precision", help="32 (the original's), bf16-mixed (GPU), 16-mixed, auto."
        ),
        logger: str = typer.Option(
            "csv", "--logger", help="csv, tensorboard, wandb (both add the CSV) or none."
        ),
        log_every: int = typer.Option(10, "--log-every", help="Log training metrics every N steps."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    ) -> None:
        """Stage B: finetune the double-conditioned latent diffusion model on fMRI-image pairs."""
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        from rich.console import Console

        from mindvis.data.formats.registry import load_dataset
        from mindvis.train.common import is_primary_process
        from mindvis.train.ldm import StageBConfig, train_stage_b

        config = StageBConfig(
            trainable=trainable,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            dataset=dataset,
            epochs=epochs,
            clip_grad=clip_grad or None,
            val_every=val_every,
            image_size=image_size,
            crop_ratio=crop_ratio,
            crop_p=crop_p,
            sparse_rate=sparse_rate,
            cond_dropout=cond_dropout,
            global_pool=global_pool,
            use_time_cond=time_cond,
            use_cross_attn=cross_attn,
            encoder_init="random" if random_encoder else "pretrained",
            num_samples=num_samples,
            sampler=sampler,
            sample_steps=steps,
            val_items=val_items,
            monitor=monitor,
            seed=seed,
            num_workers=num_workers,
        )
        options: dict[str, Any] = {}
        if roi is not None:
            options["roi"] = roi
        train_ds = load_dataset(dataset, data_dir, subject, "train", **options)
        test_ds = load_dataset(dataset, data_dir, subject or train_ds.subject, "test", **options)
        pre = None
        if preprocess is not None:
            from mindvis.data.preprocess import load_preprocessor

            pre = load_preprocessor(preprocess, subject=train_ds.subject)
        tc = trainer_config(accelerator, devices, num_nodes, strategy, precision, logger, progress, log_every)
        result = train_stage_b(
            prior,
            mbm,
            train_ds,
            test_ds,
            out,
            config,
            tc,
            classifier=load_classifier_option(classifier),
            preprocessor=pre,
            resume=resume,
            overwrite=overwrite,
        )
        if is_primary_process():
            console = Console()
            console.print(
                f"[bold]stage B[/bold] {result.epochs_done} epochs, {result.global_step} steps in "
                f"{result.seconds:.0f} s; trained {result.trainable_params:,} of "
                f"{result.total_params:,} parameters ({config.trainable})"
            )
            if result.best is not None:
                console.print(f"best {result.monitor} = {result.best:.4f}")
            console.print(f"pipeline: {out / 'model'} (best: {out / 'best'}); metrics: {out / 'metrics.csv'}")
