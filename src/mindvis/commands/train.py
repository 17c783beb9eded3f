"""``mindvis train``: MinD-Vis stage B, the double-conditioned LDM finetuned on fMRI-image pairs.

Starts from an image prior (a ``mindvis train-prior`` pipeline folder, or a converted CompVis label2img) and a
stage A model (a ``mindvis finetune`` run folder, a model folder, or an original ``.pth``), and trains on a
paired dataset (GOD layout, the simulator's output, BOLD5000, NSD, NIfTI). The run folder gets ``model/`` and
``best/`` (pipeline folders for ``mindvis reconstruct``), ``metrics.csv``, ``samples/epochNNNN.png``,
``preprocessing.json``, ``config.json`` and ``metrics.json``.

The defaults follow the original (zjc062/mind-vis) where a user would notice: GOD subject ``sbj_3``, no sparse
voxel dropout (the original's is a no-op), and its validation schedule (a quick pass of 5 test items x 3 samples,
a full pass when its top-1 exceeds 0.15 or every 15th validation). Ours are options: ``--sparse-rate 0.2``,
``--val-schedule full``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mindvis.commands._options import (
    add_options,
    load_classifier_option,
    set_threads,
    trainer_config,
    trainer_options,
)
from mindvis.data.formats.registry import load_dataset
from mindvis.utils.io import check_output_apart


def register(app: typer.Typer) -> None:
    @app.command("train")
    @add_options(
        trainer_options(
            seed=2022,
            precision="32",
            precision_help="32 (the original's), bf16-mixed (GPU), 16-mixed, auto.",
            logger_help="csv, tensorboard, wandb (both add the CSV) or none.",
            log_every=10,
            progress_help="Show the progress bar.",
            resume_help="Continue the run in --out.",
        )
    )
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
        subject: str | None = typer.Option(
            None,
            "--subject",
            help="Subject [default: for god, sbj_3 (the original's; the folder's first subject, with a warning, "
            "when it has no sbj_3); for the other datasets, the first].",
        ),
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
            0.0,
            "--sparse-rate",
            help="Fraction of voxels zeroed per training sample. 0 (the default) is the original's behaviour: its "
            "dropout is a no-op. 0.2 (not in the original) drops what the paper describes.",
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
        standardize_tokens: bool = typer.Option(
            False,
            "--standardize-tokens/--no-standardize-tokens",
            help="Z-score the encoder tokens with training statistics before the conditioner (not in the "
            "original; helps small encoders whose tokens vary little between samples).",
        ),
        context_basis: str = typer.Option(
            "free",
            "--context-basis",
            help="free (the original) or prior-classes (not in the original): every context token is a "
            "softmax mixture of the class-conditional prior's class embeddings, so the UNet reads the fMRI "
            "from the start and stage B learns from the diffusion loss alone, without class labels.",
        ),
        basis_balance: float = typer.Option(
            0.0,
            "--basis-balance",
            help="With --context-basis prior-classes: weight of the reward for using all classes across a "
            "batch (the entropy of its mean mixture); keeps label-free training from sending every fMRI to "
            "one class. 0: off.",
        ),
        align_epochs: int = typer.Option(
            0,
            "--align-epochs",
            help="Context warm start (not in the original; 0: off): first train the encoder and conditioner "
            "for N epochs so that each training fMRI's context is the prior's embedding of its image's class. "
            "Needs a class-conditional prior and labelled training images.",
        ),
        align_lr: float = typer.Option(1e-3, "--align-lr", help="Adam learning rate of the warm start."),
        validate_start: bool = typer.Option(
            False,
            "--validate-start/--no-validate-start",
            help="Also validate the untrained model and, with --align-epochs, the model right after the warm "
            "start (validation_start.json), so the validation curve starts before training.",
        ),
        random_encoder: bool = typer.Option(
            False,
            "--random-encoder",
            help="Ablation: a randomly initialised encoder of the stage A model's size (no pretraining).",
        ),
        val_every: int = typer.Option(5, "--val-every", help="Validate every N epochs."),
        val_schedule: str = typer.Option(
            "original",
            "--val-schedule",
            help="original (the original's): a quick pass (first 5 test items x 3 samples, logged as "
            "val/quick/...), and a full pass (every item x --num-samples, logged as val/...) when its top-1 "
            "exceeds 0.15 or at every 15th validation (and, not in the original, at the first and last "
            "validation of a run). full (not in the original, about 16x the compute): a full pass every time. "
            "The best checkpoint is chosen on full-pass figures in both.",
        ),
        num_samples: int = typer.Option(
            5, "--num-samples", help="Images per test item in a full validation pass."
        ),
        sampler: str = typer.Option("plms", "--sampler", help="plms, ddim or dpmsolver++."),
        steps: int = typer.Option(250, "--steps", help="Sampler steps at validation."),
        guidance_scale: float = typer.Option(
            1.0,
            "--guidance-scale",
            help="Classifier-free guidance of the validation samples (1: off; needs --cond-dropout).",
        ),
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
        **shared: Any,
    ) -> None:
        """Stage B: finetune the double-conditioned latent diffusion model on fMRI-image pairs."""
        set_threads(shared["threads"])
        from rich.console import Console

        from mindvis.train.common import is_primary_process
        from mindvis.train.ldm import StageBConfig, default_subject, train_stage_b

        config = StageBConfig(
            trainable=trainable,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            dataset=dataset,
            epochs=epochs,
            clip_grad=clip_grad or None,
            val_every=val_every,
            val_schedule=val_schedule,
            image_size=image_size,
            crop_ratio=crop_ratio,
            crop_p=crop_p,
            sparse_rate=sparse_rate,
            cond_dropout=cond_dropout,
            global_pool=global_pool,
            use_time_cond=time_cond,
            use_cross_attn=cross_attn,
            standardize_tokens=standardize_tokens,
            context_basis=context_basis,
            basis_balance=basis_balance,
            align_epochs=align_epochs,
            align_lr=align_lr,
            validate_start=validate_start,
            encoder_init="random" if random_encoder else "pretrained",
            num_samples=num_samples,
            sampler=sampler,
            sample_steps=steps,
            guidance_scale=guidance_scale,
            val_items=val_items,
            monitor=monitor,
            seed=shared["seed"],
            num_workers=shared["num_workers"],
        )

        check_output_apart(
            out,
            {
                "--prior": prior,
                "--mbm": mbm,
                "--data-dir": data_dir,
                "--preprocess": preprocess,
                "--classifier": classifier,
            },
        )
        options: dict[str, Any] = {}
        if roi is not None:
            options["roi"] = roi
        if subject is None:
            subject = default_subject(dataset, data_dir)
        train_ds = load_dataset(dataset, data_dir, subject, "train", **options)
        test_ds = load_dataset(dataset, data_dir, subject or train_ds.subject, "test", **options)
        pre = None
        if preprocess is not None:
            from mindvis.data.preprocess import load_preprocessor

            pre = load_preprocessor(preprocess, subject=train_ds.subject)
        result = train_stage_b(
            prior,
            mbm,
            train_ds,
            test_ds,
            out,
            config,
            trainer_config(shared),
            classifier=load_classifier_option(classifier),
            preprocessor=pre,
            resume=shared["resume"],
            overwrite=shared["overwrite"],
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
