"""What the settings dataclasses share: size limits, field checks, command-line help, and JSON.

Every config dataclass of :mod:`mindvis.models` (and the noise schedule's, :mod:`mindvis.sampling`) checks its
fields in ``__post_init__`` with the ``check_*`` functions here and reads and writes JSON through
:class:`ConfigMixin`. A config file comes from outside (a model folder, a converted checkpoint), so every
check raises :class:`~mindvis.errors.ConfigError` naming the field, and the sizes are bounded before anything
is allocated.

A training config declares the fields a command exposes with :func:`setting`: the default and the ``--help``
text are written once, in the dataclass, and the command's options are generated from them
(:func:`mindvis.commands._options.config_options`), so the library and the command line cannot disagree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from mindvis.errors import ConfigError

#: Upper bounds on the sizes a model config may ask for. A config file is read from outside (a model folder, a
#: converted checkpoint), so absurd values (a width of 10^12, a depth of 10^9) must be refused with the file and
#: field named before anything is allocated. The bounds sit far above the paper's models (widths up to 1024, 24
#: blocks, a UNet of about 400 M parameters, 8192 codes, 256 px images).
MAX_SIZE = 1 << 16  # any single width, channel, head or token count (65536)
MAX_DEPTH = 1024  # blocks in one stack
MAX_LEVELS = 16  # resolution levels of a UNet or autoencoder
MAX_SPATIAL = 8192  # image or latent height / width
MAX_ROWS = 1 << 20  # table rows: codebook entries, classes, basis rows
MAX_VOXELS = 1 << 24  # voxels per fMRI sample
MAX_LIST = 64  # entries of a per-level list
MAX_PARAMETERS = 1 << 32  # weights of one network (16 GiB in float32; about 10x the label2img UNet)


def check_int(name: str, value: Any, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
    """``value`` if it is an integer (not a bool) in ``[minimum, maximum]``, else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"expected an integer >= {minimum}, got {value!r}", field=name)
    if value > maximum:
        raise ConfigError(
            f"{value} is above the limit of {maximum} (a corrupt or hostile config?)", field=name
        )
    return value


def check_float(name: str, value: Any, minimum: float = -math.inf, maximum: float = math.inf) -> float:
    """``value`` as a float if it is a finite real number (not a bool) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"expected a finite number, got {value!r}", field=name)
    if not minimum <= value <= maximum:
        raise ConfigError(f"expected a number in [{minimum}, {maximum}], got {value!r}", field=name)
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (JSON ``true``/``false``; numpy bools too), else :class:`ConfigError`."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"expected true or false, got {value!r}", field=name)
    return bool(value)


def check_int_tuple(
    name: str, value: Any, minimum: int = 1, allow_empty: bool = False, maximum: int = MAX_SIZE
) -> tuple[int, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ConfigError(f"expected a list of integers, got {value!r}", field=name)
    out = tuple(itertools.islice(value, MAX_LIST + 1))
    if len(out) > MAX_LIST:
        raise ConfigError(f"more than {MAX_LIST} entries (a corrupt or hostile config?)", field=name)
    if not out and not allow_empty:
        raise ConfigError("expected a non-empty list of integers", field=name)
    for v in out:
        check_int(name, v, minimum, maximum)
    return out


def check_parameters(what: str, parts: Mapping[str, int]) -> None:
    """Refuse sizes whose networks would hold more than :data:`MAX_PARAMETERS` weights.

    ``parts`` maps the field most responsible for each part of the network to a lower bound of that part's
    weight count; the error names the field of the largest part.
    """
    total = sum(parts.values())
    if total > MAX_PARAMETERS:
        field_name = max(parts, key=lambda k: parts[k])
        raise ConfigError(
            f"these sizes give a {what} of at least {total:.3g} weights, above the limit of "
            f"{MAX_PARAMETERS:.3g} (a corrupt or hostile config?)",
            field=field_name,
        )


def setting(default: Any, help: str, *, flag: str | None = None) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default: the field's default, which is also the option's.
        help: the option's ``--help`` text (the field's documentation for users).
        flag: the option's flag when it is not ``--<name-with-dashes>`` (``--x/--no-x`` for a bool), e.g.
            ``"--steps"`` for ``sample_steps``.
    """
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


def settings_of(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` declared with :func:`setting`, in order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def config_from_dict(cls: type, data: Mapping[str, Any], source: Any = None) -> Any:
    """Build a config dataclass from a JSON dict (keys starting with ``_`` are metadata and ignored).

    Fields without a default are always required. When ``source`` names the file the dict was read from,
    every field is required except those in the class's ``_OPTIONAL_IN_FILES`` (fields added after format
    version 1, whose default reproduces the older files): the files mindvis writes hold every field, and a
    missing one would otherwise take a default that fails later with a message naming no file.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a JSON object, got {type(data).__name__}", path=source)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    unknown = sorted(str(k) for k in data if k not in names and not str(k).startswith("_"))
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} field(s): {', '.join(unknown)}", path=source, field=unknown[0]
        )
    optional = getattr(cls, "_OPTIONAL_IN_FILES", frozenset())
    missing = [
        f.name
        for f in fields
        if f.name not in data
        and (
            (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            or (source is not None and f.name not in optional)
        )
    ]
    if missing:
        raise ConfigError(
            f"missing required {cls.__name__} field(s): {', '.join(missing)}", path=source, field=missing[0]
        )
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except TypeError as exc:
        raise ConfigError(f"cannot build {cls.__name__}: {exc}", path=source) from None
    except ConfigError as exc:
        if source is None:
            raise
        raise ConfigError(exc.detail, path=source, field=exc.field) from None


class ConfigMixin:
    """Base of the config dataclasses: ``to_dict`` / ``from_dict`` to and from plain JSON."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (tuples become lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()  # type: ignore[call-overload]
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: Any = None):  # noqa: ANN206
        """Inverse of :meth:`to_dict`. Raises :class:`ConfigError` on unknown keys or bad values."""
        return config_from_dict(cls, data, source)


# ---------------------------------------------------------------------------------------------------------------
# Changing one field of a config from text (``mindvis demo --set SECTION.KEY=VALUE``)
# ---------------------------------------------------------------------------------------------------------------


def option_paths(cls: type) -> dict[str, str]:
    """``{option: field path}`` of the :func:`setting` fields of config dataclass ``cls`` and of its fields that are
    config dataclasses themselves (``{"vq_lr": "vq.lr", "steps": "unet.sample_steps"}``): the name of each field's
    command-line option, without dashes and with underscores, to the dotted path of the field. An option name
    that two nested fields share is left out (the path names it)."""
    out: dict[str, str] = {}
    shared: set[str] = set()

    def walk(kind: type, prefix: str) -> None:
        hints = typing.get_type_hints(kind)
        for f in dataclasses.fields(kind):
            inner = _dataclass_of(hints.get(f.name))
            if inner is not None:
                walk(inner, f"{prefix}{f.name}.")
            if "help" not in f.metadata:
                continue
            flag = (f.metadata.get("flag") or "--" + f.name).split("/")[0]
            name = flag.lstrip("-").replace("-", "_")
            if name in out or name in shared:
                shared.add(name)
                out.pop(name, None)
            else:
                out[name] = prefix + f.name

    walk(cls, "")
    return out


def _dataclass_of(annotation: Any) -> type | None:
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def _under(head: str, field: str | None) -> str:
    """The dotted path of ``field`` of the config in field ``head`` (a config may already name it so)."""
    if not field:
        return head
    return field if field.startswith(f"{head}.") else f"{head}.{field}"


def _allows_none(annotation: Any) -> bool:
    return annotation is Any or type(None) in typing.get_args(annotation)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def coerce_value(annotation: Any, value: Any, name: str) -> Any:
    """``value`` (as YAML reads a written value) converted to the field type ``annotation``: an integer for
    ``int`` (not a bool), a number for ``float``, ``true``/``false`` for ``bool``, text for ``str`` (a number
    written for a text field is kept as text), one of the choices of a ``Literal``, a list for a tuple or list,
    a mapping for a dict, ``None`` only where the type allows it.

    Raises:
        ConfigError: the value does not fit the type (``field=name``).
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError("expected a value, got null", field=name)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce_value(arg, value, name)
            except ConfigError as exc:
                errors.append(exc.detail)
        raise ConfigError("; or ".join(errors), field=name)
    if value is None:
        raise ConfigError(f"expected {_type_name(annotation)}, got null", field=name)
    if origin is typing.Literal:
        for choice in args:
            if value == choice or str(value) == str(choice):
                return choice
        raise ConfigError(f"expected one of {', '.join(map(str, args))}, got {value!r}", field=name)
    if annotation is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise ConfigError(f"expected true or false, got {value!r}", field=name)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", field=name)
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {value!r}", field=name)
        return float(value)
    if annotation is str:
        if isinstance(value, (list, dict)):
            raise ConfigError(f"expected text, got {value!r}", field=name)
        return (
            value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
        )
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list like [a, b], got {value!r}", field=name)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [coerce_value(args[0], v, name) for v in value]
        elif origin is tuple and args:
            if len(value) != len(args):
                raise ConfigError(f"expected a list of {len(args)} values, got {value!r}", field=name)
            items = [coerce_value(a, v, name) for a, v in zip(args, value, strict=True)]
        else:
            items = [coerce_value(args[0] if args else Any, v, name) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping like {{a: 1}}, got {value!r}", field=name)
        return dict(value)
    if isinstance(value, annotation if isinstance(annotation, type) else object):
        return value
    raise ConfigError(f"expected {_type_name(annotation)}, got {value!r}", field=name)


def field_default(f: dataclasses.Field) -> Any:
    """The default of dataclass field ``f`` (a fresh one from its factory), or ``MISSING``."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def change_config(config: Any, path: str, value: Any) -> Any:
    """A copy of config dataclass ``config`` with the field at dotted ``path`` set to ``value``.

    ``value`` is converted to the field's type (:func:`coerce_value`); :data:`RESET` restores the field's
    default, and so does ``None`` for a field that cannot be ``None`` (``None`` removes a dict entry). A path may go into a field that is a config dataclass (``vq.lr``) or into a dict field
    (``vq_model.n_embed``, whose entry is checked by the config itself). The copy is built with
    :func:`dataclasses.replace`, so the config's own checks run on the new value. ``config`` is not changed.

    Raises:
        ConfigError: no such field, or a value of the wrong type or refused by the config (``field=path``).
    """
    head, _, rest = path.partition(".")
    fields = {f.name: f for f in dataclasses.fields(config) if f.init}
    if head not in fields:
        raise ConfigError(
            f"{type(config).__name__} has no field {head!r}; it has: {', '.join(sorted(fields))}", field=path
        )
    annotation = typing.get_type_hints(type(config))[head]
    current = getattr(config, head)
    if rest and dataclasses.is_dataclass(current):
        try:
            new = change_config(current, rest, value)
        except ConfigError as exc:
            raise ConfigError(exc.detail, field=_under(head, exc.field)) from None
    elif rest and isinstance(current, Mapping):
        new = dict(current)
        if value is RESET or value is None:
            new.pop(rest, None)
        else:
            new[rest] = value
    elif rest:
        raise ConfigError(f"{head} is a single value; it has no entry {rest!r}", field=path)
    elif value is RESET or (value is None and not _allows_none(annotation)):
        new = field_default(fields[head])
    elif dataclasses.is_dataclass(current):
        raise ConfigError(f"{head} is a group of settings; set one of them, e.g. {head}.<field>", field=path)
    else:
        new = coerce_value(annotation, value, path)
    try:
        return dataclasses.replace(config, **{head: new})
    except ConfigError as exc:
        raise ConfigError(exc.detail, field=path) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc), field=path) from None


class _Reset:
    def __repr__(self) -> str:
        return "RESET"


#: The value that :func:`change_config` reads as "the field's default" (``null`` in ``--set``).
RESET: Any = _Reset()


def config_to_dict(config: Any) -> Any:
    """A config dataclass (or what it holds) as plain JSON/YAML types: dicts, lists, numbers, text."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}
    if isinstance(config, Mapping):
        return {str(k): config_to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    if isinstance(config, np.generic):
        return config.item()
    return config


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2], "d": {}}`` -> ``{"a.b": 1, "c": [1, 2], "d": {}}``: the dotted path of every
    leaf of nested mappings (an empty mapping is a leaf, so that emptying one is a change)."""
    if isinstance(data, Mapping) and (data or not prefix):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def config_from_plain(cls: type, data: Any, source: Any = None) -> Any:
    """Build config dataclass ``cls`` from plain data (:func:`config_to_dict`'s, or a YAML file's): each value
    converted to its field's type (:func:`coerce_value`), a nested config built the same way, a missing field
    left at its default, and the config's own checks run.

    Raises:
        ConfigError: not a mapping, an unknown field, or a value of the wrong type or refused by the config; the
            error names ``source`` (the file) and the field's dotted path.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of {cls.__name__} fields, got {data!r}", path=source)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            raise ConfigError(
                f"{cls.__name__} has no field {name!r}; it has: {', '.join(sorted(fields))}",
                path=source,
                field=name,
            )
        inner = _dataclass_of(hints[name])
        try:
            if inner is not None and isinstance(value, Mapping):
                kwargs[name] = config_from_plain(inner, value)
            else:
                kwargs[name] = coerce_value(hints[name], value, name)
        except ConfigError as exc:
            field = name if exc.field in (None, name) else _under(name, exc.field)
            raise ConfigError(exc.detail, path=source, field=field) from None
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(exc.detail, path=source, field=exc.field) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build {cls.__name__}: {exc}", path=source) from None


__all__ = [
    "MAX_DEPTH",
    "MAX_LEVELS",
    "MAX_LIST",
    "MAX_PARAMETERS",
    "MAX_ROWS",
    "MAX_SIZE",
    "MAX_SPATIAL",
    "MAX_VOXELS",
    "RESET",
    "ConfigMixin",
    "check_bool",
    "check_float",
    "check_int",
    "check_int_tuple",
    "change_config",
    "check_parameters",
    "coerce_value",
    "config_from_dict",
    "config_from_plain",
    "config_to_dict",
    "field_default",
    "flatten",
    "option_paths",
    "setting",
    "settings_of",
]
