"""The fMRI that an encoder from stage A is given in the later stages.

A stage A run saves its fitted preprocessing as :data:`PREPROCESSING_NAME` next to its ``model/`` folder;
:func:`find_preprocessing` finds that file from the model folder, and :func:`prepare_voxels` preprocesses a
subject's training and test splits to the encoder's input width, with the run's preprocessing or with a new
one fitted on the training split.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mindvis.data.dataset import FMRIDataset
from mindvis.data.preprocessor import FMRIPreprocessor
from mindvis.errors import DataError

#: The file a training run saves its fitted preprocessing in, next to its ``model/`` folder.
PREPROCESSING_NAME = "preprocessing.json"


def find_preprocessing(mbm: Any) -> Path | None:
    """``preprocessing.json`` of a stage A run: in the folder given, or its parent (for ``run/model``)."""
    if not isinstance(mbm, str | os.PathLike):
        return None
    p = Path(mbm)
    for cand in (p / PREPROCESSING_NAME, p.parent / PREPROCESSING_NAME):
        if cand.is_file():
            return cand
    return None


def prepare_voxels(
    train: FMRIDataset,
    test: FMRIDataset,
    num_voxels: int,
    patch_size: int,
    preprocessor: Any = None,
) -> tuple[np.ndarray, np.ndarray, Any]:
    """Preprocess both splits to the encoder's input width.

    ``preprocessor`` (fitted, e.g. the stage A2 run's) is applied as it is; without one, a new one is fitted on
    the training split: one global mean and std (as the original), wrap padding to the patch size and to the
    encoder's ``num_voxels``.

    Returns:
        ``(train [N, V'], test [M, V'], preprocessor)``.

    Raises:
        DataError: the preprocessed width is not the encoder's.
    """
    if preprocessor is None:
        preprocessor = FMRIPreprocessor(
            normalize="global", patch_size=patch_size, pad_mode="wrap", length=num_voxels
        )
        preprocessor.fit(train.voxels, source=train.source)
    xs = []
    for ds in (train, test):
        x = np.asarray(preprocessor.transform(ds.voxels, source=ds.source, split=ds.split), dtype=np.float32)
        if x.shape[1] != num_voxels:
            raise DataError(
                f"the preprocessed fMRI has {x.shape[1]} voxels but the encoder takes {num_voxels} "
                f"(raw {ds.num_voxels})",
                path=ds.source,
                field="voxels",
            )
        xs.append(x)
    return xs[0], xs[1], preprocessor


__all__ = [
    "PREPROCESSING_NAME",
    "find_preprocessing",
    "prepare_voxels",
]
