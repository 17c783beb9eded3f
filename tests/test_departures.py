"""The departures from the original: the documented table is the code's, and each option's real default is the
one the table states."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer.main

from mindvis.cli import app
from mindvis.demo import get_preset
from mindvis.demo_report import departures
from mindvis.departures import DEPARTURES, in_force, markdown_table

DOC = Path(__file__).parent.parent / "docs" / "departures.md"


def _defaults(command: str) -> dict[str, object]:
    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    return {opt: p.default for p in cmd.params for opt in getattr(p, "opts", [])}


def _same(value: object, text: str) -> bool:
    if isinstance(value, bool):
        return str(value).lower() == text.lower()
    try:
        return float(value) == float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value) == text


def test_the_documented_table_is_the_codes():
    assert markdown_table() in DOC.read_text(), "regenerate docs/departures.md from mindvis.departures"


def _stage_a_default(command: str, option: str) -> object:
    """What a stage A option left out (``None`` on the command line) resolves to."""
    from mindvis.train.mbm import MBMTrainConfig

    extra = {"init": "x"} if command == "finetune" else {}
    data = MBMTrainConfig.for_stage(command, data={"god_dir": "x"}, **extra).data  # type: ignore[arg-type]
    if option == "--a2-data":
        return {"test": "original", "train": "train", "train+test": "train+test"}[data.god_fmri]
    if option == "--pad-mode":
        return data.effective_pad_mode
    raise AssertionError(f"say how {command} {option} resolves")


@pytest.mark.parametrize("d", [d for d in DEPARTURES if d.option and d.original], ids=lambda d: d.option)
def test_each_default_is_the_one_stated(d):
    defaults = _defaults(d.command)
    assert d.option in defaults, f"mindvis {d.command} has no {d.option}"
    value = defaults[d.option]
    if value is None and d.command in ("pretrain", "finetune"):
        value = _stage_a_default(d.command, d.option)
    assert _same(value, d.original) == d.default_is_original, (d.option, value)


def test_finetune_defaults_are_the_originals_schedule():
    from mindvis.train.mbm import MBMTrainConfig

    c = MBMTrainConfig.for_stage("finetune", init="x", data={"god_dir": "x"})  # type: ignore[arg-type]
    assert (c.epochs, c.warmup_epochs, c.data.god_fmri, c.data.test_normalize) == (15, 2, "test", "original")


def test_the_demo_report_lists_the_departures_in_force():
    default = get_preset("default")
    names = {d.option for d in in_force(default)}
    assert {"--sparse-rate", "--align-epochs", "--guidance-scale", "--val-schedule"} <= names
    lines = departures(default)
    assert len(lines) == len(names) and any("--sparse-rate 0.2" in line for line in lines)
    # the paper-sized preset follows the original in stage B
    full = {d.option for d in in_force(get_preset("full"))}
    assert not full & {"--sparse-rate", "--val-schedule", "--align-epochs", "--standardize-tokens"}
