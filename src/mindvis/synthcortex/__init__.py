"""SynthCortex: a simulated human visual cortex that writes GOD- and HCP-format fMRI.

The encoding model follows the voxel-wise models of human visual cortex:

* Kay, Naselaris, Prenger & Gallant 2008 (Nature 452): each early visual voxel pools the energy of a Gabor
  wavelet pyramid (orientations x spatial frequencies) over its receptive field; identification of novel
  images from their responses is the benchmark we calibrate against.
* Kay, Winawer, Mezer & Wandell 2013 (J Neurophysiol 110), compressive spatial summation (CSS): the
  response is the Gaussian-pooled drive raised to an exponent ``n < 1``, smaller up the hierarchy.
* Dumoulin & Wandell 2008 (NeuroImage 39), population receptive fields: a Gaussian pRF whose centre follows
  the retinotopic map (log-polar eccentricity, polar angle with mirror reversals at the V1/V2/V3 borders) and
  whose size grows with eccentricity and from V1 to V4.
* Higher visual cortex (HVC, the LOC/FFA/PPA union of GOD) is category selective in spatial clusters
  (sparse tuning over the 10 stimulus classes), with large foveal receptive fields and weak global shape
  tuning.
* Trial noise has a heavy-tailed voxel SNR, a component that is spatially smooth along the cortical order,
  a global component, and slow per-run drifts. The noise ceiling follows Allen et al. 2022 (NSD, ncsnr).
* Resting state: slow latent networks with AR(1) dynamics, retinotopically structured spontaneous activity
  ("phantom" images seen through the voxels' pRFs), canonical HRF smoothing, and measurement noise.

Voxels are laid out on a cortical sheet per ROI and hemisphere and vectorised along a boustrophedon path,
so consecutive voxels (and 16-voxel patches) are cortical neighbours, as in real vectorised ROIs.

Everything is seeded (``numpy.random.default_rng([seed, stream, index])``), vectorised over voxels, and
written in the real formats (see ``docs/synthcortex.md``): ``GOD/sbj_<k>.npz`` as MinD-Vis distributes GOD,
``HCP/npz/<subject>/HCP_visual_voxel.npz`` as its HCP files, plus ``stimuli/corpus.npz`` and the manifest
``synthcortex.json`` with every parameter and the ground truth.

The modules, in the order they build on each other:

* :mod:`~mindvis.synthcortex.sources`: the labelled objects (Fashion-MNIST, Animal-MNIST, an image folder) and
  the background photos;
* :mod:`~mindvis.synthcortex.config`: :class:`SynthConfig`, the presets, the ROIs and the seed streams;
* :mod:`~mindvis.synthcortex.stimuli`: compositing objects over backgrounds, and the image sets of a run;
* :mod:`~mindvis.synthcortex.features`: the encoding model's image features and pRF pooling weights;
* :mod:`~mindvis.synthcortex.subject`: virtual subjects, their responses and their trial noise;
* :mod:`~mindvis.synthcortex.sessions`: GOD-like sessions, the noise ceiling, resting state;
* :mod:`~mindvis.synthcortex.calibration`: the calibration figures against published real data;
* :mod:`~mindvis.synthcortex.writer`: the files;
* :mod:`~mindvis.synthcortex.run`: :func:`simulate` and :func:`calibration_report`.

Everything here imports numpy only; torch, scipy and scikit-image load when a function needs them.
"""

from mindvis.synthcortex.config import PRESETS, RETINOTOPIC, ROIS, SynthConfig
from mindvis.synthcortex.features import feature_maps
from mindvis.synthcortex.run import calibration_report, simulate
from mindvis.synthcortex.sessions import GodRun, noise_ceiling, rest_timeseries, run_god_subject
from mindvis.synthcortex.sources import ObjectBank, load_objects
from mindvis.synthcortex.stimuli import StimulusPlan, StimulusSet, compose, make_stimuli, make_stimulus_set
from mindvis.synthcortex.subject import VirtualSubject, sample_subject

__all__ = [
    "PRESETS",
    "RETINOTOPIC",
    "ROIS",
    "GodRun",
    "ObjectBank",
    "StimulusPlan",
    "StimulusSet",
    "SynthConfig",
    "VirtualSubject",
    "calibration_report",
    "compose",
    "feature_maps",
    "load_objects",
    "make_stimuli",
    "make_stimulus_set",
    "noise_ceiling",
    "rest_timeseries",
    "run_god_subject",
    "sample_subject",
    "simulate",
]
