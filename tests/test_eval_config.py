"""The settings of ``mindvis evaluate`` and ``mindvis probe`` (mindvis.eval.config) and the options made from them."""

from __future__ import annotations

from typing import Any

import pytest
import typer

from mindvis.cli import app, main
from mindvis.errors import ConfigError
from mindvis.eval.config import METRIC_GROUPS, EvaluateConfig, ProbeConfig


def test_evaluate_config_parses_its_lists():
    config = EvaluateConfig()
    assert config.metric_groups == list(METRIC_GROUPS) and config.n_way_values == (2, 10, 50)
    config = EvaluateConfig(metrics=" pixel, fid ,", n_way="3, 5,")
    assert config.metric_groups == ["pixel", "fid"] and config.n_way_values == (3, 5)
    assert EvaluateConfig(n_way="").n_way_values == ()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"metrics": "pixel,colour"}, "metrics"),
        ({"metrics": " , "}, "metrics"),
        ({"metrics": ["pixel"]}, "metrics"),
        ({"n_way": "2,ten"}, "n_way"),
        ({"n_way": "1,2"}, "n_way"),
        ({"top_k": 0}, "top_k"),
        ({"trials": 0}, "trials"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"bootstrap": -1}, "bootstrap"),
        ({"fid_bootstrap": 1.5}, "fid_bootstrap"),
        ({"gray_to_rgb": "yes"}, "gray_to_rgb"),
    ],
)
def test_evaluate_config_refuses_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        EvaluateConfig(**kwargs)
    assert err.value.field == field


def test_probe_config_refuses_bad_values_naming_the_field():
    assert ProbeConfig() == ProbeConfig(prior_items=200, prior_draws=16)
    for kwargs, field in [({"prior_items": 1}, "prior_items"), ({"prior_draws": 0}, "prior_draws")]:
        with pytest.raises(ConfigError) as err:
            ProbeConfig(**kwargs)
        assert err.value.field == field


def _params(command: str) -> dict[str, Any]:
    return {p.name: p for p in typer.main.get_command(app).commands[command].params}  # type: ignore[attr-defined]


def test_the_commands_options_keep_their_flags_defaults_and_bounds():
    evaluate = _params("evaluate")
    gray = evaluate["gray_to_rgb"]
    assert gray.opts == ["--gray-to-rgb"] and gray.secondary_opts == [] and gray.default is False
    assert evaluate["n_way"].opts == ["--n-way"] and evaluate["n_way"].default == "2,10,50"
    assert evaluate["trials"].default == 1000 and evaluate["fid_bootstrap"].opts == ["--fid-bootstrap"]
    assert (evaluate["seed"].min, evaluate["seed"].max) == (0, 2**32 - 1)
    probe = _params("probe")
    assert probe["prior_items"].opts == ["--prior-items"] and probe["prior_items"].default == 200
    assert probe["prior_items"].min == 2 and probe["prior_draws"].min == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "x", "--out", "o", "--seed", "-1"], "--seed"),
        (["evaluate", "x", "--out", "o", "--no-gray-to-rgb"], "No such option"),
        (["probe", "--dataset", "god", "--data-dir", "d", "--prior-items", "1"], "--prior-items"),
        (["probe", "--dataset", "god", "--data-dir", "d", "--prior-draws", "0"], "--prior-draws"),
    ],
)
def test_out_of_range_values_are_usage_errors(args, message, capsys, quiet_cli_logging):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_classifier_options_make_the_presets_config_and_are_the_commands_options():
    import typer

    from mindvis.cli import app
    from mindvis.config import settings_of
    from mindvis.eval.classifier import CLASSIFIER_PRESETS, ClassifierConfig
    from mindvis.eval.config import ClassifierOptions

    assert ClassifierOptions().config() == ClassifierConfig()
    judge = ClassifierOptions(preset="judge", epochs=3, seed=5).config()
    assert judge.epochs == 3 and judge.seed == 5 and judge.arch == CLASSIFIER_PRESETS["judge"]["arch"]
    assert judge.blur == CLASSIFIER_PRESETS["judge"]["blur"]  # not given: the preset's
    with pytest.raises(ConfigError, match="unknown classifier preset"):
        ClassifierOptions(preset="huge").config()
    params = {p.name: p for p in typer.main.get_command(app).commands["train-classifier"].params}
    for f in settings_of(ClassifierOptions):
        assert (params[f.name].default, params[f.name].help) == (f.default, f.metadata["help"]), f.name
    assert "--holdout" in params["holdout_fraction"].opts
