"""``mindvis evaluate``: score reconstructions (MinD-Vis n-way protocol, identification, NSD metrics, FID)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mindvis.commands._options import SEED_RANGE, add_options, config_options, config_values
from mindvis.eval.config import EvaluateConfig


#: The bounds typer checks before the config does (a usage error naming the flag).
def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    @add_options(config_options(EvaluateConfig, limits={"seed": SEED_RANGE}))
    def evaluate(
        inputs: list[Path] = typer.Argument(
            ...,
            help="RECONSTRUCTIONS [GROUND_TRUTH]: a `mindvis reconstruct` folder, an npz or an image folder, "
            "and the ground truth when the first holds none. With --compare: two or more evaluation folders "
            "(metrics.json) or reconstruction folders.",
        ),
        out: Path = typer.Option(..., "--out", "-o", help="Report folder (metrics.json, report.html, PNGs)."),
        compare: bool = typer.Option(False, "--compare", help="Put several runs side by side."),
        labels: str | None = typer.Option(None, help="Comma-separated names of the compared runs."),
        classifier: str | None = typer.Option(
            None,
            help="Judge: a benchmark classifier folder (`mindvis train-classifier`), "
            "'torchvision:vit_h_14' (the paper's), 'torchvision:ARCH[:WEIGHTS_TAG]' or 'timm:NAME'.",
        ),
        classifier_weights: Path | None = typer.Option(
            None, help="Local weights of a torchvision/timm judge."
        ),
        inception_weights: Path | None = typer.Option(None, help="Local Inception-v3 weights for FID."),
        alexnet_weights: Path | None = typer.Option(
            None, help="Local AlexNet weights (NSD AlexNet(2)/(5), LPIPS)."
        ),
        inception_v3_weights: Path | None = typer.Option(
            None, help="Local torchvision Inception-v3 (NSD Inception)."
        ),
        efficientnet_b1_weights: Path | None = typer.Option(
            None, help="Local EfficientNet-B1 weights (NSD EffNet)."
        ),
        swav_weights: Path | None = typer.Option(None, help="Local SwAV ResNet-50 weights (NSD SwAV)."),
        weights_dir: Path | None = typer.Option(
            None, help="Folder searched for weight files by their usual names."
        ),
        title: str | None = typer.Option(None, help="Report title."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
        **settings: Any,
    ) -> None:
        """Evaluate reconstructions and write metrics.json, report.html and PNG figures.

        The report folder is built beside --out and moved into place when complete.
        """
        from rich.console import Console

        from mindvis.eval.evaluate import evaluate_run
        from mindvis.eval.report import print_summary

        run = evaluate_run(
            EvaluateConfig(**config_values(EvaluateConfig, settings)),
            inputs,
            out,
            compare=compare,
            labels=[x.strip() for x in labels.split(",")] if labels else None,
            classifier=classifier,
            classifier_weights=classifier_weights,
            inception_weights=inception_weights,
            alexnet_weights=alexnet_weights,
            inception_v3_weights=inception_v3_weights,
            efficientnet_b1_weights=efficientnet_b1_weights,
            swav_weights=swav_weights,
            weights_dir=weights_dir,
            title=title,
            overwrite=overwrite,
        )
        console = Console()
        print_summary(run.runs, run.labels, console=console)
        console.print(f"report: {run.report}")
