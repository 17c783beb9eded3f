"""``mindvis simulate``: write a SynthCortex dataset (GOD- and HCP-format fMRI of a simulated visual cortex)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mindvis.commands._options import SEED_RANGE
from mindvis.utils.io import check_output_apart


def register(app: typer.Typer) -> None:
    app.command("simulate", help=simulate.__doc__)(simulate)


def simulate(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
    preset: str = typer.Option("realistic", "--preset", help="Noise preset: easy, realistic or hard."),
    seed: int = typer.Option(
        0, "--seed", help="Random seed; the same seed gives identical files.", **SEED_RANGE
    ),
    subjects: int | None = typer.Option(None, "--subjects", help="GOD-like target subjects [1]."),
    rest_subjects: int | None = typer.Option(
        None, "--rest-subjects", help="HCP-like resting-state subjects [50]."
    ),
    n_train: int | None = typer.Option(None, "--n-train", help="Training images, one trial each [1200]."),
    n_test: int | None = typer.Option(None, "--n-test", help="Test images [50]."),
    repeats: int | None = typer.Option(None, "--repeats", help="Repeats of each test image [35]."),
    resolution: int | None = typer.Option(None, "--resolution", help="Stimulus size in pixels [64]."),
    source: str | None = typer.Option(
        None,
        "--source",
        help="Stimulus source: fashion-mnist (10 classes), animal-mnist (10), fashion+animal (both: 20 "
        "classes, corpus classes balanced by reusing Animal-MNIST objects) or folder:PATH (default: fashion-mnist).",
    ),
    voxels: int | None = typer.Option(None, "--voxels", help="Mean VC voxels of a target subject [4500]."),
    rest_vertices: int | None = typer.Option(
        None, "--rest-vertices", help="V1-V4 vertices of each resting-state subject [3600]."
    ),
    trs: int | None = typer.Option(None, "--trs", help="Resting-state TRs per subject [1200]."),
    corpus_size: int | None = typer.Option(
        None,
        "--corpus-size",
        help="Images in stimuli/corpus.npz, streamed to disk in chunks (any size fits in memory) [5000].",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    report: bool = typer.Option(
        False, "--report", help="Print the calibration figures and write calibration.json."
    ),
) -> None:
    """Simulate a visual cortex and write GOD- and HCP-format fMRI plus the stimulus corpus."""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from mindvis.synthcortex import SynthConfig
    from mindvis.synthcortex import simulate as run_simulation
    from mindvis.synthcortex.config import OPTION_FIELDS

    given: dict[str, Any] = {
        "seed": seed,
        "subjects": subjects,
        "rest_subjects": rest_subjects,
        "n_train": n_train,
        "n_test": n_test,
        "repeats": repeats,
        "resolution": resolution,
        "source": source,
        "voxels": voxels,
        "rest_vertices": rest_vertices,
        "trs": trs,
        "corpus_size": corpus_size,
    }
    overrides = {OPTION_FIELDS.get(k, k): v for k, v in given.items() if v is not None}
    config = SynthConfig.preset(preset, **overrides)

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
