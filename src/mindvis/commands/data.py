"""``mindvis data``: inspect dataset folders, convert GOD BData to the npz layout, build HCP pretraining files.

Other commands take the dataset through the shared options of
:func:`mindvis.commands._options.dataset_options` and load it with
:func:`mindvis.data.formats.registry.load_dataset`.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mindvis.errors import DataError
from mindvis.utils.io import check_output_apart

data_app = typer.Typer(help="Inspect, convert and prepare fMRI datasets.", no_args_is_help=True)
convert_app = typer.Typer(help="Convert a dataset to the layout mindvis reads fastest.", no_args_is_help=True)
data_app.add_typer(convert_app, name="convert")


@data_app.command("info")
def info(
    path: Path = typer.Argument(
        ..., help="A dataset folder or file (GOD npz/h5, BOLD5000, NSD, HCP, NIfTI)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    check_images: bool = typer.Option(
        False, "--check-images", help="Also read the images of BOLD5000 and NSD (large) and check them."
    ),
) -> None:
    """Detect the format of PATH and print its subjects, splits, voxel counts, ROIs, images and problems."""
    from mindvis.data.formats.detect import describe

    if path.exists() and not (path.is_file() or path.is_dir()):
        raise DataError(
            "not a regular file or folder (a FIFO, socket or device cannot be read as data)", path=path
        )
    report = describe(path, check_images=check_images)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    _print_report(report)


def _print_report(report: dict) -> None:
    """The report as text; every value from the data is escaped, so that ``[field]`` prints as written."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{escape(str(report['path']))}[/bold]: format [cyan]{escape(str(report['format']))}[/cyan]"
    )
    for line in report.get("notes", []):
        console.print(f"  {escape(str(line))}")
    subjects = report.get("subjects", [])
    if subjects:
        table = Table(show_header=True, header_style="bold")
        for col in ("subject", "split", "samples", "voxels", "ROIs", "images", "image size", "repeats"):
            table.add_column(col)
        for s in subjects:
            for sp in s.get("splits", []):
                cells = (
                    s["subject"],
                    sp.get("split", ""),
                    sp.get("samples", ""),
                    sp.get("voxels", ""),
                    ", ".join(map(str, s.get("rois", []))),
                    sp.get("images", ""),
                    "x".join(str(v) for v in sp.get("image_size", [])),
                    sp.get("repeats", ""),
                )
                table.add_row(*(escape(str(c)) for c in cells))
        console.print(table)
    problems = report.get("problems", [])
    if problems:
        console.print(f"[bold red]{len(problems)} problem(s):[/bold red]")
        for p in problems:
            console.print(f"  - {escape(str(p))}")
    else:
        console.print("[green]no problems found[/green]")


@convert_app.command("god-h5")
def convert_god_h5_cmd(
    src: Path = typer.Argument(..., help="A GOD BData .h5 file or a folder of them (Subject1.h5 ...)."),
    out: Path = typer.Option(
        ..., "--out", help="Output folder for the npz layout (sbj_N.npz, label files...)."
    ),
    stimulus_dir: Path = typer.Option(
        None,
        "--stimulus-dir",
        help="Folder with the stimulus tables, imagenet_class_index.json and images npz (default: SRC's folder).",
    ),
    images: Path = typer.Option(
        None, "--images", help="Images npz (train_images/test_images) to copy along."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists and is not empty."),
) -> None:
    """Convert GOD BData .h5 files to the MinD-Vis npz layout (identical datasets through both readers)."""
    from mindvis.data.formats.god_h5 import convert_god_h5

    check_output_apart(out, {"SRC": src, "--stimulus-dir": stimulus_dir, "--images": images})
    written = convert_god_h5(
        src,
        out,
        stimulus_dir=stimulus_dir,
        images_file=images,
        overwrite=overwrite,
        progress=lambda msg: typer.echo(msg, err=True),
    )
    typer.echo(f"wrote {len(written)} subject file(s) to {out}")


@data_app.command("prepare-hcp")
def prepare_hcp_cmd(
    src: Path = typer.Argument(..., help="HCP folder: <subject>/MNINonLinear/Results/<run>/*.dtseries.nii."),
    parcellation: Path = typer.Option(
        ..., "--parcellation", help="CIFTI dlabel.nii with the areas' labels (e.g. the Glasser MMP file)."
    ),
    out: Path = typer.Option(..., "--out", help="Output root: <out>/<subject>/HCP_visual_voxel.npz."),
    areas: str = typer.Option("V1,V2,V3,V4", "--areas", help="Comma-separated areas, one npz key each."),
    run: str = typer.Option("rfMRI_REST1_LR", "--run", help="Run name to look for in each subject folder."),
    workers: int = typer.Option(1, "--workers", "-j", min=1, help="Parallel processes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo subjects whose output exists."),
) -> None:
    """Make HCP_visual_voxel.npz (V1..V4 time series) per subject from CIFTI dtseries; skips finished subjects."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mindvis.data.formats.hcp_cifti import find_hcp_runs, prepare_hcp

    check_output_apart(out, {"SRC": src, "--parcellation": parcellation})
    n = len(find_hcp_runs(src, run))
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as bar:
        task = bar.add_task("HCP subjects", total=n)

        def step(subject: str, status: str) -> None:
            bar.advance(task)
            if status.startswith("failed"):
                bar.console.print(f"[red]{subject}: {status}[/red]")

        report = prepare_hcp(
            src,
            parcellation,
            out,
            areas=tuple(a.strip() for a in areas.split(",") if a.strip()),
            run=run,
            workers=workers,
            overwrite=overwrite,
            progress=step,
        )
    typer.echo(f"{len(report.done)} written, {len(report.skipped)} already done, {len(report.failed)} failed")
    if report.failed:
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
