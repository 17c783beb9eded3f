"""``mindvis demo``: the whole MinD-Vis pipeline on the embedded SynthCortex benchmark, with a report."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from mindvis.errors import ConfigError


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def _latest_run(root: Path, preset: str) -> Path | None:
    """The newest run folder under ``root`` made with ``preset`` (for ``--resume``)."""
    import yaml

    found = []
    for cfg in root.glob("*/config.yaml"):
        try:
            doc = yaml.safe_load(cfg.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if (doc.get("mindvis_demo") or {}).get("preset") == preset:
            found.append(cfg.parent)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def demo(
    preset: str = typer.Option(
        "default",
        help="quick (~3 min on 2 CPU cores, smoke test), default (~20 min), "
        "full (paper-sized models; for a GPU).",
    ),
    run_dir: Path = typer.Option(
        None, "--run-dir", help="Run folder to create or continue (default: runs/<timestamp>)."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the newest run folder under --runs-root made "
        "with the same preset; finished steps are skipped.",
    ),
    runs_root: Path = typer.Option(Path("runs"), "--runs-root", help="Where new run folders go."),
    ablations: str = typer.Option(
        None,
        help="none, fast (the preset's default: ridge baseline, no "
        "pretraining, PLMS-250 vs DPM-Solver++) or all (adds one conditioning path "
        "only).",
    ),
    train_prior: bool = typer.Option(
        False, "--train-prior", help="Train the image prior instead of using the shipped one."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars of each step."),
) -> None:
    """Run every step of MinD-Vis on SynthCortex and write a report.

    Steps: simulate -> benchmark classifier -> stage A1 pretrain -> stage A2 finetune -> image prior ->
    stage B finetune -> reconstruct the test set -> baseline and ablations -> evaluate and report.
    Rerunning with the same --run-dir (or --resume) skips the steps that already finished.
    """
    from rich.console import Console
    from rich.table import Table

    from mindvis.demo import get_preset, run_demo

    console = Console(stderr=True)
    p = get_preset(preset)
    if ablations is not None:
        if ablations not in ("none", "fast", "all"):
            raise ConfigError(f"expected none, fast or all, got {ablations!r}", field="--ablations")
        p.ablations = ablations  # type: ignore[assignment]
    if run_dir is None and resume:
        run_dir = _latest_run(runs_root, p.name)
        if run_dir is not None:
            console.print(f"[bold]continuing[/bold] {run_dir}")
    if run_dir is None:
        run_dir = runs_root / time.strftime("%Y%m%d-%H%M%S")
    t0 = time.perf_counter()

    def on_step(i: int, total: int | None, name: str) -> None:
        elapsed = time.perf_counter() - t0
        eta = ""
        if i > 0 and total:
            eta = f", roughly {elapsed / i * (total - i) / 60:.0f} min left at this pace"
        console.rule(
            f"[bold]step {i + 1}/{total or '?'}: {name}[/bold] ({elapsed / 60:.1f} min elapsed{eta})"
        )

    result = run_demo(p, run_dir, train_prior=train_prior, on_step=on_step, progress=progress)
    table = Table(title=f"mindvis demo ({p.name}) — test set, 95% CIs in brackets, values in %")
    labels = list(result.headline[0]["text"]) if result.headline else []
    table.add_column("metric")
    table.add_column("chance")
    for lab in labels:
        table.add_column(lab)
    for row in result.headline:
        ch = row["chance"]
        table.add_row(
            row["metric"], "–" if ch is None else f"{100 * ch:.1f}", *[row["text"][lab] for lab in labels]
        )
    Console().print(table)
    skipped = f" ({len(result.skipped)} finished steps skipped)" if result.skipped else ""
    Console().print(
        f"report: {result.report}\nrun folder: {result.run_dir} ({result.seconds / 60:.1f} min{skipped})"
    )
