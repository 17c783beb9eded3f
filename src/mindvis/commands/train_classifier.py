"""``mindvis train-classifier``: train (or reuse) the benchmark's own n-way judge on its stimulus corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mindvis.commands._options import SEED_RANGE, add_options, config_options, config_values, set_threads
from mindvis.eval.config import ClassifierOptions

#: Bounds that typer checks on the generated options.
_LIMITS = {"seed": SEED_RANGE, "blur": {"min": 0.0, "max": 1.0}}


def register(app: typer.Typer) -> None:
    @app.command("train-classifier")
    @add_options([], after={"exclude_test": config_options(ClassifierOptions, limits=_LIMITS)})
    def train_classifier(
        corpus: Path = typer.Option(
            ...,
            "--corpus",
            help="Stimulus corpus npz (images, labels, class_names) or "
            "a GOD-layout images_<res>.npz (only its training split is used).",
        ),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for model.safetensors + config.json."),
        exclude_test: Path | None = typer.Option(
            None,
            "--exclude-test",
            help="npz whose test_images must not be trained on; matching corpus images are dropped.",
        ),
        force: bool = typer.Option(False, "--force", help="Retrain even when the cached hash matches."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Replace an --out folder that holds something other than a classifier."
        ),
        threads: int | None = typer.Option(
            None, help="torch CPU threads (1 is fastest on a busy machine; default: torch's choice)."
        ),
        **shared: Any,
    ) -> None:
        """Train the benchmark classifier on training images only; cached by the SHA-256 of its data."""
        from rich.console import Console

        from mindvis.eval.classifier_training import train_classifier_on

        console = Console()
        config = ClassifierOptions(**config_values(ClassifierOptions, shared)).config()
        set_threads(threads or 0)
        result = train_classifier_on(
            config, corpus, out, exclude_test=exclude_test, force=force, overwrite=overwrite
        )
        names = result.classifier.class_names
        info = result.classifier.info
        state = "reused (training data unchanged)" if result.cached else f"trained in {result.seconds:.1f} s"
        console.print(f"classifier {state}: {out}")
        by = " (whole objects held out)" if info.get("holdout_by_object") else ""
        console.print(
            f"held-out accuracy {info['held_out_accuracy']:.3f} on {info['n_holdout']} images{by} "
            f"({len(names)} classes, majority-class chance {info['held_out_chance']:.3f}); "
            f"trained on {info['n_train']} images, data sha256 {info['training_data_sha256'][:16]}..."
        )
