"""Virtual subjects of SynthCortex: per-voxel anatomy, tuning and noise (:func:`sample_subject`), and their
noiseless responses and trial noise (:class:`VirtualSubject`).

* Population receptive fields (Dumoulin & Wandell 2008): a Gaussian pRF whose centre follows the retinotopic
  map (log-polar eccentricity, polar angle with mirror reversals at the V1/V2/V3 borders) and whose size
  grows with eccentricity and from V1 to V4.
* Compressive spatial summation (Kay, Winawer, Mezer & Wandell 2013): the response is the Gaussian-pooled
  Gabor energy drive raised to an exponent ``n < 1``, smaller up the hierarchy.
* Higher visual cortex (HVC) is category selective in spatial clusters, with large foveal receptive fields and
  weak global shape tuning.
* Trial noise has a heavy-tailed voxel SNR, a component that is spatially smooth along the cortical order, a
  global component, and slow per-run drifts.

Voxels are laid out on a cortical sheet per ROI and hemisphere and vectorised along a boustrophedon path, so
consecutive voxels (and 16-voxel patches) are cortical neighbours, as in real vectorised ROIs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mindvis.synthcortex.config import _REST, _TARGET, RETINOTOPIC, ROIS, SynthConfig
from mindvis.synthcortex.features import (
    MODEL_CHANNELS,
    N_ENERGY,
    N_ENERGY_LIKE,
    N_ORI,
    N_UNMODELLED,
    SF_CPD,
    rf_weights,
)
from mindvis.synthcortex.stimuli import SHAPE_SIDE

# ROI -> parameters: eccentricity range (deg), pRF size = s0 + s1 * ecc (deg), CSS exponent, preferred SF at
# the fovea (cycles/deg), colour weight, cortical sheet aspect (eccentricity : polar angle), SNR factor.
_ROI_KEYS = ("emax", "s0", "s1", "n", "sf0", "colour", "aspect", "snr")
# fmt: off
_ROI_PARAMS: dict[str, dict[str, float]] = {
    r: dict(zip(_ROI_KEYS, vals, strict=True)) for r, vals in {
        #       emax   s0    s1    n     sf0   colour aspect snr
        "V1":  (7.5,  0.15, 0.10, 0.50, 1.6,  0.25,  3.0,   1.0),
        "V2":  (7.5,  0.25, 0.15, 0.42, 1.2,  0.25,  3.0,   1.0),
        "V3":  (7.5,  0.35, 0.25, 0.36, 0.9,  0.30,  3.0,   0.95),
        "V4":  (6.5,  0.50, 0.35, 0.30, 0.6,  0.60,  2.0,   0.9),
        "HVC": (3.0,  2.00, 0.50, 0.30, 0.3,  0.20,  1.5,   1.0),
    }.items()
}
# fmt: on
# ROI -> sheets per hemisphere: (share, polar angle at w=0, polar angle at w=1), degrees from the horizontal
# meridian, upper field positive. V2/V3 are split into dorsal (lower field) and ventral (upper field)
# quarter-field maps with mirror reversals at the vertical (V1/V2) and horizontal (V2/V3) meridians.
_SHEETS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "V1": ((1.0, -90.0, 90.0),),
    "V2": ((0.5, -90.0, 0.0), (0.5, 90.0, 0.0)),
    "V3": ((0.5, 0.0, -90.0), (0.5, 0.0, 90.0)),
    "V4": ((1.0, -90.0, 90.0),),
    "HVC": ((1.0, -90.0, 90.0),),
}
_FOVEAL_A = 0.75  # deg, foveal constant of the log-polar eccentricity map


def _split_counts(total: int, shares: list[float]) -> list[int]:
    raw = np.asarray(shares, float) / sum(shares) * total
    out = np.floor(raw).astype(int)
    out[np.argsort(raw - out)[::-1][: total - out.sum()]] += 1
    return out.tolist()


def _sheet(n: int, aspect: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` voxels on a cortical sheet, in boustrophedon order: (u along eccentricity, w along angle)."""
    nw = max(2, int(round(math.sqrt(n / aspect))))
    nu = -(-n // nw)
    i = np.arange(n)
    row, col = i // nw, i % nw
    col = np.where(row % 2 == 1, nw - 1 - col, col)
    u = (row + 0.5 + rng.uniform(-0.3, 0.3, n)) / nu
    w = (col + 0.5 + rng.uniform(-0.3, 0.3, n)) / nw
    return np.clip(u, 0, 1), np.clip(w, 0, 1)


@dataclass
class VirtualSubject:
    """One simulated brain: per-voxel anatomy, tuning and noise (arrays ``[V]`` unless noted).

    Voxels are ordered ROI by ROI (``ROIS`` order), within an ROI hemisphere by hemisphere and sheet by
    sheet, and within a sheet along the boustrophedon path.

    Attributes:
        name: subject name (``sbj_1``, ``rest_001``).
        roi: int8 index into ``rois``; hemi: 0 left, 1 right (left hemisphere sees the right field).
        u, w: position on the cortical sheet (eccentricity axis, polar-angle axis), in [0, 1].
        x, y: pRF centre in degrees (x right, y up); sigma: pRF SD (deg); css_n: CSS exponent.
        sf_pref: preferred spatial frequency (cycles/deg); ori_pref: preferred orientation (rad).
        profile_idx, profile_w: ``[V, 2]`` the two Gabor-energy tuning profiles a voxel mixes and their
            weights; a profile (``profiles``: ``[P, 16]``) weights the energy channels by spatial frequency
            and orientation. Voxels interpolate between the two profiles around their preferred spatial
            frequency, so pooling costs two maps per voxel instead of 16.
        colour_w, contrast_w: ``[V]`` weights of the colour-opponent energy (red-green + blue-yellow) and
            of local luminance contrast inside the CSS drive.
        hue_pref, hue_w, lum_w: ``[V]`` a linear hue-tuned term (Brouwer & Heeger 2009): the pRF-pooled
            signed colour projected on the preferred hue angle (clustered along the cortex), plus a weak
            luminance weight, added with weight ``hue_w`` to the CSS response.
        unmod_idx: ``[V]`` the voxel's profile (``unmod_profiles``: ``[Q, 8]``) over the unmodelled channels.
        category_w: ``[V, K]`` category tuning (zero outside HVC); shape_w: ``[V, 49]`` shape tuning.
        hvc_mix: ``[V, 3]`` HVC weights of (pRF drive, category, shape).
        noise_sd: trial-noise SD; baseline: response offset; snr_nominal: drawn SNR; amp: signal gain.
        network: resting-state network of each voxel (index), ``[V, K]`` loadings in ``network_w``.
    """

    name: str
    rois: tuple[str, ...]
    roi: np.ndarray
    hemi: np.ndarray
    u: np.ndarray
    w: np.ndarray
    x: np.ndarray
    y: np.ndarray
    sigma: np.ndarray
    css_n: np.ndarray
    sf_pref: np.ndarray
    ori_pref: np.ndarray
    profile_idx: np.ndarray
    profile_w: np.ndarray
    profiles: np.ndarray
    colour_w: np.ndarray
    contrast_w: np.ndarray
    hue_pref: np.ndarray
    hue_w: np.ndarray
    lum_w: np.ndarray
    unmod_idx: np.ndarray
    unmod_profiles: np.ndarray
    category_w: np.ndarray
    shape_w: np.ndarray
    hvc_mix: np.ndarray
    noise_sd: np.ndarray
    baseline: np.ndarray
    snr_nominal: np.ndarray
    network_w: np.ndarray
    field_deg: float
    unmodelled_fraction: float
    noise_spatial: float
    noise_global: float
    noise_length: float
    drift_offset: float
    drift_slope: float
    global_load: np.ndarray
    # set by fit(): normalisation of the response components on the training stimuli
    norm: dict[str, np.ndarray] | None = None
    rf: np.ndarray | None = field(default=None, repr=False)
    _group_cache: Any = field(default=None, repr=False)

    @property
    def num_voxels(self) -> int:
        return int(self.roi.shape[0])

    @property
    def network(self) -> np.ndarray:
        return np.argmax(self.network_w, axis=1).astype(np.int64)

    def mask(self, roi: str) -> np.ndarray:
        """Boolean ``[V]`` mask of one ROI (``VC``: all)."""
        if roi == "VC":
            return np.ones(self.num_voxels, dtype=bool)
        return self.roi == self.rois.index(roi)

    @property
    def noise_total_sd(self) -> np.ndarray:
        """SD of all noise in one trial: trial noise plus the run offset and trend."""
        return self.noise_sd * math.sqrt(1 + self.drift_offset**2 + self.drift_slope**2 / 3)

    # ---- responses ---------------------------------------------------------------------------------
    def _rf(self) -> np.ndarray:
        if self.rf is None:
            self.rf = rf_weights(self.x, self.y, self.sigma, self.field_deg)
        return self.rf

    def _groups(self) -> tuple[list[tuple[int, np.ndarray, np.ndarray]], list[tuple[int, np.ndarray]]]:
        """Voxels (and their slot weights) of each energy profile in use; voxels of each unmodelled profile."""
        if self._group_cache is None:
            groups = []
            for p in np.unique(self.profile_idx):
                vv, slot = np.nonzero(self.profile_idx == p)
                groups.append((int(p), vv, self.profile_w[vv, slot].astype(np.float32)))
            ugroups = [(int(q), np.flatnonzero(self.unmod_idx == q)) for q in np.unique(self.unmod_idx)]
            self._group_cache = (groups, ugroups)
        return self._group_cache

    def _components(
        self, fm: np.ndarray, labels: np.ndarray | None, shape: np.ndarray | None, chunk: int = 256
    ) -> dict[str, np.ndarray]:
        """Raw response components ``[N, V]``: CSS pRF drive, unmodelled drive, category, shape.

        Drive of voxel v (Kay et al. 2013 CSS): ``(sum_x G_v(x) d_v(x)) ** n_v`` with G_v the pRF and
        ``d_v = sum_p a_vp E_p + colour_v (RG + BY) + contrast_v C``, E_p the profile-weighted Gabor energy.
        """
        n, v = fm.shape[0], self.num_voxels
        rf_t = np.ascontiguousarray(self._rf().T)  # [G*G, V]
        groups, ugroups = self._groups()
        rf_g = [np.ascontiguousarray(rf_t[:, vv]) for _, vv, _ in groups]
        rf_u = [np.ascontiguousarray(rf_t[:, vv]) for _, vv in ugroups]
        css = np.empty((n, v), np.float32)
        hue = np.empty((n, v), np.float32)
        unmod = np.empty((n, v), np.float32)
        for s in range(0, n, chunk):
            f = fm[s : s + chunk].reshape(min(chunk, n - s), fm.shape[1], -1)  # [b, C, X]
            b = f.shape[0]
            energy = np.tensordot(self.profiles, f[:, :N_ENERGY], axes=([1], [1]))  # [P, b, X]
            drive = ((f[:, N_ENERGY] + f[:, N_ENERGY + 1]) @ rf_t) * self.colour_w[None]  # opponent energy
            drive += (f[:, N_ENERGY + 2] @ rf_t) * self.contrast_w[None]
            for (p, vv, wgt), rg in zip(groups, rf_g, strict=True):
                drive[:, vv] += (energy[p] @ rg) * wgt[None]
            css[s : s + b] = np.maximum(drive, 0.0) ** self.css_n[None]
            rg, by, lum = (f[:, N_ENERGY_LIKE + i] @ rf_t for i in range(3))
            hue[s : s + b] = (
                rg * np.cos(self.hue_pref)[None] + by * np.sin(self.hue_pref)[None] + lum * self.lum_w[None]
            )
            umix = np.tensordot(self.unmod_profiles, f[:, MODEL_CHANNELS:], axes=([1], [1]))  # [Q, b, X]
            for (q, vv), rg in zip(ugroups, rf_u, strict=True):
                unmod[s : s + b, vv] = umix[q] @ rg
        cat = np.zeros((n, v), np.float32)
        if labels is not None:
            lab = np.asarray(labels, np.int64)
            ok = lab >= 0
            cat[ok] = self.category_w[:, lab[ok]].T
        shp = np.zeros((n, v), np.float32)
        if shape is not None:
            shp = (np.asarray(shape, np.float32) @ self.shape_w.T).astype(np.float32)
        return {"css": css, "hue": hue, "unmod": unmod, "cat": cat, "shape": shp}

    def _roi_scale(self, x: np.ndarray) -> np.ndarray:
        """Per-voxel scale ``[V]``: the median over the voxel's ROI of the SD across stimuli."""
        sd = x.std(axis=0)
        scale = np.ones(self.num_voxels, np.float32)
        for i in range(len(self.rois)):
            m = self.roi == i
            if m.any():
                scale[m] = max(float(np.median(sd[m])), 1e-8)
        return scale

    def fit(
        self, fm: np.ndarray, labels: np.ndarray | None, shape: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fix the response normalisation on the training stimuli (means per voxel, scales per ROI).

        Component scales are ROI-level, so a voxel whose pRF barely overlaps the stimulus keeps a weak
        signal (low SNR), as in real data.

        Returns:
            :meth:`responses` to the same stimuli (computed once).
        """
        comp = self._components(fm, labels, shape)
        norm: dict[str, np.ndarray] = {}
        for k, x in comp.items():
            norm[f"{k}_mean"] = x.mean(axis=0)
            norm[f"{k}_scale"] = self._roi_scale(x)
        self.norm = norm
        model = self._model_from(comp)
        norm["model_mean"] = model.mean(axis=0)
        norm["model_scale"] = self._roi_scale(model)
        return self._finish(comp)

    def _z(self, comp: dict[str, np.ndarray], k: str) -> np.ndarray:
        assert self.norm is not None
        return (comp[k] - self.norm[f"{k}_mean"]) / self.norm[f"{k}_scale"]

    def _model_from(self, comp: dict[str, np.ndarray]) -> np.ndarray:
        hvc = self.hvc_mix
        ret = self._z(comp, "css") + self.hue_w * self._z(comp, "hue")
        return ret * hvc[:, 0] + self._z(comp, "cat") * hvc[:, 1] + self._z(comp, "shape") * hvc[:, 2]

    @property
    def amp(self) -> np.ndarray:
        """Signal gain ``[V]``: a unit-scale response component becomes ``snr_nominal`` x noise SD."""
        return self.snr_nominal * self.noise_total_sd

    def responses(
        self, fm: np.ndarray, labels: np.ndarray | None = None, shape: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Noiseless responses to stimuli (after :meth:`fit`).

        Args:
            fm: ``[N, 30, 32, 32]`` feature maps (:func:`~mindvis.synthcortex.features.feature_maps`).
            labels: ``[N]`` class of each stimulus (-1 or None: no object, no category drive).
            shape: ``[N, 49]`` object shape descriptors (None: no object).

        Returns:
            (signal, model): ``[N, V]`` float32 each. ``signal`` is the full stimulus-driven response (the
            noiseless beta, without baseline); ``model`` is the part the encoding model predicts (the
            "true encoding model" prediction; the rest is the unmodelled component).
        """
        if self.norm is None:
            raise RuntimeError("VirtualSubject.fit() must be called before responses()")
        return self._finish(self._components(fm, labels, shape))

    def _finish(self, comp: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        assert self.norm is not None
        model = (self._model_from(comp) - self.norm["model_mean"]) / self.norm["model_scale"]
        unmod = self._z(comp, "unmod")
        a = self.amp[None]
        pred = (a * math.sqrt(1 - self.unmodelled_fraction) * model).astype(np.float32)
        sig = (pred + a * math.sqrt(self.unmodelled_fraction) * unmod).astype(np.float32)
        return sig, pred

    # ---- noise -------------------------------------------------------------------------------------
    def trial_noise(self, run: np.ndarray, position: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noise of single trials: ``[T]`` run id and position in run (-1..1) -> ``[T, V]`` float32.

        Independent + spatially smooth (along the voxel order) + global components, plus a per-run offset
        and linear trend that are smooth along the voxel order.
        """
        t, v = len(run), self.num_voxels
        f_sp, f_gl = self.noise_spatial, self.noise_global
        noise = rng.standard_normal((t, v), dtype=np.float32) * np.float32(math.sqrt(1 - f_sp - f_gl))
        if f_sp > 0:
            noise += smooth_along_voxels(
                rng.standard_normal((t, v), dtype=np.float32), self.noise_length
            ) * np.float32(math.sqrt(f_sp))
        if f_gl > 0:
            g = rng.standard_normal(t).astype(np.float32)
            noise += np.float32(math.sqrt(f_gl)) * g[:, None] * self.global_load[None]
        runs, inv = np.unique(np.asarray(run), return_inverse=True)
        off = smooth_along_voxels(
            rng.standard_normal((len(runs), v), dtype=np.float32), 4 * self.noise_length
        )
        slope = smooth_along_voxels(
            rng.standard_normal((len(runs), v), dtype=np.float32), 4 * self.noise_length
        )
        drift = (
            self.drift_offset * off[inv]
            + self.drift_slope * slope[inv] * np.asarray(position, np.float32)[:, None]
        )
        return ((noise + drift) * self.noise_sd[None]).astype(np.float32)

    def ground_truth(self, class_names: list[str] | None = None) -> dict[str, Any]:
        """Per-voxel parameters for the manifest (lists, rounded)."""
        gt: dict[str, Any] = {
            "roi": [self.rois[i] for i in self.roi.tolist()],
            "hemisphere": ["L" if h == 0 else "R" for h in self.hemi.tolist()],
            "cortex_u": _r(self.u, 3),
            "cortex_w": _r(self.w, 3),
            "x_deg": _r(self.x, 3),
            "y_deg": _r(self.y, 3),
            "sigma_deg": _r(self.sigma, 3),
            "css_exponent": _r(self.css_n, 3),
            "sf_pref_cpd": _r(self.sf_pref, 3),
            "ori_pref_deg": _r(np.degrees(self.ori_pref) % 180, 1),
            "hue_pref_deg": _r(np.degrees(self.hue_pref) % 360, 1),
            "noise_sd": _r(self.noise_total_sd, 4),
            "baseline": _r(self.baseline, 4),
            "snr_nominal": _r(self.snr_nominal, 4),
            "network": self.network.tolist(),
        }
        if "HVC" in self.rois:
            m = self.mask("HVC")
            cw = self.category_w[m]
            gt["hvc_category_pref"] = np.argmax(cw, axis=1).tolist()
            gt["hvc_category_selectivity"] = _r(cw.max(axis=1) - np.median(cw, axis=1), 3)
            if class_names is not None:
                gt["class_names"] = list(class_names)
        return gt


def _r(a: np.ndarray, d: int) -> list[float]:
    return np.round(np.asarray(a, np.float64), d).tolist()


def smooth_along_voxels(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing along the last (voxel) axis, rescaled to keep white noise at unit variance."""
    from scipy.ndimage import gaussian_filter1d

    impulse = np.zeros(int(8 * sigma) + 3, np.float64)
    impulse[len(impulse) // 2] = 1
    k = gaussian_filter1d(impulse, sigma, mode="constant")
    gain = 1.0 / math.sqrt(float((k**2).sum()))
    return (gaussian_filter1d(x, sigma, axis=-1, mode="reflect") * np.float32(gain)).astype(np.float32)


#: preferred spatial frequencies of the tuning profiles (cycles/deg), log-spaced
PROFILE_SF = np.geomspace(0.1, 2.0, 8)
N_UNMOD_PROFILES = 16


def _tuning_profiles() -> np.ndarray:
    """Gabor-energy weights of the tuning profiles: ``[len(PROFILE_SF) * N_ORI, N_ENERGY]``.

    Profile (sf bin, orientation bin): a Gaussian in log SF (1-octave SD) around the bin's SF times
    ``1 + 0.25 cos(2 (theta - theta_bin))`` (voxel orientation biases are weak), normalised to unit sum.
    """
    sfs = np.log2(np.asarray(SF_CPD))
    th = np.pi * np.arange(N_ORI) / N_ORI
    out = []
    for sf in PROFILE_SF:
        g_sf = np.exp(-((sfs - np.log2(sf)) ** 2) / 2.0)
        for o in range(N_ORI):
            e = np.outer(g_sf, 1 + 0.25 * np.cos(2 * (th - th[o]))).reshape(-1)
            out.append(e / e.sum())
    return np.asarray(out, np.float32)


def sample_subject(
    config: SynthConfig, index: int, kind: Literal["target", "rest"] = "target", n_classes: int = 10
) -> VirtualSubject:
    """Draw one virtual subject (deterministic in ``config.seed``, ``kind`` and ``index``).

    Target subjects (``sbj_<index>``) have V1..V4 + HVC with subject-specific voxel counts; resting-state
    subjects (``rest_<index>``) have V1..V4 with the fixed vertex counts of ``config.rest_roi_vertices``.
    """
    rng = np.random.default_rng([config.seed, _TARGET if kind == "target" else _REST, int(index)])
    if kind == "target":
        rois = ROIS
        counts = {
            r: max(32, int(round(config.roi_voxels[r] * (1 + config.voxel_jitter * rng.standard_normal()))))
            for r in ROIS
        }
        name = f"sbj_{index}"
    else:
        rois = RETINOTOPIC
        counts = dict(config.rest_roi_vertices)
        name = f"rest_{index:03d}"
    # subject-level map jitter
    rot = np.radians(config.map_jitter_deg) * rng.standard_normal(2)  # per hemisphere
    e_scale = float(np.exp(0.08 * rng.standard_normal()))
    a_fov = _FOVEAL_A * float(np.exp(0.1 * rng.standard_normal()))
    snr_scale = float(np.exp(config.subject_snr_jitter * rng.standard_normal()))

    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("roi", "hemi", "u", "w", "ecc", "ang", "sheet")}
    sheet_id = 0
    for ri, r in enumerate(rois):
        p = _ROI_PARAMS[r]
        halves = _split_counts(counts[r], [1, 1])
        for h in (0, 1):
            shares = [s[0] for s in _SHEETS[r]]
            for (_, a0, a1), m in zip(_SHEETS[r], _split_counts(halves[h], shares), strict=True):
                u, w = _sheet(m, p["aspect"], rng)
                emax = p["emax"] * e_scale
                if r == "HVC":
                    ecc = emax * u
                else:
                    ecc = a_fov * ((1 + emax / a_fov) ** u - 1)
                ang = np.radians(a0 + (a1 - a0) * w) + rot[h]
                cols["roi"].append(np.full(m, ri, np.int8))
                cols["hemi"].append(np.full(m, h, np.int8))
                cols["u"].append(u)
                cols["w"].append(w)
                cols["ecc"].append(ecc)
                cols["ang"].append(ang)
                cols["sheet"].append(np.full(m, sheet_id, np.int32))
                sheet_id += 1
    roi = np.concatenate(cols["roi"])
    hemi = np.concatenate(cols["hemi"])
    u, w = np.concatenate(cols["u"]), np.concatenate(cols["w"])
    ecc, ang = np.concatenate(cols["ecc"]), np.concatenate(cols["ang"])
    sheet = np.concatenate(cols["sheet"])
    v = len(roi)
    par = {k: np.array([_ROI_PARAMS[rois[i]][k] for i in range(len(rois))])[roi] for k in _ROI_PARAMS["V1"]}
    # left hemisphere (0) represents the right visual field
    side = np.where(hemi == 0, 1.0, -1.0)
    scatter = 0.1 + 0.05 * ecc
    x = side * ecc * np.cos(ang) + scatter * rng.standard_normal(v)
    y = ecc * np.sin(ang) + scatter * rng.standard_normal(v)
    ecc_true = np.hypot(x, y)
    sigma = np.maximum((par["s0"] + par["s1"] * ecc_true) * np.exp(0.15 * rng.standard_normal(v)), 0.08)
    css_n = np.clip(par["n"] + 0.04 * rng.standard_normal(v), 0.12, 1.0)
    # feature tuning: spatial frequency falls with eccentricity and up the hierarchy; weak radial bias
    # (orientation parallel to the radial direction, i.e. frequency vector perpendicular to it). A voxel
    # interpolates between the two tuning profiles around its preferred SF, at its nearest orientation bin.
    sf_pref = par["sf0"] / (1 + ecc_true / 2.0) * np.exp(0.2 * rng.standard_normal(v))
    sf_pref = np.clip(sf_pref, PROFILE_SF[0], PROFILE_SF[-1])
    ori_pref = (np.arctan2(y, x) + np.pi / 2 + np.radians(30) * rng.standard_normal(v)) % np.pi
    profiles = _tuning_profiles()
    t_sf = np.log(sf_pref / PROFILE_SF[0]) / np.log(PROFILE_SF[-1] / PROFILE_SF[0]) * (len(PROFILE_SF) - 1)
    i0 = np.clip(np.floor(t_sf).astype(np.int64), 0, len(PROFILE_SF) - 2)
    frac = np.clip(t_sf - i0, 0.0, 1.0)
    ori_bin = np.rint(ori_pref / (np.pi / N_ORI)).astype(np.int64) % N_ORI
    profile_idx = np.stack([ori_bin + i0 * N_ORI, ori_bin + (i0 + 1) * N_ORI], axis=1).astype(np.int32)
    profile_w = np.stack([1 - frac, frac], axis=1).astype(np.float32)
    unmod_profiles = (rng.standard_normal((N_UNMOD_PROFILES, N_UNMODELLED)) / math.sqrt(N_UNMODELLED)).astype(
        np.float32
    )
    unmod_idx = rng.integers(0, N_UNMOD_PROFILES, v).astype(np.int32)
    colour_w = (par["colour"] * np.exp(0.3 * rng.standard_normal(v))).astype(np.float32)
    # hue preference clustered along the cortical order: angle of a smoothed 2-D random field
    hv2 = smooth_along_voxels(rng.standard_normal((2, v)).astype(np.float32), 8.0)
    hue_pref = np.arctan2(hv2[1], hv2[0]).astype(np.float32)
    hue_w = (par["colour"] * np.exp(0.3 * rng.standard_normal(v))).astype(np.float32)
    lum_w = (0.3 + 0.3 * rng.standard_normal(v)).astype(np.float32)
    contrast_w = (0.3 * np.exp(0.3 * rng.standard_normal(v))).astype(np.float32)
    # HVC: spatially clustered sparse category tuning, shape tuning, weak pRF drive
    category_w = np.zeros((v, n_classes), np.float32)
    shape_w = np.zeros((v, SHAPE_SIDE**2), np.float32)
    hvc_mix = np.zeros((v, 3), np.float32)
    hvc_mix[:, 0] = 1.0
    if "HVC" in rois:
        hv = roi == rois.index("HVC")
        nh = int(hv.sum())
        # per sheet and class, two Gaussian blobs on the sheet; tuning = soft winner-take-all
        n_sheets = int(sheet.max()) + 1
        cu = rng.uniform(0, 1, (n_sheets, n_classes, 2))
        cw = rng.uniform(0, 1, (n_sheets, n_classes, 2))
        su, sw, ss = u[hv], w[hv], sheet[hv]
        d2 = (su[:, None, None] - cu[ss]) ** 2 + (sw[:, None, None] - cw[ss]) ** 2  # [nh, K, 2]
        field_k = np.exp(-d2 / (2 * 0.12**2)).sum(axis=2) + 0.05 * rng.standard_normal((nh, n_classes))
        tune = np.exp(6.0 * (field_k - field_k.max(axis=1, keepdims=True)))
        category_w[hv] = (tune / tune.sum(axis=1, keepdims=True)).astype(np.float32)
        shape_w[hv] = (rng.standard_normal((nh, SHAPE_SIDE**2)) / SHAPE_SIDE).astype(np.float32)
        mix = np.array([0.45, 1.0, 0.45]) * np.exp(0.3 * rng.standard_normal((nh, 3)))
        hvc_mix[hv] = (mix / np.sqrt((mix**2).sum(axis=1, keepdims=True))).astype(np.float32)
    # noise and SNR: heavy-tailed (log-normal) voxel SNR
    noise_sd = np.exp(0.2 * rng.standard_normal(v)).astype(np.float32)
    snr_roi = par["snr"] * np.where(
        roi == (rois.index("HVC") if "HVC" in rois else -1), config.hvc_snr_factor, 1.0
    )
    snr_nominal = snr_scale * snr_roi * config.snr_median * np.exp(config.snr_spread * rng.standard_normal(v))
    baseline = (0.5 * rng.standard_normal(v)).astype(np.float32)
    global_load = (1 + 0.3 * rng.standard_normal(v)).astype(np.float32)
    # resting-state networks: eccentricity bands x dorsal/ventral (lower/upper field), shared by all ROIs
    nb = config.rest_ecc_bands
    le = np.log1p(ecc_true / _FOVEAL_A) / np.log1p(7.5 / _FOVEAL_A)
    centres = (np.arange(nb) + 0.5) / nb
    band = np.exp(-((le[:, None] - centres[None]) ** 2) / (2 * (0.5 / nb) ** 2))
    upper = 1 / (1 + np.exp(-y / 0.5))
    network_w = np.concatenate([band * (1 - upper)[:, None], band * upper[:, None]], axis=1)
    network_w /= np.linalg.norm(network_w, axis=1, keepdims=True) + 1e-12
    arrays = {
        "u": u, "w": w, "x": x, "y": y, "sigma": sigma, "css_n": css_n, "sf_pref": sf_pref,
        "ori_pref": ori_pref, "profile_w": profile_w, "profiles": profiles, "colour_w": colour_w,
        "contrast_w": contrast_w, "hue_pref": hue_pref, "hue_w": hue_w, "lum_w": lum_w,
        "unmod_profiles": unmod_profiles, "category_w": category_w, "shape_w": shape_w, "hvc_mix": hvc_mix,
        "noise_sd": noise_sd, "baseline": baseline, "snr_nominal": snr_nominal, "network_w": network_w,
        "global_load": global_load,
    }  # fmt: skip
    noise = {k: getattr(config, k) for k in ("unmodelled_fraction", "noise_spatial", "noise_global",
                                             "noise_length", "drift_offset", "drift_slope")}  # fmt: skip
    return VirtualSubject(
        name=name, rois=rois, roi=roi, hemi=hemi, profile_idx=profile_idx, unmod_idx=unmod_idx,
        field_deg=config.field_deg, **{k: np.asarray(v, np.float32) for k, v in arrays.items()}, **noise,
    )  # fmt: skip
