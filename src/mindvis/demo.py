"""The main job: the whole MinD-Vis pipeline end to end on the embedded SynthCortex benchmark.

Steps, each one ``mindvis`` command run in-process and writing into its own folder of one run folder:

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

A step is skipped on a rerun when it finished before with the same settings (see
:class:`mindvis.utils.steps.StepRunner`); an interrupted step starts again, or resumes from its own
Lightning checkpoint where it has one.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mindvis.errors import ConfigError, MindVisError
from mindvis.utils.io import atomic_write, read_json, write_json
from mindvis.utils.steps import StepRunner, fingerprint, provenance

_logger = logging.getLogger(__name__)

Ablations = Literal["none", "fast", "all"]

#: The shipped image prior (``mindvis train-prior``), used unless ``--train-prior`` is given.
SHIPPED_PRIOR = Path(__file__).parent / "assets" / "prior-small"


@dataclass
class DemoPreset:
    """Sizes and training lengths of one demo preset; every value is passed to a ``mindvis`` command."""

    name: str
    simulate: dict[str, Any]
    classifier: dict[str, Any]
    pretrain: dict[str, Any]
    finetune: dict[str, Any]
    prior: dict[str, Any]
    train: dict[str, Any]
    reconstruct: dict[str, Any]
    ablation_train: dict[str, Any] = field(default_factory=dict)
    ablations: Ablations = "fast"
    evaluate: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    #: the ``--set`` items applied to the named preset, in order (see :func:`apply_overrides`)
    overrides: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The effective settings (the ``--set`` items already applied; they are listed apart)."""
        out = copy.deepcopy(self.__dict__)
        out.pop("overrides")
        return out


#: The tiny prior's 32-channel layers with 32 GroupNorm groups normalise each channel alone, which erases the
#: time embedding; the demo's tiny priors use 8 groups (see mindvis.train.prior.warn_instance_norm).
_TINY_NORM = {"vq": ["norm_groups=8"], "unet": ["norm_groups=8"]}


#: Stage B settings of every preset that are not the original's (docs/departures.md): sparse voxel dropout, which
#: the original describes but whose code is a no-op, and a full validation pass each time, so that the short
#: demo runs have a comparable curve at every validation. The paper-sized ``full`` preset keeps the original's.
_OUR_STAGE_B = {"sparse-rate": 0.2, "val-schedule": "full"}
#: Stage A2 on the training fMRI (the original tunes on the test fMRI): the demo's test set stays unseen until
#: evaluation, and its figures stay comparable with the README's.
_OUR_STAGE_A2 = {"a2-data": "train"}


def _presets() -> dict[str, DemoPreset]:
    quick = DemoPreset(
        name="quick",
        note="smoke test: small everything, a few epochs; numbers are not meaningful",
        simulate={
            "n-train": 240,
            "n-test": 10,
            "repeats": 8,
            "rest-subjects": 4,
            "trs": 300,
            "voxels": 1024,
            "rest-vertices": 800,
            "corpus-size": 600,
            "resolution": 32,
            "seed": 0,
        },
        classifier={"epochs": 3},
        pretrain={"variant": "tiny", "epochs": 2, "batch-size": 32},
        finetune={"epochs": 2, "batch-size": 16, **_OUR_STAGE_A2},
        prior={
            "preset": "tiny",
            **_TINY_NORM,
            "vq-epochs": 1,
            "unet-epochs": 1,
            "final-samples": 1,
            "steps": 5,
            "samples-per-class": 1,
        },
        train={
            "epochs": 1,
            "batch-size": 8,
            "val-every": 1,
            "num-samples": 2,
            "sampler": "dpmsolver++",
            "steps": 5,
            "val-items": 4,
            **_OUR_STAGE_B,
        },
        reconstruct={"num-samples": 2, "sampler": "dpmsolver++", "steps": 10},
        ablations="none",
        evaluate={"trials": 200, "bootstrap": 200},
    )
    default = DemoPreset(
        name="default",
        note="the embedded benchmark at GOD's trial counts with a 1.5k-voxel visual cortex, 32-pixel stimuli and "
        "tiny models, sized for 2 CPU cores",
        simulate={
            "seed": 0,
            "rest-subjects": 10,
            "voxels": 1500,
            "rest-vertices": 1200,
            "resolution": 32,
            "corpus-size": 3000,
        },
        classifier={"epochs": 20},
        pretrain={"variant": "tiny", "epochs": 30, "batch-size": 64},
        finetune={"epochs": 60, "batch-size": 32, **_OUR_STAGE_A2},
        # what scripts/build_prior.py trains for the shipped prior (used unless --train-prior)
        prior={
            "preset": "tiny",
            "vq": [*_TINY_NORM["vq"], "n_embed=512"],
            "unet": _TINY_NORM["unet"],
            "vq-epochs": 15,
            "vq-lr": 5e-4,
            "unet-epochs": 40,
            "unet-batch-size": 64,
            "unet-lr": 4e-4,
            "val-every": 10,
            "final-samples": 4,
            "steps": 20,
            "samples-per-class": 2,
        },
        # Not in the original, each for a measured reason (docs/synthcortex.md, "Why the demo needs a warm start"):
        # the tiny encoder's tokens vary little between samples, so they are standardised; a fresh conditioner
        # gives contexts the prior's cross-attention ignores, so it is first aligned to the prior's class
        # embeddings; and the weak tiny prior is sharpened by classifier-free guidance.
        train={
            "epochs": 12,
            "batch-size": 16,
            "val-every": 4,
            "num-samples": 2,
            "sampler": "dpmsolver++",
            "steps": 15,
            "val-items": 20,
            "standardize-tokens": True,
            "align-epochs": 100,
            "cond-dropout": 0.1,
            "guidance-scale": 3.0,
            "validate-start": True,
            **_OUR_STAGE_B,
        },
        reconstruct={"num-samples": 5, "sampler": "dpmsolver++", "steps": 25, "guidance-scale": 3.0},
        ablation_train={"epochs": 12, "validate-start": False},
        ablations="fast",
        evaluate={"trials": 1000, "bootstrap": 1000},
    )
    full = DemoPreset(
        name="full",
        note="paper-sized models and schedules; for a GPU",
        simulate={"seed": 0},
        classifier={"epochs": 20},
        pretrain={"variant": "large", "epochs": 500, "batch-size": 100},
        finetune={"epochs": 200},
        prior={"preset": "small", "vq-epochs": 40, "unet-epochs": 200},
        train={"epochs": 500, "val-every": 5, "num-samples": 5, "sampler": "dpmsolver++", "steps": 25},
        reconstruct={"num-samples": 5, "sampler": "plms", "steps": 250},
        ablation_train={"epochs": 200},
        ablations="all",
        evaluate={"trials": 1000, "bootstrap": 1000},
    )
    # the test suite's end-to-end check: every step on the smallest data that still exercises it
    smoke = DemoPreset(
        name="smoke",
        note="test-suite smoke run: tiny data and models, one epoch each; numbers are meaningless",
        simulate={
            "n-train": 40,
            "n-test": 4,
            "repeats": 2,
            "rest-subjects": 2,
            "trs": 60,
            "voxels": 320,
            "rest-vertices": 256,
            "corpus-size": 60,
            "resolution": 32,
            "seed": 0,
        },
        classifier={"epochs": 1},
        pretrain={"variant": "tiny", "epochs": 1, "batch-size": 16},
        finetune={"epochs": 1, "batch-size": 8, **_OUR_STAGE_A2},
        prior={
            "preset": "tiny",
            **_TINY_NORM,
            "vq-epochs": 1,
            "unet-epochs": 1,
            "final-samples": 1,
            "steps": 2,
            "samples-per-class": 1,
        },
        train={
            "epochs": 1,
            "batch-size": 8,
            "val-every": 1,
            "num-samples": 1,
            "sampler": "ddim",
            "steps": 2,
            "val-items": 2,
            **_OUR_STAGE_B,
            "align-epochs": 1,
            "cond-dropout": 0.1,
            "guidance-scale": 2.0,
            "validate-start": True,
        },
        reconstruct={"num-samples": 2, "sampler": "dpmsolver++", "steps": 3, "guidance-scale": 2.0},
        ablations="none",
        evaluate={"trials": 20, "bootstrap": 20},
    )
    return {p.name: p for p in (quick, default, full, smoke)}


PRESETS = _presets()


def get_preset(name: str) -> DemoPreset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}", field="preset")
    return copy.deepcopy(PRESETS[name])


#: The preset sections that ``--set SECTION.KEY=VALUE`` may change, and the command each one's options go to.
OVERRIDABLE = {
    "simulate": "simulate",
    "classifier": "train-classifier",
    "pretrain": "pretrain",
    "finetune": "finetune",
    "prior": "train-prior",
    "train": "train",
    "ablation_train": "train",
    "reconstruct": "reconstruct",
    "evaluate": "evaluate",
}


#: Options the demo passes itself (folders, the steps' resume logic): ``--set`` may not change them.
_DEMO_OWNED = {"out", "resume", "overwrite", "progress"}
_DEMO_OWNED_BY_SECTION = {
    "classifier": {"corpus", "exclude-test"},
    "pretrain": {"data-dir"},
    "finetune": {"init", "data-dir"},
    "prior": {"corpus", "classifier", "resolution"},
    "train": {"prior", "mbm", "dataset", "data-dir", "classifier"},
    "ablation_train": {"prior", "mbm", "dataset", "data-dir", "classifier", "random-encoder"},
    "reconstruct": {"model", "dataset", "data-dir", "split"},
    "evaluate": {"classifier", "title"},
}


def _override_value(section: str, key: str, raw: str) -> Any:
    """The value of ``SECTION.KEY=raw`` as the preset holds it, checked against the option of the section's
    command (``None``: drop the option). Raises ConfigError with the reason."""
    import typer
    import yaml

    from mindvis.cli import app

    command = typer.main.get_command(app).commands[OVERRIDABLE[section]]  # type: ignore[attr-defined]
    name = f"mindvis {command.name}"

    def fail(why: str) -> ConfigError:
        return ConfigError(f"{section}.{key}: {why}", field="--set")

    param = next((p for p in command.params if f"--{key}" in p.opts), None)
    if param is None:
        known = sorted(o[2:] for p in command.params for o in p.opts if o.startswith("--") and o != "--help")
        raise fail(f"`{name}` has no option --{key}; it takes: {', '.join(known)}")
    if key in _DEMO_OWNED | _DEMO_OWNED_BY_SECTION.get(section, set()):
        raise fail(f"the demo sets --{key} of `{name}` itself (its folders and steps depend on it)")
    raw = raw.strip()
    if raw in ("null", "~"):
        return None
    if not raw:
        raise fail("give a value (or null to leave the option to the command's default)")
    if getattr(param, "is_flag", False):
        if raw.lower() not in ("true", "false"):
            raise fail(f"--{key} is a flag; give true or false, not {raw!r}")
        if raw.lower() == "false" and not getattr(param, "secondary_opts", None):
            raise fail(f"--{key} is a flag that cannot be negated; use {section}.{key}=null to leave it off")
        return raw.lower() == "true"

    def convert(text: str) -> Any:
        try:
            value = param.process_value(None, [text] if param.multiple else text)
        except Exception as exc:  # the option's own parse error
            why = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            raise fail(f"{text!r}: {why}") from None
        if param.multiple:
            value = value[0] if value else text
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else text

    if raw.startswith("["):
        if not param.multiple:
            raise fail(f"--{key} takes one value, not a list")
        try:
            items = yaml.safe_load(raw)
        except yaml.YAMLError:
            items = None
        if not isinstance(items, list) or any(isinstance(i, (list, dict)) for i in items):
            raise fail(f"expected a list like [a, b], got {raw!r}")
        return [convert(str(i)) for i in items]
    return [convert(raw)] if param.multiple else convert(raw)


def apply_overrides(preset: DemoPreset, items: list[str]) -> DemoPreset:
    """A copy of ``preset`` with ``SECTION.KEY=VALUE`` items applied (``mindvis demo --set``).

    ``KEY`` is the command's option without its dashes (``pretrain.variant=small`` becomes ``mindvis pretrain
    --variant small``; ``train.align-epochs=40``; underscores are read as dashes). ``VALUE`` is checked against
    the option's type before anything runs: ``true`` / ``false`` for a flag, ``[a, b]`` for a repeatable option
    (a single value replaces the whole list), and ``null`` drops the option so the command's default applies
    (in ``ablation_train``, the ``train`` value applies). ``train`` also sets what the ablations train with,
    unless ``ablation_train`` sets the same key. Options that the demo passes itself (folders, data, resuming)
    are refused.

    Raises:
        ConfigError: an item is not ``SECTION.KEY=VALUE``, names another section or an option the section's
            command does not take or the demo owns, or has a value of the wrong type.
    """
    out = copy.deepcopy(preset)
    for item in items:
        target, sep, raw = item.partition("=")
        section, dot, key = target.strip().partition(".")
        key = key.strip().lstrip("-").replace("_", "-")
        if not sep or not dot or not key:
            raise ConfigError(
                f"expected SECTION.KEY=VALUE (e.g. pretrain.variant=small), got {item!r}", field="--set"
            )
        if section not in OVERRIDABLE:
            raise ConfigError(
                f"unknown section {section!r} in {item!r}; expected one of {', '.join(OVERRIDABLE)}",
                field="--set",
            )
        value = _override_value(section, key, raw)
        options: dict[str, Any] = getattr(out, section)
        if value is None:
            options.pop(key, None)
        else:
            options[key] = value
        out.overrides.append(item)
    return out


def _args(options: dict[str, Any]) -> list[str]:
    """``{"n-train": 10, "progress": False}`` -> ``["--n-train", "10", "--no-progress"]``."""
    out: list[str] = []
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, (list, tuple)):  # a repeatable option
            for item in value:
                out += [f"--{key}", str(item)]
        else:
            out += [f"--{key}", str(value)]
    return out


def run_cli(args: list[str]) -> None:
    """Run one ``mindvis`` command in this process; errors propagate as exceptions."""
    from mindvis.cli import app

    _logger.info("$ mindvis %s", " ".join(args))
    try:
        rc = app(args=args, prog_name="mindvis", standalone_mode=False)
    except SystemExit as exc:
        # a command that finishes returns; SystemExit means it stopped early, even with code None (Lightning
        # raises that on SIGTERM after a graceful stop), so the step must not be recorded as done
        if exc.code == 0:
            return
        raise MindVisError(
            f"`mindvis {' '.join(args)}` stopped before finishing (exit code {exc.code})"
        ) from None
    if isinstance(rc, int) and rc != 0:  # click returns the code of typer.Exit when not standalone
        raise MindVisError(f"`mindvis {' '.join(args)}` exited with code {rc}")


def _has_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and any(folder.rglob("*.ckpt"))


def _training_mode(folder: Path) -> list[str]:
    """Resume an interrupted training step from its own checkpoint; otherwise start it afresh."""
    if _has_checkpoint(folder):
        return ["--resume"]
    return ["--overwrite"] if folder.exists() else []


def write_run_yaml(
    run_dir: Path, preset: DemoPreset, commands: dict[str, list[str]], extra: dict[str, Any]
) -> None:
    import yaml

    overrides = list(preset.overrides)
    sets = "".join(f" --set {shlex.quote(item)}" for item in overrides)
    info = {"preset": preset.name, "note": preset.note, "settings": preset.to_dict()}
    if overrides:
        info["overrides"] = overrides
    doc = {
        "mindvis_demo": info,
        "reproduce": f"mindvis demo --preset {preset.name}{sets} --run-dir {run_dir}",
        "commands": {k: "mindvis " + " ".join(v) for k, v in commands.items()},
        **provenance(),
        **extra,
    }
    with atomic_write(run_dir / "config.yaml", "w") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False, width=120)


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
    god = sim / "GOD"
    res = int(preset.simulate.get("resolution", 64))
    images_npz = god / f"images_{res}.npz"
    prog = {"progress": progress}
    commands: dict[str, list[str]] = {}
    variants = _variants(preset)
    # simulate, classifier, pretrain, finetune, prior; per variant train (if any), reconstruct and evaluate;
    # the ridge baseline and its evaluation; the probes; the report
    total = 5 + sum(2 + (v[2] is not None) for v in variants) + 2 + 1 + 1
    steps = StepRunner(run_dir, total=total, on_start=on_step)
    # each step's fingerprint includes every earlier step's, so a changed step reruns all that follow it
    chain: list[str] = []

    def run_step(name: str, spec: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
        spec = {**spec, "upstream": chain[-1] if chain else None}
        chain.append(fingerprint(spec))
        steps.run(name, spec, fn)

    def step(
        name: str, args: list[str], folder: Path | None = None, training: bool = False, inputs: Any = None
    ) -> None:
        commands[name] = args
        write_run_yaml(run_dir, preset, commands, {"train_prior": train_prior})

        def fn() -> dict[str, Any]:
            extra: list[str] = []
            if folder is not None:
                extra = _training_mode(folder) if training else (["--overwrite"] if folder.exists() else [])
            run_cli(args + extra)
            return {"folder": str(folder) if folder else None}

        run_step(name, {"args": args, "inputs": inputs}, fn)

    # 1. simulate
    step("simulate", ["simulate", "--out", str(sim), *_args(preset.simulate)], sim)
    sim_id = (
        read_json(sim / "synthcortex.json").get("config", {}) if (sim / "synthcortex.json").exists() else {}
    )
    data_fp = fingerprint(sim_id)
    # 2. classifier (judge)
    clf = run_dir / "classifier"
    step(
        "classifier",
        [
            "train-classifier",
            "--corpus",
            str(sim / "stimuli" / "corpus.npz"),
            "--exclude-test",
            str(images_npz),
            "--out",
            str(clf),
            *_args(preset.classifier),
        ],
        None,
        inputs=data_fp,
    )
    # 3-4. stage A
    a1, a2 = run_dir / "stage_a1", run_dir / "stage_a2"
    step(
        "pretrain",
        ["pretrain", "--data-dir", str(sim), "--out", str(a1), *_args(preset.pretrain), *_args(prog)],
        a1,
        training=True,
        inputs=data_fp,
    )
    step(
        "finetune",
        [
            "finetune",
            "--init",
            str(a1),
            "--data-dir",
            str(sim),
            "--out",
            str(a2),
            *_args(preset.finetune),
            *_args(prog),
        ],
        a2,
        training=True,
        inputs=data_fp,
    )
    # 5. image prior
    prior = run_dir / "prior"
    # a --set prior.* item asks for a prior trained with it, so the shipped one does not stand in for it
    prior_changed = any(item.partition(".")[0].strip() == "prior" for item in preset.overrides)
    use_shipped = (
        not train_prior and not prior_changed and _shipped_prior_fits(res, sim / "stimuli" / "corpus.npz")
    )
    if use_shipped:

        def copy_prior() -> dict[str, Any]:
            if prior.exists():
                shutil.rmtree(prior)
            shutil.copytree(SHIPPED_PRIOR, prior)
            return {"source": str(SHIPPED_PRIOR)}

        run_step("prior", {"shipped": _shipped_prior_id()}, copy_prior)
        prior_pipeline = prior / "pipeline"
    else:
        step(
            "prior",
            [
                "train-prior",
                "--corpus",
                str(sim / "stimuli" / "corpus.npz"),
                "--out",
                str(prior),
                "--classifier",
                str(clf),
                "--resolution",
                str(res),
                *_args(preset.prior),
                *_args(prog),
            ],
            prior,
            training=True,
            inputs=data_fp,
        )
        prior_pipeline = prior / "pipeline"
    # 6-7. stage B variants (the method first) and their reconstructions
    recon_dirs: dict[str, Path] = {}
    for key, label, train_opts, recon_opts in variants:
        out = run_dir / f"stage_b_{key}" if key != "method" else run_dir / "stage_b"
        if train_opts is not None:
            step(
                f"train_{key}",
                [
                    "train",
                    "--prior",
                    str(prior_pipeline),
                    "--mbm",
                    str(a2),
                    "--dataset",
                    "synthetic",
                    "--data-dir",
                    str(sim),
                    "--out",
                    str(out),
                    "--classifier",
                    str(clf),
                    *_args(train_opts),
                    *_args(prog),
                ],
                out,
                training=True,
                inputs=data_fp,
            )
        model_dir = (run_dir / "stage_b") / "model" if train_opts is None else out / "model"
        rdir = run_dir / "reconstructions" / key
        step(
            f"reconstruct_{key}",
            [
                "reconstruct",
                "--model",
                str(model_dir),
                "--dataset",
                "synthetic",
                "--data-dir",
                str(sim),
                "--split",
                "test",
                "--out",
                str(rdir),
                *_args(recon_opts),
                *_args(prog),
            ],
            rdir,
            inputs=data_fp,
        )
        recon_dirs[label] = rdir
    # 8. ridge baseline
    rdir = run_dir / "reconstructions" / "ridge"

    def ridge() -> dict[str, Any]:
        info = _ridge_step(sim, prior_pipeline, rdir)
        return info

    run_step("baseline_ridge", {"data": data_fp, "prior": str(prior_pipeline)}, ridge)
    recon_dirs["ridge regression (baseline)"] = rdir
    # 9. linear probes: where the stimulus information goes, and whether stage B uses its fMRI
    models = [a2] + [
        (run_dir / ("stage_b" if key == "method" else f"stage_b_{key}")) / "model"
        for key, _, train_opts, _ in variants
        if train_opts is not None
    ]
    pdir = run_dir / "probe"
    step(
        "probe",
        ["probe", *map(str, models), "--dataset", "synthetic", "--data-dir", str(sim), "--out", str(pdir)],
        pdir,
        inputs=data_fp,
    )
    # 10. evaluate each, then compare and write the report
    evals: dict[str, Path] = {}
    for label, rdir in recon_dirs.items():
        edir = run_dir / "eval" / rdir.name
        step(
            f"evaluate_{rdir.name}",
            [
                "evaluate",
                str(rdir),
                "--out",
                str(edir),
                "--classifier",
                str(clf),
                "--title",
                label,
                *_args(preset.evaluate),
            ],
            edir,
            inputs=data_fp,
        )
        evals[label] = edir
    report_dir = run_dir / "report"

    def report() -> dict[str, Any]:
        from mindvis.demo_report import write_demo_report

        path = write_demo_report(run_dir, report_dir, evals, preset, steps_seconds=_step_seconds(run_dir))
        return {"report": str(path)}

    steps.run("report", {"evals": sorted(str(p) for p in evals.values()), "t": time.time()}, report)
    headline = json.loads((report_dir / "headline.json").read_text())
    seconds = time.perf_counter() - t0
    skipped = [r.name for r in steps.results if r.skipped]
    return DemoResult(run_dir, report_dir / "index.html", headline, seconds, skipped)


def _variants(preset: DemoPreset) -> list[tuple[str, str, dict[str, Any] | None, dict[str, Any]]]:
    """(key, label, stage B training options or None to reuse the method's model, reconstruct options)."""
    train = preset.train
    abl = {**train, **preset.ablation_train}
    rec = preset.reconstruct
    out: list[tuple[str, str, dict[str, Any] | None, dict[str, Any]]] = [
        ("method", f"MinD-Vis ({rec.get('sampler', 'plms')}-{rec.get('steps', '')})", train, rec),
    ]
    if preset.ablations in ("fast", "all"):
        out.append(
            ("no_pretrain", "no pretraining (random fMRI encoder)", {**abl, "random-encoder": True}, rec)
        )
        out.append(
            (
                "plms250",
                "MinD-Vis (plms-250, the original sampler)",
                None,
                {**rec, "sampler": "plms", "steps": 250},
            )
        )
    if preset.ablations == "all":
        out.append(("cross_attn_only", "cross-attention conditioning only", {**abl, "time-cond": False}, rec))
        out.append(("time_only", "time conditioning only", {**abl, "cross-attn": False}, rec))
    return out


def _shipped_prior_fits(resolution: int, corpus: Path) -> bool:
    """Whether the shipped prior was trained on exactly this corpus (sha256) at this image size."""
    cfg = SHIPPED_PRIOR / "pipeline"
    meta = SHIPPED_PRIOR / "ARTIFACT.json"
    if not cfg.is_dir() or not meta.is_file():
        return False
    try:
        from mindvis.pipeline import MindVisPipeline
        from mindvis.utils.io import file_sha256

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
    from mindvis.baselines import ridge_reconstruct
    from mindvis.data.formats.registry import load_dataset
    from mindvis.utils.io import atomic_dir, save_npz_atomic

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
