"""``mindvis demo``: the whole MinD-Vis pipeline on the embedded SynthCortex benchmark, with a report."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from mindvis.errors import ConfigError, OutputExistsError


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def _latest_run(root: Path, preset: str, settings: list[str] | None = None) -> Path | None:
    """The newest run folder under ``root`` made with ``preset`` (for ``--resume``), and, when ``settings`` are
    given, with ``--set`` items of the same effect."""
    found = []
    for cfg in root.glob("*/config.yaml"):
        info = _demo_info_of(cfg.parent)
        if info is None or info.get("preset") != preset:
            continue
        if settings and not _same_settings(preset, settings, _recorded(info)):
            continue
        found.append(cfg.parent)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _recorded(info: dict) -> list[str]:
    return [str(item) for item in info.get("overrides") or []]


def _same_settings(preset: str, a: list[str], b: list[str]) -> bool:
    """Whether two lists of ``--set`` items give ``preset`` the same settings (spelling and order aside)."""
    from mindvis.demo import apply_overrides, get_preset

    if a == b:
        return True
    try:
        return (
            apply_overrides(get_preset(preset), a).to_dict()
            == apply_overrides(get_preset(preset), b).to_dict()
        )
    except ConfigError:
        return False


def _demo_info_of(run_dir: Path) -> dict | None:
    """The ``mindvis_demo`` record of ``run_dir/config.yaml``, or ``None`` when the folder holds no demo run."""
    import yaml

    try:
        doc = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    info = doc.get("mindvis_demo") if isinstance(doc, dict) else None
    return info if isinstance(info, dict) else None


def _demo_preset_of(run_dir: Path) -> str | None:
    """The preset recorded in ``run_dir/config.yaml`` of a demo run, or ``None`` when there is none."""
    info = _demo_info_of(run_dir)
    return str(info.get("preset")) if info is not None and info.get("preset") is not None else None


def continued_overrides(run_dir: Path, preset: str, given: list[str], overwrite: bool = False) -> list[str]:
    """The ``--set`` items to run ``run_dir`` with: those recorded there when none are given (a rerun continues
    the run as it was made), else ``given``. With ``overwrite``, ``given`` (even none) replaces them.

    Raises:
        ConfigError: ``given`` has another effect than the items the run was made with, and ``overwrite`` is
            off (the run's finished steps would be redone with other settings).
    """
    info = _demo_info_of(run_dir)
    if info is None or overwrite:
        return given
    recorded = _recorded(info)
    if not given:
        return recorded
    if not _same_settings(preset, given, recorded):
        made = " ".join(f"--set {item}" for item in recorded) or "no --set"
        raise ConfigError(
            f"{run_dir} was made with {made}; give the same (or none, to continue it as it was made), "
            "or pass --overwrite to redo its steps with the new settings",
            field="--set",
        )
    return given


def check_run_dir(run_dir: Path, preset: str, overwrite: bool = False) -> None:
    """A demo may run in ``run_dir``: absent or empty, a run of the same preset (it is continued), or
    ``overwrite``. A folder that a run left before writing anything but ``steps/`` counts as empty.

    Raises:
        OutputExistsError: a file is in the way, or the folder holds something else and ``overwrite`` is off.
    """
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise OutputExistsError("exists and is not a folder", path=run_dir)
    content = [p for p in run_dir.iterdir() if not p.name.startswith(".")]
    if not content or (
        [p.name for p in content] == ["steps"] and content[0].is_dir() and not any(content[0].iterdir())
    ):
        return
    found = _demo_preset_of(run_dir)
    if overwrite or found == preset:
        return
    if found is None:
        raise OutputExistsError(
            "is not empty and holds no demo run (no config.yaml); choose another --run-dir "
            "or pass --overwrite to write the demo's folders into it",
            path=run_dir,
        )
    raise OutputExistsError(
        f"holds a demo run of preset {found!r}, not {preset!r}; choose another --run-dir or pass "
        f"--overwrite to redo its steps with {preset!r}",
        path=run_dir,
    )


def demo(
    preset: str = typer.Option(
        "default",
        help="quick (~3 min on 2 CPU cores, smoke test), default (~20 min), "
        "full (paper-sized models; for a GPU); or a preset file (.yaml: each step's config fields, as in the "
        "settings of a run's config.yaml, which is itself a preset file).",
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
    settings: list[str] = typer.Option(
        None,
        "--set",
        metavar="SECTION.KEY=VALUE",
        help="Change one setting of one step's config, e.g. pretrain.variant=small, train.align-epochs=40 or "
        "prior.vq.lr=1e-4 (repeatable; KEY is a config field or the step command's option; VALUE is YAML of "
        "the field's type: true/false, a number, text, a list as \\[a, b]; null restores the default). Sections: simulate, "
        "classifier, pretrain, finetune, prior, train, ablation_train, reconstruct, evaluate. Recorded in "
        "config.yaml and the report.",
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Use a --run-dir that holds something other than a run of this preset, or change the --set items "
        "of a run (the steps whose settings change are redone).",
    ),
) -> None:
    """Run every step of MinD-Vis on SynthCortex and write a report.

    Steps: simulate -> benchmark classifier -> stage A1 pretrain -> stage A2 finetune -> image prior ->
    stage B finetune -> reconstruct the test set -> baseline and ablations -> evaluate and report.
    Rerunning with the same --run-dir (or --resume) skips the steps that already finished; a step whose
    settings changed (e.g. through --set) is redone, and so is every step after it.
    """
    from rich.console import Console
    from rich.table import Table

    from mindvis.demo import apply_overrides, get_preset, run_demo

    console = Console(stderr=True)
    p = get_preset(preset)
    given = list(settings or [])
    apply_overrides(p, given)  # a bad --set fails here, before any folder is chosen
    if ablations is not None:
        if ablations not in ("none", "fast", "all"):
            raise ConfigError(f"expected none, fast or all, got {ablations!r}", field="--ablations")
        p.ablations = ablations  # type: ignore[assignment]
    if run_dir is None and resume:
        run_dir = _latest_run(runs_root, p.name, given)
        if run_dir is not None:
            console.print(f"[bold]continuing[/bold] {run_dir}")
    if run_dir is None:
        run_dir = runs_root / time.strftime("%Y%m%d-%H%M%S")
    check_run_dir(run_dir, p.name, overwrite)
    items = continued_overrides(run_dir, p.name, given, overwrite)
    if items and not given:
        console.print(f"[bold]with the run's settings[/bold] {' '.join('--set ' + i for i in items)}")
    p = apply_overrides(p, items)
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
    skipped = f", {len(result.skipped)} finished steps skipped" if result.skipped else ""
    Console().print(
        f"report: {result.report}\nrun folder: {result.run_dir} ({result.seconds / 60:.1f} min{skipped})"
    )
