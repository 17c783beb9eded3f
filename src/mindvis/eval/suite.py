"""One call that evaluates reconstructions with every metric it can compute: :func:`evaluate_reconstructions`.

Metric groups (``metrics=``):

- ``pixel``: MSE, PCC and SSIM of each reconstruction with its ground truth, at the ground truth's resolution,
  and the MinD-Vis original's uint8-wrapped "MSE" (for comparison with published numbers only).
- ``identification``: 2-way identification against all other test images, and n-way by random trials, by
  pixel correlation, SSIM, MSE, the original's uint8-wrapped MSE (the original MinD-Vis "pairwise" PCC, SSIM
  and MSE are the 2-way ones by PCC, SSIM and the uint8-wrapped MSE) and by the classifier's penultimate
  features.
- ``semantic``: the MinD-Vis n-way top-k classification protocol (needs a classifier).
- ``nsd``: PixCorr and SSIM at 425 px; AlexNet(2)/(5), Inception, EffNet-B, SwAV with local weights.
- ``lpips``: LPIPS (AlexNet) distance and its 2-way identification, with local AlexNet weights.
- ``fid``: FID with 64-d features (the MinD-Vis variant) and 2048-d (standard), with local Inception weights;
  and, when a classifier is given, the Fréchet distance on its features (labelled as such, not FID).

Every scored metric gets its per-image values, aggregates (mean over samples; best sample slot, the paper's
"max"; best sample per image), a bootstrap 95% interval over test images for each aggregate, and a chance
level. A metric that cannot be computed (missing weights, too few classes or images) is listed under
``unavailable`` with the reason, and never given a number.

MSE keys: ``pixel_mse`` and ``ident_mse_<n>way`` are, as before, a true MSE of [0, 1] values (only their
labels changed: they were presented as the MinD-Vis "pairwise MSE", which they are not). The original's
figure, ``np.square(pred - gt).mean()`` on uint8 arrays (wrapping modulo 256), is the added
``pixel_mse_uint8_original`` and ``ident_mse_uint8_original_<n>way``; ``ident_mse_uint8_original_2way`` is
the number to set beside a published MinD-Vis "pairwise MSE" (see :mod:`mindvis.eval.metrics`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

from mindvis.errors import ConfigError, WeightsUnavailable
from mindvis.eval import metrics as M
from mindvis.eval.classifier import ImageClassifier
from mindvis.eval.config import METRIC_GROUPS
from mindvis.eval.fid import fid_summary, load_inception
from mindvis.eval.images import pair_images
from mindvis.eval.networks import LPIPSAlex, MetricWeights, nsd_network_scores
from mindvis.utils.images import resize_images
from mindvis.utils.steps import provenance

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "mindvis-eval/1"
ORIGINAL_EVAL_SIZE = (256, 256)  # the resolution at which the original MinD-Vis compared images


class _Collector:
    """Builds the metric entries: aggregates, bootstrap intervals, chance levels."""

    def __init__(self, seed: int, n_boot: int, n_items: int, n_samples: int):
        self.seed = seed
        self.n_boot = n_boot
        self.n_items = n_items
        self.n_samples = n_samples
        self.entries: list[dict[str, Any]] = []
        self.unavailable: list[dict[str, str]] = []

    def add(
        self,
        key: str,
        label: str,
        group: str,
        values: np.ndarray,
        *,
        definition: str,
        higher_is_better: bool = True,
        chance: float | None = None,
        chance_note: str = "",
        resolution: str = "",
        extra: dict | None = None,
    ) -> None:
        v = np.asarray(values, dtype=np.float64)
        v = v[:, None] if v.ndim == 1 else v
        hows = ("mean", "best_slot", "best_per_image") if v.shape[1] > 1 else ("mean",)
        aggs = {}
        for how in hows:
            ci = M.bootstrap_ci(
                v, how, higher_is_better, self.n_boot, M.metric_rng(self.seed, f"{key}/{how}")
            )
            aggs[how] = {
                "value": M.aggregate(v, how, higher_is_better),
                "ci95": None if ci is None else list(ci),
                "label": M.AGGREGATE_LABELS[how],
            }
        best = np.max if higher_is_better else np.min
        entry = {
            "key": key,
            "label": label,
            "group": group,
            "definition": definition,
            "higher_is_better": higher_is_better,
            "chance": chance,
            "chance_note": chance_note,
            "resolution": resolution,
            "n_images": int(v.shape[0]),
            "n_samples": int(v.shape[1]),
            "aggregates": aggs,
            "per_image": v.mean(axis=1).tolist(),
            "per_image_best": best(v, axis=1).tolist(),
            "per_slot": v.mean(axis=0).tolist(),
        }
        entry.update(extra or {})
        self.entries.append(entry)

    def missing(self, key: str, label: str, group: str, reason: str) -> None:
        logger.info("%s: unavailable (%s)", label, reason)
        self.unavailable.append({"key": key, "label": label, "group": group, "reason": reason})


def _off_diagonal_mean(mat: np.ndarray) -> float:
    n = mat.shape[0]
    mask = ~np.eye(n, dtype=bool)
    return float(mat.transpose(0, 2, 1)[mask].mean())


def _diag(mat: np.ndarray) -> np.ndarray:
    n = mat.shape[0]
    return mat[np.arange(n), :, np.arange(n)]


def _identification(
    col: _Collector,
    key: str,
    what: str,
    sim: np.ndarray,
    n_way: Sequence[int],
    trials: int,
    resolution: str,
    alias: str = "",
    higher_is_better_sim: bool = True,
) -> None:
    """2-way against all others, then n-way for each feasible n > 2."""
    s = sim if higher_is_better_sim else -sim
    n_items = s.shape[0]
    col.add(
        f"ident_{key}_2way",
        f"2-way identification, {what}",
        "identification",
        M.two_way_identification(s),
        definition=f"fraction of the other {n_items - 1} test images whose {what} with the reconstruction is "
        f"strictly worse than the true image's{alias}",
        chance=0.5,
        resolution=resolution,
    )
    for n in n_way:
        if n <= 2:
            continue
        if n > n_items:
            col.missing(
                f"ident_{key}_{n}way",
                f"{n}-way identification, {what}",
                "identification",
                f"needs at least {n} test images, only {n_items}",
            )
            continue
        rng = M.metric_rng(col.seed, f"ident_{key}_{n}way")
        col.add(
            f"ident_{key}_{n}way",
            f"{n}-way identification, {what}",
            "identification",
            M.n_way_identification(s, n, trials, rng),
            definition=f"per trial, the true image and {n - 1} random other test images; success when the "
            f"true image has strictly the best {what}; {trials} trials per reconstruction",
            chance=1.0 / n,
            resolution=resolution,
        )


def evaluate_reconstructions(
    recons: np.ndarray,
    gt: np.ndarray,
    *,
    classifier: ImageClassifier | None = None,
    metrics: Sequence[str] | None = None,
    n_way: Sequence[int] = (2, 10, 50),
    top_k: int = 1,
    trials: int = 1000,
    seed: int = 0,
    bootstrap: int = 1000,
    fid_bootstrap: int = 200,
    weights: MetricWeights | None = None,
    gt_labels: np.ndarray | None = None,
    ids: list[str] | None = None,
    gray_to_rgb: bool = False,
    title: str | None = None,
    source: str = "",
) -> dict[str, Any]:
    """Evaluate reconstructions against their ground truth with every requested metric that is available.

    Args:
        recons: ``[N, S, H, W, 3]`` uint8, ``S`` samples per test item (``[N, H, W, 3]`` means S = 1).
        gt: ``[N, H', W', 3]`` uint8, item ``i`` is the ground truth of ``recons[i]``. Reconstructions of
            another size are resized per metric (pixel metrics: to the ground truth's size).
        classifier: the judge for the semantic and feature-identification metrics (None: those are
            reported unavailable). See :mod:`mindvis.eval.classifier`.
        metrics: groups to compute, from ``METRIC_GROUPS`` (default: all).
        n_way: the n of the n-way metrics. Semantic n must not exceed the classifier's class count and
            identification n the number of test images; infeasible n are reported as unavailable.
        top_k: k of the semantic n-way top-k accuracy (1 in the paper).
        trials: random trials per reconstruction (1000 for reports, 50 during training validation).
        seed: seed of every random choice (trials, bootstrap); results are deterministic given it.
        bootstrap: bootstrap resamples of the test images for the 95% intervals (0: none).
        fid_bootstrap: bootstrap resamples for the FID intervals (each one recomputes the FIDs).
        weights: local network weights (:class:`~mindvis.eval.networks.MetricWeights`); None: none.
        gt_labels: ``[N]`` true classes of the ground truth, to report the classifier's accuracy on them.
        ids: item names, kept in the results.

    Returns:
        A JSON-able dict (format ``"mindvis-eval/1"``): ``settings``, ``data``, ``classifier``,
        ``metrics`` (list of entries with ``aggregates``, ``per_image``, ``chance``, ``definition``),
        ``unavailable`` (key, label, reason), ``notes``, ``timings``, ``versions``.
    """
    t_start = time.perf_counter()
    recons = np.asarray(recons)
    if recons.ndim == 4 and recons.shape[-1] in (1, 3) and np.asarray(gt).ndim == 4:
        recons = recons[:, None]
    images = pair_images(
        recons, gt, recon_ids=ids, gt_ids=None, gray_to_rgb=gray_to_rgb, where=source or "inputs"
    )
    recons, gt = images.recons, images.gt
    n, s = recons.shape[:2]
    if n < 2:
        raise ConfigError("evaluation needs at least 2 test images", field="n_items")
    groups = list(metrics) if metrics is not None else list(METRIC_GROUPS)
    bad = [g for g in groups if g not in METRIC_GROUPS]
    if bad:
        raise ConfigError(
            f"unknown metric group(s) {bad}; choose from {list(METRIC_GROUPS)}", field="metrics"
        )
    if trials < 1:
        raise ConfigError(f"trials must be >= 1, got {trials}", field="trials")
    weights = weights or MetricWeights()
    col = _Collector(seed, bootstrap, n, s)
    notes: list[str] = []
    timings: dict[str, float] = {}
    gt_res = f"{gt.shape[1]}x{gt.shape[2]} (ground truth size)"
    recons_gt = resize_images(recons, gt.shape[1:3])
    if recons.shape[2:4] != gt.shape[1:3]:
        notes.append(
            f"reconstructions are {recons.shape[2]}x{recons.shape[3]}, ground truth "
            f"{gt.shape[1]}x{gt.shape[2]}: pixel metrics resize reconstructions to the ground truth size"
        )

    # ---------------------------------------------------------------- pixel + pixel identification
    if "pixel" in groups or "identification" in groups:
        t0 = time.perf_counter()
        mats = {
            "pcc": M.pcc_matrix(recons_gt, gt),
            "ssim": M.ssim_matrix(recons_gt, gt),
            "mse": M.mse_matrix(recons_gt, gt),
            "mse_uint8_original": M.mse_uint8_original_matrix(recons_gt, gt),
        }
        timings["pixel_matrices"] = time.perf_counter() - t0
        if tuple(gt.shape[1:3]) != ORIGINAL_EVAL_SIZE:
            notes.append(
                f"the MinD-Vis original's uint8-wrapped MSE is computed here at {gt.shape[1]}x{gt.shape[2]}; "
                "published MinD-Vis figures compare 256x256 images, so it matches them only at 256x256"
            )
        # key -> (label, definition, higher is better, what identification ranks by, alias for identification)
        defs = {
            "mse": (
                "MSE ([0, 1] floats)",
                "true mean squared error of [0, 1] RGB values; not the MinD-Vis published 'MSE', which wraps "
                "modulo 256 (see the uint8 MSE row)",
                False,
                "pixel MSE ([0, 1] floats)",
                "; a true MSE, not the MinD-Vis published 'pairwise MSE' (that is the uint8-wrapped MSE's)",
            ),
            "mse_uint8_original": (
                "MSE uint8, wraps mod 256 (MinD-Vis original; only for comparison with published numbers)",
                "the original MinD-Vis mse_metric: np.square(pred - gt).mean() on uint8 arrays, so the "
                "difference and its square both wrap modulo 256 (each pixel scores 0..255; 0 vs 255 scores "
                "1). Not a squared error: kept only to compare with published numbers; use 'MSE ([0, 1] "
                "floats)' otherwise",
                False,
                "uint8 MSE wrapping mod 256 (MinD-Vis original; only for comparison with published numbers)",
                " (= the MinD-Vis 'pairwise MSE' as published; the MSE wraps modulo 256)",
            ),
            "pcc": (
                "PCC",
                "Pearson correlation of the flattened RGB images",
                True,
                "pixel PCC",
                " (= the MinD-Vis 'pairwise PCC')",
            ),
            "ssim": (
                "SSIM",
                "SSIM, 7x7 uniform window, per-channel mean, data range 255 (scikit-image default)",
                True,
                "SSIM",
                " (= the MinD-Vis 'pairwise SSIM')",
            ),
        }
        if "pixel" in groups:
            for key, (label, definition, hib, _what, _alias) in defs.items():
                col.add(
                    f"pixel_{key}",
                    label,
                    "pixel",
                    _diag(mats[key]),
                    definition=definition,
                    higher_is_better=hib,
                    chance=_off_diagonal_mean(mats[key]),
                    chance_note="mean over mismatched pairs (reconstruction vs another test image)",
                    resolution=gt_res,
                )
        if "identification" in groups:
            for key, (_label, _d, hib, what, alias) in defs.items():
                _identification(
                    col,
                    key,
                    what,
                    mats[key],
                    n_way,
                    trials,
                    gt_res,
                    alias=alias,
                    higher_is_better_sim=hib,
                )
        timings["pixel"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- classifier-based metrics
    clf_info = None
    if classifier is not None and ({"semantic", "identification", "fid"} & set(groups)):
        t0 = time.perf_counter()
        clf_info = classifier.describe()
        out_gt = classifier.predict(gt)
        out_rec = classifier.predict(recons.reshape((n * s,) + recons.shape[2:]))
        probs = out_rec.probs.reshape(n, s, -1)
        feats = out_rec.features.reshape(n, s, -1)
        target = out_gt.probs.argmax(axis=1)
        n_classes = probs.shape[2]
        clf_info["target_classes"] = target.tolist()
        if gt_labels is not None:
            gl = np.asarray(gt_labels).reshape(-1)
            if gl.shape != (n,):
                raise ConfigError(f"gt_labels must be [N={n}], got {gl.shape}", field="gt_labels")
            clf_info["accuracy_on_ground_truth"] = float((target == gl).mean())
        if "semantic" in groups:
            feasible = [k for k in n_way if 2 <= k <= n_classes]
            for k in n_way:
                if k > n_classes:
                    msg = (
                        f"{k}-way needs at least {k} classes but the classifier has {n_classes}; "
                        f"reported n = {', '.join(map(str, feasible)) or 'none'}"
                    )
                    notes.append(msg)
                    col.missing(
                        f"semantic_{k}way_top{top_k}",
                        f"{k}-way top-{top_k} semantic accuracy",
                        "semantic",
                        msg,
                    )
            for k in feasible:
                if top_k > k:
                    continue
                key = f"semantic_{k}way_top{top_k}"
                vals = M.n_way_top_k(probs, target, k, top_k, trials, M.metric_rng(seed, key))
                exact = M.n_way_top_k_expected(probs, target, k, top_k)
                col.add(
                    key,
                    f"{k}-way top-{top_k} semantic accuracy",
                    "semantic",
                    vals,
                    definition=f"MinD-Vis protocol: target = {classifier.name} argmax on the ground truth; per "
                    f"trial the reconstruction's probability of the target and of {k - 1} random other "
                    f"classes; success if the target ranks in the top {top_k}; {trials} trials per "
                    "reconstruction, averaged per image, then over images. Measures agreement with the "
                    "classifier, not identification of the image.",
                    chance=top_k / k,
                    resolution=f"classifier input ({classifier.name})",
                    extra={"exact_expectation_mean": float(exact.mean())},
                )
        if "identification" in groups:
            sim = M.feature_corr_matrix(feats, out_gt.features)
            _identification(
                col,
                "clf_features",
                f"{classifier.name} penultimate-feature correlation",
                sim,
                n_way,
                trials,
                f"classifier input ({classifier.name})",
            )
        timings["classifier"] = time.perf_counter() - t0
    else:
        for g in ("semantic",):
            if g in groups:
                col.missing(
                    "semantic",
                    "n-way top-k semantic accuracy",
                    g,
                    "no classifier: pass a benchmark classifier folder or local classifier weights",
                )
        if "identification" in groups:
            col.missing(
                "ident_clf_features",
                "identification by classifier features",
                "identification",
                "no classifier",
            )

    # ---------------------------------------------------------------- NSD-style
    if "nsd" in groups:
        t0 = time.perf_counter()
        shift = np.roll(np.arange(n), -1)
        col.add(
            "nsd_pixcorr",
            "PixCorr (NSD)",
            "nsd",
            M.nsd_pixcorr(recons, gt),
            definition="Pearson r of the flattened RGB images, both resized to 425x425 (NSD convention)",
            chance=float(M.nsd_pixcorr(recons, gt[shift]).mean()),
            chance_note="value for mismatched pairs (reconstruction i vs test image i+1)",
            resolution="425x425",
        )
        col.add(
            "nsd_ssim",
            "SSIM (NSD)",
            "nsd",
            M.nsd_ssim(recons, gt),
            definition="SSIM of grayscale images at 425x425, Gaussian window sigma 1.5, data range 1, no "
            "sample-covariance correction (NSD convention)",
            chance=float(M.nsd_ssim(recons, gt[shift]).mean()),
            chance_note="value for mismatched pairs (reconstruction i vs test image i+1)",
            resolution="425x425",
        )

        for key, res in nsd_network_scores(recons, gt, weights).items():
            spec = res["spec"]
            if res["values"] is None:
                col.missing(key, spec.label, "nsd", res["reason"])
            elif spec.score == "two_way":
                col.add(
                    key,
                    f"{spec.label} 2-way identification",
                    "nsd",
                    res["values"],
                    definition=f"2-way identification by the correlation of {spec.arch} '{spec.layer}' "
                    f"features at {spec.resize}px (NSD convention)",
                    chance=0.5,
                    resolution=f"{spec.resize}x{spec.resize}",
                )
            else:
                col.add(
                    key,
                    f"{spec.label} distance",
                    "nsd",
                    res["values"],
                    higher_is_better=False,
                    definition=f"correlation distance (1 - r) between {spec.arch} '{spec.layer}' features "
                    f"of each reconstruction and its image at {spec.resize}px (NSD convention)",
                    resolution=f"{spec.resize}x{spec.resize}",
                )
        timings["nsd"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- LPIPS
    if "lpips" in groups:
        t0 = time.perf_counter()
        if weights.alexnet is None or not weights.alexnet.is_file():
            col.missing(
                "lpips",
                "LPIPS (AlexNet)",
                "lpips",
                "no weights: LPIPS needs local AlexNet weights (--alexnet-weights)",
            )
        else:
            try:
                mat = LPIPSAlex(weights.alexnet).matrix(recons_gt, gt)
            except WeightsUnavailable as exc:
                col.missing("lpips", "LPIPS (AlexNet)", "lpips", str(exc))
            else:
                col.add(
                    "lpips",
                    "LPIPS (AlexNet)",
                    "lpips",
                    _diag(mat),
                    higher_is_better=False,
                    definition="LPIPS v0.1 distance, AlexNet backbone, inputs in [-1, 1]",
                    chance=_off_diagonal_mean(mat),
                    chance_note="mean over mismatched pairs",
                    resolution=gt_res,
                )
                _identification(
                    col,
                    "lpips",
                    "LPIPS",
                    mat,
                    (2,),
                    trials,
                    gt_res,
                    alias=" (= the MinD-Vis 'pairwise LPIPS')",
                    higher_is_better_sim=False,
                )
        timings["lpips"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- FID
    fid_results: dict[str, Any] = {}
    if "fid" in groups:
        t0 = time.perf_counter()

        try:
            inc = load_inception(weights.inception_fid)
        except WeightsUnavailable as exc:
            for key, label in (
                ("fid_64", "FID-64 (MinD-Vis variant)"),
                ("fid_2048", "FID (standard, 2048-d)"),
            ):
                col.missing(key, label, "fid", exc.detail)
        else:
            fg = inc.extract(gt)
            fr = inc.extract(recons.reshape((n * s,) + recons.shape[2:]))
            for dim, key, label, definition in (
                (
                    "64",
                    "fid_64",
                    "FID-64 (MinD-Vis variant)",
                    "Frechet distance of 64-d Inception features (first max-pool, spatially averaged), as "
                    "torchmetrics FrechetInceptionDistance(feature=64) used by MinD-Vis; NOT the standard FID",
                ),
                (
                    "2048",
                    "fid_2048",
                    "FID (standard, 2048-d)",
                    "Frechet distance of 2048-d Inception pool features",
                ),
            ):
                summ = fid_summary(fr[dim].reshape(n, s, -1), fg[dim], fid_bootstrap, M.metric_rng(seed, key))
                fid_results[key] = {
                    "key": key,
                    "label": label,
                    "definition": definition + f"; {inc.label}",
                    "weights": str(inc.weights_path),
                    "variant": inc.variant,
                    **summ,
                    "n_images": n,
                    "bootstrap": fid_bootstrap,
                }
        if classifier is not None:
            summ = fid_summary(feats, out_gt.features, bootstrap, M.metric_rng(seed, "fcd"))
            fid_results["fcd_classifier"] = {
                "key": "fcd_classifier",
                "label": f"Frechet distance on {classifier.name} features (not FID)",
                "definition": "Frechet distance between Gaussians fitted to the classifier's penultimate features "
                "of reconstructions and ground truth; a benchmark-internal analogue of FID, not comparable with it",
                **summ,
                "n_images": n,
                "bootstrap": bootstrap,
            }
        timings["fid"] = time.perf_counter() - t0

    timings["total"] = time.perf_counter() - t_start
    results = {
        "format": RESULTS_FORMAT,
        "title": title or "mindvis evaluation",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **provenance(),
        "settings": {
            "metrics": groups,
            "n_way": list(n_way),
            "top_k": top_k,
            "trials": trials,
            "seed": seed,
            "bootstrap": bootstrap,
            "fid_bootstrap": fid_bootstrap,
            "ci_level": 0.95,
            "weights": weights.as_dict(),
        },
        "data": {
            "n_items": n,
            "n_samples": s,
            "recon_size": list(recons.shape[2:4]),
            "gt_size": list(gt.shape[1:3]),
            "source": source,
            "ids": ids,
        },
        "classifier": clf_info,
        "metrics": col.entries,
        "fid": fid_results,
        "unavailable": col.unavailable,
        "notes": notes,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    return results


def metric_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten results into table rows: one per (metric, aggregate) plus FID rows and unavailable ones.

    Each row: ``key, label, group, aggregate, value, ci95, chance, higher_is_better, status, reason``.
    """
    rows = []
    for e in results.get("metrics", []):
        for how, agg in e["aggregates"].items():
            rows.append(
                {
                    "key": f"{e['key']}@{how}",
                    "label": e["label"],
                    "group": e["group"],
                    "aggregate": how,
                    "value": agg["value"],
                    "ci95": agg["ci95"],
                    "chance": e.get("chance"),
                    "higher_is_better": e["higher_is_better"],
                    "status": "ok",
                    "reason": "",
                }
            )
    for key, f in (results.get("fid") or {}).items():
        for how in ("mean", "best_slot", "pooled"):
            rows.append(
                {
                    "key": f"{key}@{how}",
                    "label": f["label"],
                    "group": "fid",
                    "aggregate": {"best_slot": "best_slot_min"}.get(how, how),
                    "value": f[how],
                    "ci95": f["ci95"].get(how),
                    "chance": None,
                    "higher_is_better": False,
                    "status": "ok",
                    "reason": "",
                }
            )
    for u in results.get("unavailable", []):
        rows.append(
            {
                "key": u["key"],
                "label": u["label"],
                "group": u["group"],
                "aggregate": "",
                "value": None,
                "ci95": None,
                "chance": None,
                "higher_is_better": True,
                "status": "unavailable",
                "reason": u["reason"],
            }
        )
    return rows
