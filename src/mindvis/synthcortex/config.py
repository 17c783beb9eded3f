"""The parameters of a SynthCortex run (:class:`SynthConfig`), its noise presets, and the constants that the
simulator's modules share: the ROIs of a subject and the seed streams."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from mindvis.config import setting
from mindvis.errors import ConfigError
from mindvis.synthcortex.sources import parse_source

#: ROIs of a target subject, in the order of the voxel vector; ``VC`` is their union.
ROIS: tuple[str, ...] = ("V1", "V2", "V3", "V4", "HVC")
RETINOTOPIC: tuple[str, ...] = ("V1", "V2", "V3", "V4")

# seed streams: default_rng([seed, STREAM, index])
_STIMULI, _TARGET, _TARGET_TRIALS, _REST, _UNMODELLED, _CALIBRATION = 1, 2, 3, 4, 5, 6


def _default_fractions() -> dict[str, float]:
    return {"V1": 0.22, "V2": 0.21, "V3": 0.17, "V4": 0.14, "HVC": 0.26}


#: The option of ``mindvis simulate`` that picks the noise preset, which :meth:`SynthConfig.preset` calls ``name``.
OPTION_FIELDS: dict[str, str] = {"preset": "name"}


@dataclass
class SynthConfig:
    """Every parameter of a SynthCortex run. Build with :meth:`preset`; validated at creation.

    Sizes (defaults mirror GOD and HCP):
        n_subjects: GOD-like target subjects ``sbj_1..``.
        n_rest_subjects: HCP-like resting-state subjects.
        n_train / n_test / n_repeats: training images (one trial each), test images, test repeats.
        trials_per_run: trials per scanner run (drifts are per run).
        n_trs / tr: resting-state length in TRs and the TR in seconds.
        resolution: stimulus side in pixels (``images_<resolution>.npz``).
        source: stimulus source (``fashion-mnist``, ``animal-mnist``, ``fashion+animal`` (20 classes),
            ``folder:PATH``).
        corpus_size: images in ``stimuli/corpus.npz`` (the labelled corpus for the image prior / classifier).
        field_deg: the stimulus spans ``field_deg`` x ``field_deg`` degrees of visual angle (GOD: 12).

    Anatomy:
        voxels: mean VC voxel count of a target subject (GOD: 4133-4643).
        voxel_jitter: between-subject SD of each ROI's voxel count, as a fraction.
        roi_fractions: share of VC voxels per ROI.
        rest_vertices: V1..V4 vertices of every resting-state subject (fixed, as on a template surface).
        map_jitter_deg: between-subject SD of the polar-angle map rotation, in degrees.

    Signal and noise (these differ between presets):
        snr_median: median single-trial voxel SNR (signal SD / noise SD) of a retinotopic ROI.
        snr_spread: SD of log SNR across voxels (heavy tail: many nearly uninformative voxels).
        subject_snr_jitter: between-subject SD of log SNR scale.
        hvc_snr_factor: HVC SNR relative to the retinotopic ROIs.
        unmodelled_fraction: share of the stimulus-driven variance that comes from features outside the
            encoding model (texture statistics pooled in the same pRF), the gap between a model's
            prediction and the noise ceiling.
        noise_spatial / noise_global: shares of trial-noise variance that are smooth along the cortical
            order / shared by all voxels; the rest is independent.
        noise_length: SD, in voxels, of the smoothing of the spatial noise along the cortical order.
        drift_offset / drift_slope: SD of per-run offsets and linear trends, relative to the trial noise SD.

    Resting state (shares of variance; independent noise gets the rest):
        rest_network_var, rest_phantom_var, rest_global_var: slow networks, retinotopic spontaneous
            patterns, global signal.
        rest_spatial_noise_var, rest_drift_var: measurement noise smooth along the cortical order; slow
            scanner drift.
        rest_ecc_bands: eccentricity bands of the latent networks (x dorsal/ventral: 2 * bands networks).
        rest_network_ar / rest_phantom_ar: AR(1) coefficient per TR of the network / phantom latents.
        rest_phantom_length_deg: spatial correlation length of the phantom images.

    Calibration (``--report``):
        calibration_images / calibration_repeats / calibration_voxels: Kay et al. 2008's identification set
            (120 novel images, 13 repeats, 500 voxels selected by prediction accuracy on training data).
    """

    name: str = "realistic"
    seed: int = setting(0, "Random seed; the same seed gives identical files.")
    n_subjects: int = setting(1, "GOD-like target subjects.", flag="--subjects")
    n_rest_subjects: int = setting(50, "HCP-like resting-state subjects.", flag="--rest-subjects")
    n_train: int = setting(1200, "Training images, one trial each.")
    n_test: int = setting(50, "Test images.")
    n_repeats: int = setting(35, "Repeats of each test image.", flag="--repeats")
    trials_per_run: int = 50
    n_trs: int = setting(1200, "Resting-state TRs per subject.", flag="--trs")
    tr: float = 0.72
    resolution: int = setting(64, "Stimulus size in pixels.")
    source: str = setting(
        "fashion-mnist",
        "Stimulus source: fashion-mnist (10 classes), animal-mnist (10), fashion+animal (both: 20 classes, corpus "
        "classes balanced by reusing Animal-MNIST objects) or folder:PATH.",
    )
    corpus_size: int = setting(
        5000, "Images in stimuli/corpus.npz, streamed to disk in chunks (any size fits in memory)."
    )
    field_deg: float = 12.0
    voxels: int = setting(4500, "Mean VC voxels of a target subject.")
    voxel_jitter: float = 0.05
    roi_fractions: dict[str, float] = field(default_factory=_default_fractions)
    rest_vertices: int = setting(3600, "V1-V4 vertices of each resting-state subject.")
    map_jitter_deg: float = 5.0
    snr_median: float = 0.1
    snr_spread: float = 0.8
    subject_snr_jitter: float = 0.15
    hvc_snr_factor: float = 1.2
    unmodelled_fraction: float = 0.6
    noise_spatial: float = 0.4
    noise_global: float = 0.1
    noise_length: float = 6.0
    drift_offset: float = 0.3
    drift_slope: float = 0.3
    rest_network_var: float = 0.3
    rest_phantom_var: float = 0.25
    rest_global_var: float = 0.05
    rest_spatial_noise_var: float = 0.1
    rest_drift_var: float = 0.05
    rest_ecc_bands: int = 3
    rest_network_ar: float = 0.95
    rest_phantom_ar: float = 0.85
    rest_phantom_length_deg: float = 2.0
    calibration_images: int = 120
    calibration_repeats: int = 13
    calibration_voxels: int = 500
    # derived (computed after overrides, in __post_init__)
    roi_voxels: dict[str, int] = field(init=False)
    rest_roi_vertices: dict[str, int] = field(init=False)

    @classmethod
    def preset(cls, name: str = "realistic", **overrides: Any) -> SynthConfig:
        """A preset (``easy``, ``realistic``, ``hard``) with ``overrides`` applied on top.

        Raises:
            ConfigError: unknown preset or unknown / invalid option.
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r} (choose {', '.join(PRESETS)})", field="preset")
        known = {f.name for f in fields(cls) if f.init}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ConfigError(f"unknown option(s) {', '.join(bad)}", field=bad[0])
        kwargs = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}, "name": name}
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SynthConfig:
        """Rebuild a config saved by :meth:`to_dict` (derived values are recomputed)."""
        known = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{msg}, got {getattr(self, name)!r}", field=name)

        for name in (
            "seed",
            "n_subjects",
            "n_rest_subjects",
            "n_train",
            "n_test",
            "n_repeats",
            "trials_per_run",
            "n_trs",
            "resolution",
            "corpus_size",
            "voxels",
            "rest_vertices",
            "rest_ecc_bands",
            "calibration_images",
            "calibration_repeats",
            "calibration_voxels",
        ):
            v = getattr(self, name)
            need(isinstance(v, (int, np.integer)) and not isinstance(v, bool), name, "must be an integer")
            setattr(self, name, int(v))
        need(self.seed >= 0, "seed", "must be >= 0")
        need(self.n_subjects >= 0, "n_subjects", "must be >= 0")
        need(self.n_rest_subjects >= 0, "n_rest_subjects", "must be >= 0")
        need(self.n_subjects + self.n_rest_subjects >= 1, "n_subjects", "need at least one subject")
        need(self.n_train >= 2, "n_train", "must be at least 2")
        need(self.n_test >= 2, "n_test", "must be at least 2")
        need(self.n_repeats >= 2, "n_repeats", "must be at least 2 (the noise ceiling needs repeats)")
        need(self.trials_per_run >= 1, "trials_per_run", "must be >= 1")
        need(self.n_trs >= 32, "n_trs", "must be at least 32 TRs")
        need(0.1 <= self.tr <= 10, "tr", "must be between 0.1 and 10 seconds")
        need(16 <= self.resolution <= 1024, "resolution", "must be between 16 and 1024 pixels")
        need(self.corpus_size >= 0, "corpus_size", "must be >= 0")
        need(1.0 <= self.field_deg <= 60.0, "field_deg", "must be between 1 and 60 degrees")
        parse_source(self.source)
        fr = self.roi_fractions
        need(
            isinstance(fr, dict) and set(fr) == set(ROIS) and all(float(v) > 0 for v in fr.values()),
            "roi_fractions",
            f"must give a positive share for each of {', '.join(ROIS)}",
        )
        total = sum(float(v) for v in fr.values())
        self.roi_fractions = {r: float(fr[r]) / total for r in ROIS}
        # every ROI needs two hemispheres of at least one 16-voxel patch each
        min_vc = math.ceil(32 / min(self.roi_fractions.values()))
        need(
            min_vc <= self.voxels <= 200_000,
            "voxels",
            f"impossible voxel count: must be between {min_vc} (32 per ROI) and 200000",
        )
        ret_total = sum(self.roi_fractions[r] for r in RETINOTOPIC)
        min_rest = math.ceil(32 / min(self.roi_fractions[r] / ret_total for r in RETINOTOPIC))
        need(
            min_rest <= self.rest_vertices <= 200_000,
            "rest_vertices",
            f"impossible vertex count: must be between {min_rest} (32 per ROI) and 200000",
        )
        need(0 <= self.voxel_jitter <= 0.3, "voxel_jitter", "must be between 0 and 0.3")
        need(0 <= self.map_jitter_deg <= 45, "map_jitter_deg", "must be between 0 and 45")
        need(0 < self.snr_median <= 100, "snr_median", "must be positive")
        need(0 <= self.snr_spread <= 3, "snr_spread", "must be between 0 and 3")
        need(0 <= self.subject_snr_jitter <= 1, "subject_snr_jitter", "must be between 0 and 1")
        need(0 < self.hvc_snr_factor <= 10, "hvc_snr_factor", "must be positive")
        need(0 <= self.unmodelled_fraction < 1, "unmodelled_fraction", "must be in [0, 1)")
        need(
            self.noise_spatial >= 0 and self.noise_global >= 0 and self.noise_spatial + self.noise_global < 1,
            "noise_spatial",
            "noise_spatial + noise_global must be below 1",
        )
        need(0.5 <= self.noise_length <= 1000, "noise_length", "must be between 0.5 and 1000 voxels")
        need(
            0 <= self.drift_offset <= 10 and 0 <= self.drift_slope <= 10, "drift_offset", "must be in [0, 10]"
        )
        shares = (
            self.rest_network_var,
            self.rest_phantom_var,
            self.rest_global_var,
            self.rest_spatial_noise_var,
            self.rest_drift_var,
        )
        need(
            all(s >= 0 for s in shares) and sum(shares) < 1,
            "rest_network_var",
            "resting-state variance shares must be >= 0 and sum below 1",
        )
        need(1 <= self.rest_ecc_bands <= 8, "rest_ecc_bands", "must be between 1 and 8")
        need(
            0 <= self.rest_network_ar < 1 and 0 <= self.rest_phantom_ar < 1,
            "rest_network_ar",
            "AR coefficients must be in [0, 1)",
        )
        need(0.1 <= self.rest_phantom_length_deg <= 50, "rest_phantom_length_deg", "must be in [0.1, 50]")
        need(self.calibration_images >= 2, "calibration_images", "must be at least 2")
        need(self.calibration_repeats >= 1, "calibration_repeats", "must be >= 1")
        need(self.calibration_voxels >= 2, "calibration_voxels", "must be at least 2")
        # derived values
        self.roi_voxels = {r: int(round(self.voxels * self.roi_fractions[r])) for r in ROIS}
        self.rest_roi_vertices = {
            r: int(round(self.rest_vertices * self.roi_fractions[r] / ret_total)) for r in RETINOTOPIC
        }


#: Presets: overrides of the defaults (``realistic`` is the default configuration).
PRESETS: dict[str, dict[str, Any]] = {
    "easy": {
        "snr_median": 0.3,
        "snr_spread": 0.6,
        "unmodelled_fraction": 0.3,
        "noise_spatial": 0.25,
        "noise_global": 0.05,
        "drift_offset": 0.15,
        "drift_slope": 0.15,
        "rest_network_var": 0.35,
        "rest_phantom_var": 0.35,
        "rest_spatial_noise_var": 0.05,
        "rest_drift_var": 0.02,
    },
    "realistic": {},
    "hard": {
        "snr_median": 0.06,
        "snr_spread": 0.9,
        "unmodelled_fraction": 0.7,
        "noise_spatial": 0.45,
        "noise_global": 0.15,
        "drift_offset": 0.5,
        "drift_slope": 0.5,
        "rest_network_var": 0.2,
        "rest_phantom_var": 0.15,
        "rest_spatial_noise_var": 0.15,
        "rest_drift_var": 0.1,
    },
}
