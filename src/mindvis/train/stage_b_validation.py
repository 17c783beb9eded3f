"""The validation of stage B: which validations generate what (``StageBConfig.val_schedule``), the figures they log,
and the metric that picks the best checkpoint.

Schedules:

* ``original`` (default): as the original. A *quick pass* generates ``quick_samples`` (3) images for each of the
  first ``quick_items`` (5) test items and logs its figures as ``val/quick/<key>``. When its top-1 (see
  :func:`full_pass_trigger`) exceeds ``full_val_threshold`` (0.15), a *full pass* follows: ``num_samples`` (5)
  images for every validation item, logged as ``val/<key>``. Every ``full_val_every``-th (15th) validation is a
  full pass without the quick one. Not in the original: the first validation of each ``fit`` (a new or resumed
  run) and the last one of the run are full passes too, so that the best checkpoint always has a figure to
  compare and the final metrics are full ones (the original generates the whole test set after training).
* ``full`` (ours): every validation is a full pass, about 16 times the quick pass's compute at the defaults.

In both schedules ``val/<key>`` are only ever full-pass figures (the same items, samples and seeds each time),
and the best checkpoint (``monitor``, a ``val/`` figure; :func:`default_monitor`) is chosen among them, as the
original keeps its best checkpoint by the full passes only; ``val/loss`` (the denoising loss of every validation
item at fixed timesteps and noise) is logged at every validation. Every metric of
:func:`mindvis.eval.suite.evaluate_reconstructions` that is available is logged (:func:`score_validation`).

The passes themselves run in :class:`mindvis.train.ldm.StageBModule`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from mindvis.eval.suite import evaluate_reconstructions
from mindvis.train.config import QUICK_PREFIX, StageBConfig


def default_monitor(n_way: tuple[int, ...], classifier: Any, n_items: int) -> str:
    """The metric that picks the best checkpoint when ``monitor="auto"``."""
    if classifier is not None:
        n_classes = len(getattr(classifier, "class_names", []))
        feasible = [n for n in n_way if 2 <= n <= n_classes]
        if feasible:
            return f"val/semantic_{max(feasible)}way_top1"
    return "val/ident_pcc_2way"


def is_last_validation(epoch: int, every: int | None, max_epochs: int | None) -> bool:
    """Whether no validation follows the one of ``epoch`` (from 0) when validating every ``every`` epochs
    (``None``: 1) until ``max_epochs`` (``None`` or negative: no end)."""
    every = int(every or 1)
    return max_epochs is not None and max_epochs >= 0 and epoch + 1 + every > max_epochs


def scheduled_full_pass(config: StageBConfig, count: int, full_done: bool, last: bool) -> bool:
    """Whether validation number ``count`` (from 1) is a full pass without a quick one: on the ``full`` schedule
    always; on ``original`` every ``full_val_every``-th, the first of a fit (no full pass done in it yet:
    ``full_done`` false) and the last of the run (``last``)."""
    if config.val_schedule == "full":
        return True
    return count % config.full_val_every == 0 or not full_done or last


#: The n of the original's semantic top-1 that decides on a full validation pass (its 50-way accuracy).
_TRIGGER_REFERENCE_WAY = 50


def _chance_of(key: str) -> float:
    """Chance level of an n-way figure named ``..._<n>way...``."""
    m = re.search(r"_(\d+)way", key)
    return 1.0 / int(m.group(1)) if m else 0.0


def full_pass_trigger(
    quick: dict[str, float], n_way: tuple[int, ...], classifier: Any, threshold: float = 0.15
) -> tuple[str, float, bool] | None:
    """Whether the quick pass's figures ``quick`` (``val/quick/<key>``) call for a full pass (``original``
    schedule).

    The original runs the full pass when the quick pass's 50-way semantic top-1 (the best of its 3 sample slots)
    exceeds 0.15. The figure used here is the automatic monitor's (:func:`default_monitor`: the largest feasible
    n-way semantic top-1 with a classifier, else 2-way identification by pixel correlation, which stands in for
    it), its best sample slot as the original when there are several. Its chance level ``1/n`` differs from the
    original's 1/50, so the threshold is taken as the same distance above chance: the figure ``v`` triggers when
    ``(v - 1/n) / (1 - 1/n) > (threshold - 1/50) / (1 - 1/50)``, which for the 50-way top-1 is ``v > threshold``.

    Returns:
        ``(key, value, triggered)``, or ``None`` when the quick pass has no such figure (no ground truth or
        fewer than 2 items).
    """
    name = default_monitor(n_way, classifier, 0)[len("val/") :]
    for key in (f"{QUICK_PREFIX}{name}_best", f"{QUICK_PREFIX}{name}"):
        if key in quick and math.isfinite(quick[key]):
            value = float(quick[key])
            chance = _chance_of(name)
            ref = 1.0 / _TRIGGER_REFERENCE_WAY
            above = (value - chance) / (1.0 - chance) if chance < 1 else value
            return key, value, above > (threshold - ref) / (1.0 - ref)
    return None


def val_metric_names(results: dict[str, Any]) -> dict[str, float]:
    """``val/<key>`` -> value for every available metric's mean-over-samples aggregate (and best slot)."""
    out: dict[str, float] = {}
    for e in results.get("metrics", []):
        aggs = e["aggregates"]
        out[f"val/{e['key']}"] = float(aggs["mean"]["value"])
        if "best_slot" in aggs:
            out[f"val/{e['key']}_best"] = float(aggs["best_slot"]["value"])
    return out


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a logger's info messages (metrics unavailable at every validation are said once, at the end)."""
    lg = logging.getLogger(logger_name)
    level = lg.level
    lg.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        lg.setLevel(level)


def score_validation(
    recons: np.ndarray, gt: np.ndarray, classifier: Any, config: StageBConfig
) -> dict[str, Any]:
    """The pixel, identification and semantic metrics of validation images ``recons [M, S, H, W, 3]`` against
    ``gt [M, H, W, 3]`` (:func:`~mindvis.eval.suite.evaluate_reconstructions`, no bootstrap; n-way figures beyond
    the items or classes are reported unavailable), its warnings and info messages silenced."""
    with warnings.catch_warnings(), _quiet("mindvis.eval.suite"):
        warnings.simplefilter("ignore")
        return evaluate_reconstructions(
            recons,
            gt,
            classifier=classifier,
            metrics=["pixel", "identification", "semantic"],
            n_way=config.n_way,
            trials=config.eval_trials,
            seed=config.seed,
            bootstrap=0,
        )
