"""The library side of ``mindvis reconstruct`` (:mod:`mindvis.reconstruct`), called directly on a tiny random
pipeline folder: the files it writes, its inputs (a file, a dataset split, a fitted preprocessing), its
settings, and the options the command generates from them."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from mindvis.data.formats.registry import load_dataset
from mindvis.data.preprocess import FMRIPreprocessor
from mindvis.errors import ConfigError, DataError, OutputExistsError
from mindvis.models.ldm import DCLDM, ldm_preset
from mindvis.pipeline import MindVisPipeline
from mindvis.reconstruct import ReconstructConfig, ReconstructResult, reconstruct
from test_formats_god import write_god

V = 64  # voxels of the tiny encoder

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from mindvis.models.mbm import FMRIEncoder, mbm_tiny

    torch.manual_seed(0)
    ldm = DCLDM.for_fmri(ldm_preset("tiny"), FMRIEncoder(mbm_tiny(V), global_pool=False))
    with torch.no_grad():
        ldm.unet.conv_out.weight.mul_(0.05)  # keeps a random UNet's latents moderate
    return MindVisPipeline(ldm).save_pretrained(tmp_path_factory.mktemp("recon") / "model")


@pytest.fixture(scope="module")
def inputs(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    fmri = np.random.default_rng(0).standard_normal((3, V)).astype(np.float32)
    np.save(d / "fmri.npy", fmri)
    size = MindVisPipeline.from_pretrained(model).image_size
    gt = np.random.default_rng(1).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    np.savez(d / "gt.npz", images=gt)
    return d, fmri, gt


def _expected(model, voxels, config: ReconstructConfig) -> np.ndarray:
    """What the pipeline itself gives for ``voxels`` with ``config``'s settings."""
    pipe = MindVisPipeline.from_pretrained(model)
    return pipe(
        voxels,
        num_samples=config.num_samples,
        num_inference_steps=config.steps,
        sampler=config.sampler,  # type: ignore[arg-type]
        seed=config.seed,
        progress=False,
    ).images


def test_writes_the_pipelines_images_grid_npz_and_run_json(model, inputs, tmp_path):
    d, fmri, gt = inputs
    config = ReconstructConfig(num_samples=2, steps=2, sampler="ddim", seed=4, device="cpu")
    out = tmp_path / "rec"
    result = reconstruct(config, model, out, fmri=d / "fmri.npy", images=d / "gt.npz", progress=False)

    assert isinstance(result, ReconstructResult) and result.out == out
    assert (result.items, result.num_samples, result.sampler, result.num_inference_steps) == (3, 2, "ddim", 2)
    assert result.guidance_scale == 1.0 and result.seconds > 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "reconstructions.npz", "run.json", "samples"]
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == [f"item{i:04d}_s{s}.png" for i in range(3) for s in range(2)]
    with np.load(out / "reconstructions.npz") as z:
        assert sorted(z.files) == ["ground_truth", "images", "seeds"]
        images, seeds = z["images"], z["seeds"]
        assert np.array_equal(z["ground_truth"], gt)
    assert images.dtype == np.uint8 and seeds.tolist() == [4, 5, 6]
    np.testing.assert_array_equal(images, _expected(model, fmri, config))
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out / "samples" / "item0002_s1.png")), images[2, 1])
    grid = np.asarray(Image.open(out / "grid.png"))
    h = images.shape[2]
    assert grid.shape[0] > 3 * h and grid.shape[1] > 3 * h  # a row per item: ground truth + 2 samples
    assert np.array_equal(grid[2 : 2 + h, 2 : 2 + h], gt[0])  # ground truth first
    run = json.loads((out / "run.json").read_text())
    assert run == json.loads(json.dumps(result.run))
    expected = {
        "model": str(model),
        "fmri": str(d / "fmri.npy"),
        "items": 3,
        "num_samples": 2,
        "sampler": "ddim",
        "num_inference_steps": 2,
        "eta": 0.0,
        "guidance_scale": 1.0,
        "seed": 4,
        "batch_size": None,
        "device": "cpu",
        "dtype": "float32",
        "pad_to_model": False,
        "preprocess": None,
        "ground_truth": True,
    }
    assert {k: run[k] for k in expected} == expected

    # an existing folder is replaced only when asked
    with pytest.raises(OutputExistsError):
        reconstruct(config, model, out, fmri=d / "fmri.npy", progress=False)
    small = dataclasses.replace(config, limit=1, num_samples=1)
    result = reconstruct(small, model, out, fmri=d / "fmri.npy", overwrite=True, progress=False)
    with np.load(out / "reconstructions.npz") as z:
        assert z["images"].shape[:2] == (1, 1) and "ground_truth" not in z.files
    assert len(list((out / "samples").iterdir())) == 1 and result.run["ground_truth"] is False


def test_dataset_split_with_the_models_preprocessing(model, tmp_path):
    """A dataset split is read with its ground truth, and the model folder's preprocess.json brings the voxels to
    the model's count (no padding asked for)."""
    data = tmp_path / "GOD"
    write_god(data, subjects=(1,))
    train = load_dataset("god", data_dir=data, subject="sbj_1", split="train", include_images=False)
    test = load_dataset("god", data_dir=data, subject="sbj_1", split="test")
    assert train.voxels.shape[1] != V
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    pre = FMRIPreprocessor(normalize="global", patch_size=16, length=V).fit(train.voxels)
    pre.save(folder / "preprocess.json")

    config = ReconstructConfig(num_samples=1, steps=2, sampler="ddim", limit=2, device="cpu")
    out = tmp_path / "rec"
    result = reconstruct(config, folder, out, dataset="god", data_dir=data, subject="sbj_1", progress=False)
    assert result.items == 2
    assert result.run["preprocess"] == str(folder / "preprocess.json") and result.run["ground_truth"]
    assert result.run["fmri"].startswith("god:sbj_1/test")
    voxels = pre.transform(np.asarray(test.voxels[:2], np.float32), split="test")
    with np.load(out / "reconstructions.npz") as z:
        np.testing.assert_array_equal(z["images"], _expected(folder, voxels, config))
        np.testing.assert_array_equal(z["ground_truth"], test.images[test.image_ids][:2])

    # without the preprocessing the voxel count is refused, unless padding is asked for
    (folder / "preprocess.json").unlink()
    with pytest.raises(DataError, match="--pad-to-model"):
        reconstruct(config, folder, tmp_path / "refused", dataset="god", data_dir=data, progress=False)
    assert not (tmp_path / "refused").exists()
    padded = dataclasses.replace(config, pad_to_model=True)
    result = reconstruct(padded, folder, tmp_path / "padded", dataset="god", data_dir=data, progress=False)
    assert result.run["pad_to_model"] and result.run["preprocess"] is None


def test_input_errors_write_nothing(model, inputs, tmp_path):
    d, fmri, _ = inputs
    config = ReconstructConfig(num_samples=1, steps=1, sampler="ddim", device="cpu")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="exactly one"):
        reconstruct(config, model, out, progress=False)
    with pytest.raises(ConfigError, match="exactly one"):
        reconstruct(config, model, out, fmri=d / "fmri.npy", dataset="god", progress=False)
    np.savez(tmp_path / "two.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="2 ground-truth images for 3 fMRI items"):
        reconstruct(config, model, out, fmri=d / "fmri.npy", images=tmp_path / "two.npz", progress=False)
    bad = fmri.copy()
    bad[1, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataError, match="NaN"):
        reconstruct(config, model, out, fmri=tmp_path / "nan.npy", progress=False)
    with pytest.raises(ConfigError, match="not a device") as err:
        reconstruct(
            dataclasses.replace(config, device="nowhere"), model, out, fmri=d / "fmri.npy", progress=False
        )
    assert err.value.field == "device"
    assert not out.exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_samples", 0),
        ("num_samples", True),
        ("steps", 0),
        ("limit", 0),
        ("batch_size", 1.5),
        ("sampler", "euler"),
        ("eta", -0.1),
        ("eta", float("nan")),
        ("guidance_scale", float("inf")),
        ("guidance_scale", -1e30),
        ("seed", -1),
        ("seed", 2**32),
        ("device", ""),
        ("dtype", "float64"),
        ("pad_to_model", "yes"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        ReconstructConfig(**{field: value})
    assert err.value.field == field


def test_config_round_trips_through_a_dict():
    config = ReconstructConfig(num_samples=3, sampler="plms", guidance_scale=2.5, limit=4, pad_to_model=True)
    assert ReconstructConfig.from_dict(config.to_dict()) == config


def test_command_options_are_generated_from_the_config(monkeypatch):
    """Every setting is an option of ``mindvis reconstruct`` with the field's default and help; the values given
    reach the config and the other arguments the library function."""
    from typer.main import get_command
    from typer.testing import CliRunner

    from mindvis.cli import app
    from mindvis.commands import reconstruct as command
    from mindvis.config import settings_of

    params = {p.name: p for p in get_command(app).commands["reconstruct"].params}  # type: ignore[attr-defined]
    for f in settings_of(ReconstructConfig):
        assert (params[f.name].default, params[f.name].help) == (f.default, f.metadata["help"]), f.name
    assert params["seed"].max == 2**32 - 1 and params["num_samples"].min == 1

    got: dict = {}

    def fake(config, model, out, **kw):
        got.update(config=config, model=model, out=out, **kw)
        return ReconstructResult(out, 1, 1, config.sampler, 3, 1.0, 0.5, {})

    monkeypatch.setattr(command, "reconstruct", fake)
    args = ["reconstruct", "--model", "m", "--out", "o", "--fmri", "f.npy", "--pad-to-model", "--no-progress"]
    flags = [
        "--num-samples",
        "2",
        "--sampler",
        "plms",
        "--guidance-scale",
        "2",
        "--seed",
        "9",
        "--dtype",
        "bfloat16",
    ]
    result = CliRunner().invoke(app, args + flags)
    assert result.exit_code == 0, result.output
    cfg = got["config"]
    assert (cfg.num_samples, cfg.sampler, cfg.guidance_scale, cfg.seed, cfg.dtype) == (
        2,
        "plms",
        2.0,
        9,
        "bfloat16",
    )
    assert cfg.pad_to_model and got["progress"] is False and got["overwrite"] is False
    assert (got["split"], got["dataset"], str(got["fmri"])) == ("test", None, "f.npy")
    assert "wrote" in result.output and "(plms, 3 steps, 0.5 s)" in result.output


def test_command_names_the_option_in_errors_about_a_setting(model, inputs, tmp_path, capsys):
    from mindvis.cli import main

    out = tmp_path / "o"
    base = ["reconstruct", "--model", str(model), "--fmri", str(inputs[0] / "fmri.npy"), "--out", str(out)]
    for extra, flag in (
        (["--dtype", "float64"], "[--dtype]"),
        (["--sampler", "euler"], "[--sampler]"),
        (["--guidance-scale", "nan"], "[--guidance-scale]"),
        (["--eta", "nan"], "--eta"),  # refused by the command line itself
        (["--device", "nowhere"], "[--device]"),
    ):
        assert main([*base, "--no-progress", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error:") and flag in err, (extra, err)
    assert not out.exists()
