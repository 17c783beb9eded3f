"""Rebuild the image prior that ``mindvis demo`` ships with (``src/mindvis/assets/prior-small``).

The demo's ``default`` preset simulates its data with a fixed seed, so its stimulus corpus is the same file on
every machine. This script simulates that corpus, trains the benchmark classifier and the prior on it with
``mindvis train-prior``, and copies the prior's pipeline, metrics and sample grid into the assets folder with an
``ARTIFACT.json`` that records the command, the corpus sha256 and the figures. The demo uses the shipped prior
only when its own corpus has the same sha256; otherwise it trains one with the same settings (as with
``mindvis demo --train-prior``).

Usage::

    python scripts/build_prior.py [--work build/prior]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from mindvis import __version__
from mindvis.demo import SHIPPED_PRIOR, _args, get_preset, run_cli
from mindvis.utils.io import atomic_dir, file_sha256, read_json, write_json
from mindvis.utils.steps import provenance


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("build/prior"), help="working folder (kept for reuse)")
    ap.add_argument("--out", type=Path, default=SHIPPED_PRIOR, help="where the artifact goes")
    args = ap.parse_args()

    preset = get_preset("default")
    sim, clf, prior = args.work / "sim", args.work / "classifier", args.work / "prior"
    corpus = sim / "stimuli" / "corpus.npz"
    if not corpus.is_file():
        run_cli(["simulate", "--out", str(sim), "--overwrite", *_args(preset.simulate)])
    res = int(preset.simulate.get("resolution", 64))
    if not (clf / "config.json").is_file():
        run_cli(
            [
                "train-classifier",
                "--corpus",
                str(corpus),
                "--exclude-test",
                str(sim / "GOD" / f"images_{res}.npz"),
                "--out",
                str(clf),
                *_args(preset.classifier),
            ]
        )
    settings = {**preset.prior, "final-samples": 10}  # the default preset's prior, scored on more samples
    command = ["train-prior", "--corpus", str(corpus), "--out", str(prior), "--classifier", str(clf)]
    command += ["--resolution", str(res)]
    command += _args(settings)
    resume = ["--resume"] if any(prior.rglob("*.ckpt")) else (["--overwrite"] if prior.exists() else [])
    run_cli(command + resume)

    metrics = read_json(prior / "metrics.json")
    with atomic_dir(args.out, overwrite=True) as tmp:
        shutil.copytree(prior / "pipeline", tmp / "pipeline")
        shutil.copy2(prior / "metrics.json", tmp / "metrics.json")
        for grid in sorted(prior.glob("*.png")):
            shutil.copy2(grid, tmp / grid.name)
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        write_json(
            tmp / "ARTIFACT.json",
            {
                "name": "prior-small",
                "description": "tiny class-conditional DCLDM (VQ-f4 + UNet) trained on the demo's default-preset "
                "SynthCortex stimulus corpus",
                "mindvis_version": __version__,
                **provenance(),
                "command": "mindvis " + " ".join(command).replace(str(args.work), "<work>"),
                "simulate": "mindvis simulate " + " ".join(_args(preset.simulate)),
                "corpus_sha256": file_sha256(corpus),
                "resolution": res,
                "bytes": size,
                "metrics": metrics,
            },
        )
    print(f"shipped prior written to {args.out} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
