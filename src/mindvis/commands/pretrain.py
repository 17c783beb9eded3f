"""``mindvis pretrain``: stage A1, masked brain modeling on HCP resting state plus GOD (Chen et al., CVPR 2023).

The options after the data folders are the settings of :class:`~mindvis.train.stage_a.PretrainConfig` (the
recipe, preprocessing, hardware and logging ones shared with ``mindvis finetune``); the work is
:func:`mindvis.train.stage_a.pretrain`.
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
from mindvis.train.stage_a import PretrainConfig


def register(app: typer.Typer) -> None:
    @app.command("pretrain")
    @add_options(
        stage_a_options(PretrainConfig),
        after={
            "out": dataset_options(  # no --dataset: stage A1 reads HCP and GOD
                which=("data_dir",),
                help={
                    "data_dir": "Folder holding HCP/ and/or GOD/ (e.g. the simulator output). "
                    f"Default: {DATA_ROOT}."
                },
            )
        },
    )
    def pretrain(
        out: Path = typer.Option(
            ..., "--out", "-o", help="Run folder to create (or to continue with --resume)."
        ),
        hcp_dir: Path | None = typer.Option(
            None, "--hcp-dir", help="HCP folder (HCP/npz/<subject>/HCP_visual_voxel.npz)."
        ),
        god_dir: Path | None = typer.Option(None, "--god-dir", help="GOD folder (sbj_N.npz)."),
        **shared: Any,
    ) -> None:
        """Stage A1: pretrain the masked brain model on unlabeled fMRI (HCP resting state + GOD)."""
        from mindvis.train.processes import is_primary_process

        config = PretrainConfig(**config_values(PretrainConfig, shared))
        set_threads(shared["threads"] or 0)
        result = stage_a.pretrain(
            config,
            out,
            data_dir=shared["data_dir"],
            hcp_dir=hcp_dir,
            god_dir=god_dir,
            resume=shared["resume"],
            overwrite=shared["overwrite"],
            progress=shared["progress"],
        )
        if is_primary_process():
            report_mbm(result, "pretrain")
