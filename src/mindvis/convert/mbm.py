"""Converter of the original MinD-Vis stage-A checkpoints (``checkpoint.pth``, ``fmri_encoder.pth``) into our
model folder format.

The original file is read by :func:`mindvis.models.mbm.load_original_mbm_checkpoint` (which also lets
:func:`~mindvis.models.mbm.load_mbm` and :meth:`~mindvis.models.mbm.FMRIEncoder.from_mbm` take the original
files directly; the file layout itself is :mod:`mindvis.models.mbm_original`'s); :func:`convert_mbm_checkpoint`
writes what it reads as a folder of ours (:mod:`mindvis.models.folder`), with a record of the source file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mindvis.models.folder import load_state_dict_checked
from mindvis.models.mbm import MaskedBrainModel, load_original_mbm_checkpoint
from mindvis.utils.io import atomic_dir, file_sha256, prepare_output_dir, write_json

_logger = logging.getLogger(__name__)


def convert_mbm_checkpoint(
    path: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Convert an original stage-A checkpoint into our folder format (weights only).

    Writes ``config.json``, ``model.safetensors`` and ``source.json`` (the source file's name, SHA-256,
    epoch and original config) into ``out_dir``, which appears complete or not at all. The optimizer and
    AMP scaler state of the original file are not carried over.

    Raises:
        CheckpointError: the source is refused or does not fit a stage-A model.
        OutputExistsError: ``out_dir`` exists, is not empty, and ``overwrite`` is False.
    """
    path = Path(path)
    out_dir = Path(out_dir)
    prepare_output_dir(out_dir, overwrite=overwrite)  # fail before the (possibly slow) load
    config, state, extra = load_original_mbm_checkpoint(path)
    model = MaskedBrainModel(config)
    load_state_dict_checked(model, state, source=path)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        write_json(
            tmp / "source.json",
            {
                "source_file": path.name,
                "source_sha256": file_sha256(path),
                "format": "MinD-Vis stage-A checkpoint",
                "epoch": extra["epoch"],
                "config_class": extra["config_class"],
                "original_config": extra["original_config"],
                "dropped_keys": extra["dropped_keys"],
            },
        )
    _logger.info("converted %s -> %s", path, out_dir)
    return out_dir


__all__ = ["convert_mbm_checkpoint"]
