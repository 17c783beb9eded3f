"""The main job end to end: every step runs, writes its artifacts, and a rerun skips finished steps."""

from __future__ import annotations

import json
import math

import pytest

from mindvis.demo import get_preset, run_demo
from mindvis.errors import ConfigError


def _check_run(result, preset):
    run = result.run_dir
    assert (run / "config.yaml").is_file()
    assert (run / "sim" / "synthcortex.json").is_file()
    assert (run / "stage_a2" / "model" / "config.json").is_file()
    assert (run / "stage_b" / "model").is_dir()
    recon = run / "reconstructions" / "method" / "reconstructions.npz"
    assert recon.is_file() and (run / "reconstructions" / "ridge" / "reconstructions.npz").is_file()
    assert result.report.is_file() and "data:image/png;base64" in result.report.read_text()
    metrics = json.loads((run / "eval" / "method" / "metrics.json").read_text())
    values = [a["value"] for m in metrics["metrics"] for a in m["aggregates"].values()]
    assert values and all(math.isfinite(v) for v in values)
    assert result.headline, "the headline table is empty"
    for row in result.headline:
        for v in row["values"].values():
            assert v is None or math.isfinite(v["value"])


def test_demo_smoke_and_resume(tmp_path):
    preset = get_preset("smoke")
    first = run_demo(preset, tmp_path / "run", progress=False)
    _check_run(first, preset)
    assert first.skipped == []
    markers = sorted(p.name for p in (tmp_path / "run" / "steps").glob("*.json"))
    # a rerun with the same settings skips every finished step (the report is rebuilt)
    second = run_demo(get_preset("smoke"), tmp_path / "run", progress=False)
    assert set(second.skipped) >= {"simulate", "classifier", "pretrain", "finetune", "prior", "train_method"}
    assert sorted(p.name for p in (tmp_path / "run" / "steps").glob("*.json")) == markers


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("huge")


@pytest.mark.slow
def test_demo_quick_cli(tmp_path):
    from mindvis.cli import main

    rc = main(["demo", "--preset", "quick", "--run-dir", str(tmp_path / "q"), "--no-progress"])
    assert rc == 0
    assert (tmp_path / "q" / "report" / "index.html").is_file()
    assert (tmp_path / "q" / "report" / "headline.json").is_file()
