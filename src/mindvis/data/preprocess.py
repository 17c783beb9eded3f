"""Voxel preprocessing for masked brain modeling (MinD-Vis), re-exported from four modules.

The names imported from here live in:

- :mod:`mindvis.data.preprocessor`: :class:`FMRIPreprocessor` (normalisation, padding to whole patches and to
  a common length, the NaN policy, the original code's variants; its JSON) and :func:`load_preprocessor`;
- :mod:`mindvis.data.padding`: the padding rules (:func:`padded_length`, :func:`pad_columns`) and the choice
  of pad mode for a model (:func:`choose_pad_mode`, :func:`is_original_checkpoint`);
- :mod:`mindvis.data.streaming`: the row blocks and running statistics that fitting and transforming stream
  with;
- :mod:`mindvis.data.encoder_input`: a stage A run's preprocessing file (:data:`PREPROCESSING_NAME`,
  :func:`find_preprocessing`) and the preprocessing of a subject's splits to an encoder's input width
  (:func:`prepare_voxels`).
"""

from __future__ import annotations

from mindvis.data.encoder_input import PREPROCESSING_NAME, find_preprocessing, prepare_voxels
from mindvis.data.padding import (
    PAD_MODES,
    PadMode,
    choose_pad_mode,
    is_original_checkpoint,
    pad_columns,
    padded_length,
)
from mindvis.data.preprocessor import FORMAT_VERSION as FORMAT_VERSION
from mindvis.data.preprocessor import (
    NAN_POLICIES,
    NORMALIZE_MODES,
    TEST_NORMALIZE_MODES,
    FMRIPreprocessor,
    NanPolicy,
    NormalizeMode,
    NotFittedError,
    TestNormalize,
    load_preprocessor,
)
from mindvis.data.streaming import BLOCK_ROWS as BLOCK_ROWS

__all__ = [
    "FMRIPreprocessor",
    "NAN_POLICIES",
    "NORMALIZE_MODES",
    "NanPolicy",
    "NormalizeMode",
    "NotFittedError",
    "PAD_MODES",
    "PREPROCESSING_NAME",
    "PadMode",
    "TEST_NORMALIZE_MODES",
    "TestNormalize",
    "choose_pad_mode",
    "find_preprocessing",
    "is_original_checkpoint",
    "load_preprocessor",
    "pad_columns",
    "padded_length",
    "prepare_voxels",
]
