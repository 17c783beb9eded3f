"""``mindvis finetune``: stage A2, masked brain modeling tuned on the target subject (Chen et al., CVPR 2023).

Starts from a pretrained model (``mindvis pretrain`` output, a saved model folder, or an original stage-A
``.pth``) and continues the same objective on one subject's fMRI, padded or cropped to the model's voxel count.
The subject's fitted preprocessing is saved as ``preprocessing.json``, for stage B and reconstruction.

By default A2 is the original's (``stageA2_mbm_finetune.py``): 15 epochs (2 of warmup) on the subject's
*test-set* fMRI only (``--a2-data original``), see :data:`~mindvis.train.stage_a.A2_DATA`. ``--a2-data train``
is ours. The options after the paths are the settings of :class:`~mindvis.train.stage_a.FinetuneConfig`
(``--include-test-fmri``, the older spelling of ``--a2-data``, hidden); the work is
:func:`mindvis.train.stage_a.finetune`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mindvis.commands._options import (
    DATA_ROOT,
    add_options,
    config_values,
    dataset_options,
    report_mbm,
    set_threads,
    stage_a_options,
)
from mindvis.train import stage_a
from mindvis.train.stage_a import FinetuneConfig


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    @add_options(
        stage_a_options(FinetuneConfig, hidden=("include_test_fmri",)),
        after={
            "out": dataset_options(  # no --dataset: stage A2 reads the GOD layout
                which=("data_dir", "subject"),
                help={
                    "data_dir": "GOD folder (sbj_N.npz), or a folder holding GOD/, e.g. the simulator output "
                    f"(default: the GOD folder under {DATA_ROOT}).",
                    "subject": "Target subject, e.g. sbj_1 (default: the only one).",
                },
            )
        },
    )
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
        **shared: Any,
    ) -> None:
        """Stage A2: tune the pretrained masked brain model on the target subject's fMRI (by default the
        original's: its test-set fMRI, 15 epochs)."""
        from mindvis.train.processes import is_primary_process

        config = FinetuneConfig(**config_values(FinetuneConfig, shared))
        set_threads(shared["threads"] or 0)
        result = stage_a.finetune(
            config,
            out,
            init=init,
            data_dir=shared["data_dir"],
            subject=shared["subject"],
            resume=shared["resume"],
            overwrite=shared["overwrite"],
            progress=shared["progress"],
        )
        if is_primary_process():
            report_mbm(result, "finetune")
