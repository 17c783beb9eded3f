"""Changing one field of a config from text (:func:`mindvis.config.change_config`), as ``mindvis demo --set`` does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from mindvis.config import RESET, change_config, coerce_value, config_to_dict, option_paths, setting
from mindvis.errors import ConfigError


@dataclass
class Inner:
    lr: float = setting(1e-3, "Learning rate.", flag="--inner-lr")
    steps: int = setting(10, "Steps.", flag="--steps")


@dataclass
class Outer:
    epochs: int = setting(3, "Epochs.")
    mode: Literal["a", "b"] = setting("a", "Mode.")
    clip: float | None = setting(0.5, "Clip (None: off).")
    name: str = "x"
    sizes: tuple[int, ...] = (1, 2)
    model: dict = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    flag: bool = setting(False, "A switch.", flag="--switch/--no-switch")

    def __post_init__(self) -> None:
        if self.epochs > 100:
            raise ConfigError("at most 100", field="epochs")


def test_change_config_sets_typed_fields_and_leaves_the_original():
    a = Outer()
    b = change_config(a, "epochs", 7)
    assert b.epochs == 7 and a.epochs == 3
    assert change_config(a, "clip", 1).clip == 1.0 and isinstance(change_config(a, "clip", 1).clip, float)
    assert change_config(a, "clip", None).clip is None  # the type allows None: None
    nine = change_config(a, "epochs", 9)
    assert change_config(nine, "epochs", None).epochs == 3  # the type does not allow None: the default
    assert change_config(a, "epochs", RESET).epochs == 3
    assert change_config(a, "sizes", [3, 4]).sizes == (3, 4)
    assert change_config(a, "name", 32).name == "32"  # a number written for text stays text
    assert change_config(a, "mode", "b").mode == "b"
    assert change_config(a, "inner.lr", "1e-4").inner.lr == 1e-4  # YAML reads 1e-4 as text
    m = change_config(change_config(a, "model.n_embed", 256), "model.ch", 32)
    assert m.model == {"n_embed": 256, "ch": 32} and a.model == {}
    assert change_config(m, "model.n_embed", None).model == {"ch": 32}
    assert config_to_dict(m)["sizes"] == [1, 2] and config_to_dict(m)["inner"] == {"lr": 1e-3, "steps": 10}


@pytest.mark.parametrize(
    "path, value, match",
    [
        ("nope", 1, "has no field 'nope'"),
        ("epochs", 1.5, "expected an integer"),
        ("epochs", True, "expected an integer"),
        ("epochs", 1000, "at most 100"),  # the config's own check
        ("mode", "c", "expected one of a, b"),
        ("flag", "yes", "expected true or false"),
        ("sizes", 3, "expected a list"),
        ("inner", 3, "group of settings"),
        ("epochs.x", 3, "single value"),
        ("inner.nope", 3, "has no field 'nope'"),
        ("model", [1], "expected a mapping"),
    ],
)
def test_change_config_refuses_with_the_path_named(path, value, match):
    with pytest.raises(ConfigError, match=match) as err:
        change_config(Outer(), path, value)
    assert err.value.field == path


def test_option_paths_name_fields_by_their_command_options():
    paths = option_paths(Outer)
    assert paths["epochs"] == "epochs" and paths["switch"] == "flag"
    assert paths["inner_lr"] == "inner.lr" and paths["steps"] == "inner.steps"
    assert "name" not in paths  # not declared with setting(): no option


def test_coerce_value_unions_and_none():
    assert coerce_value(int | None, None, "x") is None
    assert coerce_value(int | str, "a", "x") == "a"
    with pytest.raises(ConfigError, match="got null"):
        coerce_value(int, None, "x")
