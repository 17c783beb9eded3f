"""Stage A training (masked brain modeling through Lightning): recipe pieces, learning, resume, DDP, CLI errors.

Data are tiny files in the HCP / GOD layouts (see ``test_hcp.py``). Runs use the tiny model variant on the CPU.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mindvis.cli import main
from mindvis.data.preprocess import FMRIPreprocessor
from mindvis.data.pretrain import masking_noise
from mindvis.errors import CheckpointError, ConfigError
from mindvis.models.folder import load_safetensors
from mindvis.models.mbm import MaskedBrainModel, mbm_tiny
from mindvis.train.callbacks import CSVMetricsLogger
from mindvis.train.mbm import (
    MBMTrainConfig,
    masked_pearson,
    run_mbm_stage,
)
from mindvis.train.optim import WarmupCosine, param_groups_weight_decay
from mindvis.train.run_folder import read_checkpoint_progress
from test_hcp import write_god_subject, write_hcp_subject

REPO = Path(__file__).resolve().parents[1]


def write_lowrank_hcp(
    root: Path, subjects: int = 2, samples: int = 128, voxels: int = 64, seed: int = 0
) -> Path:
    """HCP-layout files whose frames are a shared rank-3 signal plus noise (masked patches are predictable).

    Used with ``window_trs=1``, so each frame is one sample.
    """
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((3, voxels))
    q = voxels // 4
    for s in range(subjects):
        x = (
            rng.standard_normal((samples, 3)) @ mixing + 0.2 * rng.standard_normal((samples, voxels))
        ).astype(np.float32)
        folder = root / "HCP" / "npz" / f"s{s}"
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(
            folder / "HCP_visual_voxel.npz",
            V1=x[:, :q],
            V2=x[:, q : 2 * q],
            V3=x[:, 2 * q : 3 * q],
            V4=x[:, 3 * q :],
        )
    return root / "HCP"


def tiny_config(hcp_dir: Path, **over) -> MBMTrainConfig:
    data = {
        "hcp_dir": str(hcp_dir),
        "patch_size": 8,
        "window_trs": 1,
        "val_fraction": 0.1,
        **over.pop("data", {}),
    }
    trainer = {
        "accelerator": "cpu",
        "devices": 1,
        "progress_bar": False,
        "log_every_n_steps": 4,
        **over.pop("trainer", {}),
    }
    return MBMTrainConfig.for_stage(
        "pretrain",
        **{"variant": "tiny", "epochs": 4, "batch_size": 16, "lr": 2e-3, **over},
        data=data,
        trainer=trainer,
    )


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(autouse=True)
def _fresh_cli_logging():
    """``mindvis.cli`` installs one stderr handler per process; drop it so that each test's capture sees logs."""
    import logging

    yield
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_mindvis", False)]:
        root.removeHandler(h)


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


def val_curve(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return [float(r["val/corr"]) for r in csv.DictReader(fh) if r.get("val/corr")]


# ----------------------------------------------------------------------------------------------------------
# recipe pieces
# ----------------------------------------------------------------------------------------------------------


def test_masking_noise_is_a_function_of_seed_epoch_index():
    a = masking_noise(1, 0, np.array([3, 7, 11]), 20)
    assert a.shape == (3, 20) and a.dtype == np.float64 and (a >= 0).all() and (a < 1).all()
    np.testing.assert_array_equal(masking_noise(1, 0, np.array([11, 3]), 20), a[[2, 0]])  # batch-independent
    assert not np.allclose(masking_noise(1, 1, np.array([3]), 20), a[0])
    assert not np.allclose(masking_noise(2, 0, np.array([3]), 20), a[0])
    big = masking_noise(0, 0, np.arange(2000), 50)
    assert abs(big.mean() - 0.5) < 0.01 and abs(np.corrcoef(big[:, 0], big[:, 1])[0, 1]) < 0.06
    assert len({tuple(np.argsort(r)[:5]) for r in big}) > 1990  # masks differ between samples


def test_masked_pearson_matches_numpy():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 6, 4, generator=g), torch.randn(3, 6, 4, generator=g)
    mask = (torch.rand(3, 6, generator=g) > 0.4).float()
    mask[:, 0] = 1
    got = masked_pearson(pred, target, mask)
    for n in range(3):
        sel = mask[n].bool()
        expect = np.corrcoef(pred[n][sel].flatten(), target[n][sel].flatten())[0, 1]
        assert got[n].item() == pytest.approx(expect, abs=1e-5)
    assert masked_pearson(target, target).tolist() == pytest.approx([1, 1, 1], abs=1e-6)
    assert masked_pearson(torch.zeros(1, 6, 4), target[:1]).item() == 0.0


def test_warmup_cosine_schedule():
    s = WarmupCosine(lr=1e-3, min_lr=1e-5, warmup_epochs=2, epochs=10, steps_per_epoch=5)
    assert s.lr_at(0) == 0.0
    assert s.lr_at(5) == pytest.approx(5e-4)
    assert s.lr_at(10) == pytest.approx(1e-3)
    assert s.lr_at(30) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # halfway through the cosine
    assert s.lr_at(50) == pytest.approx(1e-5)
    values = [s.lr_at(i) for i in range(10, 51)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert s(10) == pytest.approx(1.0)


def test_weight_decay_groups():
    model = MaskedBrainModel(mbm_tiny(64, patch_size=8))
    no_decay, decay = param_groups_weight_decay(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05
    assert "pos_embed" not in nd | d and "decoder_pos_embed" not in nd | d  # frozen tables are left out
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim <= 1 for n in nd)
    assert {"norm.weight", "blocks.0.norm1.weight", "decoder_pred.bias"} <= nd
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "cls_token", "mask_token"} <= d


def test_config_defaults_and_derived_values(tmp_path):
    a1 = MBMTrainConfig.for_stage("pretrain", data={"hcp_dir": str(tmp_path)})
    assert (a1.lr, a1.epochs, a1.batch_size, a1.warmup_epochs, a1.clip_grad, a1.mask_ratio) == (
        2.5e-4,
        500,
        100,
        40,
        0.8,
        0.75,
    )
    assert a1.betas == (0.9, 0.95) and a1.weight_decay == 0.05 and a1.min_lr == 0 and a1.variant == "large"
    assert a1.trainer.max_epochs == 500 and a1.trainer.clip_grad == 0.8
    short = MBMTrainConfig.for_stage("pretrain", epochs=100, data={"hcp_dir": str(tmp_path)})
    assert short.warmup_epochs == 8 and short.trainer.max_epochs == 100  # derived after the override
    a2 = MBMTrainConfig.for_stage("finetune", init="x", data={"god_dir": str(tmp_path)})
    assert (a2.lr, a2.batch_size, a2.mask_ratio) == (5.3e-5, 16, 0.75)
    # the original's A2: 15 epochs, 2 of warmup, on the test fMRI with the original's test normalisation
    assert (a2.epochs, a2.warmup_epochs, a2.data.val_fraction) == (15, 2, 0.05)
    assert (a2.data.god_fmri, a2.data.test_normalize, a2.data.val_holdout) == ("test", "original", False)
    assert a2.data.include_test_fmri and a2.data.pad_mode == "auto"
    assert MBMTrainConfig.from_dict(json.loads(json.dumps(a2.to_dict()))) == a2
    # ours on request; the older include_test_fmri keeps its meaning
    for data, expect in (
        ({"god_fmri": "train"}, ("train", "train", True)),
        ({"include_test_fmri": True}, ("train+test", "train", True)),
        ({"include_test_fmri": False}, ("train", "train", True)),
        ({"god_fmri": "test", "test_normalize": "train"}, ("test", "train", False)),
    ):
        d = MBMTrainConfig.for_stage("finetune", init="x", data={"god_dir": str(tmp_path), **data}).data
        assert (d.god_fmri, d.test_normalize, d.val_holdout) == expect, data
    with pytest.raises(ConfigError, match="contradicts"):
        MBMTrainConfig.for_stage(
            "finetune",
            init="x",
            data={"god_dir": str(tmp_path), "god_fmri": "test", "include_test_fmri": False},
        )
    assert a1.data.god_fmri == "train" and a1.data.val_holdout and a1.data.test_normalize == "train"
    for bad in ({"epochs": 0}, {"warmup_epochs": 600}, {"variant": "huge"}, {"mask_ratio": 1.0}, {"lr": -1}):
        with pytest.raises(ConfigError):
            MBMTrainConfig.for_stage("pretrain", data={"hcp_dir": str(tmp_path)}, **bad)
    with pytest.raises(ConfigError, match="--init"):
        MBMTrainConfig.for_stage("finetune", data={"god_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="num_voxels"):
        MBMTrainConfig.for_stage(
            "pretrain", data={"hcp_dir": str(tmp_path)}, model_overrides={"num_voxels": 3}
        )


# ----------------------------------------------------------------------------------------------------------
# training runs
# ----------------------------------------------------------------------------------------------------------


def test_validation_correlation_rises(tmp_path):
    hcp = write_lowrank_hcp(tmp_path)
    result = run_mbm_stage(tiny_config(hcp, epochs=6), tmp_path / "run")
    curve = val_curve(tmp_path / "run")
    assert len(curve) == 7  # before training, then after each epoch
    assert curve[0] == pytest.approx(result.initial_val_corr, abs=1e-6)
    assert curve[-1] > curve[0] + 0.15 and curve[-1] > 0.2, curve
    assert result.best_val_corr == pytest.approx(max(curve[1:]), abs=1e-6)
    run = tmp_path / "run"
    for name in (
        "config.json",
        "preprocessing.json",
        "metrics.csv",
        "checkpoints/last.ckpt",
        "data/voxels.npy",
    ):
        assert (run / name).is_file(), name
    final = MaskedBrainModel.from_pretrained(run / "model")
    best = MaskedBrainModel.from_pretrained(run / "best")
    assert final.config.num_voxels == 64 and best.config == final.config
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 5 and "optimizer_states" in ckpt  # training state lives apart from model/
    state = load_safetensors(run / "model" / "model.safetensors")
    assert set(state) == set(final.state_dict()) and not any("optimizer" in k for k in state)
    pre = json.loads((run / "preprocessing.json").read_text())
    assert set(pre["subjects"]) == {"hcp/s0", "hcp/s1"}
    assert FMRIPreprocessor.from_dict(pre["subjects"]["hcp/s0"]).n_voxels_out_ == 64


class _Crash(Exception):
    pass


def test_epoch_lines_show_validation_only_when_it_ran(tmp_path, caplog):
    import logging

    hcp = write_lowrank_hcp(tmp_path)
    cfg = tiny_config(hcp, epochs=4, trainer={"val_every_n_epochs": 2, "validate_first": False})
    with caplog.at_level(logging.INFO, logger="mindvis.train.callbacks"):
        run_mbm_stage(cfg, tmp_path / "run")
    lines = {int(m.split()[1].split("/")[0]): m for m in caplog.messages if m.startswith("epoch ")}
    assert sorted(lines) == [1, 2, 3, 4]
    assert [("val/corr" in lines[e]) for e in (1, 2, 3, 4)] == [False, True, False, True]


def _crash_at_epoch(epoch: int):
    import lightning.pytorch as pl

    class Crash(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == epoch:
                raise _Crash(f"simulated crash at epoch {epoch}")

    return Crash()


def test_resume_after_interruption_gives_the_same_weights(tmp_path):
    hcp = write_lowrank_hcp(tmp_path, samples=48)
    cfg = tiny_config(hcp, epochs=4, data={"aug_times": 1.5})
    run_mbm_stage(cfg, tmp_path / "straight")
    with pytest.raises(_Crash):
        run_mbm_stage(cfg, tmp_path / "broken", callbacks=[_crash_at_epoch(2)])
    assert read_checkpoint_progress(tmp_path / "broken/checkpoints/last.ckpt")["epoch"] == 1
    assert not (tmp_path / "broken/model").exists()
    result = run_mbm_stage(cfg, tmp_path / "broken", resume=True)
    assert result.epochs_done == 4
    a = load_safetensors(tmp_path / "straight/model/model.safetensors")
    b = load_safetensors(tmp_path / "broken/model/model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    # the log continues: one validation row per epoch, in order, same values as the straight run
    np.testing.assert_allclose(val_curve(tmp_path / "broken"), val_curve(tmp_path / "straight"), atol=1e-6)


def test_cli_resume_errors_change_nothing(tmp_path, capsys):
    hcp = write_lowrank_hcp(tmp_path, samples=32)
    out = tmp_path / "run"
    args = ["pretrain", "--hcp-dir", str(hcp), "--out", str(out), "--variant", "tiny", "--epochs", "1",
            "--batch-size", "16", "--patch-size", "8", "--window-trs", "1", "--accelerator", "cpu", "--devices", "1",
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    # the same folder again without --resume or --overwrite
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    # a truncated checkpoint
    ckpt = out / "checkpoints" / "last.ckpt"
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[: len(raw) // 2])
    before[ckpt] = ckpt.stat().st_mtime_ns
    assert main([*args, "--resume", "--epochs", "2"]) == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert "last.ckpt" in err and "corrupt" in err
    # a changed recipe on resume
    ckpt.write_bytes(raw)
    before[ckpt] = ckpt.stat().st_mtime_ns
    assert main([*args, "--resume", "--lr", "0.1"]) == 2
    assert "cannot change lr" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # a run folder without checkpoints
    (out / "checkpoints" / "last.ckpt").unlink()
    assert main([*args, "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["nan", "few_voxels", "inconsistent", "missing_subject"])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, problem):
    data = tmp_path / "data"  # the output may not lie inside the data folder
    write_hcp_subject(data, "100", frames=40)
    write_hcp_subject(data, "101", frames=40, seed=1)
    write_god_subject(data, "sbj_1")
    extra: list[str] = []
    if problem == "nan":
        v1 = np.load(data / "HCP/npz/101/HCP_visual_voxel.npz")["V1"].copy()
        v1[5, 0] = np.nan
        write_hcp_subject(data, "101", frames=40, seed=1, V1=v1)
        expect = "non-finite"
    elif problem == "few_voxels":
        write_god_subject(data, "sbj_2", n_vc=10)
        expect = "fewer than one patch"
    elif problem == "inconsistent":
        write_hcp_subject(data, "101", frames=40, V3=np.zeros((41, 6), np.float32))
        expect = "different numbers of TRs"
    else:
        extra = ["--god-subjects", "sbj_7"]
        expect = "sbj_7"
    out = tmp_path / "run"
    code = main(["pretrain", "--data-dir", str(data), "--out", str(out), "--variant", "tiny", "--epochs", "1",
                 "--accelerator", "cpu", "--no-progress", *extra])  # fmt: skip
    (err,) = error_lines(capsys.readouterr().err)
    assert code == 2 and expect in err
    assert not out.exists() and not list(tmp_path.glob(".run*"))


def test_finetune_from_pretrained(tmp_path, capsys):
    hcp = write_lowrank_hcp(tmp_path, samples=32, voxels=48)
    pre_dir = tmp_path / "pre"
    run_mbm_stage(tiny_config(hcp, epochs=1), pre_dir)
    write_god_subject(tmp_path / "data", "sbj_1", n_train=30, v_all=70, n_vc=52)
    common = ["finetune", "--init", str(pre_dir), "--data-dir", str(tmp_path / "data"), "--subject", "1", "--epochs", "2",
              "--batch-size", "8", "--accelerator", "cpu", "--devices", "1", "--no-progress"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "ft"), "--a2-data", "train"]) == 0
    ft = tmp_path / "ft"
    doc = json.loads((ft / "config.json").read_text())
    assert (
        doc["stage"] == "finetune" and doc["config"]["lr"] == 5.3e-5 and doc["data_summary"]["samples"] == 30
    )
    assert doc["config"]["data"]["pad_mode"] == "wrap"  # "auto", resolved: not an original checkpoint
    pre = FMRIPreprocessor.load(ft / "preprocessing.json")  # the target subject's, for stage B
    assert pre.n_voxels_in_ == 52 and pre.n_voxels_out_ == 48  # cropped to the pretrained model's length
    assert pre.test_normalize == "train"
    model = MaskedBrainModel.from_pretrained(ft / "model")
    assert model.config == MaskedBrainModel.from_pretrained(pre_dir / "model").config
    # ours plus the single-trial test rows; the older spelling gives the same
    assert main([*common, "--out", str(tmp_path / "ft2"), "--a2-data", "train+test"]) == 0
    assert json.loads((tmp_path / "ft2" / "config.json").read_text())["data_summary"]["samples"] == 30 + 12
    assert main([*common, "--out", str(tmp_path / "ft2b"), "--include-test-fmri"]) == 0
    assert json.loads((tmp_path / "ft2b" / "config.json").read_text())["data_summary"]["samples"] == 30 + 12
    # the default, the original's: the 4 averaged + 12 single-trial test rows only, validated on tuned rows
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "ft4")]) == 0
    doc4 = json.loads((tmp_path / "ft4" / "config.json").read_text())
    assert doc4["data_summary"]["samples"] == 4 + 12
    assert FMRIPreprocessor.load(tmp_path / "ft4" / "preprocessing.json").test_normalize == "original"
    assert "also trains on, as the original" in " ".join(capsys.readouterr().out.split())
    assert main([*common, "--out", str(tmp_path / "ft5"), "--a2-data", "bogus"]) == 2
    assert "--a2-data" in capsys.readouterr().err and not (tmp_path / "ft5").exists()
    # a corrupt --init
    weights = pre_dir / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "ft3")]) == 2
    assert "model.safetensors" in capsys.readouterr().err and not (tmp_path / "ft3").exists()
    # resuming needs no --init: the architecture is in the run folder
    assert main(["finetune", "--out", str(ft), "--resume", "--epochs", "3", "--no-progress"]) == 0
    assert len(val_curve(ft)) == 1 + 3


def test_csv_logger_resume_keeps_rows_up_to_the_checkpoint(tmp_path):
    log = CSVMetricsLogger(tmp_path / "metrics.csv")
    for step in (1, 2, 3):
        log.log_metrics({"a": float(step)}, step)
        log.save()
    log.log_metrics({"a": 4.0, "b": 1.0}, 4)
    log.save()
    again = CSVMetricsLogger(tmp_path / "metrics.csv", resume_step=2)
    again.log_metrics({"a": 9.0}, 3)
    again.save()
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["step"], r["a"]) for r in rows] == [("1", "1.0"), ("2", "2.0"), ("3", "9.0")]


def test_run_config_errors(tmp_path):
    from mindvis.train.run_folder import read_run_config

    with pytest.raises(ConfigError, match="not a mindvis run folder"):
        read_run_config(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint_progress(tmp_path / "x.ckpt")


# ----------------------------------------------------------------------------------------------------------
# distributed
# ----------------------------------------------------------------------------------------------------------


def _ddp_args(hcp: Path, out: Path, devices: int, batch: int) -> list[str]:
    return ["pretrain", "--hcp-dir", str(hcp), "--out", str(out), "--variant", "tiny", "--epochs", "2",
            "--batch-size", str(batch), "--patch-size", "8", "--window-trs", "1", "--val-fraction", "0.2",
            "--accelerator", "cpu", "--devices", str(devices), "--no-progress", "--seed", "3", "--lr", "2e-3"]  # fmt: skip


def test_ddp_two_processes_match_one_process(tmp_path):
    """2 CPU processes (gloo) x batch 8 give the weights of 1 process x batch 16 (same global batches)."""
    hcp = write_lowrank_hcp(tmp_path, subjects=1, samples=40)  # 32 training samples: 2 global batches of 16
    assert main(_ddp_args(hcp, tmp_path / "one", 1, 16)) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mindvis.cli", *_ddp_args(hcp, tmp_path / "two", 2, 8), "--strategy", "ddp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size=2" in proc.stderr.replace(" ", "") or "ddp" in proc.stderr.lower()
    a = load_safetensors(tmp_path / "one/model/model.safetensors")
    b = load_safetensors(tmp_path / "two/model/model.safetensors")
    torch.manual_seed(3)  # the run's seed: the same initial weights
    init = MaskedBrainModel(mbm_tiny(64, patch_size=8)).state_dict()
    moved = 0.0
    for k in a:
        if k.endswith("attn.qkv.bias"):
            # The key bias has an exactly zero gradient (softmax ignores a shift shared by all keys), so Adam
            # turns rounding noise into steps of up to lr: it may differ by at most lr x steps (2e-3 x 4).
            d = a[k].shape[0] // 3
            assert float((a[k][d : 2 * d] - b[k][d : 2 * d]).abs().max()) < 8e-3, k
            keep = torch.cat([torch.arange(d), torch.arange(2 * d, 3 * d)])
            a[k], b[k], init[k] = a[k][keep], b[k][keep], init[k][keep]
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
        moved = max(moved, float((a[k] - init[k]).abs().max()))
    assert moved > 1e-3  # training changed the weights, so the comparison means something
    assert len(val_curve(tmp_path / "two")) == 3


# ----------------------------------------------------------------------------------------------------------
# end to end on SynthCortex
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_pretrain_then_finetune_on_synthcortex(tmp_path, capsys):
    from mindvis.synthcortex import SynthConfig, simulate

    sim = tmp_path / "sim"
    cfg = SynthConfig.preset(
        "easy", n_rest_subjects=3, voxels=300, rest_vertices=240, n_train=120, n_test=4, n_repeats=2, n_trs=200,
        corpus_size=0, calibration_images=2, calibration_repeats=1, calibration_voxels=2,
    )  # fmt: skip
    simulate(cfg, sim)
    hw = ["--accelerator", "cpu", "--devices", "1", "--no-progress"]
    assert main(["pretrain", "--data-dir", str(sim), "--out", str(tmp_path / "a1"), "--variant", "tiny",
                 "--epochs", "3", "--batch-size", "16", "--val-fraction", "0.1", *hw]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "pretrain finished" in out and "validation masked-patch correlation" in out
    a1 = json.loads((tmp_path / "a1" / "config.json").read_text())
    assert a1["data_summary"]["subjects"] == ["hcp/rest_001", "hcp/rest_002", "hcp/rest_003", "god/sbj_1"]
    assert main(["finetune", "--init", str(tmp_path / "a1"), "--data-dir", str(sim), "--subject", "sbj_1",
                 "--out", str(tmp_path / "a2"), "--epochs", "2", *hw]) == 0  # fmt: skip
    assert len(val_curve(tmp_path / "a2")) == 3
    assert (tmp_path / "a2" / "model" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------
# --compile and the fused optimizer
# ----------------------------------------------------------------------------------------------------------


def test_make_adamw_uses_the_fused_kernel_on_cpu_tensors():
    from mindvis.train.optim import make_adamw

    layer = torch.nn.Linear(4, 3)
    opt = make_adamw(param_groups_weight_decay(layer, 0.05), lr=1e-3)
    assert opt.defaults["fused"] is True
    assert len(opt.param_groups) == 2
    # a parameter the fused kernel does not take (an integer buffer posing as one) gets the default AdamW
    assert make_adamw([torch.zeros(2, dtype=torch.float64, requires_grad=True)], lr=1e-3).defaults["fused"]
    meta = torch.nn.Parameter(torch.zeros(2, device="meta"))
    assert not make_adamw([meta], lr=1e-3).defaults["fused"]


def test_compile_trains_like_eager_and_keeps_parameter_names(tmp_path, caplog):
    hcp = write_lowrank_hcp(tmp_path, samples=48)
    eager = run_mbm_stage(tiny_config(hcp, epochs=2), tmp_path / "eager")
    with caplog.at_level("INFO", logger="mindvis.train.common"):
        compiled = run_mbm_stage(tiny_config(hcp, epochs=2, trainer={"compile": True}), tmp_path / "compiled")
    assert "torch.compile: model" in caplog.text
    assert compiled.epochs_done == eager.epochs_done == 2
    a = load_safetensors(tmp_path / "eager/model/model.safetensors")
    b = load_safetensors(tmp_path / "compiled/model/model.safetensors")
    assert sorted(a) == sorted(b)  # no "_orig_mod." prefixes: checkpoints stay interchangeable
    # Fused kernels round differently; Adam turns that into steps of about lr on parameters whose gradient is
    # zero in exact arithmetic (the key bias), so the weights are compared as one vector.
    fa = torch.cat([a[k].flatten() for k in sorted(a)])
    fb = torch.cat([b[k].flatten() for k in sorted(a)])
    assert float((fa - fb).norm() / fa.norm()) < 1e-3
    np.testing.assert_allclose(val_curve(tmp_path / "compiled"), val_curve(tmp_path / "eager"), atol=1e-3)


def test_compile_without_a_compiler_falls_back_to_eager(tmp_path, caplog, monkeypatch):
    from mindvis.train import common

    monkeypatch.setattr(common, "compiler_missing", lambda device_type="cpu": "no C++ compiler found (g++)")
    hcp = write_lowrank_hcp(tmp_path, samples=32)
    with caplog.at_level("WARNING", logger="mindvis.train.common"):
        result = run_mbm_stage(tiny_config(hcp, epochs=1, trainer={"compile": True}), tmp_path / "run")
    assert result.epochs_done == 1
    assert "--compile ignored: no C++ compiler found" in caplog.text
    assert (tmp_path / "run/model/model.safetensors").is_file()
