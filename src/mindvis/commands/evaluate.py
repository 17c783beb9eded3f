"""``mindvis evaluate``: score reconstructions (MinD-Vis n-way protocol, identification, NSD metrics, FID)."""

from __future__ import annotations

from pathlib import Path

import typer

from mindvis.commands._options import SEED_RANGE
from mindvis.errors import ConfigError
from mindvis.utils.io import atomic_dir, check_output_apart, prepare_output_dir


def _parse_ints(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated integers, got {text!r}", field=option) from None


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
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
        metrics: str = typer.Option(
            "all", help="Comma-separated groups: pixel, identification, semantic, nsd, lpips, fid (or 'all')."
        ),
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
        n_way: str = typer.Option(
            "2,10,50", help="n of the n-way metrics (infeasible n are reported as such)."
        ),
        top_k: int = typer.Option(1, help="k of the semantic n-way top-k accuracy."),
        trials: int = typer.Option(1000, help="Random trials per reconstruction for the n-way metrics."),
        seed: int = typer.Option(0, help="Seed of every random choice (trials, bootstrap).", **SEED_RANGE),
        bootstrap: int = typer.Option(1000, help="Bootstrap resamples for the 95% intervals (0: none)."),
        fid_bootstrap: int = typer.Option(200, help="Bootstrap resamples for the FID intervals."),
        gray_to_rgb: bool = typer.Option(
            False, "--gray-to-rgb", help="Allow grayscale against RGB (gray repeated)."
        ),
        title: str | None = typer.Option(None, help="Report title."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
    ) -> None:
        """Evaluate reconstructions and write metrics.json, report.html and PNG figures.

        The report folder is built beside --out and moved into place when complete.
        """
        from rich.console import Console

        from mindvis.eval.images import load_eval_images
        from mindvis.eval.networks import MetricWeights
        from mindvis.eval.report import load_results, print_summary, write_report
        from mindvis.eval.suite import METRIC_GROUPS, evaluate_reconstructions

        console = Console()
        check_output_apart(
            out,
            {
                "INPUTS": list(inputs),
                "--classifier": classifier if classifier and Path(classifier).exists() else None,
                "--classifier-weights": classifier_weights,
                "--inception-weights": inception_weights,
                "--alexnet-weights": alexnet_weights,
                "--inception-v3-weights": inception_v3_weights,
                "--efficientnet-b1-weights": efficientnet_b1_weights,
                "--swav-weights": swav_weights,
                "--weights-dir": weights_dir,
            },
        )
        prepare_output_dir(out, overwrite=overwrite)
        groups = (
            list(METRIC_GROUPS)
            if metrics.strip() == "all"
            else [m.strip() for m in metrics.split(",") if m.strip()]
        )
        weights = MetricWeights.discover(
            weights_dir,
            inception_fid=inception_weights,
            alexnet=alexnet_weights,
            inception_v3=inception_v3_weights,
            efficientnet_b1=efficientnet_b1_weights,
            swav=swav_weights,
        )
        judge = None
        if classifier is not None:
            from mindvis.eval.classifier import load_classifier

            judge = load_classifier(classifier, classifier_weights)
        options = dict(
            classifier=judge,
            metrics=groups,
            n_way=_parse_ints(n_way, "n_way"),
            top_k=top_k,
            trials=trials,
            seed=seed,
            bootstrap=bootstrap,
            fid_bootstrap=fid_bootstrap,
            weights=weights,
        )

        def run_one(recon: Path, gt: Path | None, name: str):
            images = load_eval_images(recon, gt, gray_to_rgb=gray_to_rgb)
            res = evaluate_reconstructions(
                images.recons, images.gt, ids=images.ids, source=images.source, title=name, **options
            )
            return res, images

        if compare:
            if len(inputs) < 2:
                raise ConfigError("--compare needs at least two runs", field="compare")
            names = [x.strip() for x in labels.split(",")] if labels else [p.name or str(p) for p in inputs]
            if len(names) != len(inputs):
                raise ConfigError(f"{len(names)} labels for {len(inputs)} runs", field="labels")
            runs = []
            for path, name in zip(inputs, names, strict=True):
                if (path / "metrics.json").is_file() or path.name == "metrics.json":
                    res = load_results(path)
                else:
                    res, _ = run_one(path, None, name)
                res["label"] = name
                runs.append(res)
            with atomic_dir(out, overwrite=overwrite) as tmp:
                write_report(runs, tmp, title=title or "mindvis comparison", labels=names)
            print_summary(runs, names, console=console)
        else:
            if len(inputs) > 2:
                raise ConfigError("expected RECONSTRUCTIONS [GROUND_TRUTH]; use --compare for several runs")
            gt_path = inputs[1] if len(inputs) == 2 else None
            res, images = run_one(inputs[0], gt_path, title or f"evaluation of {inputs[0]}")
            with atomic_dir(out, overwrite=overwrite) as tmp:
                write_report(res, tmp, recons=images.recons, gt=images.gt)
            print_summary(res, console=console)
        console.print(f"report: {out / 'report.html'}")
