"""``mindvis convert`` then ``mindvis reconstruct`` on the reference fixtures, through the command line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import parity_dir
from mindvis.cli import main
from mindvis.pipeline import MindVisPipeline

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def fx():
    d = parity_dir()
    assert d.is_dir(), f"parity fixture folder {d} is missing (set MINDVIS_PARITY_DIR or restore the copy)"
    with np.load(d / "golden.npz") as z:
        golden = {k: z[k] for k in z.files}
    return SimpleNamespace(dir=d, g=golden)


@pytest.fixture(scope="module")
def converted(fx, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "model"
    rc = main(
        [
            "convert",
            "--finetuned",
            str(fx.dir / "finetuned.pth"),
            "--label2img-dir",
            str(fx.dir / "label2img"),
            "--mbm",
            str(fx.dir / "mae_checkpoint.pth"),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def inputs(fx, tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    fmri = fx.g["fmri"].reshape(fx.g["fmri"].shape[0], -1)
    np.save(d / "fmri.npy", fmri)
    np.savez(d / "fmri.npz", betas=fmri, other=np.zeros(3))
    gt = (np.clip((fx.g["image"].transpose(0, 2, 3, 1) + 1) / 2, 0, 1) * 255).astype(np.uint8)
    np.savez(d / "gt.npz", images=gt)
    return SimpleNamespace(dir=d, fmri=fmri, gt=gt)


def _run(*args: str) -> int:
    return main([str(a) for a in args])


def test_converted_folder_reproduces_the_original(fx, converted):
    index = json.loads((converted / "model_index.json").read_text())
    assert set(index["components"]) == {"fmri_encoder", "conditioner", "unet", "vq", "scheduler"}
    assert index["source"]["original_config"]["global_pool"] is not None
    pipe = MindVisPipeline.from_pretrained(converted)
    with torch.no_grad():
        cond = pipe.model.condition(torch.from_numpy(fx.g["fmri"]))
        eps = pipe.model.eps(torch.from_numpy(fx.g["unet_x_t"]), torch.from_numpy(fx.g["unet_t"]), cond)
    for got, key in ((cond.context, "context"), (eps, "unet_eps")):
        ref = fx.g[key]
        assert np.abs(got.numpy() - ref).max() <= 1e-4 * np.abs(ref).max(), key


def test_reconstruct_writes_pngs_grid_and_npz(converted, inputs, tmp_path):
    out = tmp_path / "rec"
    rc = _run(
        "reconstruct",
        "--model",
        converted,
        "--fmri",
        inputs.dir / "fmri.npy",
        "--images",
        inputs.dir / "gt.npz",
        "--out",
        out,
        "--num-samples",
        2,
        "--steps",
        2,
        "--sampler",
        "ddim",
        "--seed",
        4,
        "--no-progress",
    )
    assert rc == 0
    n = inputs.fmri.shape[0]
    pngs = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert len(pngs) == n * 2 and pngs[0] == "item0000_s0.png"
    with np.load(out / "reconstructions.npz") as z:
        images, seeds, gt = z["images"], z["seeds"], z["ground_truth"]
    assert (
        images.shape[:2] == (n, 2)
        and images.dtype == np.uint8
        and seeds.tolist() == [4 + i for i in range(n)]
    )
    assert np.array_equal(gt, inputs.gt)
    from PIL import Image

    grid = np.asarray(Image.open(out / "grid.png"))
    h = images.shape[2]
    assert grid.shape[0] > n * h and grid.shape[1] > 3 * h  # ground truth + 2 samples per row
    assert np.array_equal(grid[2 : 2 + h, 2 : 2 + h], inputs.gt[0])  # ground truth first
    run = json.loads((out / "run.json").read_text())
    assert run["sampler"] == "ddim" and run["num_inference_steps"] == 2 and run["ground_truth"]
    # same seed, same images, also from an npz input with a key
    out2 = tmp_path / "rec2"
    assert (
        _run(
            "reconstruct",
            "--model",
            converted,
            "--fmri",
            inputs.dir / "fmri.npz",
            "--fmri-key",
            "betas",
            "--out",
            out2,
            "--num-samples",
            2,
            "--steps",
            2,
            "--sampler",
            "ddim",
            "--seed",
            4,
            "--batch-size",
            3,
            "--no-progress",
        )
        == 0
    )
    with np.load(out2 / "reconstructions.npz") as z:
        assert np.abs(z["images"].astype(int) - images.astype(int)).max() <= 1
        assert "ground_truth" not in z.files
    # without --sampler / --steps: DPM-Solver++ at its 25 steps (docs/performance.md, "Every sampler on one model")
    out3 = tmp_path / "rec3"
    args = ["--fmri", inputs.dir / "fmri.npy", "--limit", 1, "--num-samples", 1, "--no-progress"]
    assert _run("reconstruct", "--model", converted, *args, "--out", out3) == 0
    run = json.loads((out3 / "run.json").read_text())
    assert run["sampler"] == "dpmsolver++" and run["num_inference_steps"] == 25


def test_reconstruct_input_errors(converted, inputs, tmp_path, capsys):
    d = inputs.dir
    np.save(d / "short.npy", inputs.fmri[:, :-16])
    bad_nan = inputs.fmri.copy()
    bad_nan[1, 3] = np.nan
    np.save(d / "nan.npy", bad_nan)
    (d / "empty.npy").write_bytes(b"")
    np.save(d / "ints.npy", inputs.fmri.astype(np.int32))
    np.save(d / "norows.npy", inputs.fmri[:0])
    cases = [
        (["--fmri", d / "short.npy"], "--pad-to-model"),
        (["--fmri", d / "nan.npy"], "NaN"),
        (["--fmri", d / "empty.npy"], "empty"),
        (["--fmri", d / "ints.npy"], "dtype"),
        (["--fmri", d / "norows.npy"], "no fMRI values"),
        (["--fmri", d / "missing.npy"], "not found"),
        (["--fmri", d / "fmri.npz"], "several arrays"),
        (["--fmri", d / "fmri.npy", "--model", tmp_path / "nomodel"], "not found"),
        (["--fmri", d / "fmri.npy", "--sampler", "euler"], "sampler"),
        ([], "exactly one"),
    ]
    for i, (args, msg) in enumerate(cases):
        if "--model" not in args:
            args = [*args, "--model", converted]
        rc = _run(
            "reconstruct",
            *args,
            "--out",
            tmp_path / f"o{i}",
            "--steps",
            1,
            "--num-samples",
            1,
            "--no-progress",
        )
        err = capsys.readouterr().err
        assert rc == 2, (args, err)
        assert msg in err, (args, err)
    # padding on request
    out = tmp_path / "padded"
    assert (
        _run(
            "reconstruct",
            "--model",
            converted,
            "--fmri",
            d / "short.npy",
            "--pad-to-model",
            "--out",
            out,
            "--steps",
            1,
            "--num-samples",
            1,
            "--sampler",
            "ddim",
            "--no-progress",
        )
        == 0
    )
    # an existing output folder is not overwritten silently
    assert (
        _run(
            "reconstruct",
            "--model",
            converted,
            "--fmri",
            d / "fmri.npy",
            "--out",
            out,
            "--steps",
            1,
            "--num-samples",
            1,
            "--no-progress",
        )
        == 2
    )
    assert "exists" in capsys.readouterr().err


def test_convert_other_combinations(fx, tmp_path, capsys):
    from mindvis.models.mbm import load_original_mbm_checkpoint

    # label2img alone: a class-conditional prior folder
    prior_dir = tmp_path / "prior"
    assert _run("convert", "--label2img-dir", fx.dir / "label2img", "--out", prior_dir) == 0
    prior = MindVisPipeline.from_pretrained(prior_dir)
    assert prior.num_voxels is None
    out = prior(labels=[0, 1], num_samples=1, num_inference_steps=1, sampler="ddim", seed=0, progress=False)
    assert out.images.shape[:2] == (2, 1)
    assert (
        _run("reconstruct", "--model", prior_dir, "--fmri", tmp_path / "x.npy", "--out", tmp_path / "r") == 2
    )
    capsys.readouterr()
    # label2img + stage A: the untrained starting point of stage B
    start = tmp_path / "start"
    assert (
        _run(
            "convert",
            "--label2img-dir",
            fx.dir / "label2img",
            "--mbm",
            fx.dir / "mae_checkpoint.pth",
            "--out",
            start,
            "--global-pool",
        )
        == 0
    )
    sp = MindVisPipeline.from_pretrained(start)
    assert sp.model.conditioner.config.global_pool and sp.model.fmri_encoder.global_pool
    for k, v in prior.model.unet.state_dict().items():
        assert torch.equal(v, sp.model.unet.state_dict()[k]), k
    # stage A alone
    mbm_dir = tmp_path / "mbm"
    assert _run("convert", "--mbm", fx.dir / "mae_checkpoint.pth", "--out", mbm_dir) == 0
    assert (mbm_dir / "config.json").is_file() and (mbm_dir / "model.safetensors").is_file()
    # finetuned with the head count given instead of the stage-A file
    heads = load_original_mbm_checkpoint(fx.dir / "mae_checkpoint.pth")[0].num_heads
    fin = tmp_path / "fin"
    assert (
        _run(
            "convert",
            "--finetuned",
            fx.dir / "finetuned.pth",
            "--label2img-dir",
            fx.dir / "label2img",
            "--encoder-heads",
            heads,
            "--out",
            fin,
        )
        == 0
    )
    capsys.readouterr()
    # combinations that make no sense, or lack what the file does not store
    for args, msg in (
        ([], "nothing to convert"),
        (["--finetuned", fx.dir / "finetuned.pth"], "--label2img-dir"),
        (["--finetuned", fx.dir / "finetuned.pth", "--label2img-dir", fx.dir / "label2img"], "head count"),
        (["--finetuned", tmp_path / "none.pth", "--label2img-dir", fx.dir / "label2img"], "not found"),
        (["--label2img-dir", fin / "unet"], "config.yaml"),
    ):
        rc = _run("convert", *args, "--out", tmp_path / "bad")
        err = capsys.readouterr().err
        assert rc == 2 and msg in err, (args, err)
    assert not (tmp_path / "bad").exists()


def test_convert_rejects_foreign_keys(fx, tmp_path, capsys):
    """A state dict with a key the converter does not know fails and names the key."""
    from mindvis.safeload import load_torch_file

    obj = load_torch_file(fx.dir / "finetuned.pth")
    obj["model_state_dict"]["model_ema.decay"] = torch.tensor(0.999)
    obj["config"] = None
    bad = tmp_path / "foreign.pth"
    torch.save(obj, bad)
    rc = _run(
        "convert",
        "--finetuned",
        bad,
        "--label2img-dir",
        fx.dir / "label2img",
        "--mbm",
        fx.dir / "mae_checkpoint.pth",
        "--out",
        tmp_path / "o",
    )
    err = capsys.readouterr().err
    assert rc == 2 and "model_ema.decay" in err


def test_global_pool_checkpoint_round_trip(fx, tmp_path):
    """A global-pool stage-B model written in the original's layout converts back to identical weights, and
    the pickled config's global_pool must agree with the keys."""
    from mindvis.convert.ldm import (
        cond_key_map,
        init_from_label2img_and_mbm,
        load_finetuned,
        unet_key_map,
        vq_key_map,
    )
    from mindvis.errors import CheckpointError

    start = init_from_label2img_and_mbm(
        fx.dir / "label2img", fx.dir / "mae_checkpoint.pth", global_pool=True, seed=3
    ).model
    km = unet_key_map(start.unet_config)
    km.update(vq_key_map(start.vq_config))
    km.update(cond_key_map(list(start.fmri_encoder.state_dict()), start.conditioner.config))
    ours = start.state_dict()
    orig = dict(start.schedule.original_buffers())
    for src, dst in km.keys.items():
        v = ours[dst]
        orig[src] = (v[:, :, None, None] if src in km.conv_to_linear else v).clone()
    assert any(k.endswith("time_embed_condtion.weight") for k in orig)  # the single-Linear form
    path = tmp_path / "gp.pth"
    torch.save(
        {
            "model_state_dict": orig,
            "config": {"global_pool": True, "use_time_cond": True},
            "state": torch.zeros(4, dtype=torch.uint8),
        },
        path,
    )
    back = load_finetuned(path, fx.dir / "label2img", mbm=fx.dir / "mae_checkpoint.pth").model
    assert back.conditioner.config.global_pool and back.fmri_encoder.global_pool
    got = back.state_dict()
    for k, v in ours.items():
        assert torch.equal(v, got[k]), k
    with torch.no_grad():
        c = back.condition(torch.randn(2, back.fmri_encoder.config.num_voxels))
    assert c.context.shape[1] == 1
    torch.save({"model_state_dict": orig, "config": {"global_pool": False, "use_time_cond": True}}, path)
    with pytest.raises(CheckpointError, match="global_pool"):
        load_finetuned(path, fx.dir / "label2img", mbm=fx.dir / "mae_checkpoint.pth")
