"""Scoring reconstructions into a report folder, as ``mindvis evaluate`` does: :func:`evaluate_run`.

One run: the reconstructions (a ``mindvis reconstruct`` folder, an npz or an image folder, with the ground truth
beside them or given apart) are scored by :func:`~mindvis.eval.suite.evaluate_reconstructions` and written by
:func:`~mindvis.eval.report.write_report` (``metrics.json``, ``report.html``, PNG figures). A comparison: each
input is an evaluation folder (its ``metrics.json`` is read) or a reconstruction folder (scored first), and the
runs are put side by side. The folder is built beside ``out`` and moved into place when complete.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mindvis.errors import ConfigError
from mindvis.eval.classifier import ImageClassifier, load_classifier
from mindvis.eval.config import EvaluateConfig
from mindvis.eval.images import EvalImages, load_eval_images
from mindvis.eval.networks import MetricWeights
from mindvis.eval.report import load_results, write_report
from mindvis.eval.suite import evaluate_reconstructions
from mindvis.utils.io import atomic_dir, check_output_apart, prepare_output_dir

#: Default title of a comparison's report.
COMPARE_TITLE = "mindvis comparison"


@dataclass
class EvaluateRun:
    """What :func:`evaluate_run` scored and wrote.

    Attributes:
        runs: the results dicts (:func:`~mindvis.eval.suite.evaluate_reconstructions`), one per run: one
            without ``compare``, each with its ``label`` in a comparison.
        labels: the names of the compared runs; ``None`` for one run.
        out: the report folder.
        files: what :func:`~mindvis.eval.report.write_report` wrote, by kind (``json``, ``html``, ``grid``...),
            as paths under ``out``.
    """

    runs: list[dict[str, Any]]
    labels: list[str] | None
    out: Path
    files: dict[str, Path]

    @property
    def report(self) -> Path:
        """The HTML report."""
        return self.out / "report.html"


def classifier_path(spec: str | os.PathLike | None) -> Path | None:
    """The folder or file a ``--classifier`` spec reads (a path, or ``benchmark:PATH``), or ``None`` for a
    network named by ``torchvision:``/``timm:`` or a path that does not exist."""
    if spec is None:
        return None
    text = os.fspath(spec)
    if text and Path(text).exists():
        return Path(text)
    kind, _, rest = text.partition(":")
    if kind == "benchmark" and rest and Path(rest).exists():
        return Path(rest)
    return None


def evaluate_run(
    config: EvaluateConfig,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    compare: bool = False,
    labels: Sequence[str] | None = None,
    classifier: str | os.PathLike | ImageClassifier | None = None,
    classifier_weights: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
    alexnet_weights: str | os.PathLike | None = None,
    inception_v3_weights: str | os.PathLike | None = None,
    efficientnet_b1_weights: str | os.PathLike | None = None,
    swav_weights: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    title: str | None = None,
    overwrite: bool = False,
) -> EvaluateRun:
    """Score reconstructions and write the report folder ``out``.

    Args:
        config: the metric settings.
        inputs: ``[RECONSTRUCTIONS]`` or ``[RECONSTRUCTIONS, GROUND_TRUTH]`` (the ground truth when the
            reconstructions hold none; see :func:`~mindvis.eval.images.load_eval_images`); with ``compare``,
            two or more evaluation folders (or their ``metrics.json``) or reconstruction folders.
        out: the report folder; it must lie apart from every input.
        compare: put the ``inputs`` side by side.
        labels: names of the compared runs (default: the inputs' folder names).
        classifier: the judge of the semantic metrics: a spec of :func:`~mindvis.eval.classifier.load_classifier`
            (a benchmark classifier folder, ``torchvision:ARCH[:WEIGHTS_TAG]``, ``timm:NAME``) or a loaded
            classifier; ``None``: those metrics are reported unavailable.
        classifier_weights: local weights of a ``torchvision:``/``timm:`` judge.
        inception_weights, alexnet_weights, inception_v3_weights, efficientnet_b1_weights, swav_weights: local
            weights of the network metrics (FID, NSD AlexNet and LPIPS, NSD Inception, EffNet, SwAV).
        weights_dir: a folder searched for weight files by their usual names
            (:meth:`~mindvis.eval.networks.MetricWeights.discover`).
        title: the report's title (default: ``evaluation of RECONSTRUCTIONS``, or ``mindvis comparison``).
        overwrite: replace a non-empty ``out``.

    Raises:
        ConfigError: the inputs or labels do not fit the mode.
        OutputOverlapError: ``out`` is, contains or lies inside an input.
        OutputExistsError: ``out`` is not empty and ``overwrite`` is not set.
    """
    inputs = [Path(p) for p in inputs]
    out = Path(out)
    names: list[str] | None = None
    if compare:
        if len(inputs) < 2:
            raise ConfigError("--compare needs at least two runs", field="compare")
        names = list(labels) if labels else [p.name or str(p) for p in inputs]
        if len(names) != len(inputs):
            raise ConfigError(f"{len(names)} labels for {len(inputs)} runs", field="labels")
    elif not inputs or len(inputs) > 2:
        raise ConfigError("expected RECONSTRUCTIONS [GROUND_TRUTH]; use --compare for several runs")
    is_spec = isinstance(classifier, (str, os.PathLike))
    check_output_apart(
        out,
        {
            "INPUTS": inputs,
            "--classifier": classifier_path(classifier) if is_spec else None,
            "--classifier-weights": classifier_weights,
            "--inception-weights": inception_weights,
            "--alexnet-weights": alexnet_weights,
            "--inception-v3-weights": inception_v3_weights,
            "--efficientnet-b1-weights": efficientnet_b1_weights,
            "--swav-weights": swav_weights,
            "--weights-dir": weights_dir,
        },
    )
    prepare_output_dir(out, overwrite=overwrite)
    weights = MetricWeights.discover(
        weights_dir,
        inception_fid=inception_weights,
        alexnet=alexnet_weights,
        inception_v3=inception_v3_weights,
        efficientnet_b1=efficientnet_b1_weights,
        swav=swav_weights,
    )
    judge = load_classifier(os.fspath(classifier), classifier_weights) if is_spec else classifier
    options: dict[str, Any] = dict(
        classifier=judge,
        metrics=config.metric_groups,
        n_way=list(config.n_way_values),
        top_k=config.top_k,
        trials=config.trials,
        seed=config.seed,
        bootstrap=config.bootstrap,
        fid_bootstrap=config.fid_bootstrap,
        weights=weights,
    )

    def run_one(recon: Path, gt: Path | None, name: str) -> tuple[dict[str, Any], EvalImages]:
        images = load_eval_images(recon, gt, gray_to_rgb=config.gray_to_rgb)
        res = evaluate_reconstructions(
            images.recons, images.gt, ids=images.ids, source=images.source, title=name, **options
        )
        return res, images

    if names is not None:
        runs = []
        for path, name in zip(inputs, names, strict=True):
            if (path / "metrics.json").is_file() or path.name == "metrics.json":
                res = load_results(path)
            else:
                res, _ = run_one(path, None, name)
            res["label"] = name
            runs.append(res)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            written = write_report(runs, tmp, title=title or COMPARE_TITLE, labels=names)
    else:
        gt_path = inputs[1] if len(inputs) == 2 else None
        res, images = run_one(inputs[0], gt_path, title or f"evaluation of {inputs[0]}")
        runs = [res]
        with atomic_dir(out, overwrite=overwrite) as tmp:
            written = write_report(res, tmp, recons=images.recons, gt=images.gt)
    files = {kind: out / path.relative_to(tmp) for kind, path in written.items()}
    return EvaluateRun(runs, names, out, files)


__all__ = ["COMPARE_TITLE", "EvaluateRun", "classifier_path", "evaluate_run"]
