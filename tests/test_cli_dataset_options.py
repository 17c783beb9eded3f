"""The dataset options (``--dataset``, ``--split``, ``--data-dir``, ``--subject``, ``--roi``) of every command that
reads fMRI come from one group, :func:`mindvis.commands._options.dataset_options`: one help text each (unless the
command's meaning differs, listed here), each command's own defaults, and their old place in ``--help``."""

from __future__ import annotations

import click
import pytest
from typer.main import get_command
from typer.testing import CliRunner

from mindvis.cli import app
from mindvis.commands._options import dataset_options

NAMES = ("dataset", "split", "data_dir", "subject", "roi")
FLAGS = {"--dataset", "--split", "--data-dir", "--subject", "--roi"}

#: Per command: the parameter its dataset options follow, then each option's default (``...``: required), in
#: ``--help`` order; as they were before the options were shared.
EXPECTED: dict[str, tuple[str, dict[str, object]]] = {
    "train": ("out", {"dataset": "god", "data_dir": None, "subject": None, "roi": None}),
    "reconstruct": ("images_key", {"dataset": None, "split": "test", "data_dir": None, "subject": None}),
    "probe": ("models", {"dataset": ..., "data_dir": ..., "subject": None, "roi": None}),
    "finetune": ("out", {"data_dir": None, "subject": None}),
    "pretrain": ("out", {"data_dir": None}),
}
#: ``--roi`` of stage A is a setting of its config, listed with the other settings, with the shared help text.
STAGE_A_ROI = ("finetune", "pretrain")
#: The options whose help is the command's own, as their meaning there differs from the shared one.
OWN_HELP = {
    ("reconstruct", "dataset"),  # an alternative to --fmri
    ("train", "subject"),  # the original's GOD subject, sbj_3
    ("finetune", "data_dir"),  # no --dataset: a GOD folder
    ("finetune", "subject"),  # the folder's only subject
    ("pretrain", "data_dir"),  # no --dataset: a folder holding HCP/ and GOD/
}


def _commands(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    out: dict[str, click.Command] = {}
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out.update(_commands(cmd, f"{prefix}{name} "))
        else:
            out[prefix + name] = cmd
    return out


def _params(command: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in _commands(get_command(app))[command].params}  # type: ignore[arg-type,misc]


def test_every_command_reading_a_dataset_is_listed():
    """A command that takes a dataset option is one of those checked here (so a new one uses the group too)."""
    found = {
        name
        for name, cmd in _commands(get_command(app)).items()  # type: ignore[arg-type]
        if any(set(getattr(p, "opts", [])) & FLAGS for p in cmd.params)
    }
    assert found == set(EXPECTED)


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_defaults_and_places_are_the_commands(command):
    """Each command keeps its defaults, required options and flags, and lists the options where it did."""
    after, defaults = EXPECTED[command]
    params = _commands(get_command(app))[command].params  # type: ignore[arg-type]
    names = [p.name for p in params]
    start = names.index(after) + 1
    assert names[start : start + len(defaults)] == list(defaults)
    for name, default in defaults.items():
        p = params[names.index(name)]
        assert p.opts == ["--" + name.replace("_", "-")], name
        assert p.required == (default is ...), name
        assert p.default == (None if default is ... else default), name
        assert not p.hidden, name
    if command in STAGE_A_ROI:
        roi = params[names.index("roi")]
        assert (roi.opts, roi.default, roi.required) == (["--roi"], None, False)


def test_help_texts_are_the_groups():
    """Every dataset option has the shared help text (``--data-dir`` without its default when required), except
    those in :data:`OWN_HELP`; the same option has the same help in every command that shares it."""
    shared = {s.name: s.help for s in dataset_options(which=NAMES)}
    shared_required = {s.name: s.help for s in dataset_options(which=NAMES, required=NAMES)}
    assert "$MINDVIS_DATA" in shared["data_dir"] and "default" not in shared_required["data_dir"]
    seen: dict[str, set[str]] = {name: set() for name in NAMES}
    for command, (_, defaults) in EXPECTED.items():
        params = _params(command)
        names = [*defaults, *(["roi"] if command in STAGE_A_ROI else [])]
        for name in names:
            text = params[name].help
            if (command, name) in OWN_HELP:
                assert text not in (shared[name], shared_required[name]), (command, name)
                continue
            assert text == (shared_required if params[name].required else shared)[name], (command, name)
            if not params[name].required:
                seen[name].add(text)
    assert all(len(texts) == 1 for texts in seen.values()), seen
    assert _params("train")["data_dir"].help == _params("reconstruct")["data_dir"].help
    assert _params("train")["roi"].help == _params("probe")["roi"].help == _params("finetune")["roi"].help
    assert "sbj_3" in _params("train")["subject"].help


class _Stop(Exception):
    """Raised by a stand-in for the library call, once it has seen its arguments."""


def test_values_reach_the_library(monkeypatch, tmp_path):
    """The values given reach each command's library call as before (stage A's --roi: its config)."""
    import mindvis.eval.probe as probe_mod
    import mindvis.train.ldm as ldm_mod
    from mindvis.commands import reconstruct as reconstruct_cmd
    from mindvis.train import stage_a

    seen: dict[str, dict] = {}

    def stand_in(name):
        def call(config, *args, **kwargs):
            seen[name] = {"config": config, **kwargs}
            raise _Stop

        return call

    monkeypatch.setattr(ldm_mod, "run_stage_b", stand_in("train"))
    monkeypatch.setattr(reconstruct_cmd, "reconstruct", stand_in("reconstruct"))
    monkeypatch.setattr(probe_mod, "probe", stand_in("probe"))
    monkeypatch.setattr(stage_a, "finetune", stand_in("finetune"))
    monkeypatch.setattr(stage_a, "pretrain", stand_in("pretrain"))
    d = tmp_path / "d"
    given = ["--out", str(tmp_path / "o"), "--data-dir", str(d)]
    runs = {
        "train": "--prior p --mbm m --dataset nsd --subject s --roi V1",
        "reconstruct": "--model m --dataset god --split train --subject s",
        "probe": "--dataset synthetic --subject s --roi V1",
        "finetune": "--init i --subject s --roi V1",
        "pretrain": "--roi V1",
    }
    for command, args in runs.items():
        result = CliRunner().invoke(app, [command, *given, *args.split()])
        assert isinstance(result.exception, _Stop), (command, result.output)

    def got(command, *names):
        return {k: seen[command][k] for k in names}

    assert got("train", "data_dir", "subject", "roi") == {"data_dir": d, "subject": "s", "roi": "V1"}
    assert seen["train"]["config"].dataset == "nsd"
    want = {"dataset": "god", "split": "train", "data_dir": d, "subject": "s"}
    assert got("reconstruct", *want) == want
    want = {"dataset": "synthetic", "data_dir": d, "subject": "s", "roi": "V1"}
    assert got("probe", *want) == want
    assert got("finetune", "data_dir", "subject") == {"data_dir": d, "subject": "s"}
    assert got("pretrain", "data_dir") == {"data_dir": d}
    assert seen["finetune"]["config"].roi == seen["pretrain"]["config"].roi == "V1"


def test_train_dataset_default_reaches_the_config(monkeypatch):
    import mindvis.train.ldm as ldm_mod

    seen = {}

    def stand_in(config, *args, **kwargs):
        seen["config"] = config
        raise _Stop

    monkeypatch.setattr(ldm_mod, "run_stage_b", stand_in)
    result = CliRunner().invoke(app, ["train", "--prior", "p", "--mbm", "m", "--out", "o"])
    assert isinstance(result.exception, _Stop), result.output
    assert seen["config"].dataset == "god"


def test_group_refuses_misuse():
    with pytest.raises(TypeError, match="no dataset options"):
        dataset_options(which=("dataset", "session"))
    with pytest.raises(TypeError, match="not among"):
        dataset_options(which=("dataset",), required=("data_dir",))
    with pytest.raises(TypeError, match="not among"):
        dataset_options(which=("dataset",), help={"roi": "x"})
    with pytest.raises(TypeError, match="optional --dataset"):
        dataset_options(which=("dataset",), dataset_default="god", required=("dataset",))
    with pytest.raises(TypeError, match="optional --dataset"):
        dataset_options(which=("roi",), dataset_default="god")
    with pytest.raises(TypeError, match="own help text"):
        dataset_options(which=("data_dir", "subject"), help={"data_dir": "x"})
    assert [s.name for s in dataset_options(which=("roi", "dataset"))] == ["roi", "dataset"]
    assert dataset_options(which=("dataset",), required=("dataset",))[0].annotation is str
