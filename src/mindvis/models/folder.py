"""The folder one model is saved in: ``config.json`` and ``model.safetensors``.

``config.json`` holds the model's config fields plus ``_class_name`` and ``_format_version``;
``model.safetensors`` holds the state dict (canonical header, so equal weights give equal bytes). Each file is
written atomically. :meth:`~mindvis.models.mbm.MaskedBrainModel.save_pretrained`,
:meth:`~mindvis.models.mbm.FMRIEncoder.save_pretrained` and the components of a
:class:`~mindvis.pipeline.MindVisPipeline` folder are written with :func:`save_model_folder` and read back with
:func:`read_folder_config`, :func:`load_safetensors` and :func:`load_state_dict_checked`.

:func:`state_dict_mismatch` is the one check of a state dict against a module's: missing and unexpected keys,
wrong shapes, dtypes that would be reinterpreted. The strict folder loads, the non-strict encoder load and the
reader of the original stage-A checkpoints use it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mindvis.errors import CheckpointError, MindVisError
from mindvis.utils.io import atomic_write, read_json, safetensors_bytes, write_json

_logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: Version of our saved-folder layout, written into config.json as ``_format_version``.
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# Writing and reading folders
# ----------------------------------------------------------------------------------------------------------


def save_model_folder(
    module: nn.Module, directory: str | os.PathLike, class_name: str, config: dict[str, Any]
) -> Path:
    """Write ``module``'s weights and ``config`` (with ``_class_name`` and ``_format_version``) into
    ``directory`` (created if needed), each file atomically.

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    payload = safetensors_bytes(tensors, {"format": "pt", "mindvis_class": class_name})
    with atomic_write(directory / WEIGHTS_NAME, "wb") as fh:
        fh.write(payload)
    write_json(
        directory / CONFIG_NAME, {"_class_name": class_name, "_format_version": FORMAT_VERSION, **config}
    )
    _logger.info("saved %s to %s", class_name, directory)
    return directory


def read_model_json(path: Path, newest: int = FORMAT_VERSION) -> dict[str, Any]:
    """A JSON object from a model folder (``config.json``, ``model_index.json``) of format version <= ``newest``.

    Raises:
        CheckpointError: the file is missing, not JSON (malformed, nested too deeply, a number too long to
            read), not an object, or names a format version this mindvis does not read.
    """
    try:
        meta = read_json(path)
    except MindVisError as exc:
        raise CheckpointError(exc.detail, path=path) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise CheckpointError(f"not usable JSON ({_first_line(exc)})", path=path) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"expected a JSON object, got {type(meta).__name__}", path=path)
    version = meta.get("_format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(
            f"expected a format version (an integer >= 1), got {version!r}",
            path=path,
            field="_format_version",
        )
    if version > newest:
        raise CheckpointError(
            f"written by a newer mindvis (format version {version}, this one reads {newest})",
            path=path,
            field="_format_version",
        )
    return meta


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def read_folder_config(directory: Path) -> dict[str, Any]:
    """The ``config.json`` object of a model folder (see :func:`read_model_json`).

    Raises:
        CheckpointError: ``directory`` is not a folder, or its ``config.json`` is missing or unusable.
    """
    if not directory.is_dir():
        raise CheckpointError(
            "not a saved model folder (expected config.json and model.safetensors)", path=directory
        )
    return read_model_json(directory / CONFIG_NAME)


def load_safetensors(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read a safetensors file into a dict of tensors.

    Raises:
        CheckpointError: missing, empty, truncated or corrupt file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("weights file not found", path=path)
    if path.stat().st_size == 0:
        raise CheckpointError("weights file is empty", path=path)
    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"truncated or corrupt safetensors file ({exc})", path=path) from None


# ----------------------------------------------------------------------------------------------------------
# Checking a state dict against a module's
# ----------------------------------------------------------------------------------------------------------


def _dtype_fits(got: torch.dtype, want: torch.dtype) -> bool:
    """Whether a stored tensor of dtype ``got`` may be loaded where the model holds ``want``.

    Floating point takes any floating-point dtype (cast on load); integers take integers; bools take bools.
    """
    if want.is_floating_point:
        return got.is_floating_point
    if want == torch.bool or got == torch.bool:
        return got == want
    if want.is_complex or got.is_complex:
        return got == want
    return not got.is_floating_point


@dataclass
class StateDictMismatch:
    """How a state dict differs from the one a module expects (see :func:`state_dict_mismatch`).

    Attributes:
        missing: expected keys the state dict lacks.
        unexpected: state dict keys the module has no place for.
        shapes: shared keys of the wrong shape, each ``"key [shape] (expected [shape])"``.
        dtypes: shared keys whose dtype does not fit (or that hold no tensor), each
            ``"key dtype (expected dtype)"``.
        first: the first key in ``shapes`` or ``dtypes`` (in the module's order), or None.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    first: str | None = None

    def describe(self, dtypes: bool = True) -> list[str]:
        """One phrase per kind of problem (at most five keys each); empty when they agree.

        Args:
            dtypes: include the dtype problems.
        """
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)} key(s): {', '.join(self.missing[:5])}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} key(s): {', '.join(self.unexpected[:5])}")
        if self.shapes:
            parts.append(f"wrong shape: {', '.join(self.shapes[:5])}")
        if dtypes and self.dtypes:
            parts.append(f"wrong dtype: {', '.join(self.dtypes[:5])}")
        return parts


def state_dict_mismatch(expected: Mapping[str, Tensor], state: Mapping[str, Any]) -> StateDictMismatch:
    """Compare the keys of ``state`` with ``expected`` (a module's state dict, e.g. built on the meta device),
    and the shapes and dtypes of the keys they share.

    Dtypes: a floating-point tensor of another floating-point dtype (float16, bfloat16, float64, ...) fits, as
    it is cast to the module's dtype on load; an integer, bool or complex tensor where the module holds floating
    point (or the reverse) does not, as its values would be reinterpreted.
    """
    out = StateDictMismatch(
        missing=[k for k in expected if k not in state], unexpected=[k for k in state if k not in expected]
    )
    for k, v in expected.items():
        if k not in state:
            continue
        t = state[k]
        if not isinstance(t, Tensor):
            out.dtypes.append(f"{k} is a {type(t).__name__}, not a tensor")
        elif tuple(t.shape) != tuple(v.shape):
            out.shapes.append(f"{k} {list(t.shape)} (expected {list(v.shape)})")
        elif not _dtype_fits(t.dtype, v.dtype):
            out.dtypes.append(
                f"{k} {str(t.dtype).removeprefix('torch.')} (expected {str(v.dtype).removeprefix('torch.')})"
            )
        else:
            continue
        out.first = out.first or k
    return out


def load_state_dict_checked(
    module: nn.Module, state: Mapping[str, Tensor], source: str | os.PathLike | None = None
) -> None:
    """``load_state_dict(strict=True)`` that reports missing, unexpected, mis-shaped and mis-typed keys as one
    error.

    Dtypes: a floating-point tensor of another floating-point dtype (float16, bfloat16, float64, ...) is
    accepted and cast to the module's dtype on load, deliberately (a half-precision export loads into the
    float32 model, rounding aside unchanged). An integer, bool or complex tensor where the module holds floating
    point (or the reverse) is refused: its values would be reinterpreted (int8 codes read as small floats, a
    bool mask as 0/1 weights) and the model would run silently on garbage, e.g. giving black images.

    Raises:
        CheckpointError: the keys, shapes or dtypes differ from the module's; it names ``source`` and, for a
            shape or dtype, the first offending tensor key as the field.
    """
    mismatch = state_dict_mismatch(module.state_dict(), state)
    problems = mismatch.describe()
    if problems:
        raise CheckpointError(
            "weights do not fit the model; " + "; ".join(problems), path=source, field=mismatch.first
        )
    module.load_state_dict(dict(state), strict=True)


__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "StateDictMismatch",
    "load_safetensors",
    "load_state_dict_checked",
    "read_folder_config",
    "read_model_json",
    "save_model_folder",
    "state_dict_mismatch",
]
