"""``mindvis train-classifier``: train (or reuse) the benchmark's own n-way judge on its stimulus corpus."""

from __future__ import annotations

from pathlib import Path

import typer

from mindvis.commands._options import SEED_RANGE, set_threads


def register(app: typer.Typer) -> None:
    @app.command("train-classifier")
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
        preset: str = typer.Option(
            "small",
            "--preset",
            help="Training settings: small (the quick demo judge) or judge (the 20-class corpus judge: a "
            "deeper CNN, about 30 minutes on one core). Options given explicitly override the preset.",
        ),
        epochs: int | None = typer.Option(None, help="Training epochs (default: small 10, judge 20)."),
        input_size: int | None = typer.Option(
            None, help="Network input size (images are resized to it) [32]."
        ),
        holdout: float | None = typer.Option(
            None, help="Share of the corpus held out to measure accuracy (default: small 0.15, judge 0.1)."
        ),
        blur: float | None = typer.Option(
            None,
            min=0.0,
            max=1.0,
            help="Share of training images whose resolution is dropped to between half and all of the input "
            "size and restored, so that smooth images (such as VQ decodes) are judged too [0].",
        ),
        seed: int = typer.Option(0, help="Seed of the split, initialisation and augmentation.", **SEED_RANGE),
        force: bool = typer.Option(False, "--force", help="Retrain even when the cached hash matches."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Replace an --out folder that holds something other than a classifier."
        ),
        threads: int | None = typer.Option(
            None, help="torch CPU threads (1 is fastest on a busy machine; default: torch's choice)."
        ),
    ) -> None:
        """Train the benchmark classifier on training images only; cached by the SHA-256 of its data."""
        from rich.console import Console

        from mindvis.eval.classifier import classifier_config
        from mindvis.eval.classifier_training import train_classifier_on

        console = Console()
        config = classifier_config(
            preset, epochs=epochs, input_size=input_size, holdout_fraction=holdout, blur=blur, seed=seed
        )
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
