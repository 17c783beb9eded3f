"""``mindvis finetune``: stage A2, masked brain modeling tuned on the target subject (Chen et al., CVPR 2023).

Starts from a pretrained model (``mindvis pretrain`` output, a saved model folder, or an original stage-A
``.pth``) and continues the same objective on one subject's fMRI, padded or cropped to the model's voxel count.
The subject's fitted preprocessing is saved as ``preprocessing.json``, for stage B and reconstruction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mindvis.commands._options import add_options, given_run_options, mbm_run_options, run_mbm

#: Help texts of the options whose default depends on the stage.
_STAGE_HELP = {
    "epochs": "Epochs (default: 100; the original 15 stops while the correlation still rises).",
    "batch_size": "Samples per device per step (default: 16).",
    "lr": "Peak learning rate (default: 5.3e-5).",
    "warmup_epochs": "Linear warmup epochs (default: 2/15 of --epochs).",
    "include_test_fmri": "Also tune on the subject's test-set fMRI (the non-averaged presentations, without "
    "images), as the original does. Off by default, so the test fMRI stays unseen until evaluation.",
    "normalize": "global (train mean/std, default), voxel (z-score) or none.",
    "val_fraction": "Held-out fraction of the training fMRI for validation (default: 0.05).",
}


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    @add_options(mbm_run_options(**_STAGE_HELP))
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
        **shared: Any,
    ) -> None:
        """Stage A2: tune the pretrained masked brain model on the target subject's fMRI."""
        from mindvis.utils.io import check_output_apart

        resume = shared["resume"]
        check_output_apart(out, {"--init": init, "--data-dir": data_dir})
        given = given_run_options(shared)
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
            check_output_apart(out, {"--data-dir": god_dir})  # the folder found
        run_mbm("finetune", out, given, resume, shared["overwrite"], shared["threads"])


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
