"""``mindvis convert``: turn the original MinD-Vis / CompVis checkpoints into mindvis folders.

* ``--finetuned finetuned.pth --label2img-dir DIR --mbm fmri_encoder.pth``: a complete reconstruction
  pipeline (the YAML in DIR gives the architecture; the stage-A file gives the encoder's head count);
* ``--label2img-dir DIR --mbm PTH``: the untrained stage-B starting point (label2img UNet and VQ, the stage-A
  encoder, fresh mappers);
* ``--label2img-dir DIR``: the class-conditional label2img prior;
* ``--mbm PTH``: a stage-A model folder.
"""

from __future__ import annotations

from pathlib import Path

import typer

from mindvis.commands._options import SEED_RANGE
from mindvis.errors import CheckpointError
from mindvis.utils.io import check_output_apart, read_json


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)


def convert(
    out: Path = typer.Option(..., "--out", help="Output folder (written atomically)."),
    finetuned: Path | None = typer.Option(
        None, "--finetuned", help="MinD-Vis stage-B checkpoint (finetuned.pth)."
    ),
    label2img_dir: Path | None = typer.Option(
        None, "--label2img-dir", help="CompVis label2img folder with config.yaml (and model.ckpt)."
    ),
    mbm: Path | None = typer.Option(
        None, "--mbm", help="MinD-Vis stage-A checkpoint (fmri_encoder.pth / checkpoint.pth) or our folder."
    ),
    encoder_heads: int | None = typer.Option(
        None, "--encoder-heads", min=1, help="Encoder attention heads, when --finetuned comes without --mbm."
    ),
    global_pool: bool = typer.Option(
        False, "--global-pool/--no-global-pool", help="Starting point only: mean-pool the encoder tokens."
    ),
    time_cond: bool = typer.Option(
        True, "--time-cond/--no-time-cond", help="Starting point only: build the time-conditioning path."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Starting point only: seed of the fresh mapper weights.", **SEED_RANGE
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
) -> None:
    """Convert original checkpoints (finetuned.pth, label2img model.ckpt, stage-A .pth) to a mindvis folder."""
    from rich.console import Console

    from mindvis.convert.ldm import convert as run_convert

    check_output_apart(out, {"--finetuned": finetuned, "--label2img-dir": label2img_dir, "--mbm": mbm})
    for opt, p in (("--finetuned", finetuned), ("--mbm", mbm)):
        if p is not None and not p.exists():
            raise CheckpointError("file not found", path=p, field=opt)
    folder = run_convert(
        out,
        finetuned=finetuned,
        label2img_dir=label2img_dir,
        mbm=mbm,
        encoder_heads=encoder_heads,
        global_pool=global_pool,
        use_time_cond=time_cond,
        seed=seed,
        overwrite=overwrite,
    )
    console = Console()
    index = folder / "model_index.json"
    if index.is_file():
        meta = read_json(index)
        comps = ", ".join(f"{k} ({v})" for k, v in meta.get("components", {}).items())
        console.print(f"[green]wrote[/green] {folder}: {comps}")
        fmt = meta.get("source", {}).get("format")
        if fmt:
            console.print(f"  from: {fmt}")
    else:
        console.print(f"[green]wrote[/green] {folder} (stage-A model)")
