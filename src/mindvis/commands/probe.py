"""``mindvis probe``: linear readouts of class and pixels from each representation of fMRI, to find where
stimulus information is lost (raw voxels, stage A tokens, stage B conditioning)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mindvis.commands._options import add_options, config_options, config_values, dataset_options, set_threads
from mindvis.eval.config import ProbeConfig

#: The bounds typer checks before the config does (a usage error naming the flag).
_LIMITS = {"prior_items": {"min": 2}, "prior_draws": {"min": 1}}


def register(app: typer.Typer) -> None:
    @app.command("probe")
    @add_options(
        config_options(ProbeConfig, limits=_LIMITS),
        after={
            "models": dataset_options(
                which=("dataset", "data_dir", "subject", "roi"), required=("dataset", "data_dir")
            )
        },
    )
    def probe(
        models: list[Path] = typer.Argument(
            None,
            help="Model folders to probe: stage A runs (pretrain/finetune --out), stage A weights folders, or "
            "stage B pipelines (train --out/model). None: only the raw voxels.",
        ),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="Folder for probe.json, probe.md and probe.png (default: print only)."
        ),
        prior: Path | None = typer.Option(
            None,
            "--prior",
            help="A class-conditional prior (train-prior --out/pipeline): also measure how well its denoising "
            "loss names the class of training images, the signal stage B learns from when the diffusion loss "
            "is its only teacher.",
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
        threads: int | None = typer.Option(
            None, "--threads", help="torch CPU threads (default: one per core)."
        ),
        **settings: Any,
    ) -> None:
        """Read class and pixels linearly out of each level (train split -> test split) and compare to chance.

        Levels: raw voxels; then per model its preprocessed input, the encoder tokens [N, L, D] (flattened), their
        mean, and for stage B pipelines the cross-attention context and the time vector. A level far below the
        raw voxels is where information is lost.
        """
        from rich.console import Console
        from rich.table import Table

        from mindvis.eval.probe import fmt_score, prior_signal_text
        from mindvis.eval.probe import probe as run_probe

        config = ProbeConfig(**config_values(ProbeConfig, settings))
        set_threads(threads or 0)
        run = run_probe(
            config,
            list(models or []),
            out,
            dataset=settings["dataset"],
            data_dir=settings["data_dir"],
            subject=settings["subject"],
            roi=settings["roi"],
            prior=prior,
            overwrite=overwrite,
        )
        data = run.data
        table = Table(
            title=f"linear probes: {data['subject']}, {data['train']} train -> {data['test']} test samples"
        )
        for col in ("source", "level", "dims", "class acc", "chance", "pixel 2-way"):
            table.add_column(col, justify="left" if col in ("source", "level") else "right")
        for r in run.rows:
            table.add_row(
                r["source"],
                r["level"],
                str(r["dims"]),
                fmt_score(r["class_accuracy"]),
                fmt_score(r["class_chance"]),
                fmt_score(r["pixel_2way"]),
            )
        console = Console()
        console.print(table)
        for name, use in run.report.conditioning.items():
            console.print(
                f"{name}: denoising loss with its own fMRI {use['loss_true']:.5f}, with another sample's "
                f"{use['loss_shuffled']:.5f} ({use['gap_percent']:+.2f} %; near 0: the model ignores the fMRI)"
            )
        if run.prior_signal is not None:
            console.print(prior_signal_text(run.prior_signal))
        if out is not None:
            console.print(f"wrote {out / 'probe.json'}, probe.md and probe.png")
