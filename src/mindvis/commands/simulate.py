"""``mindvis simulate``: write a SynthCortex dataset (GOD- and HCP-format fMRI of a simulated visual cortex)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mindvis.commands._options import SEED_RANGE, add_options, config_options, config_values
from mindvis.synthcortex import simulate as run_simulation
from mindvis.synthcortex.config import SynthConfig
from mindvis.utils.io import check_output_apart


def register(app: typer.Typer) -> None:
    app.command("simulate", help=simulate.__doc__)(
        add_options([], after={"preset": config_options(SynthConfig, limits={"seed": SEED_RANGE})})(simulate)
    )


def simulate(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
    preset: str = typer.Option("realistic", "--preset", help="Noise preset: easy, realistic or hard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    report: bool = typer.Option(
        False, "--report", help="Print the calibration figures and write calibration.json."
    ),
    **shared: Any,
) -> None:
    """Simulate a visual cortex and write GOD- and HCP-format fMRI plus the stimulus corpus."""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    config = SynthConfig.preset(preset, **config_values(SynthConfig, shared))

    folder = config.source.partition("folder:")[2] if config.source.startswith("folder:") else None
    check_output_apart(out, {"--source": folder})
    err = Console(stderr=True)
    start = time.perf_counter()
    with Progress(
        TextColumn("[bold]simulate[/bold] {task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=100)

        def progress(message: str, fraction: float) -> None:
            bar.update(task, description=message, completed=100 * fraction)

        manifest = run_simulation(config, out, overwrite=overwrite, report=report, progress=progress)
    elapsed = time.perf_counter() - start
    console = Console()
    _summary(console, manifest, out, elapsed)
    if report:
        print_calibration(console, manifest["calibration"])


def _summary(console: Any, manifest: dict[str, Any], out: Path, elapsed: float) -> None:
    cfg = manifest["config"]
    console.print(
        f"SynthCortex ({cfg['name']}, seed {cfg['seed']}) written to [bold]{out}[/bold] in {elapsed:.1f} s"
    )
    for name, sub in manifest["subjects"].items():
        rois = ", ".join(f"{r} {n}" for r, n in sub["roi_voxels"].items())
        console.print(
            f"  GOD/{name}.npz: {sub['voxels']} voxels ({rois}); {cfg['n_train']} training trials, "
            f"{cfg['n_test']} test images x {cfg['n_repeats']} repeats"
        )
    if manifest["subjects"]:
        console.print(
            f"  GOD/images_{cfg['resolution']}.npz: {cfg['n_train']} + {cfg['n_test']} images, "
            f"{len(manifest['class_names'])} classes"
        )
    n_rest = len(manifest["rest_subjects"])
    if n_rest:
        first = next(iter(manifest["rest_subjects"].values()))
        verts = sum(first["vertices"].values())
        console.print(
            f"  HCP/npz/<subject>/HCP_visual_voxel.npz: {n_rest} subjects x {cfg['n_trs']} TRs x "
            f"{verts} vertices (V1-V4)"
        )
    if cfg["corpus_size"]:
        console.print(f"  stimuli/corpus.npz: {cfg['corpus_size']} labelled images")


def print_calibration(console: Any, cal: dict[str, Any]) -> None:
    """The calibration figures as tables."""
    from rich.table import Table

    nc = Table(
        title=f"Noise ceiling of {cal['subject']} (fraction of variance, estimated from the test repeats)"
    )
    for col in ("ROI", "p10", "p25", "median", "p75", "p90", "true median"):
        nc.add_column(col, justify="right")
    for roi, q in cal["noise_ceiling"]["estimated_from_test_repeats"].items():
        true = cal["noise_ceiling"]["true"][roi]["median"]
        nc.add_row(roi, *(f"{q[k]:.2f}" for k in ("p10", "p25", "median", "p75", "p90")), f"{true:.2f}")
    console.print(nc)
    ident = cal["identification_true_model"]
    pub = ident["published"]
    t = Table(title="Identification and decoding")
    for col in ("figure", "SynthCortex", "chance", "published (real fMRI)"):
        t.add_column(col, justify="right")
    t.add_row(
        f"true model, {ident['n_images']} images, {ident['repeats']}-repeat average",
        f"{ident['averaged']:.1%}",
        f"{ident['chance']:.1%}",
        " / ".join(f"{x:.0%}" for x in pub["averaged"]) + " (Kay 2008 S1/S2)",
    )
    t.add_row(
        f"true model, {ident['n_images']} images, single trial",
        f"{ident['single_trial']:.1%}",
        f"{ident['chance']:.1%}",
        " / ".join(f"{x:.0%}" for x in pub["single_trial"]) + " (Kay 2008 S1/S2)",
    )
    god = cal["identification_true_model_god_test"]
    t.add_row(
        f"true model, {god['n_images']} GOD test images, {god['repeats_averaged']}-repeat average",
        f"{god['accuracy']:.1%}",
        f"{god['chance']:.1%}",
        "",
    )
    rd = cal["ridge_decoder"]
    t.add_row(
        f"ridge voxels->pixels, {rd['n_test']}-way identification",
        f"{rd['identification']:.1%}",
        f"{rd['identification_chance']:.1%}",
        "",
    )
    t.add_row("ridge voxels->pixels, mean pixel correlation", f"{rd['pixel_correlation_mean']:.3f}", "", "")
    t.add_row("ridge voxels->class, accuracy", f"{rd['class_accuracy']:.1%}", f"{rd['class_chance']:.1%}", "")
    lay = cal.get("layout_decoder")
    if lay:
        t.add_row(
            "ridge voxels->object x / y / size, r",
            f"{lay['r_x']:.2f} / {lay['r_y']:.2f} / {lay['r_size']:.2f}",
            "0",
            "",
        )
    console.print(t)
