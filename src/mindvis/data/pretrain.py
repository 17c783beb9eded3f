"""Training data of masked brain modeling (MinD-Vis stage A), re-exported from five modules.

Stage A1 pretrains on unlabeled fMRI of many subjects (HCP resting state plus the GOD subjects' training
fMRI); stage A2 tunes on the target subject's fMRI alone. Both read a voxel corpus, one memory-mapped
``[N, V]`` file of every subject's preprocessed samples. The names imported from here live in:

- :mod:`mindvis.data.pretrain_config`: the data settings, :class:`MBMDataConfig` (which subjects and which of
  their fMRI, the preprocessing, the validation split, the augmentation);
- :mod:`mindvis.data.corpus_plan`: the subjects a corpus will hold, from the file headers
  (:class:`SourcePlan`, :func:`plan_sources`, :func:`common_length`);
- :mod:`mindvis.data.corpus`: the corpus on disk (:class:`VoxelCorpus`, :class:`SubjectBlock`) and
  :func:`build_corpus`, which writes it one subject at a time;
- :mod:`mindvis.data.mask_noise`: the masking noise, a function of seed, epoch and sample index
  (:func:`masking_noise`);
- :mod:`mindvis.data.pretrain_loader`: the validation split and augmentation pairs (:func:`split_rows`,
  :func:`augmentation_pairs`), the dataset that serves rows from the corpus (:class:`MBMDataset`) and the
  training and validation loaders (:class:`MBMDataModule`).
"""

from __future__ import annotations

from mindvis.data.corpus import CORPUS_FORMAT_VERSION as CORPUS_FORMAT_VERSION
from mindvis.data.corpus import CORPUS_INDEX, CORPUS_VOXELS, SubjectBlock, VoxelCorpus, build_corpus
from mindvis.data.corpus_plan import SourcePlan, common_length, plan_sources
from mindvis.data.mask_noise import VALIDATION_NOISE_KEY, masking_noise
from mindvis.data.pretrain_config import DATA_PAD_MODES, GOD_FMRI_CHOICES, MBMDataConfig
from mindvis.data.pretrain_loader import MBMDataModule, MBMDataset, augmentation_pairs, split_rows

__all__ = [
    "CORPUS_INDEX",
    "CORPUS_VOXELS",
    "DATA_PAD_MODES",
    "GOD_FMRI_CHOICES",
    "VALIDATION_NOISE_KEY",
    "MBMDataConfig",
    "MBMDataModule",
    "MBMDataset",
    "SourcePlan",
    "SubjectBlock",
    "VoxelCorpus",
    "augmentation_pairs",
    "build_corpus",
    "common_length",
    "masking_noise",
    "plan_sources",
    "split_rows",
]
