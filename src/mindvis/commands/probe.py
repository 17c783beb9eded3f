"""``mindvis probe``: linear readouts of class and pixels from each representation of fMRI, to find where
stimulus information is lost (raw voxels, stage A tokens, stage B conditioning)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mindvis.commands._options import set_threads
from mindvis.data.formats.registry import load_dataset
from mindvis.errors import DataError
from mindvis.utils.io import atomic_dir, atomic_write, check_output_apart, prepare_output_dir, write_json


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def probe_table(rows: list[dict[str, Any]], use: dict[str, dict[str, float]] | None = None) -> str:
    """A Markdown table of probe results (``ProbeResult.to_dict()`` rows), then the conditioning-use figures."""
    head = "| source | level | dims | class accuracy | class chance | pixel 2-way |\n|---|---|---:|---:|---:|---:|\n"
    body = "".join(
        f"| {r['source']} | {r['level']} | {r['dims']} | {_fmt(r['class_accuracy'])} | "
        f"{_fmt(r['class_chance'])} | {_fmt(r['pixel_2way'])} |\n"
        for r in rows
    )
    tail = ""
    if use:
        tail = (
            "\n| model | denoising loss, own fMRI | with another sample's fMRI | gap |\n|---|---:|---:|---:|\n"
            + "".join(
                f"| {k} | {u['loss_true']:.5f} | {u['loss_shuffled']:.5f} | {u['gap_percent']:+.2f} % |\n"
                for k, u in use.items()
            )
        )
    return head + body + tail


def _prior_signal(prior: Path, train: Any, items: int, draws: int) -> dict[str, Any]:
    """:func:`~mindvis.eval.probe.prior_class_signal` on a seeded subset of the labelled training images."""
    import numpy as np

    from mindvis.eval.probe import prior_class_signal
    from mindvis.train.stage_b_model import load_prior

    if train.labels is None or not train.paired:
        raise DataError("--prior needs labelled, paired training images", path=train.source, field="labels")
    labels = np.asarray(train.labels)
    known = np.flatnonzero(labels >= 0)
    idx = np.sort(np.random.default_rng(0).permutation(known)[:items])
    signal = prior_class_signal(load_prior(prior), train.sample_images()[idx], labels[idx], draws=draws)
    return {"prior": str(prior), "draws": draws, **signal}


def prior_signal_text(signal: dict[str, Any]) -> str:
    """One paragraph on a prior's class signal (:func:`~mindvis.eval.probe.prior_class_signal`)."""
    acc = ", ".join(f"{n} draw{'s' * (int(n) > 1)} {v:.3f}" for n, v in signal["accuracy"].items())
    return (
        f"prior {signal['prior']} on {signal['items']} training images: denoising loss under the image's own "
        f"class {signal['loss_own']:.5f}, under the other classes {signal['loss_other']:.5f} "
        f"({signal['gap_percent']:+.2f} %); in a single draw the own class beats a random other one "
        f"{signal['pairwise_win']:.3f} of the time (0.5: no signal; by timestep "
        + ", ".join(f"{k} {v:.3f}" for k, v in signal["pairwise_win_by_timestep"].items())
        + "); the lowest loss names the class "
        f"({acc}; chance {signal['chance']:.3f})"
    )


def plot_probes(rows: list[dict[str, Any]], path: Path) -> None:
    """Horizontal bars of class accuracy and pixel identification per level, chance marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['source']}: {r['level']}" for r in rows]
    panels = [
        ("class accuracy (test)", "class_accuracy", [r["class_chance"] for r in rows]),
        ("pixel 2-way identification (test)", "pixel_2way", [0.5] * len(rows)),
    ]
    panels = [p for p in panels if any(r[p[1]] is not None for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.35 * len(rows) + 1.2), squeeze=False)
    ys = list(range(len(rows)))[::-1]
    for ax, (title, key, chance) in zip(axes[0], panels, strict=True):
        ax.barh(ys, [r[key] or 0.0 for r in rows], color="#4c72b0")
        for y, c in zip(ys, chance, strict=True):
            if c is not None:
                ax.plot([c, c], [y - 0.4, y + 0.4], color="#c44e52", lw=2)
        ax.set_yticks(ys, names if ax is axes[0][0] else [""] * len(rows), fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_title(title, fontsize=9)
    axes[0][-1].text(1.0, -0.9, "red: chance", color="#c44e52", fontsize=7, ha="right")
    fig.tight_layout()

    with atomic_write(path, mode="wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def register(app: typer.Typer) -> None:
    @app.command("probe")
    def probe(
        models: list[Path] = typer.Argument(
            None,
            help="Model folders to probe: stage A runs (pretrain/finetune --out), stage A weights folders, or "
            "stage B pipelines (train --out/model). None: only the raw voxels.",
        ),
        dataset: str = typer.Option(..., "--dataset", help="Dataset kind (synthetic, god, ...)."),
        data_dir: Path = typer.Option(..., "--data-dir", help="Folder of --dataset."),
        subject: str | None = typer.Option(None, "--subject", help="Subject (default: the first)."),
        roi: str | None = typer.Option(None, "--roi", help="ROI mask key (default: the dataset's)."),
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
        prior_items: int = typer.Option(
            200, "--prior-items", min=2, help="Training images (a seeded random subset) for --prior."
        ),
        prior_draws: int = typer.Option(
            16, "--prior-draws", min=1, help="Noise draws per image and class for --prior."
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
        threads: int | None = typer.Option(
            None, "--threads", help="torch CPU threads (default: one per core)."
        ),
    ) -> None:
        """Read class and pixels linearly out of each level (train split -> test split) and compare to chance.

        Levels: raw voxels; then per model its preprocessed input, the encoder tokens [N, L, D] (flattened), their
        mean, and for stage B pipelines the cross-attention context and the time vector. A level far below the
        raw voxels is where information is lost.
        """
        from rich.console import Console
        from rich.table import Table

        from mindvis.eval.probe import run_probes
        from mindvis.utils.steps import provenance

        if out is not None:
            check_output_apart(out, {"MODELS": list(models or []), "--data-dir": data_dir, "--prior": prior})
            prepare_output_dir(out, overwrite=overwrite)
        set_threads(threads or 0)
        options: dict[str, Any] = {} if roi is None else {"roi": roi}
        train = load_dataset(dataset, data_dir, subject, "train", **options)
        test = load_dataset(dataset, data_dir, subject or train.subject, "test", **options)
        signal = None if prior is None else _prior_signal(prior, train, prior_items, prior_draws)
        report = run_probes(train, test, list(models or []))
        results = [r.to_dict() for r in report.levels]
        table = Table(title=f"linear probes: {train.subject}, {len(train)} train -> {len(test)} test samples")
        for col in ("source", "level", "dims", "class acc", "chance", "pixel 2-way"):
            table.add_column(col, justify="left" if col in ("source", "level") else "right")
        for r in results:
            table.add_row(
                r["source"],
                r["level"],
                str(r["dims"]),
                _fmt(r["class_accuracy"]),
                _fmt(r["class_chance"]),
                _fmt(r["pixel_2way"]),
            )
        console = Console()
        console.print(table)
        for name, use in report.conditioning.items():
            console.print(
                f"{name}: denoising loss with its own fMRI {use['loss_true']:.5f}, with another sample's "
                f"{use['loss_shuffled']:.5f} ({use['gap_percent']:+.2f} %; near 0: the model ignores the fMRI)"
            )
        if signal is not None:
            console.print(prior_signal_text(signal))
        if out is None:
            return
        with atomic_dir(out, overwrite=True) as tmp:
            write_json(
                tmp / "probe.json",
                {
                    "format": "mindvis-probe/1",
                    "data": {
                        "dataset": dataset,
                        "data_dir": str(data_dir),
                        "subject": train.subject,
                        "train": len(train),
                        "test": len(test),
                    },  # fmt: skip
                    **report.to_dict(),
                    **({} if signal is None else {"prior_class_signal": signal}),
                    **provenance(),
                },
            )
            with atomic_write(tmp / "probe.md", mode="w") as f:
                f.write(probe_table(results, report.conditioning))
                if signal is not None:
                    f.write(f"\n{prior_signal_text(signal)}\n")
            plot_probes(results, tmp / "probe.png")
        console.print(f"wrote {out / 'probe.json'}, probe.md and probe.png")
