"""The options shared by the training commands (``mindvis.commands._options``) and the dual ridge solver."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from mindvis.commands._options import (
    OptionSpec,
    add_options,
    stage_a_options,
    trainer_config,
    trainer_options,
)
from mindvis.config import settings_of
from mindvis.train.stage_a import FinetuneConfig, PretrainConfig, StageAConfig, nest
from mindvis.utils.linalg import ridge_dual


def _params(app: typer.Typer, name: str) -> list:
    return get_command(app).commands[name].params  # type: ignore[attr-defined]


def test_added_options_parse_like_declared_ones():
    """A command with ``**shared`` gets the specs as options, after its own, and receives their values."""
    app = typer.Typer()
    seen: dict = {}
    specs = [
        OptionSpec("count", int, 3, ("--count",), "How many."),
        OptionSpec("flag", bool | None, None, ("--flag/--no-flag",), "On or off."),
    ]

    @app.command("go")
    @add_options(specs)
    def go(name: str = typer.Option("x", "--name", help="A name."), **shared: int) -> None:
        seen.update(shared, name=name)

    @app.command("other")
    def other() -> None:  # a second command, so that typer keeps "go" as a subcommand
        pass

    assert [p.name for p in _params(app, "go")] == ["name", "count", "flag"]
    result = CliRunner().invoke(app, ["go", "--count", "7", "--no-flag"])
    assert result.exit_code == 0, result.output
    assert seen == {"name": "x", "count": 7, "flag": False}
    result = CliRunner().invoke(app, ["go", "--count", "many"])
    assert result.exit_code != 0 and "count" in result.output


def test_add_options_refuses_misuse():
    spec = OptionSpec("a", int, 0, ("--a",), "A.")
    with pytest.raises(TypeError, match=r"\*\*shared"):
        add_options([spec])(lambda a=1: None)
    with pytest.raises(TypeError, match="already has"):
        add_options([spec])(lambda a=1, **shared: None)
    with pytest.raises(TypeError, match="help text"):
        add_options([OptionSpec("b", int, 0, ("--b",))])(lambda **shared: None)
    with pytest.raises(TypeError, match="no options"):
        stage_a_options(PretrainConfig, hidden=("not_an_option",))


def test_options_placed_after_a_parameter():
    """``add_options(after=...)`` puts a group right after the named parameter, before the command's later ones."""
    app = typer.Typer()
    seen: dict = {}

    @app.command("go")
    @add_options(
        [OptionSpec("count", int, 3, ("--count",), "How many.")],
        after={"first": [OptionSpec("mid", str, "m", ("--mid",), "Middle.")]},
    )
    def go(
        first: str = typer.Option("f", "--first", help="First."),
        last: str = typer.Option("l", "--last", help="Last."),
        **shared: object,
    ) -> None:
        seen.update(shared, first=first, last=last)

    @app.command("other")
    def other() -> None:
        pass

    assert [p.name for p in _params(app, "go")] == ["first", "mid", "last", "count"]
    result = CliRunner().invoke(app, ["go", "--mid", "x", "--last", "y"])
    assert result.exit_code == 0, result.output
    assert seen == {"first": "f", "mid": "x", "last": "y", "count": 3}
    spec = OptionSpec("mid", str, "m", ("--mid",), "Middle.")
    with pytest.raises(TypeError, match="no parameters"):
        add_options([], after={"nope": [spec]})(lambda first=1, **shared: None)
    with pytest.raises(TypeError, match="added twice"):
        add_options([spec], after={"first": [spec]})(lambda first=1, **shared: None)
    with pytest.raises(TypeError, match="already has"):
        add_options([], after={"first": [spec]})(lambda first=1, mid=2, **shared: None)


def test_stage_a_settings_map_onto_the_run_configuration():
    """Every stage A setting sets a field the run configuration has; unset settings are left out."""
    from mindvis.data.pretrain import MBMDataConfig
    from mindvis.train.common import TrainerConfig
    from mindvis.train.mbm import MBMTrainConfig
    from mindvis.train.stage_a import CONFIG_KEYS

    fields = {
        None: {f.name for f in dataclasses.fields(MBMTrainConfig)},
        "data": {f.name for f in dataclasses.fields(MBMDataConfig)},
        "trainer": {f.name for f in dataclasses.fields(TrainerConfig)},
    }
    names = {f.name for cls in (PretrainConfig, FinetuneConfig) for f in settings_of(cls)}
    assert set(CONFIG_KEYS) == names
    for cls in (PretrainConfig, FinetuneConfig):
        keys = [CONFIG_KEYS[f.name] for f in settings_of(cls) if CONFIG_KEYS[f.name] is not None]
        assert len(keys) == len(set(keys)), cls
    for key in filter(None, CONFIG_KEYS.values()):
        head, _, tail = key.partition(".")
        assert (tail in fields[head]) if tail else (head in fields[None]), key
    given = PretrainConfig(lr=0.1, pad_mode="cut").given()
    assert given == {"lr": 0.1, "data.pad_mode": "cut"}
    assert nest(given) == {"lr": 0.1, "data": {"pad_mode": "cut"}}


def test_pretrain_and_finetune_share_the_stage_a_options():
    from mindvis.cli import app

    names = [f.name for f in settings_of(StageAConfig)]
    names = [*names[: names.index("seed")], "threads", *names[names.index("seed") :]]
    names += ["progress", "resume", "overwrite"]
    for command in ("pretrain", "finetune"):
        params = [p.name for p in _params(app, command)]
        assert params[-len(names) :] == names, command
        assert all(p.default is None for p in _params(app, command) if p.name in names[:-2])


def test_trainer_options_build_the_trainer_config():
    from mindvis.cli import app

    helps = dict.fromkeys(("precision_help", "logger_help", "progress_help", "resume_help"), "Help.")
    specs = trainer_options(seed=1, precision="32", log_every=7, **helps)
    values = {s.name: s.default for s in specs}
    tc = trainer_config(values)
    assert (tc.precision, tc.log_every_n_steps, tc.progress_bar, tc.devices) == ("32", 7, True, "auto")
    assert tc.compile is False and trainer_config(values | {"compile": True}).compile is True
    for command in ("train", "train-prior"):
        assert [p.name for p in _params(app, command)][-len(specs) :] == [s.name for s in specs], command


def test_ridge_dual_matches_the_primal_solution_and_picks_by_leave_one_out():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8))
    w = rng.normal(size=(8, 2))
    y = x @ w + 0.1 * rng.normal(size=(30, 2))
    y = y - y.mean(axis=0)
    coef, alpha = ridge_dual(x, y, np.array([1e-3, 1.0, 1e6]))
    primal = np.linalg.solve(x.T @ x + alpha * np.eye(8), x.T @ y)
    np.testing.assert_allclose(x.T @ coef, primal, rtol=1e-6, atol=1e-9)
    assert alpha < 1e6  # a huge penalty predicts zeros, far worse out of sample than the others

    # exact leave-one-out error of the chosen penalty, refitting without each row
    def loo(a: float) -> float:
        errs = []
        for i in range(len(x)):
            keep = np.arange(len(x)) != i
            b = np.linalg.solve(x[keep].T @ x[keep] + a * np.eye(8), x[keep].T @ y[keep])
            errs.append(((x[i] @ b - y[i]) ** 2).mean())
        return float(np.mean(errs))

    assert loo(alpha) <= min(loo(a) for a in (1e-3, 1.0, 1e6)) + 1e-12


def test_stage_b_options_are_generated_from_its_config(monkeypatch):
    """Every ``setting`` of StageBConfig is an option of ``mindvis train`` with the field's default and help, and
    the values given on the command line reach the config the training gets."""
    from mindvis.cli import app
    from mindvis.config import settings_of
    from mindvis.train import ldm
    from mindvis.train.config import StageBConfig

    params = {p.name: p for p in _params(app, "train")}
    settings = settings_of(StageBConfig)
    assert len(settings) >= 25
    for f in settings:
        assert f.name in params, f.name
        assert params[f.name].default == f.default, f.name
        assert params[f.name].help == f.metadata["help"], f.name
    assert (
        "--steps" in params["sample_steps"].opts
        and "--no-time-cond" in params["use_time_cond"].secondary_opts
    )

    got: dict = {}

    def fake_train(prior, mbm, train_ds, test_ds, out, config, trainer_config, **kw):
        got["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(ldm, "train_stage_b", fake_train)
    monkeypatch.setattr("mindvis.train.ldm.load_dataset", lambda *a, **k: type("D", (), {"subject": "s"})())
    args = ["train", "--prior", "p", "--mbm", "m", "--out", "o", "--dataset", "bold5000", "--subject", "s"]
    flags = [
        "--steps",
        "7",
        "--no-time-cond",
        "--clip-grad",
        "0",
        "--val-schedule",
        "full",
        "--random-encoder",
    ]
    result = CliRunner().invoke(app, args + flags + ["--seed", "5"])
    assert result.exit_code == 0, result.output
    cfg = got["config"]
    assert (cfg.sample_steps, cfg.use_time_cond, cfg.clip_grad, cfg.val_schedule) == (7, False, None, "full")
    assert (cfg.encoder_init, cfg.seed, cfg.batch_size, cfg.lr) == ("random", 5, 25, StageBConfig.lr)
    result = CliRunner().invoke(app, args + ["--val-schedule", "sometimes"])
    assert result.exit_code != 0 and "val_schedule" in str(result.exception)  # the CLI prints it in one line


def test_vq_options_of_train_prior_are_generated_from_its_config():
    from mindvis.cli import app
    from mindvis.commands._options import config_values
    from mindvis.config import settings_of
    from mindvis.train.config import UNetTrainConfig, VQTrainConfig

    params = {p.name: p for p in _params(app, "train-prior")}
    for prefix, cls in (("vq_", VQTrainConfig), ("unet_", UNetTrainConfig)):
        for f in settings_of(cls):
            p = params[prefix + f.name]
            assert (p.default, p.help) == (f.default, f.metadata["help"]), f.name
    assert params["ema_decay"].default == UNetTrainConfig.ema_decay
    assert "--unet-lr" in params["unet_lr"].opts and "--guidance" in params["unet_guidance_scale"].opts
    assert "--vq-lr" in params["vq_lr"].opts and "--gan-start" in params["vq_gan_start_step"].opts
    values = {"vq_lr": 0.5, "vq_recon_loss": "l2", "unet_lr": 9.0}
    assert config_values(VQTrainConfig, values, prefix="vq_") == {"lr": 0.5, "recon_loss": "l2"}


def test_no_option_help_is_swallowed_as_markup():
    """``--help`` renders option help with rich markup: a ``[word ...]`` in a help text would vanish from it."""
    import typer
    from rich.text import Text

    from mindvis.cli import app

    def walk(cmd, name=""):
        for sub_name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, f"{name} {sub_name}".strip())
        for p in getattr(cmd, "params", []):
            if getattr(p, "help", None):
                yield name, p

    bad = [
        f"{name} {p.opts[0]}: {p.help}"
        for name, p in walk(typer.main.get_command(app))
        if Text.from_markup(p.help).plain != p.help.replace("\\[", "[")  # \[ shows a bracket on purpose
    ]
    assert not bad, bad


def test_config_options_carry_typer_bounds_and_refuse_unknown_names():
    from mindvis.commands._options import SEED_RANGE, config_options
    from mindvis.eval.config import ProbeConfig

    specs = {s.name: s for s in config_options(ProbeConfig, limits={"prior_items": {"min": 2}})}
    assert specs["prior_items"].limits == (("min", 2),) and specs["prior_draws"].limits == ()
    with pytest.raises(TypeError, match="no settings"):
        config_options(ProbeConfig, limits={"seed": SEED_RANGE})
