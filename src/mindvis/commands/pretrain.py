"""``mindvis pretrain``: stage A1, masked brain modeling on HCP resting state plus GOD (Chen et al., CVPR 2023).

The options shared with ``mindvis finetune`` (recipe, preprocessing, hardware, logging) are defined here once.
Every option defaults to ``None`` = "not given", so that the stage's recipe supplies the default and, with
``--resume``, the run folder's saved configuration wins over defaults but not over what is given explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from mindvis.errors import ConfigError

#: Options that may differ from the saved configuration when a run is resumed.
RESUME_MUTABLE = {
    "epochs",
    "num_workers",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.precision",
    "trainer.accelerator",
    "trainer.logger",
    "trainer.progress_bar",
}


def common_options(
    epochs: int | None,
    batch_size: int | None,
    lr: float | None,
    min_lr: float | None,
    weight_decay: float | None,
    warmup_epochs: float | None,
    clip_grad: float | None,
    mask_ratio: float | None,
    accumulate: int | None,
    seed: int | None,
    num_workers: int | None,
    nan_policy: str | None,
    normalize: str | None,
    pad_mode: str | None,
    val_fraction: float | None,
    include_test_fmri: bool | None,
    accelerator: str | None,
    devices: str | None,
    num_nodes: int | None,
    strategy: str | None,
    precision: str | None,
    logger: str | None,
    progress: bool | None,
    val_every: int | None,
) -> dict[str, Any]:
    """The explicitly given options as dotted keys (``"lr"``, ``"data.nan_policy"``, ``"trainer.devices"``)."""
    given = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "min_lr": min_lr,
        "weight_decay": weight_decay,
        "warmup_epochs": warmup_epochs,
        "clip_grad": clip_grad,
        "mask_ratio": mask_ratio,
        "accumulate": accumulate,
        "seed": seed,
        "num_workers": num_workers,
        "data.nan_policy": nan_policy,
        "data.normalize": normalize,
        "data.pad_mode": pad_mode,
        "data.val_fraction": val_fraction,
        "data.include_test_fmri": include_test_fmri,
        "trainer.accelerator": accelerator,
        "trainer.devices": devices,
        "trainer.num_nodes": num_nodes,
        "trainer.strategy": strategy,
        "trainer.precision": precision,
        "trainer.logger": logger,
        "trainer.progress_bar": progress,
        "trainer.val_every_n_epochs": val_every,
    }
    return {k: v for k, v in given.items() if v is not None}


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"data.x": 1, "lr": 2}`` -> ``{"data": {"x": 1}, "lr": 2}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        head, _, tail = key.partition(".")
        if tail:
            out.setdefault(head, {})[tail] = value
        else:
            out[key] = value
    return out


def resolve_config(stage: str, out: Path, resume: bool, given: dict[str, Any]):
    """The run configuration: the stage's defaults with the given options, or, with ``resume``, the saved
    configuration with the given options that may change on resume (others must equal the saved values).
    """
    from mindvis.train.common import read_run_config
    from mindvis.train.mbm import MBMTrainConfig

    if not resume:
        return MBMTrainConfig.for_stage(stage, **nest(given))  # type: ignore[arg-type]
    saved = read_run_config(out, stage)["config"]
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in saved.items()}
    for key, value in given.items():
        head, _, tail = key.partition(".")
        current = merged.get(head, {}).get(tail) if tail else merged.get(head)
        if key not in RESUME_MUTABLE and _normalise(current) != _normalise(value):
            raise ConfigError(
                f"cannot change {key} when resuming (the run was started with {current!r}); start a new run instead",
                field=key,
            )
        if tail:
            merged.setdefault(head, {})[tail] = value
        else:
            merged[key] = value
    return MBMTrainConfig.from_dict(merged)


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, str) and os.path.exists(value):
        return str(Path(value).resolve())
    return value


def report(result: Any, stage: str) -> None:
    """Print the outcome of a run."""
    from rich.console import Console

    console = Console(stderr=False)
    corr = result.best_val_corr
    last = result.metrics.get("val/corr")
    console.print(
        f"[bold green]{stage} finished[/bold green]: {result.epochs_done} epochs, {result.global_step} steps, "
        f"{result.num_samples} samples x {result.num_voxels} voxels, {result.seconds:.0f} s"
    )
    if last is not None:
        start = "" if result.initial_val_corr is None else f"before training {result.initial_val_corr:.4f}, "
        console.print(f"  validation masked-patch correlation: {start}last {last:.4f}, best {corr:.4f}")
    out = result.run_dir
    console.print(f"  weights: {out / 'model'}" + (f" (best: {out / 'best'})" if corr is not None else ""))
    console.print(f"  log: {out / 'metrics.csv'}   checkpoints: {out / 'checkpoints'}")


def _find_sources(
    data_dir: Path | None,
    hcp_dir: Path | None,
    god_dir: Path | None,
    use_hcp: bool | None,
    use_god: bool | None,
) -> tuple[str | None, str | None]:
    from mindvis.data.formats.common import default_data_root

    root = data_dir if data_dir is not None else (None if (hcp_dir or god_dir) else default_data_root())
    if hcp_dir is None and root is not None and use_hcp is not False:
        if (root / "HCP").is_dir():
            hcp_dir = root / "HCP"
        elif (root / "npz").is_dir() or any(root.glob("*/HCP_visual_voxel.npz")):
            hcp_dir = root
    if god_dir is None and root is not None and use_god is not False:
        for name in ("GOD", "god", "Kamitani/npz"):
            if (root / name).is_dir():
                god_dir = root / name
                break
        else:
            if any(root.glob("sbj_*.npz")):
                god_dir = root
    if use_hcp is False:
        hcp_dir = None
    if use_god is False:
        god_dir = None
    if use_hcp and hcp_dir is None:
        raise ConfigError("--hcp was given but no HCP folder was found (pass --hcp-dir)", field="hcp_dir")
    if use_god and god_dir is None:
        raise ConfigError("--god was given but no GOD folder was found (pass --god-dir)", field="god_dir")
    if hcp_dir is None and god_dir is None:
        where = root if root is not None else "the given folders"
        raise ConfigError(
            f"no HCP or GOD data found under {where} (expected HCP/npz/<subject>/HCP_visual_voxel.npz or "
            "GOD/sbj_N.npz); pass --data-dir, --hcp-dir or --god-dir",
            field="data_dir",
        )
    return (None if hcp_dir is None else str(hcp_dir)), (None if god_dir is None else str(god_dir))


def _split_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def register(app: typer.Typer) -> None:
    @app.command("pretrain")
    def pretrain(
        out: Path = typer.Option(
            ..., "--out", "-o", help="Run folder to create (or to continue with --resume)."
        ),
        data_dir: Path | None = typer.Option(
            None,
            "--data-dir",
            help="Folder holding HCP/ and/or GOD/ (e.g. the simulator output). "
            "Default: $MINDVIS_DATA, else ~/mindvis_data.",
        ),
        hcp_dir: Path | None = typer.Option(
            None, "--hcp-dir", help="HCP folder (HCP/npz/<subject>/HCP_visual_voxel.npz)."
        ),
        god_dir: Path | None = typer.Option(None, "--god-dir", help="GOD folder (sbj_N.npz)."),
        use_hcp: bool | None = typer.Option(
            None, "--hcp/--no-hcp", help="Use the HCP data (default: when found)."
        ),
        use_god: bool | None = typer.Option(
            None, "--god/--no-god", help="Use the GOD data (default: when found)."
        ),
        god_subjects: str | None = typer.Option(
            None, "--god-subjects", help="Comma-separated GOD subjects (default all)."
        ),
        hcp_limit: int | None = typer.Option(None, "--hcp-limit", help="Use only the first N HCP subjects."),
        roi: str | None = typer.Option(None, "--roi", help="GOD ROI mask key (default: VC)."),
        window_trs: int | None = typer.Option(
            None, "--window-trs", help="HCP TRs averaged per sample (default: 10)."
        ),
        aug_times: float | None = typer.Option(
            None, "--aug-times", help="Interpolation augmentation: total size multiplier (default: 1 = none)."
        ),
        length: int | None = typer.Option(
            None,
            "--length",
            help="Common voxel length (multiple of the patch size) (default: longest subject).",
        ),
        patch_size: int | None = typer.Option(None, "--patch-size", help="Voxels per patch (default: 16)."),
        variant: str | None = typer.Option(
            None, "--variant", help="Model size: tiny, small or large (default: large)."
        ),
        epochs: int | None = typer.Option(None, "--epochs", help="Epochs (default: 500)."),
        batch_size: int | None = typer.Option(
            None, "--batch-size", help="Samples per device per step (default: 100)."
        ),
        lr: float | None = typer.Option(
            None, "--lr", help="Peak learning rate, not scaled by batch (default: 2.5e-4)."
        ),
        min_lr: float | None = typer.Option(None, "--min-lr", help="Final learning rate (default: 0)."),
        weight_decay: float | None = typer.Option(
            None, "--weight-decay", help="AdamW weight decay (default: 0.05)."
        ),
        warmup_epochs: float | None = typer.Option(
            None, "--warmup-epochs", help="Linear warmup epochs (default: 8% of --epochs, 40 of 500)."
        ),
        clip_grad: float | None = typer.Option(
            None, "--clip-grad", help="Gradient-norm clip, 0 = off (default: 0.8)."
        ),
        mask_ratio: float | None = typer.Option(
            None, "--mask-ratio", help="Fraction of patches masked (default: 0.75)."
        ),
        accumulate: int | None = typer.Option(
            None, "--accumulate", help="Batches per optimizer step (default: 1)."
        ),
        include_test_fmri: bool | None = typer.Option(
            None,
            "--include-test-fmri/--no-include-test-fmri",
            help="Also train on the GOD test-set fMRI (non-averaged presentations, no images). Off by default: "
            "the test fMRI then stays unseen until evaluation.",
        ),
        nan_policy: str | None = typer.Option(
            None,
            "--nan-policy",
            help="NaN/Inf voxels: error (default), zero (set to the mean) or drop (remove voxel).",
        ),
        normalize: str | None = typer.Option(
            None, "--normalize", help="global (one mean/std per subject, default), voxel (z-score) or none."
        ),
        pad_mode: str | None = typer.Option(None, "--pad-mode", help="wrap (default), constant or cut."),
        val_fraction: float | None = typer.Option(
            None, "--val-fraction", help="Held-out validation fraction (default: 0.01, at most 2000 samples)."
        ),
        val_every: int | None = typer.Option(
            None, "--val-every", help="Validate every N epochs (default: 1)."
        ),
        accelerator: str | None = typer.Option(None, "--accelerator", help="auto (default), cpu, gpu..."),
        devices: str | None = typer.Option(
            None, "--devices", help="auto (default), a count, or indices like 0,1."
        ),
        num_nodes: int | None = typer.Option(None, "--num-nodes", help="Machines (default: 1)."),
        strategy: str | None = typer.Option(
            None, "--strategy", help="auto (DDP with several devices), ddp, fsdp..."
        ),
        precision: str | None = typer.Option(
            None, "--precision", help="auto (bf16-mixed on GPUs, 32 on CPUs), 32-true, bf16-mixed, 16-mixed."
        ),
        num_workers: int | None = typer.Option(
            None, "--num-workers", help="Data-loader workers (default: 0)."
        ),
        seed: int | None = typer.Option(None, "--seed", help="Random seed (default: 2022)."),
        logger: str | None = typer.Option(
            None, "--logger", help="csv (default), tensorboard or wandb (both add the CSV)."
        ),
        progress: bool | None = typer.Option(None, "--progress/--no-progress", help="Show the progress bar."),
        resume: bool = typer.Option(
            False, "--resume", help="Continue the run in --out from checkpoints/last.ckpt."
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    ) -> None:
        """Stage A1: pretrain the masked brain model on unlabeled fMRI (HCP resting state + GOD)."""
        from mindvis.train.mbm import run_mbm_stage

        given = common_options(
            epochs,
            batch_size,
            lr,
            min_lr,
            weight_decay,
            warmup_epochs,
            clip_grad,
            mask_ratio,
            accumulate,
            seed,
            num_workers,
            nan_policy,
            normalize,
            pad_mode,
            val_fraction,
            include_test_fmri,
            accelerator,
            devices,
            num_nodes,
            strategy,
            precision,
            logger,
            progress,
            val_every,
        )
        if variant is not None:
            given["variant"] = variant
        extra = {
            "data.god_subjects": _split_list(god_subjects),
            "data.hcp_limit": hcp_limit,
            "data.god_roi": roi,
            "data.window_trs": window_trs,
            "data.aug_times": aug_times,
            "data.length": length,
            "data.patch_size": patch_size,
        }
        given.update({k: v for k, v in extra.items() if v is not None})
        if not resume or any(x is not None for x in (data_dir, hcp_dir, god_dir, use_hcp, use_god)):
            hcp, god = _find_sources(data_dir, hcp_dir, god_dir, use_hcp, use_god)
            given["data.hcp_dir"], given["data.god_dir"] = hcp, god
        config = resolve_config("pretrain", out, resume, given)
        result = run_mbm_stage(config, out, resume=resume, overwrite=overwrite)
        from mindvis.train.common import is_primary_process

        if is_primary_process():
            report(result, "pretrain")
