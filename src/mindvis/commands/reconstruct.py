"""``mindvis reconstruct``: images from fMRI with a trained (or converted) MinD-Vis pipeline.

Writes into ``--out``: ``samples/item0000_s0.png`` ... (one PNG per sample), ``grid.png`` (one row per
item, the ground truth first when known, as the original), ``reconstructions.npz`` (``images`` uint8
``[N, S, H, W, 3]``, ``seeds``, ``ground_truth`` when known) and ``run.json`` (the settings). The work is
:func:`mindvis.reconstruct.reconstruct`; the settings' options are generated from
:class:`~mindvis.reconstruct.ReconstructConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from mindvis.commands._options import (
    DATASET_FORMATS,
    SEED_RANGE,
    OptionSpec,
    add_options,
    config_options,
    config_values,
    dataset_options,
)
from mindvis.errors import ConfigError
from mindvis.reconstruct import ReconstructConfig, reconstruct

#: Bounds of the generated options, checked by the command line before the config sees them.
_LIMITS: dict[str, dict[str, Any]] = {
    "limit": {"min": 1},
    "num_samples": {"min": 1},
    "steps": {"min": 1},
    "eta": {"min": 0.0},
    "seed": SEED_RANGE,
    "batch_size": {"min": 1},
}

_OPTIONS: list[OptionSpec] = [
    *config_options(ReconstructConfig, limits=_LIMITS),
    OptionSpec("progress", bool, True, ("--progress/--no-progress",), "Show a progress bar."),
    OptionSpec("overwrite", bool, False, ("--overwrite",), "Replace a non-empty output folder."),
]

#: The dataset read in place of ``--fmri``: a split of one subject.
_DATASET: list[OptionSpec] = dataset_options(
    which=("dataset", "split", "data_dir", "subject"),
    help={"dataset": f"Read --split of this dataset instead of --fmri; its format: {DATASET_FORMATS}."},
)


def register(app: typer.Typer) -> None:
    app.command("reconstruct")(reconstruct_command)


#: The option of each config field, named in errors in place of the field (``--guidance-scale``).
_FLAGS: dict[str, str] = {
    **{f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(ReconstructConfig)},
    **{s.name: s.decls[0].split("/")[0] for s in _OPTIONS},
}


@contextmanager
def _flags_in_errors() -> Iterator[None]:
    """Re-raise a :class:`ConfigError` about a setting with the setting's option as its field."""
    try:
        yield
    except ConfigError as exc:
        if exc.path is None and exc.field in _FLAGS:
            raise ConfigError(exc.detail, field=_FLAGS[exc.field]) from None
        raise


@add_options(_OPTIONS, after={"images_key": _DATASET})
def reconstruct_command(
    model: Path = typer.Option(..., "--model", help="Pipeline folder (from `mindvis convert` or training)."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    fmri: Path | None = typer.Option(None, "--fmri", help="Voxels [N, V] as .npy or .npz."),
    fmri_key: str | None = typer.Option(None, "--fmri-key", help="Array name inside an .npz."),
    images: Path | None = typer.Option(
        None, "--images", help="Ground-truth images [N, H, W, 3] (.npy/.npz)."
    ),
    images_key: str | None = typer.Option(None, "--images-key", help="Array name inside the images .npz."),
    preprocess: Path | None = typer.Option(
        None,
        "--preprocess",
        help="Fitted preprocessing JSON (default: preprocess.json in the model folder). Without one, a model "
        "converted from an original checkpoint gets, with --dataset, the original's preprocessing fitted on the "
        "dataset's training split: its padding rule, and test fMRI normalised with the statistics of the "
        "normalised training fMRI (about 0 and 1, so nearly as stored). --fmri items count as test items.",
    ),
    pad_to_model: bool = typer.Option(
        False, "--pad-to-model", help="Wrap-pad (or crop) the voxels to the model's count."
    ),
    **shared: Any,
) -> None:
    """Reconstruct the seen images from fMRI: a PNG per sample, a grid, and an npz of all images."""
    from rich.console import Console

    with _flags_in_errors():
        config = ReconstructConfig(**config_values(ReconstructConfig, shared), pad_to_model=pad_to_model)
        result = reconstruct(
            config,
            model,
            out,
            fmri=fmri,
            fmri_key=fmri_key,
            images=images,
            images_key=images_key,
            dataset=shared["dataset"],
            data_dir=shared["data_dir"],
            subject=shared["subject"],
            split=shared["split"],
            preprocess=preprocess,
            overwrite=shared["overwrite"],
            progress=shared["progress"],
        )
    Console().print(
        f"[green]wrote[/green] {result.out}: {result.items} items x {result.num_samples} samples "
        f"({result.sampler}, {result.num_inference_steps} steps, {result.seconds:.1f} s)"
    )
