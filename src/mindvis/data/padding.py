"""Padding voxel vectors to whole patches and to a common length (MinD-Vis, Chen et al., CVPR 2023).

A masked brain model cuts each voxel vector into patches of ``p`` voxels, so the vector is padded to a
multiple of ``p``. :func:`padded_length` gives the padded voxel count of each ``pad_mode`` (ours, ``"wrap"``:
up to the next multiple of ``p``; ``"original"``, the original code's rule: always ``p - V % p`` more, a whole
extra patch when ``V % p == 0``), and :func:`pad_columns` pads or crops the voxel axis to a given length. A
model from an original checkpoint needs the original's rule: :func:`is_original_checkpoint` reads where a
model came from in its provenance metadata, and :func:`choose_pad_mode` picks the pad mode that gives a model
the voxel count it was trained with. :class:`~mindvis.data.preprocessor.FMRIPreprocessor` pads with these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from mindvis.errors import DataError

PadMode = Literal["wrap", "constant", "cut", "original"]
PAD_MODES: tuple[str, ...] = ("wrap", "constant", "cut", "original")


def padded_length(num_voxels: int, patch_size: int, pad_mode: PadMode = "wrap") -> int:
    """Voxel count after padding to a multiple of ``patch_size`` (``"cut"``: rounding down; ``"original"``:
    ``V + p - V % p``, the original's rule, a whole extra patch when ``V % p == 0``).

    Raises:
        DataError: ``num_voxels`` is smaller than one patch.
    """
    if num_voxels < patch_size:
        raise DataError(
            f"{num_voxels} voxels is fewer than one patch ({patch_size} voxels); the model needs at least one "
            "whole patch",
            field="voxels",
        )
    if pad_mode == "cut":
        return num_voxels - num_voxels % patch_size
    if pad_mode == "original":
        return num_voxels + patch_size - num_voxels % patch_size
    return -(-num_voxels // patch_size) * patch_size


def is_original_checkpoint(source: Mapping[str, Any] | None) -> bool:
    """Whether provenance metadata (a converted folder's ``source.json``, a pipeline's ``model_index.json``
    ``source``) says the weights came from an original MinD-Vis checkpoint."""
    return isinstance(source, Mapping) and str(source.get("format", "")).startswith("MinD-Vis")


def choose_pad_mode(num_voxels: int, patch_size: int, model_voxels: int | None, original: bool) -> PadMode:
    """The pad mode that feeds a model what it was trained on: ``"original"`` when the model comes from an
    original checkpoint (``original``) or when its voxel count ``model_voxels`` is the original rule's count
    for ``num_voxels`` and not ours (``V % p == 0``, one patch more); ``"wrap"`` otherwise."""
    if original:
        return "original"
    if (
        model_voxels is not None
        and num_voxels % patch_size == 0
        and model_voxels == padded_length(num_voxels, patch_size, "original")
    ):
        return "original"
    return "wrap"


def pad_columns(
    x: np.ndarray, length: int, mode: Literal["wrap", "constant"] = "wrap", value: float = 0.0
) -> np.ndarray:
    """Pad or crop the voxel axis of ``x: [N, V]`` to ``length`` columns.

    ``"wrap"`` repeats the vector from its first voxel (``np.pad`` wrap mode, also when more than ``V`` columns
    are needed); ``"constant"`` fills with ``value``. Cropping keeps the first ``length`` voxels.

    Returns:
        ``[N, length]`` in ``x.dtype`` (``x`` itself when ``V == length``).
    """
    n, v = x.shape
    if v == length:
        return x
    if v > length:
        return x[:, :length]
    if mode == "wrap":
        return np.pad(x, ((0, 0), (0, length - v)), mode="wrap")
    return np.pad(x, ((0, 0), (0, length - v)), mode="constant", constant_values=value)


__all__ = [
    "PAD_MODES",
    "PadMode",
    "choose_pad_mode",
    "is_original_checkpoint",
    "pad_columns",
    "padded_length",
]
