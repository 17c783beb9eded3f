"""Stage A as library calls (``mindvis.train.stage_a``): the settings, the commands' options generated from them,
and ``pretrain`` / ``finetune`` on tiny data in the HCP / GOD layouts (tiny model variant, CPU)."""

from __future__ import annotations

import json
import typing

import pytest
import typer.main

from mindvis.cli import app
from mindvis.config import settings_of
from mindvis.errors import ConfigError, DataError, OutputOverlapError
from mindvis.train.stage_a import (
    A2_DATA,
    CONFIG_KEYS,
    VARIANTS,
    FinetuneConfig,
    PretrainConfig,
    StageAConfig,
    find_sources,
    finetune,
    pick_subject,
    pretrain,
)
from test_hcp import write_god_subject
from test_train_mbm import val_curve, write_lowrank_hcp

#: The options of each command that are not settings: its paths, then those added around the settings.
PATHS = {
    "pretrain": ["out", "data_dir", "hcp_dir", "god_dir"],
    "finetune": ["init", "out", "data_dir", "subject"],
}
RUN = ["threads", "progress", "resume", "overwrite"]
#: Hardware of the runs here.
CPU = dict(accelerator="cpu", devices="1")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _params(command: str) -> dict:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------------------
# the settings and the options
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "cls"), [("pretrain", PretrainConfig), ("finetune", FinetuneConfig)])
def test_config_fields_are_the_commands_options_one_to_one(command, cls):
    params = _params(command)
    settings = settings_of(cls)
    assert sorted(params) == sorted(PATHS[command] + RUN + [f.name for f in settings])
    assert list(params)[: len(PATHS[command])] == PATHS[command]
    for f in settings:
        p = params[f.name]
        assert p.default is None and f.default is None, f.name
        assert p.help == f.metadata["help"], f.name
        assert p.opts == [f.metadata["flag"] or "--" + f.name.replace("_", "-")], f.name
        annotation = typing.get_type_hints(cls)[f.name]
        assert p.is_flag == (bool in typing.get_args(annotation)), f.name
        if p.is_flag:
            assert p.secondary_opts == ["--no-" + p.opts[0][2:]], f.name
        assert p.hidden == (command == "finetune" and f.name == "include_test_fmri"), f.name
    assert (params["seed"].min, params["seed"].max) == (0, 2**32 - 1)
    # each stage's own help where the default is the stage's
    assert params["epochs"].help.startswith(
        {"pretrain": "Epochs (default: 500)", "finetune": "Epochs (default: 15"}[command]
    )
    assert settings_of(StageAConfig)[0].metadata["help"] != params["epochs"].help


def test_the_choices_are_the_run_configurations():
    """The settings' ``Literal`` choices (and the variants their check takes) are those the run accepts."""
    from mindvis.data.preprocess import NAN_POLICIES, NORMALIZE_MODES
    from mindvis.data.pretrain import DATA_PAD_MODES
    from mindvis.models.mbm import MBM_VARIANTS

    hints = typing.get_type_hints(PretrainConfig)

    def choices(name: str, hints=hints) -> set:
        return {a for a in typing.get_args(typing.get_args(hints[name])[0])}

    assert choices("nan_policy") == set(NAN_POLICIES) and choices("normalize") == set(NORMALIZE_MODES)
    assert choices("pad_mode") == set(DATA_PAD_MODES)
    assert choices("variant") == set(VARIANTS) == set(MBM_VARIANTS)
    assert choices("a2_data", typing.get_type_hints(FinetuneConfig)) == set(A2_DATA)


@pytest.mark.parametrize(
    "bad",
    [
        {"epochs": 0},
        {"batch_size": 2.5},
        {"lr": -1.0},
        {"lr": float("nan")},
        {"min_lr": True},
        {"clip_grad": -0.1},
        {"mask_ratio": 1.0},
        {"accumulate": 0},
        {"num_workers": -1},
        {"seed": -1},
        {"val_fraction": 1.0},
        {"nan_policy": "ignore"},
        {"normalize": "robust"},
        {"pad_mode": "mirror"},
        {"variant": "huge"},
        {"window_trs": 0},
        {"patch_size": 0},
        {"hcp_limit": 0},
        {"aug_times": 0.5},
    ],
    ids=lambda d: next(iter(d)),
)
def test_bad_settings_fail_as_the_run_configuration_does(tmp_path, bad):
    """A setting out of range fails when the config is made, naming the field, with the message the run
    configuration gives it (what the command line has always printed)."""
    from mindvis.train.stage_a import resolve_config

    name = next(iter(bad))
    with pytest.raises(ConfigError) as early:
        PretrainConfig(**bad)
    assert early.value.field == name
    given = {CONFIG_KEYS[name]: bad[name], "data.hcp_dir": str(tmp_path)}
    with pytest.raises(ConfigError) as late:
        resolve_config("pretrain", tmp_path / "run", False, given)
    assert str(early.value) == str(late.value)


def test_more_bad_settings_name_their_field():
    for cls, bad, field in (
        (PretrainConfig, {"seed": 2**32}, "seed"),
        (PretrainConfig, {"use_hcp": "yes"}, "use_hcp"),
        (PretrainConfig, {"god_subjects": ["sbj_1"]}, "god_subjects"),
        (PretrainConfig, {"devices": 1}, "devices"),
        (PretrainConfig, {"warmup_epochs": "2"}, "warmup_epochs"),
        (FinetuneConfig, {"roi": 3}, "roi"),
        (FinetuneConfig, {"compile": "no"}, "compile"),
    ):
        with pytest.raises(ConfigError) as exc:
            cls(**bad)
        assert exc.value.field == field, bad
    with pytest.raises(ConfigError, match=r"\[--a2-data\] expected one of original, train, train\+test"):
        FinetuneConfig(a2_data="bogus")  # type: ignore[arg-type]


def test_given_settings_by_run_configuration_key():
    assert PretrainConfig().given() == {} and FinetuneConfig().given() == {}
    got = PretrainConfig(
        god_subjects=" sbj_1, ,sbj_3", roi="V1", val_every=2, devices="0,1", use_hcp=False, variant="tiny"
    ).given()
    assert got == {
        "trainer.val_every_n_epochs": 2,
        "trainer.devices": "0,1",
        "data.god_subjects": ["sbj_1", "sbj_3"],
        "data.god_roi": "V1",
        "variant": "tiny",
    }
    assert "data.god_subjects" not in PretrainConfig(god_subjects=" , ").given()  # no names: all subjects
    got = FinetuneConfig(a2_data="train+test", roi="VC", include_test_fmri=True).given()
    assert got == {"data.include_test_fmri": True, "data.god_roi": "VC", **A2_DATA["train+test"]}


def test_find_sources(tmp_path):
    write_lowrank_hcp(tmp_path, subjects=1, samples=8)
    write_god_subject(tmp_path, "sbj_1")
    assert find_sources(tmp_path, None, None, None, None) == (str(tmp_path / "HCP"), str(tmp_path / "GOD"))
    assert find_sources(tmp_path, None, None, None, False) == (str(tmp_path / "HCP"), None)
    assert find_sources(None, None, tmp_path / "GOD", None, None) == (None, str(tmp_path / "GOD"))
    with pytest.raises(ConfigError, match="--hcp was given") as exc:
        find_sources(tmp_path / "GOD", None, None, True, None)
    assert exc.value.field == "hcp_dir"
    with pytest.raises(ConfigError, match="no HCP or GOD data found"):
        find_sources(tmp_path / "HCP" / "npz" / "s0", None, None, False, None)
    assert pick_subject(tmp_path / "GOD", None) == "sbj_1" and pick_subject(tmp_path / "GOD", "1") == "sbj_1"
    with pytest.raises(DataError, match="sbj_2 not found"):
        pick_subject(tmp_path / "GOD", "2")


# ----------------------------------------------------------------------------------------------------------
# the runs
# ----------------------------------------------------------------------------------------------------------


def test_pretrain_then_finetune_as_library_calls(tmp_path):
    """``pretrain`` and ``finetune`` train from their configs and paths and return what the commands print; a
    resumed run takes the run's settings and refuses a changed recipe, changing nothing."""
    hcp = write_lowrank_hcp(tmp_path, samples=32, voxels=48)
    pre = pretrain(
        PretrainConfig(variant="tiny", epochs=1, batch_size=16, patch_size=8, window_trs=1, seed=3, **CPU),
        tmp_path / "a1",
        hcp_dir=hcp,
        progress=False,
    )
    assert (pre.run_dir, pre.epochs_done, pre.num_samples, pre.num_voxels) == (tmp_path / "a1", 1, 64, 48)
    doc = json.loads((tmp_path / "a1" / "config.json").read_text())["config"]
    assert (doc["variant"], doc["seed"], doc["lr"], doc["data"]["hcp_dir"], doc["data"]["god_dir"]) == (
        "tiny",
        3,
        2.5e-4,  # the stage's default
        str(hcp),
        None,
    )
    assert doc["trainer"]["progress_bar"] is False and doc["trainer"]["devices"] == 1

    data = tmp_path / "data"
    write_god_subject(data, "sbj_1", n_train=30, v_all=70, n_vc=52)
    config = FinetuneConfig(epochs=1, batch_size=8, a2_data="train", **CPU)
    ft = finetune(config, tmp_path / "a2", init=tmp_path / "a1", data_dir=data, subject="1", progress=False)
    assert (ft.epochs_done, ft.num_samples, ft.num_voxels, ft.val_on_training) == (1, 30, 48, False)
    doc = json.loads((tmp_path / "a2" / "config.json").read_text())["config"]
    assert doc["init"] == str(tmp_path / "a1") and doc["data"]["god_subjects"] == ["sbj_1"]
    assert (doc["data"]["god_dir"], doc["data"]["god_fmri"], doc["lr"]) == (
        str(data / "GOD"),
        "train",
        5.3e-5,
    )

    # resumed: no init or data needed, more epochs allowed, another learning rate refused
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "a2").rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="cannot change lr when resuming"):
        finetune(FinetuneConfig(epochs=2, lr=0.1), tmp_path / "a2", resume=True)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a2").rglob("*") if p.is_file()} == before
    again = finetune(
        FinetuneConfig(epochs=2, **CPU), tmp_path / "a2", resume=True, data_dir=data, subject="1"
    )
    assert again.epochs_done == 2 and len(val_curve(tmp_path / "a2")) == 1 + 2


def test_library_calls_check_their_inputs_before_writing(tmp_path):
    write_god_subject(tmp_path / "data", "sbj_1")
    write_god_subject(tmp_path / "data", "sbj_2")
    with pytest.raises(ConfigError, match="--init") as exc:
        finetune(FinetuneConfig(), tmp_path / "a2", data_dir=tmp_path / "data")
    assert exc.value.field == "init"
    with pytest.raises(ConfigError, match="choose the target subject"):
        finetune(FinetuneConfig(), tmp_path / "a2", init=tmp_path / "x", data_dir=tmp_path / "data")
    with pytest.raises(ConfigError, match="no HCP or GOD data found"):
        pretrain(PretrainConfig(use_god=False), tmp_path / "a1", data_dir=tmp_path / "data")
    with pytest.raises(OutputOverlapError, match="lies inside"):
        pretrain(PretrainConfig(), tmp_path / "data" / "GOD" / "run", data_dir=tmp_path / "data")
    assert not (tmp_path / "a1").exists() and not (tmp_path / "a2").exists()
    assert not (tmp_path / "data" / "GOD" / "run").exists()
