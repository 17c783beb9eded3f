"""Build an image prior and its judge: the demo's shipped prior, or the 20-class benchmark prior.

``--corpus demo`` (default) rebuilds the prior that ``mindvis demo`` ships with
(``src/mindvis/assets/prior-small``): the demo's ``default`` preset simulates its data with a fixed seed, so its
stimulus corpus is the same file on every machine. The demo uses the shipped prior only when its own corpus
has the same sha256; otherwise it trains one with the same settings (as with ``mindvis demo --train-prior``).

``--corpus fashion+animal`` builds the 20-class benchmark prior: a 60k-image composite corpus of all of
Fashion-MNIST and Animal-MNIST (``mindvis simulate --source fashion+animal``), the benchmark's judge
(``mindvis train-classifier --preset judge``) and a VQ-f4 + class-conditional UNet (``mindvis train-prior``).
Its artifact goes to ``<work>/artifact`` unless ``--out`` says otherwise (the shipped asset is not replaced).

Every step runs in the work folder with paths relative to it, so nothing written (metrics.json, the
classifier's config, ARTIFACT.json) records an absolute path. Steps already done are skipped and an
interrupted prior is resumed (``--resume``): rerunning the same command continues where it stopped.
``--evaluate-only`` trains nothing: it scores what the work folder holds (the judge on held-out corpus images
and on composites of never-seen test-split objects, the VQ's reconstructions, the class samples) into
``<work>/evaluation.json``.

Usage::

    python scripts/build_prior.py [--work build/prior]
    python scripts/build_prior.py --corpus fashion+animal --work build/prior20 [--no-prior]
    python scripts/build_prior.py --corpus fashion+animal --work build/prior20 --evaluate-only
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from mindvis import __version__
from mindvis.demo import SHIPPED_PRIOR, _args, get_preset, run_cli
from mindvis.utils.io import atomic_dir, file_sha256, read_json, write_json
from mindvis.utils.steps import provenance

#: The 20-class benchmark build: every setting of its three commands.
BENCHMARK20: dict[str, Any] = {
    "simulate": {
        "seed": 0,
        "source": "fashion+animal",
        "rest-subjects": 0,
        "resolution": 32,
        "corpus-size": 60000,
    },
    "classifier": {"preset": "judge", "threads": 1},
    "prior": {
        "preset": "tiny",
        "vq": ["n_embed=512", "norm_groups=8"],
        "unet": ["model_channels=64", "norm_groups=8"],
        "vq-epochs": 3,
        "vq-batch-size": 32,
        "vq-lr": 0.0005,
        "unet-epochs": 12,
        "unet-batch-size": 128,
        "unet-lr": 0.0004,
        "ema": True,
        "ema-decay": 0.999,
        "class-dropout": 0.1,
        "guidance": 3.0,
        "sampler": "ddim",
        "steps": 50,
        "val-every": 1,
        "samples-per-class": 2,
        "final-samples": 10,
        "log-every": 50,
        "holdout": 0.1,
        "seed": 0,
        "threads": 1,
        "progress": False,
    },
}


def settings_for(corpus: str) -> dict[str, Any]:
    if corpus == "demo":
        preset = get_preset("default")
        # the default preset's prior, scored on more samples
        return {
            "simulate": dict(preset.simulate),
            "classifier": dict(preset.classifier),
            "prior": {**preset.prior, "final-samples": 10},
        }
    return json.loads(json.dumps(BENCHMARK20))


def _relative(obj: Any, work: Path) -> Any:
    """``obj`` with every absolute path under ``work`` written as ``<work>/...`` (strings in dicts/lists)."""
    roots = sorted({str(work.resolve()), str(work.absolute())}, key=len, reverse=True)
    text = json.dumps(obj)
    for root in roots:
        text = text.replace(json.dumps(root)[1:-1], "<work>")
    return json.loads(text)


@contextlib.contextmanager
def _inside(folder: Path):
    old = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def build(corpus: str, work: Path, with_prior: bool = True) -> dict[str, list[str]]:
    """Run the missing steps inside ``work``; returns the command of each step (paths relative to ``work``)."""
    s = settings_for(corpus)
    res = int(s["simulate"].get("resolution", 64))
    sim, clf, prior = Path("sim"), Path("classifier"), Path("prior")
    corpus_npz = sim / "stimuli" / "corpus.npz"
    commands = {
        "simulate": ["simulate", "--out", str(sim), "--overwrite", *_args(s["simulate"])],
        "classifier": [
            "train-classifier",
            "--corpus",
            str(corpus_npz),
            "--exclude-test",
            str(sim / "GOD" / f"images_{res}.npz"),
            "--out",
            str(clf),
            *_args(s["classifier"]),
        ],
        "prior": [
            "train-prior",
            "--corpus",
            str(corpus_npz),
            "--out",
            str(prior),
            "--classifier",
            str(clf),
            "--resolution",
            str(res),
            *_args(s["prior"]),
        ],
    }
    work.mkdir(parents=True, exist_ok=True)
    with _inside(work):
        if not corpus_npz.is_file():  # simulate writes atomically: the corpus is complete or absent
            run_cli(commands["simulate"])
        if not (clf / "config.json").is_file():
            run_cli(commands["classifier"])
        if with_prior and not (prior / "metrics.json").is_file():
            resume = (
                ["--resume"] if any(prior.rglob("*.ckpt")) else (["--overwrite"] if prior.exists() else [])
            )
            run_cli(commands["prior"] + resume)
    return commands


def evaluate(corpus: str, work: Path, test_images: int = 2000, per_class: int = 10) -> dict[str, Any]:
    """Score the judge and (when present) the prior of ``work`` without training anything."""
    import numpy as np

    from mindvis.data.stimuli import make_stimulus_set
    from mindvis.eval.classifier import BenchmarkClassifier
    from mindvis.train.prior import class_sample_accuracy, classifier_callable, evaluate_vq, load_image_corpus

    s = settings_for(corpus)
    res = int(s["simulate"].get("resolution", 64))
    out: dict[str, Any] = {}
    with _inside(work):
        judge = BenchmarkClassifier.load("classifier")
        source = s["simulate"].get("source", "fashion-mnist")
        images, labels, _ = make_stimulus_set(test_images, res, seed=1, source=source, split="test")
        pred = judge.predict(images).probs.argmax(1)
        out["judge"] = {
            "held_out_accuracy": judge.info.get("held_out_accuracy"),
            "held_out_by_object": bool(judge.info.get("holdout_by_object", False)),
            "n_holdout": judge.info.get("n_holdout"),
            "train_seconds": judge.info.get("train_seconds"),
            "config": dataclasses.asdict(judge.config),
            "test_split_accuracy": float((pred == labels).mean()),
            "test_split_images": int(test_images),
            "test_split_note": "composites of the source's test-split objects (never trained on), seed 1",
        }
        pipeline = Path("prior") / "pipeline"
        if pipeline.is_dir():
            from mindvis.pipeline import MindVisPipeline

            corpus_ = load_image_corpus(Path("sim") / "stimuli" / "corpus.npz", res)
            fn = classifier_callable(judge, corpus_.class_names)
            ps = s["prior"]
            _, held = corpus_.split(float(ps.get("holdout", 0.1)), int(ps.get("seed", 0)))
            model = MindVisPipeline.from_pretrained(pipeline).model
            vq = evaluate_vq(model.vq, np.asarray(held.images), labels=held.labels, classifier=fn)
            vq["judge_accuracy_kept"] = vq["class_accuracy_reconstructions"] / max(
                vq["class_accuracy_images"], 1e-9
            )
            out["vq"] = vq
            out["class_samples"] = class_sample_accuracy(
                model,
                fn,
                corpus_.class_names,
                per_class,
                int(ps.get("steps", 50)),
                str(ps.get("sampler", "ddim")),
                guidance_scale=float(ps.get("guidance", 1.0)),
            )
        write_json("evaluation.json", _relative(out, work))
    return out


def write_artifact(corpus: str, work: Path, out: Path, commands: dict[str, list[str]]) -> int:
    prior = work / "prior"
    metrics = _relative(read_json(prior / "metrics.json"), work)
    judge = _relative(read_json(work / "classifier" / "config.json"), work)
    name = "prior-small" if corpus == "demo" else "prior-fashion-animal"
    with atomic_dir(out, overwrite=True) as tmp:
        shutil.copytree(prior / "pipeline", tmp / "pipeline")
        write_json(tmp / "metrics.json", metrics)
        for grid in sorted(prior.glob("*.png")):
            shutil.copy2(grid, tmp / grid.name)
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        record = {
            "name": name,
            "description": (
                "tiny class-conditional DCLDM (VQ-f4 + UNet) trained on the demo's default-preset "
                "SynthCortex stimulus corpus"
                if corpus == "demo"
                else "class-conditional DCLDM (VQ-f4 + UNet) trained on the 20-class fashion+animal "
                "SynthCortex stimulus corpus"
            ),
            "mindvis_version": __version__,
            **provenance(),
            "command": "mindvis " + " ".join(commands["prior"]),
            "simulate": "mindvis " + " ".join(commands["simulate"]),
            "classifier": "mindvis " + " ".join(commands["classifier"]),
            "paths": "relative to the build's work folder",
            "corpus_sha256": file_sha256(work / "sim" / "stimuli" / "corpus.npz"),
            "judge": {
                k: judge.get(k)
                for k in ("held_out_accuracy", "holdout_by_object", "n_holdout", "train_seconds")
            },
            "resolution": metrics.get("resolution"),
            "bytes": size,
            "metrics": metrics,
        }
        evaluation = work / "evaluation.json"
        if evaluation.is_file():
            record["evaluation"] = read_json(evaluation)
        write_json(tmp / "ARTIFACT.json", _relative(record, work))
    print(f"prior artifact written to {out} ({size / 1e6:.1f} MB)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--corpus", choices=("demo", "fashion+animal"), default="demo", help="which prior to build"
    )
    ap.add_argument("--work", type=Path, default=None, help="working folder (kept for reuse and resuming)")
    ap.add_argument("--out", type=Path, default=None, help="where the artifact goes")
    ap.add_argument("--no-prior", action="store_true", help="stop after the corpus and the judge")
    ap.add_argument(
        "--evaluate-only", action="store_true", help="train nothing; score the judge and prior in --work"
    )
    args = ap.parse_args()
    work = args.work or Path("build/prior" if args.corpus == "demo" else "build/prior20")
    out = args.out or (SHIPPED_PRIOR if args.corpus == "demo" else work / "artifact")
    if args.evaluate_only:
        result = evaluate(args.corpus, work)
        print(json.dumps(_relative(result, work), indent=1)[:4000])
        return 0
    commands = build(args.corpus, work, with_prior=not args.no_prior)
    if args.no_prior:
        print(f"corpus and judge in {work}")
        return 0
    if args.corpus != "demo":
        evaluate(args.corpus, work)
    return write_artifact(args.corpus, work, out, commands)


if __name__ == "__main__":
    sys.exit(main())
