"""Build the embedded benchmark's two stand-ins: the image prior and the judge (``src/mindvis/assets/synthcortex-20``).

They play the parts of the original's ImageNet label2img LDM and ViT-H/14 classifier. The build runs four
``mindvis`` commands in a work folder: ``simulate --source fashion+animal`` writes a 60k-image composite corpus of
all of Fashion-MNIST and Animal-MNIST (20 classes, training-split objects only), ``train-classifier --preset
judge`` trains the judge, ``train-classifier --preset small --seed 1`` a second CNN whose features give the VQ's
perceptual loss (the original's LPIPS needs ImageNet weights), and ``train-prior`` the VQ-f4 +
class-conditional UNet. Then the artifact is written:
the pipeline and the judge (float16 weights), the training metrics, ``ARTIFACT.json`` (the exact commands, the
corpus hash, the wall times) and the evaluation of exactly the shipped weights on composites of the sources'
never-seen test-split objects (:mod:`mindvis.eval.prior_benchmark`: the judge's accuracy and confusion matrix,
the VQ's reconstructions, the class samples without and with guidance, the denoising loss's class signal).

Every step runs in the work folder with paths relative to it, so nothing written records an absolute path. Steps
already done are skipped, an interrupted judge or prior resumes from its last epoch: rerunning the same command
continues where it stopped. Training takes hours on 2 CPU cores; run it with ``nice`` in the background.

Usage::

    python scripts/build_prior.py --work build/synthcortex-20 [--out src/mindvis/assets/synthcortex-20] [--no-prior]
    python scripts/build_prior.py --work build/synthcortex-20 --evaluate-only
    python scripts/build_prior.py --evaluate-only --artifact src/mindvis/assets/synthcortex-20 --report build/eval
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from mindvis import __version__
from mindvis.cli import app
from mindvis.errors import MindVisError
from mindvis.utils.io import (
    atomic_dir,
    atomic_write,
    check_output_apart,
    file_sha256,
    read_json,
    safetensors_bytes,
    write_json,
)
from mindvis.utils.steps import provenance


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
    """Run one ``mindvis`` command in this process (the build records each step as its command line, for
    ``ARTIFACT.json``); a command that stops early (SystemExit other than 0, as Lightning's graceful stop on
    SIGTERM raises) is an error, so the step is not taken as done."""
    print("$ mindvis " + " ".join(args), flush=True)
    try:
        rc = app(args=args, prog_name="mindvis", standalone_mode=False)
    except SystemExit as exc:
        if exc.code == 0:
            return
        raise MindVisError(
            f"`mindvis {' '.join(args)}` stopped before finishing (exit code {exc.code})"
        ) from None
    if isinstance(rc, int) and rc != 0:  # click returns the code of typer.Exit when not standalone
        raise MindVisError(f"`mindvis {' '.join(args)}` exited with code {rc}")


#: The 20-class benchmark build: every setting of its four commands.
BENCHMARK20: dict[str, Any] = {
    "simulate": {
        "seed": 0,
        "source": "fashion+animal",
        "rest-subjects": 0,
        "resolution": 32,
        "corpus-size": 60000,
    },
    "classifier": {"preset": "judge", "threads": 1},
    # the perceptual term of the VQ's loss (no ImageNet LPIPS backbone here): a CNN other than the judge
    "perceptual": {"preset": "small", "seed": 1, "threads": 1},
    "prior": {
        "preset": "tiny",
        "vq": ["n_embed=512", "norm_groups=8"],
        "unet": ["model_channels=64", "norm_groups=8"],
        "vq-epochs": 6,
        "perceptual-classifier": "perceptual",
        "vq-batch-size": 32,
        "vq-lr": 0.0005,
        "unet-epochs": 16,
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


def settings_for(corpus: str = "fashion+animal") -> dict[str, Any]:
    """The settings of the build's four commands (a copy; ``fashion+animal`` is the only corpus)."""
    if corpus != "fashion+animal":
        raise SystemExit(f"unknown corpus {corpus!r}: this script builds the fashion+animal stand-ins")
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
    sim, clf, prior, perceptual = Path("sim"), Path("classifier"), Path("prior"), Path("perceptual")
    corpus_npz = sim / "stimuli" / "corpus.npz"

    def classifier_command(out: Path, settings: dict[str, Any]) -> list[str]:
        exclude = sim / "GOD" / f"images_{res}.npz"  # the subject's test images are never trained on
        return [
            "train-classifier",
            "--corpus",
            str(corpus_npz),
            "--exclude-test",
            str(exclude),
            "--out",
            str(out),
        ] + _args(settings)

    commands = {
        "simulate": ["simulate", "--out", str(sim), "--overwrite", *_args(s["simulate"])],
        "classifier": classifier_command(clf, s["classifier"]),
        "perceptual": classifier_command(perceptual, s["perceptual"]),
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
            _timed("simulate", lambda: run_cli(commands["simulate"]))
        if not (clf / "config.json").is_file():  # resumes from clf/training-state.pt when interrupted
            _timed("classifier", lambda: run_cli(commands["classifier"]))
        if with_prior and not (perceptual / "config.json").is_file():
            _timed("perceptual", lambda: run_cli(commands["perceptual"]))
        if with_prior and not (prior / "metrics.json").is_file():
            resume = (
                ["--resume"] if any(prior.rglob("*.ckpt")) else (["--overwrite"] if prior.exists() else [])
            )
            _timed("prior", lambda: run_cli(commands["prior"] + resume))
    return commands


#: Wall seconds of each step, summed over the sessions of a resumed build (in the work folder).
TIMES_FILE = "wall_seconds.json"


def _timed(step: str, fn: Any) -> None:
    """Run ``fn`` and add its wall time to ``TIMES_FILE`` (also when it is interrupted, as far as it got)."""
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        times = read_json(TIMES_FILE) if Path(TIMES_FILE).is_file() else {}
        times[step] = round(float(times.get(step, 0.0)) + time.perf_counter() - t0, 1)
        write_json(TIMES_FILE, times)


def evaluate(corpus: str, folder: Path, out: Path | None = None) -> dict[str, Any]:
    """Score the judge (``folder/classifier``) and, when present, the prior (``folder/prior/pipeline`` or
    ``folder/pipeline``) of a work folder or a built artifact, without training anything
    (:func:`mindvis.eval.prior_benchmark.evaluate_stand_ins`: never-seen test-split composites). The result and
    its figures go to ``out`` (default ``folder/evaluation``)."""
    from mindvis.eval.prior_benchmark import evaluate_stand_ins

    s = settings_for(corpus)
    ps = s["prior"]
    pipeline = next((p for p in (folder / "prior" / "pipeline", folder / "pipeline") if p.is_dir()), None)
    return evaluate_stand_ins(
        folder / "classifier",
        pipeline,
        str(s["simulate"].get("source", "fashion-mnist")),
        int(s["simulate"].get("resolution", 64)),
        out or folder / "evaluation",
        guidance_scale=float(ps.get("guidance", 3.0)),
        sampler=str(ps.get("sampler", "ddim")),
        steps=int(ps.get("steps", 50)),
    )


def _half_precision(folder: Path) -> None:
    """Store every float32 tensor of the ``*.safetensors`` files under ``folder`` as float16 (halves the
    artifact; the readers cast floats to the model's dtype). The evaluation scores these shipped weights."""
    import torch
    from safetensors.torch import load_file

    for path in sorted(folder.rglob("*.safetensors")):
        tensors = load_file(str(path))
        half = {k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}
        with atomic_write(path) as fh:
            fh.write(safetensors_bytes(half))


def write_artifact(corpus: str, work: Path, out: Path, commands: dict[str, list[str]], seconds: dict) -> int:
    """The shipped folder: the prior's pipeline and the judge (float16 weights), the training metrics, the
    evaluation of exactly these weights with its figures, and ``ARTIFACT.json`` (commands, corpus hash, wall
    times, the figures), with no absolute path."""
    prior = work / "prior"
    metrics = _relative(read_json(prior / "metrics.json"), work)
    judge = _relative(read_json(work / "classifier" / "config.json"), work)
    s = settings_for(corpus)
    with atomic_dir(out, overwrite=True) as tmp:
        shutil.copytree(prior / "pipeline", tmp / "pipeline")
        shutil.copytree(work / "classifier", tmp / "classifier")
        _half_precision(tmp / "pipeline")
        write_json(tmp / "metrics.json", metrics)
        evaluation = evaluate(corpus, tmp, tmp / "evaluation")
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        record = {
            "name": out.name,
            "description": "the embedded benchmark's stand-ins for label2img and ViT-H/14: a class-conditional "
            f"DCLDM (VQ-f4 + UNet) and the judge, trained on the {len(judge['class_names'])}-class "
            f"{s['simulate'].get('source')} SynthCortex stimulus corpus",
            "mindvis_version": __version__,
            **provenance(),
            "source": s["simulate"].get("source"),
            "resolution": metrics.get("resolution"),
            "class_names": judge["class_names"],
            "command": "mindvis " + " ".join(commands["prior"]),
            "simulate": "mindvis " + " ".join(commands["simulate"]),
            "classifier": "mindvis " + " ".join(commands["classifier"]),
            "perceptual": "mindvis " + " ".join(commands["perceptual"]),
            "paths": "relative to the build's work folder",
            "corpus_sha256": file_sha256(work / "sim" / "stimuli" / "corpus.npz"),
            "wall_seconds": seconds,
            "weights": "float16 (trained in float32)",
            "judge": {
                k: judge.get(k)
                for k in ("held_out_accuracy", "holdout_by_object", "n_holdout", "train_seconds")
            },
            "evaluation": {k: v for k, v in evaluation.items() if k != "figures"},
            "bytes": size,
            "metrics": metrics,
        }
        write_json(tmp / "ARTIFACT.json", _relative(record, work))
    print(f"artifact written to {out} ({size / 1e6:.1f} MB)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--corpus", choices=("fashion+animal",), default="fashion+animal", help="the stimulus corpus"
    )
    ap.add_argument(
        "--work", type=Path, default=Path("build/synthcortex-20"), help="working folder (kept for resuming)"
    )
    ap.add_argument("--out", type=Path, default=None, help="where the artifact goes [WORK/artifact]")
    ap.add_argument("--no-prior", action="store_true", help="stop after the corpus and the judge")
    ap.add_argument(
        "--evaluate-only",
        action="store_true",
        help="train nothing: score the judge and prior of --work (or of --artifact) into --report",
    )
    ap.add_argument(
        "--artifact", type=Path, default=None, help="with --evaluate-only: a built artifact folder"
    )
    ap.add_argument("--report", type=Path, default=None, help="with --evaluate-only: where results go")
    args = ap.parse_args()
    work = args.work
    if args.evaluate_only:
        folder = args.artifact or work
        report = args.report or (work / "evaluation" if args.artifact is None else None)
        if report is None:
            raise SystemExit("--artifact needs --report: an artifact is never written to")
        check_output_apart(report, {"--artifact": args.artifact})
        result = evaluate(args.corpus, folder, report)
        print(json.dumps({k: v for k, v in result.items() if k != "figures"}, indent=1)[:4000])
        print(f"evaluation and figures written to {report}")
        return 0
    commands = build(args.corpus, work, with_prior=not args.no_prior)
    if args.no_prior:
        print(f"corpus and judge in {work}")
        return 0
    times = read_json(work / TIMES_FILE) if (work / TIMES_FILE).is_file() else {}
    return write_artifact(args.corpus, work, args.out or work / "artifact", commands, times)


if __name__ == "__main__":
    sys.exit(main())
