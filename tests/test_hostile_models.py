"""Hostile model folders and checkpoints through the command line: one ``error:`` line naming file and field.

Each test damages a copy of a real model folder (a tiny fMRI pipeline written by ``save_pretrained``), an
original label2img ``config.yaml`` or a pickle checkpoint, runs ``mindvis reconstruct`` / ``mindvis convert``
on it, and checks the contract of :mod:`mindvis.errors`: exit code 2, exactly one line on stderr, starting
with ``error:``, naming the file (and the field where there is one), and no traceback or internal error.

* absurd config values (widths of 10^12, depths of 10^9, negative sizes, bools where integers belong, sizes
  whose product is terabytes) are refused when the config is read, before anything is allocated;
* wrong types in ``model_index.json``, JSON nested too deeply or holding numbers too long to read;
* weights whose dtype does not fit the model (integer or bool where floating point belongs); another
  floating-point dtype is cast deliberately and loads;
* missing required keys (fields added after format version 1 stay optional, so older folders still load);
* torch's warnings about pickle protocols stay out of the output when a pickle checkpoint is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import parity_dir
from mindvis.cli import main
from mindvis.errors import CheckpointError, ConfigError
from mindvis.models.ldm import DCLDM, ldm_preset
from mindvis.models.mbm import FMRIEncoder, mbm_tiny
from mindvis.pipeline import MindVisPipeline

V = 64  # voxels of the tiny encoder

pytestmark = pytest.mark.usefixtures("one_thread_module", "quiet_cli_logging")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = DCLDM.for_fmri(ldm_preset("tiny"), FMRIEncoder(mbm_tiny(V)))
    return MindVisPipeline(model).save_pretrained(tmp_path_factory.mktemp("saved") / "model")


@pytest.fixture
def folder(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "model"))


@pytest.fixture(scope="module")
def fmri(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fmri") / "fmri.npy"
    np.save(path, np.random.default_rng(0).standard_normal((2, V)).astype(np.float32))
    return path


def refused(capsys, argv: list, *names: str) -> str:
    """Run the CLI; it must exit 2 with one ``error:`` line naming each of ``names``."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def reconstruct(capsys, folder: Path, fmri: Path, *names: str) -> str:
    out = folder.parent / "out"
    return refused(capsys, ["reconstruct", "--model", folder, "--fmri", fmri, "--out", out], *names)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


_DROP = object()


# ---- 1. absurd sizes in config.json -------------------------------------------------------------------------

ABSURD = [
    ("fmri_encoder", "embed_dim", 10**12),
    ("fmri_encoder", "depth", 10**9),
    ("fmri_encoder", "num_voxels", 10**15),
    ("fmri_encoder", "patch_size", -16),
    ("fmri_encoder", "mlp_ratio", 1e9),
    ("fmri_encoder", "num_heads", True),
    ("conditioner", "token_dim", True),
    ("conditioner", "cond_tokens", 10**12),
    ("conditioner", "basis_size", 10**9),
    ("conditioner", "context_dim", 64.0),
    ("conditioner", "global_pool", "false"),
    ("unet", "model_channels", 10**12),
    ("unet", "num_res_blocks", -1),
    ("unet", "transformer_depth", 10**9),
    ("unet", "sample_size", 2**40),
    ("unet", "channel_mult", [1] * 10**4),
    ("unet", "channel_mult", [1, 2, 10**9]),
    ("unet", "time_cond", "yes"),
    ("vq", "n_embed", 10**12),
    ("vq", "ch", 2**20),
    ("vq", "resolution", 10**9),
    ("vq", "ch_mult", {"a": 1}),
    ("scheduler", "num_train_timesteps", 10**12),
]


@pytest.mark.parametrize(("component", "field", "value"), ABSURD, ids=lambda v: str(v)[:20])
def test_absurd_config_value_refused(capsys, folder, fmri, component, field, value):
    path = folder / component / "config.json"
    edit_json(path, **{field: value})
    reconstruct(capsys, folder, fmri, path, f"[{field}]")


def test_sizes_whose_product_is_too_large_refused(capsys, folder, fmri):
    """Each size within its bound, together terabytes of weights: refused before allocating."""
    path = folder / "fmri_encoder" / "config.json"
    edit_json(path, embed_dim=65536, num_heads=16, depth=1024, decoder_embed_dim=65536, decoder_num_heads=16)
    line = reconstruct(capsys, folder, fmri, path, "weights")
    assert "[embed_dim]" in line


def test_paper_sizes_are_within_the_bounds():
    from mindvis.models.conditioning import DCConditionerConfig
    from mindvis.models.mbm import mbm_large_patch16

    cfg = ldm_preset("label2img")  # the ~400 M parameter UNet and the f4 VQ with 8192 codes
    enc = mbm_large_patch16(4656)  # the paper's encoder on GOD's 4656 voxels
    cond = DCConditionerConfig(
        num_tokens=enc.num_patches,
        token_dim=enc.embed_dim,
        context_dim=cfg.unet.context_dim,
        time_embed_dim=cfg.unet.time_embed_dim,
    )
    assert cfg.vq.n_embed == 8192 and cond.cond_tokens == 77


# ---- 2. wrong types and unreadable JSON -----------------------------------------------------------------------

INDEX_VALUES = [
    ("components", ["conditioner", "unet", "vq", "scheduler"], "components"),
    ("components", "unet", "components"),
    ("components", {"conditioner": "DCConditioner", "unet": 5, "vq": "VQModel", "scheduler": "x"}, "unet"),
    ("scale_factor", "1.0", "scale_factor"),
    ("scale_factor", [1.0], "scale_factor"),
    ("scale_factor", -1.0, "scale_factor"),
    ("default_steps", "50", "default_steps"),
    ("default_steps", 10**12, "default_steps"),
    ("default_sampler", ["ddim"], "default_sampler"),
    ("default_guidance_scale", "7.5", "default_guidance_scale"),
    ("source", [1, 2], "source"),
    ("_format_version", "1", "_format_version"),
    ("_format_version", True, "_format_version"),
]


@pytest.mark.parametrize(("key", "value", "field"), INDEX_VALUES, ids=lambda v: str(v)[:24])
def test_wrong_type_in_model_index_refused(capsys, folder, fmri, key, value, field):
    path = folder / "model_index.json"
    edit_json(path, **{key: value})
    reconstruct(capsys, folder, fmri, path, field)


def test_model_index_not_an_object_refused(capsys, folder, fmri):
    (folder / "model_index.json").write_text("[1, 2, 3]")
    reconstruct(capsys, folder, fmri, folder / "model_index.json", "object")


def test_conditioner_class_name_of_wrong_type_refused(capsys, folder, fmri):
    path = folder / "conditioner" / "config.json"
    edit_json(path, _class_name=["DCConditioner"])
    reconstruct(capsys, folder, fmri, path, "[_class_name]")


@pytest.mark.parametrize(
    "name", ["model_index.json", "unet/config.json", "fmri_encoder/config.json", "scheduler/config.json"]
)
@pytest.mark.parametrize(
    "text",
    ["[" * 100_000, '{"a": ' * 100_000, '{"scale_factor": 1' + "0" * 5000 + "}"],
    ids=["deep-list", "deep-object", "long-integer"],
)
def test_unreadable_json_refused(capsys, folder, fmri, name, text):
    (folder / name).write_text(text)
    reconstruct(capsys, folder, fmri, folder / name)


# ---- 3. weights of the wrong dtype ---------------------------------------------------------------------------


def _retype(path: Path, key: str, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    state[key] = state[key].to(dtype)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize(
    ("component", "key"),
    [("unet", "conv_in.weight"), ("vq", "quantize.embedding.weight"), ("fmri_encoder", "pos_embed")],
)
def test_weight_of_wrong_dtype_refused(capsys, folder, fmri, component, key, dtype):
    path = folder / component / "model.safetensors"
    _retype(path, key, dtype)
    line = reconstruct(capsys, folder, fmri, path, f"[{key}]", "dtype")
    assert str(dtype).removeprefix("torch.") in line


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weight_of_another_float_dtype_is_cast(folder, saved, dtype):
    _retype(folder / "unet" / "model.safetensors", "conv_in.weight", dtype)
    loaded = MindVisPipeline.from_pretrained(folder).model.unet.conv_in.weight
    ref = MindVisPipeline.from_pretrained(saved).model.unet.conv_in.weight
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, ref.to(dtype).float())


# ---- 4. missing required keys ----------------------------------------------------------------------------------

MISSING = [
    ("unet", "context_dim"),
    ("unet", "time_cond"),
    ("vq", "n_embed"),
    ("conditioner", "num_tokens"),
    ("conditioner", "global_pool"),
    ("fmri_encoder", "num_heads"),
    ("fmri_encoder", "_global_pool"),
    ("scheduler", "linear_end"),
]


@pytest.mark.parametrize(("component", "field"), MISSING, ids=str)
def test_missing_required_key_refused(capsys, folder, fmri, component, field):
    path = folder / component / "config.json"
    edit_json(path, **{field: _DROP})
    reconstruct(capsys, folder, fmri, path, f"[{field}]", "missing")


@pytest.mark.parametrize("field", ["scale_factor", "components"])
def test_missing_required_index_key_refused(capsys, folder, fmri, field):
    path = folder / "model_index.json"
    edit_json(path, **{field: _DROP})
    reconstruct(capsys, folder, fmri, path, field)


def test_fields_added_after_format_1_stay_optional(folder):
    """Older folders lack the conditioner's standardize_tokens and basis_size: they load with both off."""
    edit_json(folder / "conditioner" / "config.json", standardize_tokens=_DROP, basis_size=_DROP)
    for key in ("default_sampler", "default_steps", "default_guidance_scale", "source"):
        edit_json(folder / "model_index.json", **{key: _DROP})
    cfg = MindVisPipeline.from_pretrained(folder).model.conditioner.config
    assert not cfg.standardize_tokens and cfg.basis_size == 0


def test_components_that_do_not_fit_name_the_file(capsys, folder, fmri):
    path = folder / "conditioner" / "config.json"
    edit_json(path, token_dim=32)  # the encoder gives 64-wide tokens
    reconstruct(capsys, folder, fmri, path, "[token_dim]")
    edit_json(path, token_dim=64)
    edit_json(folder / "unet" / "config.json", context_dim=32)
    reconstruct(capsys, folder, fmri, folder / "unet" / "config.json", "context")


def test_library_errors_are_mindvis_errors(folder):
    edit_json(folder / "unet" / "config.json", model_channels=10**12)
    with pytest.raises(ConfigError) as info:
        MindVisPipeline.from_pretrained(folder)
    assert info.value.field == "model_channels" and info.value.path.endswith("config.json")
    edit_json(folder / "unet" / "config.json", model_channels=32)
    _retype(folder / "vq" / "model.safetensors", "quantize.embedding.weight", torch.int8)
    with pytest.raises(CheckpointError) as info:
        MindVisPipeline.from_pretrained(folder)
    assert info.value.field == "quantize.embedding.weight"


# ---- original configs (mindvis convert) ---------------------------------------------------------------------


@pytest.fixture
def label2img(tmp_path) -> Path:
    d = tmp_path / "label2img"
    d.mkdir()
    shutil.copy(parity_dir() / "label2img" / "config.yaml", d / "config.yaml")
    return d


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("model_channels: 32", "model_channels: 1000000000000", "model_channels"),
        ("transformer_depth: 1", "transformer_depth: true", "transformer_depth"),  # was read as 1
        ("in_channels: 3\n        out_channels", "in_channels: '3'\n        out_channels", "in_channels"),
        ("n_embed: 64", "n_embed: 1000000000000", "n_embed"),
        (
            "num_res_blocks: 2\n        channel_mult",
            "num_res_blocks: -2\n        channel_mult",
            "num_res_blocks",
        ),
        ("timesteps: 1000", "timesteps: [1000]", "timesteps"),
        ("embed_dim: 64", "embed_dim: 64.5", "embed_dim"),
    ],
    ids=lambda v: str(v)[:24],
)
def test_original_yaml_config_refused(capsys, tmp_path, label2img, old, new, field):
    path = label2img / "config.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    argv = ["convert", "--label2img-dir", label2img, "--out", tmp_path / "out"]
    refused(capsys, argv, path, field)


def test_original_yaml_nested_too_deeply_refused(capsys, tmp_path, label2img):
    (label2img / "config.yaml").write_text("[" * 100_000)
    refused(capsys, ["convert", "--label2img-dir", label2img, "--out", tmp_path / "out"], "config.yaml")


# ---- 5. pickle checkpoints: nothing printed but the refusal -----------------------------------------------------


class _Payload:
    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def _pickles(tmp_path: Path) -> dict[str, Path]:
    canary = tmp_path / "canary"
    files = {}
    for protocol in (3, 4, 5):
        files[f"evil{protocol}"] = tmp_path / f"evil{protocol}.pth"
        files[f"evil{protocol}"].write_bytes(pickle.dumps({"model": _Payload(canary)}, protocol=protocol))
    files["malformed"] = tmp_path / "malformed.ckpt"
    files["malformed"].write_bytes(pickle.dumps({"model": {"w": 1}}, protocol=4)[:-9] + b"\x00garbage")
    return files


@pytest.mark.parametrize("name", ["evil3", "evil4", "evil5", "malformed"])
def test_refused_pickle_prints_only_the_refusal(tmp_path, name):
    """In a fresh process (pytest would capture the warnings): stderr holds the one refusal line only."""
    path = _pickles(tmp_path)[name]
    env = {**os.environ, "MINDVIS_LOG_DIR": str(tmp_path / "logs")}
    env.pop("PYTHONWARNINGS", None)
    res = subprocess.run(
        [sys.executable, "-m", "mindvis.cli", "convert", "--mbm", str(path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], res.stderr
    assert "Warning" not in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "canary").exists()


def test_refused_pickle_warnings_not_shown_in_process(tmp_path):
    """The library call itself lets no warning through, whatever the warning filters say."""
    import warnings

    from mindvis.safeload import load_torch_file

    for path in _pickles(tmp_path).values():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(CheckpointError):
                load_torch_file(path)
        assert not caught, [str(w.message) for w in caught]
