"""The settings of the evaluation runs, apart from the code that runs them, so that the commands build their
options from them (:func:`~mindvis.config.setting`) without loading the metrics: scoring reconstructions
(:class:`EvaluateConfig`, ``mindvis evaluate``) and the linear probes' prior measurement (:class:`ProbeConfig`,
``mindvis probe``). The metric groups (:data:`METRIC_GROUPS`) are defined here and used by
:func:`mindvis.eval.suite.evaluate_reconstructions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mindvis.config import MAX_ROWS, MAX_SIZE, check_bool, check_int, check_int_tuple, setting
from mindvis.errors import ConfigError

#: The metric groups of :func:`mindvis.eval.suite.evaluate_reconstructions`, in the order they are computed.
METRIC_GROUPS = ("pixel", "identification", "semantic", "nsd", "lpips", "fid")
#: The range of every seed: numpy's (the same as ``mindvis evaluate --seed`` accepts).
MAX_SEED = 2**32 - 1


@dataclass
class EvaluateConfig:
    """How ``mindvis evaluate`` scores reconstructions (:func:`mindvis.eval.evaluate.evaluate_run`).

    Every field is an option of ``mindvis evaluate``, generated from it with its default and help text. The
    lists keep their command-line form (comma-separated text); :attr:`metric_groups` and :attr:`n_way_values`
    are the parsed values.
    """

    metrics: str = setting(
        "all", "Comma-separated groups: pixel, identification, semantic, nsd, lpips, fid (or 'all')."
    )
    n_way: str = setting("2,10,50", "n of the n-way metrics (infeasible n are reported as such).")
    top_k: int = setting(1, "k of the semantic n-way top-k accuracy.")
    trials: int = setting(1000, "Random trials per reconstruction for the n-way metrics.")
    seed: int = setting(0, "Seed of every random choice (trials, bootstrap).")
    bootstrap: int = setting(1000, "Bootstrap resamples for the 95% intervals (0: none).")
    fid_bootstrap: int = setting(200, "Bootstrap resamples for the FID intervals.")
    gray_to_rgb: bool = setting(
        False, "Allow grayscale against RGB (gray repeated).", flag="--gray-to-rgb/"
    )  # a trailing "/": the flag alone, without a --no- form

    def __post_init__(self) -> None:
        parse_metric_groups(self.metrics)
        parse_n_way(self.n_way)
        check_int("top_k", self.top_k, 1, MAX_SIZE)
        check_int("trials", self.trials, 1, MAX_ROWS)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("bootstrap", self.bootstrap, 0, MAX_ROWS)
        check_int("fid_bootstrap", self.fid_bootstrap, 0, MAX_ROWS)
        self.gray_to_rgb = check_bool("gray_to_rgb", self.gray_to_rgb)

    @property
    def metric_groups(self) -> list[str]:
        """The groups :attr:`metrics` names (all of :data:`METRIC_GROUPS` for ``"all"``)."""
        return parse_metric_groups(self.metrics)

    @property
    def n_way_values(self) -> tuple[int, ...]:
        """The integers :attr:`n_way` lists."""
        return parse_n_way(self.n_way)


def parse_metric_groups(text: str) -> list[str]:
    """The metric groups of a comma-separated list (``"all"``: every one of :data:`METRIC_GROUPS`).

    Raises:
        ConfigError: (field ``metrics``) a name that is not a group, or no name at all.
    """
    if not isinstance(text, str):
        raise ConfigError(f"expected comma-separated group names, got {text!r}", field="metrics")
    if text.strip() == "all":
        return list(METRIC_GROUPS)
    groups = [m.strip() for m in text.split(",") if m.strip()]
    bad = [g for g in groups if g not in METRIC_GROUPS]
    if bad:
        raise ConfigError(
            f"unknown metric group(s) {bad}; choose from {list(METRIC_GROUPS)} or 'all'", field="metrics"
        )
    if not groups:
        raise ConfigError(
            f"no metric group named; choose from {list(METRIC_GROUPS)} or 'all'", field="metrics"
        )
    return groups


def parse_n_way(text: str) -> tuple[int, ...]:
    """The n of the n-way metrics from a comma-separated list, each at least 2. The list may be empty: then
    only the 2-way identification against every other image, which needs no n, is scored.

    Raises:
        ConfigError: (field ``n_way``) an entry that is not an integer, or one below 2.
    """
    if not isinstance(text, str):
        raise ConfigError(f"expected comma-separated integers, got {text!r}", field="n_way")
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated integers, got {text!r}", field="n_way") from None
    return check_int_tuple("n_way", values, minimum=2, allow_empty=True, maximum=MAX_ROWS)


@dataclass
class ProbeConfig:
    """How ``mindvis probe`` measures a class-conditional prior's class signal (its ``--prior``;
    :func:`mindvis.eval.probe.probe`). Every field is an option of ``mindvis probe``."""

    prior_items: int = setting(200, "Training images (a seeded random subset) for --prior.")
    prior_draws: int = setting(16, "Noise draws per image and class for --prior.")

    def __post_init__(self) -> None:
        check_int("prior_items", self.prior_items, 2, MAX_ROWS)
        check_int("prior_draws", self.prior_draws, 1, MAX_SIZE)


__all__ = ["MAX_SEED", "METRIC_GROUPS", "EvaluateConfig", "ProbeConfig", "parse_metric_groups", "parse_n_way"]


@dataclass
class ClassifierOptions:
    """What ``mindvis train-classifier`` takes: a training preset of
    :data:`~mindvis.eval.classifier.CLASSIFIER_PRESETS` and the settings given over it (``None``: the preset's).
    :meth:`config` is the :class:`~mindvis.eval.classifier.ClassifierConfig` they make."""

    preset: str = setting(
        "small",
        "Training settings: small (the quick demo judge) or judge (the 20-class corpus judge: a deeper CNN, about "
        "30 minutes on one core). Options given explicitly override the preset.",
    )
    epochs: int | None = setting(None, "Training epochs (default: small 10, judge 20).")
    input_size: int | None = setting(None, "Network input size (images are resized to it) (default: 32).")
    holdout_fraction: float | None = setting(
        None,
        "Share of the corpus held out to measure accuracy (default: small 0.15, judge 0.1).",
        flag="--holdout",
    )
    blur: float | None = setting(
        None,
        "Share of training images whose resolution is dropped to between half and all of the input size and "
        "restored, so that smooth images (such as VQ decodes) are judged too (default: 0).",
    )
    seed: int = setting(0, "Seed of the split, initialisation and augmentation.")

    def config(self) -> Any:
        """The :class:`~mindvis.eval.classifier.ClassifierConfig` of the preset with the given settings.

        Raises:
            ConfigError: an unknown preset or a value the config refuses.
        """
        from mindvis.eval.classifier import classifier_config  # torch; a command's --help reads this module

        return classifier_config(
            self.preset,
            epochs=self.epochs,
            input_size=self.input_size,
            holdout_fraction=self.holdout_fraction,
            blur=self.blur,
            seed=self.seed,
        )
