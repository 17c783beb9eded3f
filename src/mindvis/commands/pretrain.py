"""``mindvis pretrain``: stage A1, masked brain modeling on HCP resting state plus GOD (Chen et al., CVPR 2023).

The recipe, preprocessing, hardware and logging options are those of ``mindvis finetune``
(:mod:`mindvis.commands._options`); this module adds the choice of data and of the model size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mindvis.commands._options import add_options, given_run_options, mbm_run_options, run_mbm
from mindvis.data.formats.common import default_data_root
from mindvis.errors import ConfigError
from mindvis.utils.io import check_output_apart

#: Help texts of the options whose default depends on the stage.
_STAGE_HELP = {
    "epochs": "Epochs (default: 500).",
    "batch_size": "Samples per device per step (default: 100).",
    "lr": "Peak learning rate, not scaled by batch (default: 2.5e-4).",
    "warmup_epochs": "Linear warmup epochs (default: 8% of --epochs, 40 of 500).",
    "include_test_fmri": "Also train on the GOD test-set fMRI (non-averaged presentations, no images). Off by "
    "default: the test fMRI then stays unseen until evaluation.",
    "normalize": "global (one mean/std per subject, default), voxel (z-score) or none.",
    "val_fraction": "Held-out validation fraction (default: 0.01, at most 2000 samples).",
}


def _find_sources(
    data_dir: Path | None,
    hcp_dir: Path | None,
    god_dir: Path | None,
    use_hcp: bool | None,
    use_god: bool | None,
) -> tuple[str | None, str | None]:
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
    @add_options(mbm_run_options(**_STAGE_HELP))
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
        **shared: Any,
    ) -> None:
        """Stage A1: pretrain the masked brain model on unlabeled fMRI (HCP resting state + GOD)."""
        given = given_run_options(shared)
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
        resume = shared["resume"]
        check_output_apart(out, {"--data-dir": data_dir, "--hcp-dir": hcp_dir, "--god-dir": god_dir})
        if not resume or any(x is not None for x in (data_dir, hcp_dir, god_dir, use_hcp, use_god)):
            hcp, god = _find_sources(data_dir, hcp_dir, god_dir, use_hcp, use_god)
            given["data.hcp_dir"], given["data.god_dir"] = hcp, god
            check_output_apart(out, {"--hcp-dir": hcp, "--god-dir": god})  # the folders found
        run_mbm("pretrain", out, given, resume, shared["overwrite"], shared["threads"])
