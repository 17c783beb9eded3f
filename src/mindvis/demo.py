"""The main job: the whole MinD-Vis pipeline end to end on the embedded SynthCortex benchmark.

Steps, each one library call with its typed config (the same call the ``mindvis`` command of the same name makes),
each writing into its own folder of one run folder:

1. ``simulate``          SynthCortex: a GOD-like target subject, HCP-like resting state, a stimulus corpus.
2. ``classifier``        the benchmark's judge, trained on the corpus (never on test images).
3. ``pretrain``          stage A1: masked brain modeling on resting state (+ the target's training fMRI).
4. ``finetune``          stage A2: the same objective on the target subject's fMRI.
5. ``prior``             the image prior (VQ + class-conditional UNet): the shipped one, or trained.
6. ``train``             stage B: the double-conditioned LDM finetuned on fMRI-image pairs.
7. ``reconstruct``       the test set, several samples per fMRI.
8. baselines/ablations   ridge regression to the prior's latent; stage B without pretraining; one
                         conditioning path only; PLMS-250 against DPM-Solver++ (``--ablations``).
9. ``evaluate``          metrics with CIs per variant, a side-by-side comparison, and the HTML report.

A preset (:class:`~mindvis.demo_presets.DemoPreset`) holds the config of every step; ``mindvis demo --set
SECTION.KEY=VALUE`` (:func:`~mindvis.demo_presets.apply_overrides`) changes one field of one of them, typed and
checked by the config itself. The ``reproduce`` line of the run's ``config.yaml`` is written from the configs.

A step is skipped on a rerun when it finished before with the same settings (see
:class:`mindvis.utils.steps.StepRunner`); an interrupted step starts again, or resumes from its own
Lightning checkpoint where it has one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mindvis.baselines import ridge_reconstruct
from mindvis.config import config_to_dict
from mindvis.data.formats.registry import load_dataset
from mindvis.demo_presets import (
    PRESETS,
    DemoPreset,
    apply_overrides,
    get_preset,
    reproduce_line,
    set_items,
    write_run_yaml,
)
from mindvis.demo_report import write_demo_report
from mindvis.errors import MindVisError
from mindvis.eval.classifier_training import train_classifier_on
from mindvis.eval.evaluate import evaluate_run
from mindvis.eval.probe import ProbeConfig, probe
from mindvis.pipeline import MindVisPipeline
from mindvis.reconstruct import ReconstructConfig, reconstruct
from mindvis.synthcortex import simulate
from mindvis.train.common import TrainerConfig
from mindvis.train.config import PRIOR_TRAINER, STAGE_B_TRAINER, StageBConfig
from mindvis.train.ldm import run_stage_b
from mindvis.train.prior import run_train_prior
from mindvis.train.stage_a import finetune, pretrain
from mindvis.utils.io import atomic_dir, file_sha256, read_json, save_npz_atomic, write_json
from mindvis.utils.steps import StepRunner, fingerprint

_logger = logging.getLogger(__name__)

#: The shipped image prior (``mindvis train-prior``), used unless ``--train-prior`` is given.
SHIPPED_PRIOR = Path(__file__).parent / "assets" / "prior-small"

__all__ = [
    "PRESETS",
    "SHIPPED_PRIOR",
    "DemoPreset",
    "DemoResult",
    "apply_overrides",
    "get_preset",
    "reproduce_line",
    "run_demo",
    "set_items",
    "write_run_yaml",
]


def _has_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and any(folder.rglob("*.ckpt"))


def _training_mode(folder: Path) -> dict[str, bool]:
    """Resume an interrupted training step from its own checkpoint; otherwise start it afresh."""
    if _has_checkpoint(folder):
        return {"resume": True, "overwrite": False}
    return {"resume": False, "overwrite": folder.exists()}


@dataclass
class DemoResult:
    run_dir: Path
    report: Path
    headline: list[dict[str, Any]]
    seconds: float
    skipped: list[str]


def run_demo(
    preset: DemoPreset,
    run_dir: str | os.PathLike,
    train_prior: bool = False,
    on_step: Callable[[int, int | None, str], None] | None = None,
    progress: bool = True,
) -> DemoResult:
    """Run (or continue) the demo in ``run_dir``; returns where the report is and the headline figures."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sim = run_dir / "sim"
    res = preset.simulate.resolution
    images_npz = sim / "GOD" / f"images_{res}.npz"
    corpus = sim / "stimuli" / "corpus.npz"
    variants = _variants(preset)
    # simulate, classifier, pretrain, finetune, prior; per variant train (if any), reconstruct and evaluate;
    # the ridge baseline and its evaluation; the probes; the report
    total = 5 + sum(2 + (v.train is not None) for v in variants) + 2 + 1 + 1
    steps = StepRunner(run_dir, total=total, on_start=on_step)
    write_run_yaml(run_dir, preset, {"train_prior": train_prior})
    # each step's fingerprint includes every earlier step's, so a changed step reruns all that follow it
    chain: list[str] = []

    def run_step(name: str, spec: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
        spec = {**spec, "upstream": chain[-1] if chain else None}
        chain.append(fingerprint(spec))
        steps.run(name, spec, fn)

    def step(name: str, config: Any, fn: Callable[[], Any], inputs: Any = None) -> None:
        def call() -> dict[str, Any]:
            fn()
            return {}

        run_step(name, {"step": name, "config": config_to_dict(config), "inputs": inputs}, call)

    def fresh(folder: Path) -> bool:  # a step without checkpoints starts again from nothing
        return folder.exists()

    # 1. simulate
    step("simulate", preset.simulate, lambda: simulate(preset.simulate, sim, overwrite=fresh(sim)))
    data_fp = fingerprint(read_json(sim / "synthcortex.json").get("config", {}))
    # 2. classifier (judge)
    clf = run_dir / "classifier"
    step(
        "classifier",
        preset.classifier,
        lambda: train_classifier_on(preset.classifier, corpus, clf, exclude_test=images_npz),
        inputs=data_fp,
    )
    # 3-4. stage A
    a1, a2 = run_dir / "stage_a1", run_dir / "stage_a2"
    step(
        "pretrain",
        preset.pretrain,
        lambda: pretrain(preset.pretrain, a1, data_dir=sim, progress=progress, **_training_mode(a1)),
        inputs=data_fp,
    )
    step(
        "finetune",
        preset.finetune,
        lambda: finetune(preset.finetune, a2, init=a1, data_dir=sim, progress=progress, **_training_mode(a2)),
        inputs=data_fp,
    )
    # 5. image prior
    prior = run_dir / "prior"
    prior_pipeline = prior / "pipeline"
    # a --set prior.* item asks for a prior trained with it, so the shipped one does not stand in for it
    prior_changed = any(item.partition(".")[0].strip() == "prior" for item in preset.overrides)
    if not train_prior and not prior_changed and _shipped_prior_fits(res, corpus):

        def copy_prior() -> dict[str, Any]:
            if prior.exists():
                shutil.rmtree(prior)
            shutil.copytree(SHIPPED_PRIOR, prior)
            return {"source": str(SHIPPED_PRIOR)}

        run_step("prior", {"shipped": _shipped_prior_id()}, copy_prior)
    else:
        prior_config = dataclasses.replace(preset.prior, resolution=res)
        step(
            "prior",
            prior_config,
            lambda: run_train_prior(
                prior_config,
                corpus,
                prior,
                classifier=clf,
                trainer_config=TrainerConfig(**PRIOR_TRAINER, progress_bar=progress),
                **_training_mode(prior),
            ),
            inputs=data_fp,
        )
    # 6-7. stage B variants (the method first) and their reconstructions
    recon_dirs: dict[str, Path] = {}
    stage_b_models: list[Path] = []
    for v in variants:
        out = run_dir / ("stage_b" if v.key == "method" else f"stage_b_{v.key}")
        if v.train is not None:
            config = v.train

            def train_it(config: StageBConfig = config, out: Path = out) -> Any:
                return run_stage_b(
                    config,
                    prior_pipeline,
                    a2,
                    out,
                    data_dir=sim,
                    classifier=clf,
                    trainer_config=TrainerConfig(**STAGE_B_TRAINER, progress_bar=progress),
                    **_training_mode(out),
                )

            step(f"train_{v.key}", config, train_it, inputs=data_fp)
            stage_b_models.append(out / "model")
        model_dir = (run_dir / "stage_b" if v.train is None else out) / "model"
        rdir = run_dir / "reconstructions" / v.key

        def reconstruct_it(
            config: ReconstructConfig = v.reconstruct, model: Path = model_dir, rdir: Path = rdir
        ) -> Any:
            return reconstruct(
                config,
                model,
                rdir,
                dataset="synthetic",
                data_dir=sim,
                split="test",
                overwrite=fresh(rdir),
                progress=progress,
            )

        step(f"reconstruct_{v.key}", v.reconstruct, reconstruct_it, inputs=data_fp)
        recon_dirs[v.label] = rdir
    # 8. ridge baseline
    rdir = run_dir / "reconstructions" / "ridge"
    run_step(
        "baseline_ridge",
        {"data": data_fp, "prior": str(prior_pipeline)},
        lambda: _ridge_step(sim, prior_pipeline, rdir),
    )
    recon_dirs["ridge regression (baseline)"] = rdir
    # 9. linear probes: where the stimulus information goes, and whether stage B uses its fMRI
    pdir = run_dir / "probe"
    probe_config = ProbeConfig()
    step(
        "probe",
        {"probe": config_to_dict(probe_config), "models": [str(m) for m in [a2, *stage_b_models]]},
        lambda: probe(
            probe_config,
            [a2, *stage_b_models],
            pdir,
            dataset="synthetic",
            data_dir=sim,
            overwrite=fresh(pdir),
        ),
        inputs=data_fp,
    )
    # 10. evaluate each, then compare and write the report
    evals: dict[str, Path] = {}
    for label, rdir in recon_dirs.items():
        edir = run_dir / "eval" / rdir.name

        def evaluate_it(rdir: Path = rdir, edir: Path = edir, label: str = label) -> Any:
            return evaluate_run(
                preset.evaluate, [rdir], edir, classifier=clf, title=label, overwrite=fresh(edir)
            )

        step(
            f"evaluate_{rdir.name}",
            {"evaluate": config_to_dict(preset.evaluate), "title": label},
            evaluate_it,
            inputs=data_fp,
        )
        evals[label] = edir
    report_dir = run_dir / "report"

    def report() -> dict[str, Any]:
        path = write_demo_report(run_dir, report_dir, evals, preset, steps_seconds=_step_seconds(run_dir))
        return {"report": str(path)}

    steps.run("report", {"evals": sorted(str(p) for p in evals.values()), "t": time.time()}, report)
    headline = json.loads((report_dir / "headline.json").read_text())
    seconds = time.perf_counter() - t0
    skipped = [r.name for r in steps.results if r.skipped]
    return DemoResult(run_dir, report_dir / "index.html", headline, seconds, skipped)


@dataclass
class Variant:
    """One row of the comparison: a stage B training (``None``: the method's model) and its reconstruction."""

    key: str
    label: str
    train: StageBConfig | None
    reconstruct: ReconstructConfig


def _variants(preset: DemoPreset) -> list[Variant]:
    """The method, then the ablations of ``preset.ablations``."""
    rec = preset.reconstruct
    abl = dataclasses.replace(preset.train, **preset.ablation_train)
    out = [Variant("method", f"MinD-Vis ({rec.sampler}-{rec.steps})", preset.train, rec)]
    if preset.ablations in ("fast", "all"):
        out.append(
            Variant(
                "no_pretrain",
                "no pretraining (random fMRI encoder)",
                dataclasses.replace(abl, encoder_init="random"),
                rec,
            )
        )
        out.append(
            Variant(
                "plms250",
                "MinD-Vis (plms-250, the original sampler)",
                None,
                dataclasses.replace(rec, sampler="plms", steps=250),
            )
        )
    if preset.ablations == "all":
        out.append(
            Variant(
                "cross_attn_only",
                "cross-attention conditioning only",
                dataclasses.replace(abl, use_time_cond=False),
                rec,
            )
        )
        out.append(
            Variant(
                "time_only", "time conditioning only", dataclasses.replace(abl, use_cross_attn=False), rec
            )
        )
    return out


def _shipped_prior_fits(resolution: int, corpus: Path) -> bool:
    """Whether the shipped prior was trained on exactly this corpus (sha256) at this image size."""
    cfg = SHIPPED_PRIOR / "pipeline"
    meta = SHIPPED_PRIOR / "ARTIFACT.json"
    if not cfg.is_dir() or not meta.is_file():
        return False
    try:
        want = read_json(meta).get("corpus_sha256")
        if not corpus.is_file() or want != file_sha256(corpus):
            _logger.warning(
                "the shipped image prior was trained on another stimulus corpus than %s; training one instead",
                corpus,
            )
            return False
        return int(MindVisPipeline.from_pretrained(cfg).image_size) == resolution
    except MindVisError as e:
        _logger.warning("the shipped image prior cannot be used (%s); training one instead", e)
        return False


def _shipped_prior_id() -> str:
    meta = SHIPPED_PRIOR / "ARTIFACT.json"
    return fingerprint(read_json(meta)) if meta.exists() else "none"


def _ridge_step(sim: Path, prior_pipeline: Path, out: Path) -> dict[str, Any]:
    train = load_dataset("synthetic", data_dir=sim, split="train")
    test = load_dataset("synthetic", data_dir=sim, split="test")
    images, info = ridge_reconstruct(train, test, prior_pipeline)
    with atomic_dir(out, overwrite=True) as tmp:
        save_npz_atomic(
            tmp / "reconstructions.npz",
            compressed=True,
            images=images,
            ground_truth=test.sample_images(),
            ids=np.arange(len(images)),
        )
        write_json(tmp / "run.json", {"method": "ridge regression to the prior's VQ latent", **info})
    return info


def _step_seconds(run_dir: Path) -> dict[str, float]:
    out = {}
    for p in sorted((run_dir / "steps").glob("*.json")):
        try:
            out[p.stem] = float(read_json(p).get("seconds", 0.0))
        except MindVisError:
            continue
    return out
