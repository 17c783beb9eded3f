"""``mindvis finetune``: stage A2, masked brain modeling tuned on the target subject (Chen et al., CVPR 2023).

Starts from a pretrained model (``mindvis pretrain`` output, a saved model folder, or an original stage-A
``.pth``) and continues the same objective on one subject's fMRI, padded or cropped to the model's voxel count.
The subject's fitted preprocessing is saved as ``preprocessing.json``, for stage B and reconstruction.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune(
        init: Path | None = typer.Option(
            None,
            "--init",
            help="Pretrained model: a `mindvis pretrain` run folder, a model folder, or an original .pth "
            "(required, except with --resume).",
        ),
        out: Path = typer.Option(
            ..., "--out", "-o", help="Run folder to create (or to continue with --resume)."
        ),
        data_dir: Path | None = typer.Option(
            None,
            "--data-dir",
            help="GOD folder (sbj_N.npz), or a folder holding GOD/ (e.g. the simulator output).",
        ),
        subject: str | None = typer.Option(
            None, "--subject", help="Target subject, e.g. sbj_1 (default: the only one)."
        ),
        roi: str | None = typer.Option(None, "--roi", help="ROI mask key (default: VC)."),
        epochs: int | None = typer.Option(
            None,
            "--epochs",
            help="Epochs (default: 100; the original 15 stops while the correlation still rises).",
        ),
        batch_size: int | None = typer.Option(
            None, "--batch-size", help="Samples per device per step (default: 16)."
        ),
        lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default: 5.3e-5)."),
        min_lr: float | None = typer.Option(None, "--min-lr", help="Final learning rate (default: 0)."),
        weight_decay: float | None = typer.Option(
            None, "--weight-decay", help="AdamW weight decay (default: 0.05)."
        ),
        warmup_epochs: float | None = typer.Option(
            None, "--warmup-epochs", help="Linear warmup epochs (default: 2/15 of --epochs)."
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
            help="Also tune on the subject's test-set fMRI (the non-averaged presentations, without images), as "
            "the original does. Off by default, so the test fMRI stays unseen until evaluation.",
        ),
        nan_policy: str | None = typer.Option(
            None,
            "--nan-policy",
            help="NaN/Inf voxels: error (default), zero (set to the mean) or drop (remove voxel).",
        ),
        normalize: str | None = typer.Option(
            None, "--normalize", help="global (train mean/std, default), voxel (z-score) or none."
        ),
        pad_mode: str | None = typer.Option(None, "--pad-mode", help="wrap (default), constant or cut."),
        val_fraction: float | None = typer.Option(
            None,
            "--val-fraction",
            help="Held-out fraction of the training fMRI for validation (default: 0.05).",
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
        """Stage A2: tune the pretrained masked brain model on the target subject's fMRI."""
        from mindvis.commands.pretrain import common_options, report, resolve_config
        from mindvis.train.common import is_primary_process
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
        if roi is not None:
            given["data.god_roi"] = roi
        if init is not None:
            given["init"] = str(init)
        elif not resume:
            from mindvis.errors import ConfigError

            raise ConfigError("give the pretrained model with --init", field="init")
        if not resume or data_dir is not None or subject is not None:
            god_dir = _god_folder(data_dir)
            given["data.god_dir"] = str(god_dir)
            given["data.god_subjects"] = [_pick_subject(god_dir, subject)]
        config = resolve_config("finetune", out, resume, given)
        result = run_mbm_stage(config, out, resume=resume, overwrite=overwrite)
        if is_primary_process():
            report(result, "finetune")


def _god_folder(data_dir: Path | None) -> Path:
    from mindvis.data.formats.registry import resolve_data_dir

    folder = resolve_data_dir("god", data_dir)
    if not any(folder.glob("sbj_*.npz")):
        for name in ("GOD", "god", "Kamitani/npz"):
            if (folder / name).is_dir():
                return folder / name
    return folder


def _pick_subject(folder: Path, subject: str | None) -> str:
    from mindvis.data.formats.god import god_subject_name, list_god_subjects
    from mindvis.errors import ConfigError, DataError

    available = list_god_subjects(folder)
    if subject is None:
        if len(available) == 1:
            return available[0]
        raise ConfigError(
            f"choose the target subject with --subject ({', '.join(available) or 'none found'})",
            path=folder,
            field="subject",
        )
    name = god_subject_name(subject)
    if name not in available:
        raise DataError(
            f"subject {name} not found (subjects here: {', '.join(available) or 'none'})",
            path=folder,
            field="subject",
        )
    return name
