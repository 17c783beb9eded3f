"""How many labelled trials does the context warm start need, and does stage A pretraining lower that number?

For each label budget N (balanced over the classes of the training split), this runs the stage B context warm
start (``mindvis train --align-epochs``; :func:`mindvis.train.align.align_context`) for a fixed number of steps
from three encoders, and scores the nearest-class accuracy of the test fMRI's context:

* ``pretrained``: the stage A encoder, trained with the conditioner;
* ``random``: an encoder of the same size with random weights (the "no pretraining" ablation);
* ``frozen``: the stage A encoder kept fixed, only the conditioner trained (how far the pretrained tokens go
  on their own);

and, as the linear reference, a ridge classifier on the preprocessed voxels with the same N trials (penalty
chosen by exact leave-one-out error on those N). The test split is the one stage B validates on.

Usage::

    python scripts/label_budget.py RUN_DIR [--budgets 50,100,200,400,1200] [--steps 2000] [--seeds 0]

``RUN_DIR`` is a ``mindvis demo`` run folder (its ``sim``, ``stage_a2`` and ``prior/pipeline`` are used), or
give ``--data-dir``, ``--mbm`` and ``--prior`` separately. Rows are appended to ``--out`` (JSON) as they finish,
so an interrupted run continues where it stopped; a Markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ENCODERS = ("pretrained", "random", "frozen", "ridge")


class _Frozen(nn.Module):
    """The encoder's forward pass without gradients; its parameters are hidden from the warm start's optimiser."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self._inner = [encoder.eval()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._inner[0](x)


def balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of ``n // K`` trials of each of the ``K`` classes, drawn without replacement."""
    classes = np.unique(labels)
    per = n // len(classes)
    counts = np.bincount(labels)[classes]
    if per < 1 or per > counts.min():
        raise SystemExit(
            f"label budget {n}: expected 1 to {counts.min()} trials per class ({len(classes)} classes)"
        )
    rng = np.random.default_rng(seed)
    return np.sort(
        np.concatenate([rng.choice(np.flatnonzero(labels == k), per, replace=False) for k in classes])
    )


def ridge_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Test accuracy of kernel ridge onto one-hot labels, the probe's readout (:func:`probe_level`)."""
    from mindvis.eval.probe import probe_level

    return float(
        probe_level("voxels", "input", x_train, x_test, (y_train, y_test), (None, None)).class_accuracy
    )


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], int]:
    """Run the missing rows; returns all rows of ``args.out`` and the prior's class count."""
    from mindvis.data.formats.registry import load_dataset
    from mindvis.data.preprocess import find_preprocessing, load_preprocessor, prepare_voxels
    from mindvis.models.ldm import prior_class_table
    from mindvis.train.align import align_context
    from mindvis.train.config import StageBConfig
    from mindvis.train.stage_b_model import (
        build_encoder,
        build_stage_b_model,
        fit_token_stats,
        load_prior,
        prior_context_std,
    )
    from mindvis.utils.io import read_json, write_json

    train = load_dataset(args.dataset, args.data_dir, args.subject, "train")
    test = load_dataset(args.dataset, args.data_dir, args.subject or train.subject, "test")
    if train.labels is None or test.labels is None:
        raise SystemExit(f"{args.data_dir}: the warm start needs class labels of both splits")
    prior = load_prior(args.prior)
    class_table = prior_class_table(prior, source=args.prior)
    found = find_preprocessing(args.mbm)
    pre = None if found is None else load_preprocessor(found, subject=train.subject)
    shape = build_encoder(args.mbm, StageBConfig()).config  # every encoder here has the stage A input width
    x_tr, x_te, _ = prepare_voxels(train, test, shape.num_voxels, shape.patch_size, pre)
    rows: list[dict[str, Any]] = read_json(args.out) if args.out.is_file() else []
    done = {(r["budget"], r["encoder"], r["seed"], r["steps"]) for r in rows}
    for seed in args.seeds:
        for budget in args.budgets:
            idx = balanced_subset(np.asarray(train.labels), budget, seed)
            for kind in args.encoders:
                if (len(idx), kind, seed, args.steps) in done:
                    continue
                t0 = time.perf_counter()
                torch.manual_seed(
                    seed
                )  # the conditioner's initialisation: the same for a row run alone or resumed
                config = StageBConfig(
                    encoder_init="random" if kind == "random" else "pretrained",
                    standardize_tokens=True,
                    sparse_rate=args.sparse_rate,
                    batch_size=args.batch_size,
                    seed=seed,
                )
                y_tr = np.asarray(train.labels)[idx]
                row: dict[str, Any] = {"budget": len(idx), "encoder": kind, "seed": seed, "steps": args.steps}
                if kind == "ridge":
                    row["test_accuracy"] = ridge_accuracy(x_tr[idx], y_tr, x_te, np.asarray(test.labels))
                else:
                    model = build_stage_b_model(prior, build_encoder(args.mbm, config), config)
                    fit_token_stats(model, x_tr[idx], prior_context_std(prior))
                    if kind == "frozen":
                        model.fmri_encoder = _Frozen(model.fmri_encoder)
                    epochs = max(1, math.ceil(args.steps * args.batch_size / len(idx)))
                    result = align_context(
                        model,
                        x_tr[idx],
                        y_tr,
                        class_table,
                        epochs,
                        lr=args.lr,
                        batch_size=args.batch_size,
                        sparse_rate=args.sparse_rate,
                        seed=seed,
                        eval_sets={"test": (x_te, test.labels)},
                    )
                    row["train_accuracy"] = result["accuracy"]["train"]
                    row["test_accuracy"] = result["accuracy"]["test"]
                    row["final_loss"] = result["loss"][-1]
                row["seconds"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                write_json(args.out, rows)
                print(
                    f"N={row['budget']:5d} seed {seed} {kind:10s} test {row['test_accuracy']:.3f}"
                    + (f" train {row['train_accuracy']:.3f}" if "train_accuracy" in row else "")
                    + f" ({row['seconds']:.0f} s)",
                    flush=True,
                )
    return rows, int(class_table.shape[0])


def table(rows: list[dict[str, Any]], n_classes: int | None = None) -> str:
    """Markdown: one row per label budget, mean test accuracy (over seeds) per encoder."""
    budgets = sorted({r["budget"] for r in rows})
    kinds = [k for k in ENCODERS if any(r["encoder"] == k for r in rows)]
    out = "| labelled trials | " + " | ".join(kinds) + " |\n|---:|" + "---:|" * len(kinds) + "\n"
    for b in budgets:
        cells = []
        for k in kinds:
            acc = [r["test_accuracy"] for r in rows if r["budget"] == b and r["encoder"] == k]
            cells.append(f"{100 * np.mean(acc):.0f} % (n={len(acc)})" if acc else "-")
        out += f"| {b} | " + " | ".join(cells) + " |\n"
    if n_classes:
        out += f"\nChance: {100 / n_classes:.0f} %.\n"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, nargs="?", help="a mindvis demo run folder")
    ap.add_argument("--dataset", default="synthetic", help="dataset kind of --data-dir (default: synthetic)")
    ap.add_argument("--data-dir", type=Path, help="dataset folder (default: RUN_DIR/sim)")
    ap.add_argument("--subject", default=None, help="subject (default: the first)")
    ap.add_argument("--mbm", type=Path, help="stage A run folder (default: RUN_DIR/stage_a2)")
    ap.add_argument(
        "--prior", type=Path, help="class-conditional prior pipeline (default: RUN_DIR/prior/pipeline)"
    )
    ap.add_argument(
        "--budgets", default="50,100,200,400,1200", help="labelled training trials, comma-separated"
    )
    ap.add_argument("--encoders", default=",".join(ENCODERS), help=f"which of {','.join(ENCODERS)}")
    ap.add_argument("--seeds", default="0", help="seeds (subset draw and training), comma-separated")
    ap.add_argument("--steps", type=int, default=2000, help="warm-start optimiser steps at every budget")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (mindvis train --align-lr)")
    ap.add_argument(
        "--sparse-rate", type=float, default=0.2, help="sparse voxel dropout during the warm start"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    ap.add_argument(
        "--out", type=Path, default=Path("label_budget.json"), help="rows, appended as they finish"
    )
    args = ap.parse_args(argv)
    for name, sub in (("data_dir", "sim"), ("mbm", "stage_a2"), ("prior", "prior/pipeline")):
        if getattr(args, name) is None:
            if args.run_dir is None:
                ap.error(f"give RUN_DIR or --{name.replace('_', '-')}")
            setattr(args, name, args.run_dir / sub)
    args.budgets = [int(b) for b in args.budgets.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.encoders = args.encoders.split(",")
    if unknown := set(args.encoders) - set(ENCODERS):
        ap.error(f"--encoders: unknown {sorted(unknown)}; expected some of {','.join(ENCODERS)}")
    from mindvis.commands._options import set_threads

    set_threads(args.threads)
    rows, n_classes = run(args)
    print(table(rows, n_classes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
