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

import dataclasses
import itertools
import math
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


__all__ = [
    "MAX_DEPTH",
    "MAX_LEVELS",
    "MAX_LIST",
    "MAX_PARAMETERS",
    "MAX_ROWS",
    "MAX_SIZE",
    "MAX_SPATIAL",
    "MAX_VOXELS",
    "ConfigMixin",
    "check_bool",
    "check_float",
    "check_int",
    "check_int_tuple",
    "check_parameters",
    "config_from_dict",
    "setting",
    "settings_of",
]
