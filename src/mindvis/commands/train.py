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
    config_options,
    config_values,
    dataset_options,
    set_threads,
    trainer_config,
    trainer_options,
)
from mindvis.train.config import STAGE_B_TRAINER, StageBConfig

#: ``--subject``: the default GOD subject is the original's (see :func:`mindvis.train.ldm.default_subject`).
_SUBJECT_HELP = (
    "Subject of --dataset (default: for god, sbj_3, the original's, or the folder's first subject, with a "
    "warning, when it has no sbj_3; for the other datasets, the first)."
)


def register(app: typer.Typer) -> None:
    @app.command("train")
    @add_options(
        config_options(StageBConfig)
        + trainer_options(
            seed=StageBConfig.seed,
            precision=STAGE_B_TRAINER["precision"],
            precision_help="32 (the original's), bf16-mixed (GPU), 16-mixed, auto.",
            logger_help="csv, tensorboard, wandb (both add the CSV) or none.",
            log_every=STAGE_B_TRAINER["log_every_n_steps"],
            progress_help="Show the progress bar.",
            resume_help="Continue the run in --out.",
        ),
        after={
            "out": dataset_options(
                which=("dataset", "data_dir", "subject", "roi"),
                dataset_default="god",
                help={"subject": _SUBJECT_HELP},
            )
        },
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
        preprocess: Path | None = typer.Option(
            None,
            "--preprocess",
            help="Fitted preprocessing JSON (default: "
            "the stage A run's preprocessing.json, else fitted on train).",
        ),
        random_encoder: bool = typer.Option(
            False,
            "--random-encoder",
            help="Ablation: a randomly initialised encoder of the stage A model's size (no pretraining).",
        ),
        classifier: Path | None = typer.Option(
            None, "--classifier", help="Benchmark classifier folder for the semantic metrics."
        ),
        **shared: Any,
    ) -> None:
        """Stage B: finetune the double-conditioned latent diffusion model on fMRI-image pairs."""
        set_threads(shared["threads"])
        from rich.console import Console

        from mindvis.train.ldm import run_stage_b
        from mindvis.train.processes import is_primary_process

        config = StageBConfig(
            **config_values(StageBConfig, shared),
            dataset=shared["dataset"],
            encoder_init="random" if random_encoder else "pretrained",
            seed=shared["seed"],
            num_workers=shared["num_workers"],
        )
        result = run_stage_b(
            config,
            prior,
            mbm,
            out,
            data_dir=shared["data_dir"],
            subject=shared["subject"],
            roi=shared["roi"],
            preprocess=preprocess,
            classifier=classifier,
            trainer_config=trainer_config(shared),
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
