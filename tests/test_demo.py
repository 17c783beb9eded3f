"""The main job end to end: every step runs, writes its artifacts, and a rerun skips finished steps."""

from __future__ import annotations

import json
import math

import pytest

from conftest import SMOKE_PRESET
from mindvis.demo import get_preset, run_demo
from mindvis.demo_report import stage_b_validation_curve
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
    probe = json.loads((run / "probe" / "probe.json").read_text())
    assert [r["source"] for r in probe["results"][:2]] == ["voxels", "stage_a2"]
    assert set(probe["conditioning_use"]) == {"stage_b/model"}
    assert all(math.isfinite(u["gap_percent"]) for u in probe["conditioning_use"].values())
    assert "Where the stimulus information goes" in result.report.read_text()
    assert "ceilings of the semantic metric" in result.report.read_text()
    ceilings = json.loads((run / "report" / "stand_ins.json").read_text())
    assert 0.0 <= ceilings["judge"] <= 1.0 and ceilings["samples"], ceilings
    metrics = json.loads((run / "eval" / "method" / "metrics.json").read_text())
    values = [a["value"] for m in metrics["metrics"] for a in m["aggregates"].values()]
    assert values and all(math.isfinite(v) for v in values)
    assert result.headline, "the headline table is empty"
    for row in result.headline:
        for v in row["values"].values():
            assert v is None or math.isfinite(v["value"])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run of the demo shared by this file's tests: ``(result, its tmp folder)``; the run is
    ``folder / "run"``. The tests read it, or rerun it with the same settings (which changes nothing)."""
    folder = tmp_path_factory.mktemp("smoke")
    return run_demo(get_preset(SMOKE_PRESET), folder / "run", progress=False), folder


def test_demo_smoke_and_resume(smoke_run):
    preset = get_preset(SMOKE_PRESET)
    first, tmp_path = smoke_run
    _check_run(first, preset)
    assert first.skipped == []
    # the smoke preset runs the warm start and a validation before training; the report names the departure
    assert preset.train.align_epochs > 0 and preset.train.validate_start
    assert (tmp_path / "run" / "stage_b" / "align.json").is_file()
    assert "--align-epochs" in (tmp_path / "run" / "report" / "index.html").read_text()
    start = json.loads((tmp_path / "run" / "stage_b" / "validation_start.json").read_text())
    assert len(start["points"]) == 2  # before the warm start, and after it
    xs, ys = stage_b_validation_curve(tmp_path / "run", "val/loss")
    assert xs[: len(start["points"])] == [0.0] * len(start["points"])
    assert ys[0] == pytest.approx(start["points"][0]["val/loss"])
    assert len(xs) > len(start["points"]) and min(xs[len(start["points"]) :]) >= 1
    markers = sorted(p.name for p in (tmp_path / "run" / "steps").glob("*.json"))
    # a rerun with the same settings skips every finished step (the report is rebuilt)
    second = run_demo(get_preset(SMOKE_PRESET), tmp_path / "run", progress=False)
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


def test_shipped_prior_used_only_for_its_own_corpus(smoke_run, tmp_path, monkeypatch):
    import shutil

    import mindvis.demo as demo
    from mindvis.utils.io import file_sha256, write_json

    preset = get_preset(SMOKE_PRESET)
    run = tmp_path / "run"
    shutil.copytree(smoke_run[0].run_dir, run)  # a copy of the shared run: the rerun below changes it
    corpus = run / "sim" / "stimuli" / "corpus.npz"
    res = preset.simulate.resolution
    shipped = tmp_path / "assets" / "prior-small"
    shutil.copytree(run / "prior" / "pipeline", shipped / "pipeline")
    monkeypatch.setattr(demo, "SHIPPED_PRIOR", shipped)
    assert not demo._shipped_prior_fits(res, corpus), "no ARTIFACT.json: must not be used"
    write_json(shipped / "ARTIFACT.json", {"corpus_sha256": file_sha256(corpus)})
    assert demo._shipped_prior_fits(res, corpus)
    assert not demo._shipped_prior_fits(res * 2, corpus), "wrong image size"
    write_json(shipped / "ARTIFACT.json", {"corpus_sha256": "0" * 64})
    assert not demo._shipped_prior_fits(res, corpus), "another corpus"
    # a rerun that can use the shipped prior copies it instead of training
    write_json(shipped / "ARTIFACT.json", {"corpus_sha256": file_sha256(corpus)})
    again = run_demo(get_preset(SMOKE_PRESET), run, progress=False)
    # the prior step's inputs changed (shipped instead of trained), so it and every later step rerun
    assert {"simulate", "pretrain"} <= set(again.skipped)
    assert "prior" not in again.skipped and "train_method" not in again.skipped
    assert (run / "prior" / "ARTIFACT.json").is_file()


@pytest.mark.parametrize("stop", [SystemExit(None), SystemExit(0), KeyboardInterrupt()])
def test_a_step_that_stops_early_is_not_recorded_as_done(monkeypatch, tmp_path, stop):
    """Lightning stops gracefully on SIGTERM by raising SystemExit (code None): the step must run again."""
    import mindvis.demo

    def stopped(*args, **kwargs):
        raise stop

    monkeypatch.setattr(mindvis.demo, "simulate", stopped)
    with pytest.raises(type(stop)):
        run_demo(get_preset(SMOKE_PRESET), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "steps" / "simulate.json").exists()


def test_report_says_plainly_whether_the_method_beats_chance():
    from mindvis.demo_report import above_chance_summary

    def row(metric, lo, chance=0.1):
        return {
            "metric": metric,
            "chance": chance,
            "values": {"m": {"value": lo + 0.01, "ci95": [lo, lo + 0.02]}},
        }

    at_chance = [row("semantic 10-way", 0.05), row("identification 50-way", 0.01, 0.02)]
    assert above_chance_summary(at_chance, "m").startswith("None of the 2")
    mixed = [row("semantic 10-way", 0.3), row("identification 50-way", 0.01, 0.02), row("SSIM, mean", 0.9)]
    assert "1 of 2 figures: semantic 10-way." in above_chance_summary(mixed, "m")


def test_label_budget_script_on_a_smoke_run(smoke_run, tmp_path, load_script):
    """``scripts/label_budget.py`` runs every encoder on a demo run folder and continues an interrupted table."""
    import numpy as np

    from mindvis.data.formats.registry import load_dataset
    from mindvis.utils.io import read_json

    run = smoke_run[1] / "run"  # read only: the rows go to tmp_path
    labels = np.asarray(load_dataset("synthetic", run / "sim", split="train").labels)
    k = len(np.unique(labels))
    lb = load_script("label_budget")
    out = tmp_path / "budget.json"
    argv = [str(run), "--budgets", str(k), "--steps", "2", "--out", str(out), "--threads", "1"]
    assert lb.main([*argv, "--encoders", "pretrained,ridge"]) == 0
    first = read_json(out)
    assert [r["encoder"] for r in first] == ["pretrained", "ridge"] and all(r["budget"] == k for r in first)
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in first)
    assert lb.main(argv) == 0  # finished rows are kept, the missing encoders are added
    rows = read_json(out)
    assert rows[:2] == first and sorted(r["encoder"] for r in rows[2:]) == ["frozen", "random"]
    assert "| labelled trials |" in lb.table(rows, k)


def test_set_overrides_one_field_of_one_step_and_is_recorded(tmp_path):
    import yaml

    from mindvis.demo import _variants, apply_overrides, write_run_yaml
    from mindvis.reconstruct import ReconstructConfig
    from mindvis.train.config import StageBConfig

    base = get_preset("default")
    p = apply_overrides(
        base,
        [
            "pretrain.variant=small",
            "train.align_epochs=7",
            "reconstruct.steps=null",
            "train.sparse-rate=null",
        ],
    )
    assert p.pretrain.variant == "small" and p.train.align_epochs == 7
    assert p.reconstruct.steps == ReconstructConfig().steps != base.reconstruct.steps  # null: the default
    assert p.train.sparse_rate == StageBConfig().sparse_rate != base.train.sparse_rate
    # a field path or the option's name; nested configs and dict entries; typed as the field is
    q = apply_overrides(
        base,
        ["prior.vq-lr=1e-4", "prior.vq_model.n_embed=256", "simulate.rest-subjects=3", "prior.unet.lr=3e-4"],
    )
    assert q.prior.vq.lr == 1e-4 and q.prior.vq_model["n_embed"] == 256 and q.prior.unet.lr == 3e-4
    assert q.simulate.n_rest_subjects == 3 and isinstance(q.prior.vq.lr, float)
    # train.* reaches the ablations too, unless ablation_train sets the same field
    ablation = next(v for v in _variants(p) if v.key == "no_pretrain")
    assert ablation.train.align_epochs == 7 and ablation.train.encoder_init == "random"
    assert ablation.train.epochs == base.ablation_train["epochs"]
    assert get_preset("default").pretrain == base.pretrain  # the preset itself is untouched
    assert p.overrides[0] == "pretrain.variant=small" and base.overrides == []

    write_run_yaml(tmp_path, p)
    doc = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert doc["mindvis_demo"]["overrides"] == p.overrides
    assert doc["mindvis_demo"]["settings"]["pretrain"]["variant"] == "small"
    assert "overrides" not in doc["mindvis_demo"]["settings"]
    assert "--set pretrain.variant=small" in doc["reproduce"]
    assert "--set train.align_epochs=7" in doc["reproduce"]


@pytest.mark.parametrize(
    "name, items",
    [
        (SMOKE_PRESET, []),
        ("default", ["pretrain.variant=small", "train.align-epochs=7", "reconstruct.steps=null"]),
        (
            "default",
            ["prior.vq_model.n_embed=null", "prior.unet.ema_decay=null", "ablation_train.epochs=null"],
        ),
        ("quick", ["simulate.preset=hard", "simulate.n_train=100", "ablation_train.cond_dropout=0.2"]),
        (SMOKE_PRESET, ["train.val_items=null", "classifier.holdout=0.2", "evaluate.trials=30"]),
    ],
)
def test_the_reproduce_line_is_written_from_the_configs_and_gives_the_same_run(name, items):
    from mindvis.demo import apply_overrides, set_items

    made = apply_overrides(get_preset(name), items)
    again = apply_overrides(get_preset(name), set_items(made))
    assert again.to_dict() == made.to_dict()
    assert set_items(get_preset(name)) == []


@pytest.mark.parametrize(
    "item, match",
    [
        ("pretrain.variant", "SECTION.KEY=VALUE"),
        ("variant=small", "SECTION.KEY=VALUE"),
        ("stage_b.epochs=3", "unknown section 'stage_b'"),
        ("pretrain.no-such-option=1", "has no setting 'no-such-option'"),
        ("train.validate-start=3", "expected true or false"),
        ("train.epochs=abc", "expected an integer"),
        ("train.epochs=", "give a value"),
        ("train.epochs=0", "train.epochs"),
        ("pretrain.epochs=[1, 2]", "expected an integer"),
        ("prior.vq=3", "group of settings"),
        ("prior.resolution=64", "the demo sets resolution"),
        ("train.dataset=god", "the demo sets dataset"),
        ("ablation_train.encoder_init=random", "the demo sets encoder_init"),
        ("simulate.preset=nosuch", "unknown preset"),
    ],
)
def test_set_rejects_what_it_cannot_apply(item, match):
    from mindvis.demo import apply_overrides

    with pytest.raises(ConfigError, match=match) as err:
        apply_overrides(get_preset(SMOKE_PRESET), [item])
    assert err.value.field == "--set"


def test_demo_cli_set_error_is_one_line_and_writes_nothing(tmp_path, capsys):
    from mindvis.cli import main

    run = tmp_path / "run"
    rc = main(
        ["demo", "--preset", SMOKE_PRESET, "--run-dir", str(run), "--set", "nosuch.key=1", "--no-progress"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--set" in err and "nosuch" in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_a_rerun_continues_with_the_settings_the_run_was_made_with(tmp_path):
    from mindvis.commands.demo import continued_overrides
    from mindvis.demo import apply_overrides, write_run_yaml

    made = ["pretrain.variant=small", "train.align-epochs=7"]
    write_run_yaml(tmp_path, apply_overrides(get_preset(SMOKE_PRESET), made))
    assert continued_overrides(tmp_path, SMOKE_PRESET, []) == made  # no --set: the run goes on as it was made
    assert continued_overrides(tmp_path, SMOKE_PRESET, made) == made
    same = ["train.align_epochs=7", "pretrain.variant=small"]  # spelling and order aside, the same settings
    assert continued_overrides(tmp_path, SMOKE_PRESET, same) == same
    with pytest.raises(ConfigError, match="was made with --set pretrain.variant=small") as err:
        continued_overrides(tmp_path, SMOKE_PRESET, ["pretrain.variant=tiny"])
    assert err.value.field == "--set"
    new = ["pretrain.variant=tiny"]
    assert continued_overrides(tmp_path, SMOKE_PRESET, new, overwrite=True) == new
    assert continued_overrides(tmp_path / "new", SMOKE_PRESET, ["train.epochs=2"]) == ["train.epochs=2"]
    write_run_yaml(tmp_path / "plain", get_preset(SMOKE_PRESET))
    with pytest.raises(ConfigError, match="was made with no --set"):
        continued_overrides(tmp_path / "plain", SMOKE_PRESET, ["train.epochs=2"])


def test_resume_with_set_picks_the_run_made_with_the_same_settings(tmp_path):
    import os

    from mindvis.commands.demo import _latest_run
    from mindvis.demo import apply_overrides, write_run_yaml

    write_run_yaml(tmp_path / "a", apply_overrides(get_preset(SMOKE_PRESET), ["pretrain.variant=small"]))
    write_run_yaml(tmp_path / "b", get_preset(SMOKE_PRESET))
    os.utime(tmp_path / "a", (1, 1))  # b is the newest
    assert _latest_run(tmp_path, SMOKE_PRESET) == tmp_path / "b"
    assert _latest_run(tmp_path, SMOKE_PRESET, ["pretrain.variant=small"]) == tmp_path / "a"
    assert _latest_run(tmp_path, SMOKE_PRESET, ["pretrain.variant=base"]) is None


def test_a_preset_file_and_a_runs_config_yaml_are_presets(tmp_path):
    from mindvis.demo import apply_overrides, write_run_yaml
    from mindvis.synthcortex import SynthConfig

    made = apply_overrides(get_preset("quick"), ["train.align_epochs=7", "simulate.preset=hard"])
    write_run_yaml(tmp_path, made)
    again = get_preset(str(tmp_path / "config.yaml"))  # a run's settings make a preset
    assert again.name == str(tmp_path / "config.yaml")
    assert {**again.to_dict(), "name": ""} == {**made.to_dict(), "name": ""}
    partial = tmp_path / "mine.yaml"
    partial.write_text("simulate: {name: hard, n_train: 30}\ntrain: {epochs: 2}\nablations: none\n")
    p = get_preset(str(partial))
    assert p.simulate == SynthConfig.preset("hard", n_train=30)  # the noise preset's values, then the file's
    assert p.train.epochs == 2 and p.train.lr == get_preset("quick").train.lr  # the rest: the defaults
    assert p.ablations == "none"


@pytest.mark.parametrize(
    "text, match, field",
    [
        ("train: {epochs: zero}\n", "expected an integer", "train.epochs"),
        ("prior: {vq: {lr: -1}}\n", "", "prior.vq.lr"),
        ("stage_b: {epochs: 1}\n", "unknown section", "stage_b"),
        ("train: {nope: 1}\n", "has no field 'nope'", "train.nope"),
        ("ablations: some\n", "none, fast or all", "ablations"),
        ("[1, 2]\n", "expected a mapping", None),
    ],
)
def test_a_bad_preset_file_is_refused_naming_the_file_and_field(tmp_path, text, match, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        get_preset(str(path))
    assert str(path) in str(err.value) and err.value.field == field
