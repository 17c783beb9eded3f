"""``mindvis finetune``: stage A2, masked brain modeling tuned on the target subject (Chen et al., CVPR 2023).

Starts from a pretrained model (``mindvis pretrain`` output, a saved model folder, or an original stage-A
``.pth``) and continues the same objective on one subject's fMRI, padded or cropped to the model's voxel count.
The subject's fitted preprocessing is saved as ``preprocessing.json``, for stage B and reconstruction.

By default A2 is the original's (``stageA2_mbm_finetune.py``): 15 epochs (2 of warmup) on the subject's
*test-set* fMRI only (``--a2-data original``), see :data:`A2_DATA`. ``--a2-data train`` is ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mindvis.commands._options import add_options, given_run_options, mbm_run_options, run_mbm
from mindvis.data.formats.registry import resolve_data_dir
from mindvis.errors import ConfigError, DataError
from mindvis.utils.io import check_output_apart

#: ``--a2-data`` choices: the data settings each one sets (:class:`~mindvis.data.pretrain.MBMDataConfig`).
A2_DATA: dict[str, dict[str, Any]] = {
    # the original: the test fMRI (averaged + single-trial rows), normalised with the statistics of the
    # normalised training fMRI (about 0 and 1), validated on rows it also tunes on
    "original": {"data.god_fmri": "test", "data.test_normalize": "original", "data.val_holdout": False},
    # ours: the training fMRI, 5 % held out, the test fMRI unseen until evaluation
    "train": {"data.god_fmri": "train", "data.test_normalize": "train", "data.val_holdout": True},
    # ours plus the single-trial test fMRI (what --include-test-fmri used to give)
    "train+test": {"data.god_fmri": "train+test", "data.test_normalize": "train", "data.val_holdout": True},
}

#: Help texts of the options whose default depends on the stage.
_STAGE_HELP = {
    "epochs": "Epochs (default: 15, the original's; tuning on the training fMRI (--a2-data train) keeps "
    "improving to about 80-100 epochs on SynthCortex).",
    "batch_size": "Samples per device per step (default: 16).",
    "lr": "Peak learning rate (default: 5.3e-5).",
    "warmup_epochs": "Linear warmup epochs (default: 2/15 of --epochs, the original's 2 of 15).",
    "include_test_fmri": "Older spelling: --include-test-fmri is --a2-data train+test, --no-include-test-fmri "
    "is --a2-data train.",
    "normalize": "global (one mean/std fitted on the training fMRI, default), voxel (z-score) or none. "
    "Test-set rows are normalised as --a2-data says.",
    "val_fraction": "Fraction of the tuning rows used for validation (default: 0.05): held out with --a2-data "
    "train / train+test; with original drawn from the rows it also tunes on, as the original reports the "
    "correlation on the data it tunes on.",
}


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    @add_options(mbm_run_options(hidden=("include_test_fmri",), **_STAGE_HELP))
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
        a2_data: str | None = typer.Option(
            None,
            "--a2-data",
            help="Which fMRI of the subject A2 tunes on. original (default, the original's): its test-set fMRI "
            "only, the averaged and the single-trial rows, never the training fMRI; the test rows normalised "
            "as the original does (with the mean/std of the normalised training fMRI, about 0 and 1, so nearly "
            "as stored) and validated on rows it also tunes on. The test fMRI is then not unseen when stage B "
            "is evaluated. train (ours): the training fMRI, 5% held out for validation, the test fMRI unseen. "
            "train+test: the training fMRI plus the single-trial test rows (normalised with the training "
            "statistics).",
        ),
        **shared: Any,
    ) -> None:
        """Stage A2: tune the pretrained masked brain model on the target subject's fMRI (by default the
        original's: its test-set fMRI, 15 epochs)."""
        resume = shared["resume"]
        check_output_apart(out, {"--init": init, "--data-dir": data_dir})
        given = given_run_options(shared)
        if a2_data is not None:
            if a2_data not in A2_DATA:
                raise ConfigError(f"expected one of {', '.join(A2_DATA)}, got {a2_data!r}", field="--a2-data")
            given.update(A2_DATA[a2_data])
        if roi is not None:
            given["data.god_roi"] = roi
        if init is not None:
            given["init"] = str(init)
        elif not resume:
            raise ConfigError("give the pretrained model with --init", field="init")
        if not resume or data_dir is not None or subject is not None:
            god_dir = _god_folder(data_dir)
            given["data.god_dir"] = str(god_dir)
            given["data.god_subjects"] = [_pick_subject(god_dir, subject)]
            check_output_apart(out, {"--data-dir": god_dir})  # the folder found
        run_mbm("finetune", out, given, resume, shared["overwrite"], shared["threads"])


def _god_folder(data_dir: Path | None) -> Path:
    folder = resolve_data_dir("god", data_dir)
    if not any(folder.glob("sbj_*.npz")):
        for name in ("GOD", "god", "Kamitani/npz"):
            if (folder / name).is_dir():
                return folder / name
    return folder


def _pick_subject(folder: Path, subject: str | None) -> str:
    from mindvis.data.formats.god import god_subject_name, list_god_subjects

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
