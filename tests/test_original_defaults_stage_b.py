"""``mindvis train`` (stage B) follows the original by default where a user would notice.

Each behaviour is pinned on a tiny input, and ours stays an option:

* sparse voxel dropout: the original's is a no-op (default ``--sparse-rate 0``); ours drops 20 % (``0.2``);
* the GOD subject: the original trains on ``sbj_3`` (default for ``--dataset god``); the others take the first;
* validation: the original's quick pass (5 items x 3 samples) with a full pass above 0.15 top-1 or every 15th
  validation (default ``--val-schedule original``); ours is a full pass every time (``full``).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mindvis.data.paired import PairedFMRIDataset
from mindvis.train import ldm as ldm_mod
from mindvis.train.config import QUICK_PREFIX, StageBConfig
from mindvis.train.ldm import (
    ORIGINAL_GOD_SUBJECT,
    StageBModule,
    StageBResult,
    default_subject,
    train_stage_b,
)
from mindvis.train.stage_b_validation import full_pass_trigger
from test_formats_god import write_god
from test_train_ldm import (  # noqa: F401 - the module-scoped fixtures are used by name
    _config,
    _datasets,
    _one_thread,
    _trainer,
    mbm_dir,
    prior_dir,
)


def _train_option(name: str):
    """The click parameter of ``mindvis train`` called ``name``."""
    import typer

    from mindvis.cli import app

    command = typer.main.get_command(app).commands["train"]
    return next(p for p in command.params if p.name == name)


def _words(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------------------
# 2. sparse voxel dropout
# ----------------------------------------------------------------------------------------------------------


def _original_fmri_transform(x: np.ndarray, sparse_rate: float = 0.2) -> np.ndarray:
    """The original's stage B ``fmri_transform`` (code/stageB_ldm_finetune.py), seeded numpy as it is there."""
    x_aug = x.copy()
    idx = np.random.choice(x.shape[0], int(x.shape[0] * sparse_rate), replace=False)
    x_aug[idx] = 0
    return x_aug


def test_sparse_dropout_default_is_the_originals_no_op():
    rng = np.random.default_rng(0)
    voxels = rng.normal(size=(6, 40)).astype(np.float32) + 5.0  # no voxel is 0 by chance
    # the original hands it one sample as a (1, V) array: it picks int(0.2 * 1) = 0 rows, nothing changes
    np.random.seed(0)
    for row in voxels:
        assert np.array_equal(_original_fmri_transform(row[None]), row[None])

    tr, _ = _datasets()
    images = np.zeros((tr.num_samples, 8, 8, 3), np.uint8)
    ids = np.arange(tr.num_samples)

    def training_set(cfg: StageBConfig) -> PairedFMRIDataset:
        return PairedFMRIDataset(voxels, images, ids[: len(voxels)], 8, train=True, augment=cfg.augment)

    default = training_set(StageBConfig())  # the default: the original's behaviour
    for _ in range(3):
        for i in range(len(voxels)):
            assert np.array_equal(default[i]["fmri"].numpy(), voxels[i])
    ours = training_set(StageBConfig(sparse_rate=0.2))  # ours, an option: int(0.2 * 40) = 8 voxels dropped
    for i in range(len(voxels)):
        assert int((ours[i]["fmri"] == 0).sum()) == 8

    opt = _train_option("sparse_rate")
    assert opt.default == 0.0
    assert "original's behaviour" in _words(opt.help) and "0.2" in opt.help


# ----------------------------------------------------------------------------------------------------------
# 6. the default GOD subject
# ----------------------------------------------------------------------------------------------------------


def test_default_god_subject_is_the_originals(tmp_path, caplog):
    with_3, without_3 = tmp_path / "with3", tmp_path / "without3"
    write_god(with_3, subjects=(1, 3))
    write_god(without_3, subjects=(1, 2))
    assert ORIGINAL_GOD_SUBJECT == "sbj_3"
    assert default_subject("god", with_3) == "sbj_3"
    assert default_subject("GOD", with_3) == "sbj_3"
    with caplog.at_level(logging.WARNING, logger="mindvis.train.ldm"):
        assert default_subject("god", without_3) == "sbj_1"  # fall back to the first, saying so
    assert "sbj_3" in caplog.text and "--subject" in caplog.text
    for other in ("synthetic", "bold5000", "nsd", "nifti"):  # the other datasets keep the reader's first
        assert default_subject(other, with_3) is None
    assert "sbj_3" in _words(_train_option("subject").help)


def test_train_cli_uses_sbj_3_and_the_original_defaults(tmp_path, monkeypatch):
    from mindvis.cli import main

    folder = tmp_path / "GOD"
    write_god(folder, subjects=(1, 3))
    seen = {}

    def fake_train(prior, mbm, train, test, out, config, *args, **kwargs):
        seen.update(train=train.subject, test=test.subject, config=config)
        return StageBResult(Path(out), "val/ident_pcc_2way", None, {}, 1, 1, 0, 0, 0.0)

    monkeypatch.setattr(ldm_mod, "train_stage_b", fake_train)
    args = ["train", "--prior", tmp_path / "p", "--mbm", tmp_path / "m", "--out", tmp_path / "o"]
    assert main([str(a) for a in [*args, "--dataset", "god", "--data-dir", folder]]) == 0
    assert seen["train"] == seen["test"] == "sbj_3"
    cfg = seen["config"]
    assert (cfg.sparse_rate, cfg.val_schedule, cfg.val_every) == (0.0, "original", 5)
    given = [*args, "--dataset", "god", "--data-dir", folder, "--subject", "1", "--overwrite"]
    given += ["--sparse-rate", "0.2", "--val-schedule", "full"]
    assert main([str(a) for a in given]) == 0
    assert seen["train"] == "sbj_1" and (seen["config"].sparse_rate, seen["config"].val_schedule) == (
        0.2,
        "full",
    )


# ----------------------------------------------------------------------------------------------------------
# 7. the validation schedule
# ----------------------------------------------------------------------------------------------------------


def test_full_pass_trigger_is_the_originals_threshold():
    clf50 = SimpleNamespace(class_names=[str(i) for i in range(100)])
    n_way = (2, 10, 50)
    key = f"{QUICK_PREFIX}semantic_50way_top1"
    # the original: full pass when the quick pass's 50-way top-1 (best of its sample slots) exceeds 0.15
    for value, want in ((0.16, True), (0.15, False), (0.14, False)):
        got = full_pass_trigger({key: 0.0, f"{key}_best": value}, n_way, clf50)
        assert got == (f"{key}_best", value, want)
    assert full_pass_trigger({key: 0.2}, n_way, clf50)[2]  # a single sample: its mean
    # other n, and the 2-way identification that stands in without a classifier: the same distance above
    # chance, (0.15 - 1/50) / (1 - 1/50) of the way from chance to perfect
    clf10 = SimpleNamespace(class_names=[str(i) for i in range(10)])
    k10 = f"{QUICK_PREFIX}semantic_10way_top1_best"
    assert (
        not full_pass_trigger({k10: 0.21}, n_way, clf10)[2]
        and full_pass_trigger({k10: 0.23}, n_way, clf10)[2]
    )
    ident = f"{QUICK_PREFIX}ident_pcc_2way_best"
    assert not full_pass_trigger({ident: 0.55}, n_way, None)[2]
    assert full_pass_trigger({ident: 0.6}, n_way, None)[2]
    assert full_pass_trigger({}, n_way, None) is None  # no figure (no ground truth): no full pass
    opt = _train_option("val_schedule")
    assert opt.default == "original" and "(the original's)" in _words(opt.help)


def _logged(run: Path) -> dict[str, dict[int, float]]:
    """``{column: {epoch: value}}`` of metrics.csv."""
    out: dict[str, dict[int, float]] = {}
    with (run / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            for k, v in row.items():
                if v not in ("", None) and k != "epoch":
                    out.setdefault(k, {})[int(float(row["epoch"]))] = float(v)
    return out


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_original_validation_schedule_on_a_tiny_run(prior_dir, mbm_dir, tmp_path, monkeypatch):  # noqa: F811
    calls: list[tuple[int, int, int]] = []  # (epoch, items, samples) of every generation
    generate = StageBModule.generate

    def spy(self, fmri, index, num_samples=None):
        images = generate(self, fmri, index, num_samples)
        calls.append((self.current_epoch, len(index), images.shape[1]))
        return images

    decisions = iter([False, True])  # the quick passes' verdicts: the first below the threshold, then above
    trigger = full_pass_trigger

    def fake_trigger(quick, *args):
        key, value, _ = trigger(quick, *args)
        return key, value, next(decisions)

    monkeypatch.setattr(StageBModule, "generate", spy)
    monkeypatch.setattr(ldm_mod, "full_pass_trigger", fake_trigger)
    tr, te = _datasets(n_test=7)
    out = tmp_path / "run"
    # the defaults: a quick pass of 5 items x 3 samples, full passes of every item x num_samples (5)
    cfg = _config(epochs=5, num_samples=5, full_val_every=3)
    assert cfg.val_schedule == "original" and (cfg.quick_items, cfg.quick_samples) == (5, 3)  # the defaults
    result = train_stage_b(prior_dir, mbm_dir, tr, te, out, cfg, _trainer())

    full, quick = (7, 5), (5, 3)  # (items, samples): every item x num_samples; the first 5 items x 3 samples
    per_epoch = {e: [c[1:] for c in calls if c[0] == e] for e in range(5)}
    assert per_epoch == {
        0: [full],  # the first of the run (not in the original: the best checkpoint needs a figure)
        1: [quick],  # quick, below the threshold: no full pass
        2: [full],  # every full_val_every-th validation: the full pass alone
        3: [quick, full],  # quick, above the threshold: the full pass follows
        4: [full],  # the last validation of the run (the original generates the whole test set at the end)
    }
    logged = _logged(out)
    assert set(logged["val/ident_pcc_2way"]) == {0, 2, 3, 4}  # val/<key>: full passes only
    assert set(logged[f"{QUICK_PREFIX}ident_pcc_2way"]) == {1, 3}
    assert set(logged["val/loss"]) == {0, 1, 2, 3, 4}  # every validation, every item
    names = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert names == [
        "epoch0000.png",
        "epoch0001-quick.png",
        "epoch0002.png",
        "epoch0003-quick.png",
        "epoch0003.png",
        "epoch0004.png",
    ]
    # the best checkpoint is chosen among the full passes, whose figures are comparable
    assert result.monitor == "val/ident_pcc_2way"
    assert result.best == pytest.approx(max(logged["val/ident_pcc_2way"].values()))
    assert result.metrics["val/ident_pcc_2way"] == pytest.approx(logged["val/ident_pcc_2way"][4])
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["mindvis_val_count"] == 5


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_full_validation_schedule_stays_an_option(prior_dir, mbm_dir, tmp_path, monkeypatch):  # noqa: F811
    calls: list[tuple[int, int]] = []
    generate = StageBModule.generate

    def spy(self, fmri, index, num_samples=None):
        images = generate(self, fmri, index, num_samples)
        calls.append((len(index), images.shape[1]))
        return images

    monkeypatch.setattr(StageBModule, "generate", spy)
    tr, te = _datasets(n_test=7)
    cfg = _config(epochs=3, num_samples=5, val_schedule="full")
    train_stage_b(prior_dir, mbm_dir, tr, te, tmp_path / "run", cfg, _trainer())
    assert calls == [(7, 5)] * 3  # every validation: every item x num_samples
    logged = _logged(tmp_path / "run")
    assert set(logged["val/ident_pcc_2way"]) == {0, 1, 2}
    assert not any(k.startswith(QUICK_PREFIX) for k in logged)
