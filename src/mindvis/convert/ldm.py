"""Converter for the original latent diffusion checkpoints of MinD-Vis stage B.

Two sources:

* the CompVis ImageNet ``label2img`` model (``config.yaml`` + ``model.ckpt``, ``{'state_dict': ...}``):
  ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VQ-f4) and ``cond_stage_model.embedding``
  (class embedder) become our UNet, VQ model and :class:`~mindvis.models.conditioning.ClassEmbedder`;
* the MinD-Vis ``finetuned.pth`` (``{'model_state_dict', 'config', 'state'}``), which adds the fMRI encoder
  ``cond_stage_model.mae.*``, the mappers ``cond_stage_model.{channel,dim}_mapper`` and the UNet's
  ``time_embed_condtion`` (the misspelling is the original's), and becomes a complete pipeline folder.

Every key goes through an explicit map (:func:`unet_key_map`, :func:`vq_key_map`, :func:`cond_key_map`);
every shape is checked; keys we do not understand, and keys we expect but do not find, are listed and the
conversion fails. The twelve noise-schedule buffers at the top of the state dict are not weights: they are
recomputed from ``linear_start`` / ``linear_end`` and compared with the stored ones. ``global_pool`` and
``use_time_cond`` come from the pickled generative config, which overrides the YAML (as the original does).
Pickled config objects are read by the restricted unpickler of :mod:`mindvis.safeload`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from mindvis.convert.mbm import convert_mbm_checkpoint
from mindvis.errors import CheckpointError, ConfigError
from mindvis.models.conditioning import (
    COND_TOKENS,
    ClassEmbedder,
    ClassEmbedderConfig,
    DCConditioner,
    DCConditionerConfig,
)
from mindvis.models.ldm import DCLDM, LDMConfig, UNetConfig, VQConfig, build_unet
from mindvis.models.mbm import FMRIEncoder, MBMConfig, load_mbm_weights, load_original_mbm_checkpoint
from mindvis.pipeline import MindVisPipeline
from mindvis.safeload import load_torch_file
from mindvis.sampling import ORIGINAL_SCHEDULE_BUFFERS, NoiseSchedule, NoiseScheduleConfig
from mindvis.utils.io import file_sha256, prepare_output_dir

_logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VQ_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."
TIME_COND = "time_embed_condtion"  # sic: the original's spelling

_WB = ("weight", "bias")

# ResBlock (CompVis) -> ResnetBlock2D (diffusers)
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
}
# VQ ResnetBlock (CompVis) -> ResnetBlock2D (diffusers)
_VQ_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
# VQ AttnBlock (1x1 convs) -> Attention (linears)
_VQ_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


@dataclass
class KeyMap:
    """Original key -> our key, and the original keys whose 1x1-conv weights become linear weights."""

    keys: dict[str, str] = field(default_factory=dict)
    conv_to_linear: set[str] = field(default_factory=set)

    def add(self, src: str, dst: str, conv_to_linear: bool = False) -> None:
        if src in self.keys:
            raise AssertionError(f"duplicate source key {src}")
        self.keys[src] = dst
        if conv_to_linear:
            self.conv_to_linear.add(src)

    def add_wb(self, src: str, dst: str, conv_to_linear: bool = False, bias: bool = True) -> None:
        self.add(f"{src}.weight", f"{dst}.weight", conv_to_linear)
        if bias:
            self.add(f"{src}.bias", f"{dst}.bias")

    def update(self, other: KeyMap) -> None:
        for k, v in other.keys.items():
            self.add(k, v, k in other.conv_to_linear)


def _transformer(m: KeyMap, src: str, dst: str, depth: int) -> None:
    for name in ("norm", "proj_in", "proj_out"):
        m.add_wb(f"{src}.{name}", f"{dst}.{name}")
    for d in range(depth):
        s, t = f"{src}.transformer_blocks.{d}", f"{dst}.transformer_blocks.{d}"
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v"):
                m.add(f"{s}.{attn}.{proj}.weight", f"{t}.{attn}.{proj}.weight")
            m.add_wb(f"{s}.{attn}.to_out.0", f"{t}.{attn}.to_out.0")
        for name in ("ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3"):
            m.add_wb(f"{s}.{name}", f"{t}.{name}")


def _unet_resblock(m: KeyMap, src: str, dst: str, skip: bool) -> None:
    for a, b in _UNET_RESNET.items():
        m.add_wb(f"{src}.{a}", f"{dst}.{b}")
    if skip:
        m.add_wb(f"{src}.skip_connection", f"{dst}.conv_shortcut")


def unet_key_map(config: UNetConfig, src_prefix: str = UNET_PREFIX, dst_prefix: str = "unet.") -> KeyMap:
    """CompVis ``UNetModel`` keys -> diffusers ``UNet2DConditionModel`` keys (the time conditioner excluded)."""
    c = config
    m = KeyMap()
    S, D = src_prefix, dst_prefix
    m.add_wb(f"{S}time_embed.0", f"{D}time_embedding.linear_1")
    m.add_wb(f"{S}time_embed.2", f"{D}time_embedding.linear_2")
    m.add_wb(f"{S}input_blocks.0.0", f"{D}conv_in")
    levels = len(c.channel_mult)
    chans = [c.model_channels]  # channels of every stored skip, as the original's input_block_chans
    ch = c.model_channels
    idx = 1
    for lvl, mult in enumerate(c.channel_mult):
        out = c.model_channels * mult
        for j in range(c.num_res_blocks):
            _unet_resblock(m, f"{S}input_blocks.{idx}.0", f"{D}down_blocks.{lvl}.resnets.{j}", ch != out)
            if c.attention_levels[lvl]:
                _transformer(
                    m, f"{S}input_blocks.{idx}.1", f"{D}down_blocks.{lvl}.attentions.{j}", c.transformer_depth
                )
            ch = out
            chans.append(ch)
            idx += 1
        if lvl != levels - 1:
            m.add_wb(f"{S}input_blocks.{idx}.0.op", f"{D}down_blocks.{lvl}.downsamplers.0.conv")
            chans.append(ch)
            idx += 1
    _unet_resblock(m, f"{S}middle_block.0", f"{D}mid_block.resnets.0", False)
    _transformer(m, f"{S}middle_block.1", f"{D}mid_block.attentions.0", c.transformer_depth)
    _unet_resblock(m, f"{S}middle_block.2", f"{D}mid_block.resnets.1", False)
    idx = 0
    for up, lvl in enumerate(reversed(range(levels))):
        out = c.model_channels * c.channel_mult[lvl]
        for j in range(c.num_res_blocks + 1):
            skip_ch = chans.pop()
            _unet_resblock(
                m, f"{S}output_blocks.{idx}.0", f"{D}up_blocks.{up}.resnets.{j}", ch + skip_ch != out
            )
            if c.attention_levels[lvl]:
                _transformer(
                    m, f"{S}output_blocks.{idx}.1", f"{D}up_blocks.{up}.attentions.{j}", c.transformer_depth
                )
            ch = out
            if lvl != 0 and j == c.num_res_blocks:
                sub = 2 if c.attention_levels[lvl] else 1
                m.add_wb(f"{S}output_blocks.{idx}.{sub}.conv", f"{D}up_blocks.{up}.upsamplers.0.conv")
            idx += 1
    m.add_wb(f"{S}out.0", f"{D}conv_norm_out")
    m.add_wb(f"{S}out.2", f"{D}conv_out")
    return m


def _vq_resblock(m: KeyMap, src: str, dst: str, skip: bool) -> None:
    for a, b in _VQ_RESNET.items():
        m.add_wb(f"{src}.{a}", f"{dst}.{b}")
    if skip:
        m.add_wb(f"{src}.nin_shortcut", f"{dst}.conv_shortcut")


def _vq_mid(m: KeyMap, src: str, dst: str) -> None:
    _vq_resblock(m, f"{src}.block_1", f"{dst}.resnets.0", False)
    for a, b in _VQ_ATTN.items():
        m.add_wb(f"{src}.attn_1.{a}", f"{dst}.attentions.0.{b}", conv_to_linear=a != "norm")
    _vq_resblock(m, f"{src}.block_2", f"{dst}.resnets.1", False)


def vq_key_map(config: VQConfig, src_prefix: str = VQ_PREFIX, dst_prefix: str = "vq.") -> KeyMap:
    """CompVis ``VQModel`` (encoder/decoder/quantize) keys -> diffusers ``VQModel`` keys."""
    c = config
    m = KeyMap()
    S, D = src_prefix, dst_prefix
    n = len(c.ch_mult)
    in_mult = (1, *c.ch_mult)
    m.add_wb(f"{S}encoder.conv_in", f"{D}encoder.conv_in")
    for lvl in range(n):
        block_in, block_out = c.ch * in_mult[lvl], c.ch * c.ch_mult[lvl]
        for j in range(c.num_res_blocks):
            _vq_resblock(
                m,
                f"{S}encoder.down.{lvl}.block.{j}",
                f"{D}encoder.down_blocks.{lvl}.resnets.{j}",
                block_in != block_out,
            )
            block_in = block_out
        if lvl != n - 1:
            m.add_wb(
                f"{S}encoder.down.{lvl}.downsample.conv", f"{D}encoder.down_blocks.{lvl}.downsamplers.0.conv"
            )
    _vq_mid(m, f"{S}encoder.mid", f"{D}encoder.mid_block")
    m.add_wb(f"{S}encoder.norm_out", f"{D}encoder.conv_norm_out")
    m.add_wb(f"{S}encoder.conv_out", f"{D}encoder.conv_out")
    m.add_wb(f"{S}decoder.conv_in", f"{D}decoder.conv_in")
    _vq_mid(m, f"{S}decoder.mid", f"{D}decoder.mid_block")
    block_in = c.ch * c.ch_mult[-1]
    for lvl in reversed(range(n)):
        up = n - 1 - lvl
        block_out = c.ch * c.ch_mult[lvl]
        for j in range(c.num_res_blocks + 1):
            _vq_resblock(
                m,
                f"{S}decoder.up.{lvl}.block.{j}",
                f"{D}decoder.up_blocks.{up}.resnets.{j}",
                block_in != block_out,
            )
            block_in = block_out
        if lvl != 0:
            m.add_wb(f"{S}decoder.up.{lvl}.upsample.conv", f"{D}decoder.up_blocks.{up}.upsamplers.0.conv")
    m.add_wb(f"{S}decoder.norm_out", f"{D}decoder.conv_norm_out")
    m.add_wb(f"{S}decoder.conv_out", f"{D}decoder.conv_out")
    m.add(f"{S}quantize.embedding.weight", f"{D}quantize.embedding.weight")
    m.add_wb(f"{S}quant_conv", f"{D}quant_conv")
    m.add_wb(f"{S}post_quant_conv", f"{D}post_quant_conv")
    return m


def cond_key_map(
    encoder_keys: list[str] | None,
    cond: DCConditionerConfig | ClassEmbedderConfig,
) -> KeyMap:
    """The conditioning stage.

    For a :class:`DCConditionerConfig`: ``cond_stage_model.mae.<k>`` -> ``fmri_encoder.<k>`` for each encoder
    key ``k``, the two mappers -> ``conditioner.*``, and ``model.diffusion_model.time_embed_condtion.*`` ->
    ``conditioner.time_mapper.*``. For a :class:`ClassEmbedderConfig`: ``cond_stage_model.embedding.weight``.
    """
    m = KeyMap()
    if isinstance(cond, ClassEmbedderConfig):
        m.add(f"{COND_PREFIX}embedding.weight", "conditioner.embedding.weight")
        return m
    for k in encoder_keys or []:
        m.add(f"{COND_PREFIX}mae.{k}", f"fmri_encoder.{k}")
    if not cond.global_pool:
        m.add_wb(f"{COND_PREFIX}channel_mapper.0", "conditioner.channel_mapper.0")
        m.add_wb(f"{COND_PREFIX}channel_mapper.1", "conditioner.channel_mapper.1")
    m.add_wb(f"{COND_PREFIX}dim_mapper", "conditioner.dim_mapper")
    if cond.use_time_cond:
        if cond.global_pool:
            m.add_wb(f"{UNET_PREFIX}{TIME_COND}", "conditioner.time_mapper")
        else:
            for i in range(3):
                m.add_wb(f"{UNET_PREFIX}{TIME_COND}.{i}", f"conditioner.time_mapper.{i}")
    return m


# ----------------------------------------------------------------------------------------------------------
# Configs of the original files
# ----------------------------------------------------------------------------------------------------------


@dataclass
class OriginalLDMConfig:
    """What a CompVis ``config.yaml`` says about the model (after checking it is one we can build)."""

    unet: UNetConfig
    vq: VQConfig
    schedule: NoiseScheduleConfig
    class_embedder: ClassEmbedderConfig | None
    scale_factor: float
    raw: dict[str, Any]


def _get(d: dict, dotted: str, path: Path, default: Any = ...) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            if default is ...:
                raise ConfigError("missing entry", path=path, field=dotted)
            return default
        cur = cur[part]
    return cur


def _section(d: dict, dotted: str, path: Path) -> dict:
    """The mapping at ``dotted`` (``ConfigError`` naming it when it is missing or not a mapping)."""
    value = _get(d, dotted, path)
    if not isinstance(value, dict):
        raise ConfigError(f"expected a mapping, got {type(value).__name__}", path=path, field=dotted)
    return value


def _yaml_number(d: dict, key: str, where: str, path: Path, default: Any = ..., kind: type = int) -> Any:
    """``d[key]`` as an ``int`` (``kind=int``: an integer, not a bool) or ``float`` (any real number).

    Raises:
        ConfigError: the entry is missing (without a default) or of another type, naming ``where.key``.
    """
    field_name = f"{where}.{key}"
    if key not in d or d[key] is None:
        if default is ...:
            raise ConfigError("missing entry", path=path, field=field_name)
        return default
    value = d[key]
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"expected {what}, got {value!r:.80}", path=path, field=field_name)
    return kind(value)


def read_label2img_config(path: str | os.PathLike, time_cond: bool | None = None) -> OriginalLDMConfig:
    """Parse a CompVis/MinD-Vis LDM ``config.yaml``.

    Args:
        path: the YAML file.
        time_cond: overrides ``unet_config.params.use_time_cond`` (the original's generative config does);
            ``None`` leaves the UNet without time conditioning (the label2img model as trained).

    Raises:
        ConfigError: missing entries, or options this implementation does not build (named by field).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", path=path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid YAML ({_one_line(exc)})", path=path) from None
    except RecursionError:
        raise ConfigError("not usable YAML: nested too deeply", path=path) from None
    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping at the top level", path=path)
    p = _section(raw, "model.params", path)
    target = str(_get(raw, "model.target", path, ""))
    if target and not target.endswith("LatentDiffusion"):
        raise ConfigError(f"expected a LatentDiffusion model, got {target}", path=path, field="model.target")
    if p.get("parameterization", "eps") != "eps":
        raise ConfigError(
            "only eps parameterisation is supported", path=path, field="model.params.parameterization"
        )
    if p.get("scale_by_std", False):
        _logger.info("%s: scale_by_std is set; the scale factor is read from the state dict", path)
    if p.get("conditioning_key", "crossattn") != "crossattn":
        raise ConfigError(
            f"conditioning_key {p.get('conditioning_key')!r} is not supported (crossattn only)",
            path=path,
            field="model.params.conditioning_key",
        )
    u = _section(p, "unet_config.params", path)
    U = "model.params.unet_config.params"
    for k, ok in (
        ("use_scale_shift_norm", False),
        ("resblock_updown", False),
        ("num_classes", None),
        ("use_linear_in_transformer", False),
        ("dims", 2),
    ):
        if u.get(k, ok) != ok:
            raise ConfigError(
                f"{k}={u.get(k)!r} is not supported", path=path, field=f"unet_config.params.{k}"
            )
    if u.get("num_head_channels", -1) not in (-1, None):
        raise ConfigError(
            "num_head_channels is not supported; use num_heads",
            path=path,
            field="unet_config.params.num_head_channels",
        )
    if not u.get("use_spatial_transformer", False):
        raise ConfigError(
            "only the spatial-transformer UNet is supported",
            path=path,
            field="unet_config.params.use_spatial_transformer",
        )
    try:
        unet = UNetConfig(
            sample_size=_yaml_number(
                u, "image_size", U, path, default=_yaml_number(p, "image_size", "model.params", path, None)
            ),
            in_channels=_yaml_number(u, "in_channels", U, path),
            out_channels=_yaml_number(u, "out_channels", U, path),
            model_channels=_yaml_number(u, "model_channels", U, path),
            channel_mult=_yaml_list(u, "channel_mult", U, path, (1, 2, 4, 8)),
            num_res_blocks=_yaml_number(u, "num_res_blocks", U, path),
            attention_resolutions=_yaml_list(u, "attention_resolutions", U, path),
            num_heads=_yaml_number(u, "num_heads", U, path, 1),
            transformer_depth=_yaml_number(u, "transformer_depth", U, path, 1),
            context_dim=_yaml_number(u, "context_dim", U, path),
            time_cond=bool(time_cond) if time_cond is not None else False,
        )
        fs = _section(p, "first_stage_config", path)
        if not str(fs.get("target", "VQModelInterface")).endswith("VQModelInterface"):
            raise ConfigError(
                f"only the VQ first stage is supported, got {fs.get('target')}",
                path=path,
                field="first_stage_config.target",
            )
        fsp = _section(fs, "params", path)
        dd = _section(fsp, "ddconfig", path)
        F, D = "model.params.first_stage_config.params", "model.params.first_stage_config.params.ddconfig"
        if dd.get("double_z", False):
            raise ConfigError("double_z is not supported", path=path, field="ddconfig.double_z")
        vq = VQConfig(
            resolution=_yaml_number(dd, "resolution", D, path),
            in_channels=_yaml_number(dd, "in_channels", D, path),
            out_ch=_yaml_number(dd, "out_ch", D, path),
            ch=_yaml_number(dd, "ch", D, path),
            ch_mult=_yaml_list(dd, "ch_mult", D, path),
            num_res_blocks=_yaml_number(dd, "num_res_blocks", D, path),
            z_channels=_yaml_number(dd, "z_channels", D, path),
            embed_dim=_yaml_number(fsp, "embed_dim", F, path),
            n_embed=_yaml_number(fsp, "n_embed", F, path),
            attn_resolutions=_yaml_list(dd, "attn_resolutions", D, path, ()),
        )
        schedule = NoiseScheduleConfig(
            num_train_timesteps=_yaml_number(p, "timesteps", "model.params", path, 1000),
            linear_start=_yaml_number(p, "linear_start", "model.params", path, 1e-4, float),
            linear_end=_yaml_number(p, "linear_end", "model.params", path, 2e-2, float),
            beta_schedule=str(p.get("beta_schedule", "linear")),
        )
        scale_factor = _yaml_number(p, "scale_factor", "model.params", path, 1.0, float)
        cs = p.get("cond_stage_config") or {}
        class_emb = None
        if isinstance(cs, dict) and str(cs.get("target", "")).endswith("ClassEmbedder"):
            cp = _section(cs, "params", path)
            C = "model.params.cond_stage_config.params"
            class_emb = ClassEmbedderConfig(
                n_classes=_yaml_number(cp, "n_classes", C, path, 1000),
                embed_dim=_yaml_number(cp, "embed_dim", C, path),
            )
    except ConfigError as exc:
        raise ConfigError(exc.detail, path=path, field=exc.field) from None
    if unet.sample_size != vq.latent_size:
        raise ConfigError(
            f"UNet image_size {unet.sample_size} != first-stage latent size {vq.latent_size}",
            path=path,
            field="unet_config.params.image_size",
        )
    if not scale_factor > 0:
        raise ConfigError(
            f"expected a number > 0, got {scale_factor}", path=path, field="model.params.scale_factor"
        )
    return OriginalLDMConfig(
        unet=unet, vq=vq, schedule=schedule, class_embedder=class_emb, scale_factor=scale_factor, raw=raw
    )


def _yaml_list(d: dict, key: str, where: str, path: Path, default: Any = ...) -> tuple:
    """``d[key]`` as a tuple: it must be a YAML list (the entries are checked by the config classes)."""
    if key not in d:
        if default is ...:
            raise ConfigError("missing entry", path=path, field=f"{where}.{key}")
        return tuple(default)
    value = d[key]
    if not isinstance(value, list):
        raise ConfigError(f"expected a list, got {value!r:.80}", path=path, field=f"{where}.{key}")
    return tuple(value)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def plain_config(obj: Any) -> Any:
    """A JSON-ready copy of a pickled config object (SimpleNamespace from the restricted unpickler)."""
    if isinstance(obj, SimpleNamespace):
        return {k: plain_config(v) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {str(k): plain_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_config(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


# ----------------------------------------------------------------------------------------------------------
# Applying a key map
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """What a conversion did with the source keys."""

    converted: int = 0
    schedule_buffers: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _mapped_shape(key_map: KeyMap, src: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Shape of ``src`` after conversion, or ``None`` when a 1x1-conv rule does not fit it."""
    if src in key_map.conv_to_linear:
        if len(shape) != 4 or tuple(shape[2:]) != (1, 1):
            return None
        return tuple(shape[:2])
    return tuple(shape)


def key_map_problems(
    source_shapes: Mapping[str, Sequence[int]],
    key_map: KeyMap,
    target_shapes: Mapping[str, Sequence[int]],
    ignore: set[str] | None = None,
    allow_unmapped_target: set[str] | None = None,
) -> list[str]:
    """Everything that keeps ``key_map`` from turning ``source`` into exactly ``target`` (names and shapes).

    Works on shapes only, so it also checks key lists of real-size models without allocating them. Empty
    when the conversion is complete and exact.
    """
    ignore = ignore or set()
    problems = []
    unknown = [k for k in source_shapes if k not in key_map.keys and k not in ignore]
    missing = [k for k in key_map.keys if k not in source_shapes]
    stray = [v for v in key_map.keys.values() if v not in target_shapes]
    if unknown:
        problems.append(f"{len(unknown)} key(s) this converter does not understand: {', '.join(unknown[:8])}")
    if missing:
        problems.append(f"{len(missing)} expected key(s) missing: {', '.join(missing[:8])}")
    if stray:
        problems.append(f"internal key map names {len(stray)} key(s) the model lacks: {', '.join(stray[:8])}")
    wrong = []
    for src, dst in key_map.keys.items():
        if src not in source_shapes or dst not in target_shapes:
            continue
        shape = _mapped_shape(key_map, src, tuple(source_shapes[src]))
        want = tuple(target_shapes[dst])
        if shape != want:
            wrong.append(f"{src} {list(source_shapes[src])} (expected {list(want)} for {dst})")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: {'; '.join(wrong[:6])}")
    produced = set(key_map.keys.values())
    uncovered = [k for k in target_shapes if k not in produced and k not in (allow_unmapped_target or set())]
    if uncovered:
        problems.append(f"{len(uncovered)} model key(s) receive no value: {', '.join(uncovered[:8])}")
    return problems


def apply_key_map(
    source: dict[str, Tensor],
    key_map: KeyMap,
    target: Mapping[str, Tensor],
    path: Path | None,
    ignore: set[str] | None = None,
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Map ``source`` through ``key_map`` onto exactly the keys and shapes of the state dict ``target``.

    Keys in ``ignore`` are dropped knowingly (and reported). Everything else must map, every mapped key must
    exist in the source, every target key must be produced, and every shape must match.

    Raises:
        CheckpointError: unknown source keys, missing source keys, uncovered target keys, wrong shapes,
            non-float or non-finite tensors.
    """
    ignore = ignore or set()
    problems = key_map_problems(
        {k: tuple(v.shape) for k, v in source.items()},
        key_map,
        {k: tuple(v.shape) for k, v in target.items()},
        ignore=ignore,
    )
    if problems:
        raise CheckpointError("; ".join(problems), path=path)
    out: dict[str, Tensor] = {}
    for src, dst in key_map.keys.items():
        v = source[src]
        if not v.is_floating_point():
            raise CheckpointError(f"dtype {v.dtype}, expected floating point", path=path, field=src)
        if src in key_map.conv_to_linear:
            v = v[:, :, 0, 0]
        out[dst] = v.detach().to(torch.float32).clone()
    nonfinite = [k for k, v in out.items() if not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise CheckpointError(f"non-finite values in {', '.join(nonfinite[:5])}", path=path)
    report = ConversionReport(converted=len(out), ignored=sorted(k for k in source if k in ignore))
    return out, report


def check_schedule_buffers(state: dict[str, Tensor], schedule: NoiseSchedule, path: Path | None) -> list[str]:
    """Compare the stored schedule buffers (any present of the twelve) with ours; return the names checked.

    Raises:
        CheckpointError: a buffer has the wrong length or differs by more than 1e-5 relative.
    """
    ours = schedule.original_buffers()
    seen = []
    for name in ORIGINAL_SCHEDULE_BUFFERS:
        if name not in state:
            continue
        v = state[name].detach().to(torch.float64).cpu()
        want = ours[name].to(torch.float64)
        if v.shape != want.shape:
            raise CheckpointError(
                f"schedule buffer has shape {list(v.shape)}, expected {list(want.shape)}",
                path=path,
                field=name,
            )
        finite = torch.isfinite(want) & torch.isfinite(v)
        if not torch.equal(torch.isfinite(want), torch.isfinite(v)) or not torch.allclose(
            v[finite], want[finite], rtol=1e-5, atol=1e-7
        ):
            err = float((v[finite] - want[finite]).abs().max()) if finite.any() else float("nan")
            raise CheckpointError(
                f"stored schedule differs from linear_start={schedule.config.linear_start}, "
                f"linear_end={schedule.config.linear_end}, T={schedule.num_train_timesteps} "
                f"(max abs difference {err:.3g})",
                path=path,
                field=name,
            )
        seen.append(name)
    return seen


# ----------------------------------------------------------------------------------------------------------
# Loading the original files
# ----------------------------------------------------------------------------------------------------------


def _state_dict_from(obj: Any, key: str, path: Path) -> dict[str, Tensor]:
    if not isinstance(obj, dict) or key not in obj:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"expected a dict with '{key}', got {keys}", path=path, field=key)
    sd = obj[key]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError("not a state dict of tensors", path=path, field=key)
    return dict(sd)


def _count(state: dict[str, Tensor], prefix: str) -> int:
    pat = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return len({int(mm.group(1)) for k in state if (mm := pat.match(k))})


def encoder_config_from_state(
    state: dict[str, Tensor],
    num_heads: int | None,
    base: Any | None,
    path: Path,
) -> Any:
    """MBMConfig of the cond stage's encoder from the finetuned tensors; heads from ``base`` or ``num_heads``.

    Widths, depth, MLP ratio, patch size and voxel count come from the tensors (``(pos_embed rows - 1) *
    patch_size``); no tensor shape carries the head count, so it comes from a stage-A config or the caller.
    """
    p = f"{COND_PREFIX}mae."
    for key, nd in (("patch_embed.proj.weight", 3), ("pos_embed", 3), ("blocks.0.mlp.fc1.weight", 2)):
        key_t = state.get(p + key)
        if key_t is None:
            raise CheckpointError(
                "missing from the state dict (not an fMRI-conditioned model?)", path=path, field=p + key
            )
        if key_t.ndim != nd:
            raise CheckpointError(
                f"expected a {nd}-D tensor, got {list(key_t.shape)}", path=path, field=p + key
            )
    proj = state[p + "patch_embed.proj.weight"]
    embed_dim, patch_size = int(proj.shape[0]), int(proj.shape[2])
    num_voxels = (int(state[p + "pos_embed"].shape[1]) - 1) * patch_size
    depth = _count(state, p + "blocks.")
    mlp_ratio = int(state[p + "blocks.0.mlp.fc1.weight"].shape[0]) / embed_dim
    heads = num_heads if num_heads is not None else (base.num_heads if base is not None else None)
    if heads is None:
        raise CheckpointError(
            "the encoder's head count is stored nowhere in this file; give the stage-A checkpoint it was built "
            "from (--mbm) or the head count (--encoder-heads)",
            path=path,
            field="num_heads",
        )
    try:
        if base is not None:
            cfg = dataclasses.replace(
                base,
                num_voxels=num_voxels,
                patch_size=patch_size,
                embed_dim=embed_dim,
                depth=depth,
                num_heads=int(heads),
                mlp_ratio=mlp_ratio,
            )
        else:
            cfg = MBMConfig(
                num_voxels=num_voxels,
                patch_size=patch_size,
                embed_dim=embed_dim,
                depth=depth,
                num_heads=int(heads),
                mlp_ratio=mlp_ratio,
                decoder_embed_dim=embed_dim,
                decoder_num_heads=int(heads),
                decoder_depth=0,
            )
    except ConfigError as exc:
        raise CheckpointError(
            f"the stored sizes give an invalid encoder ({exc.detail})", path=path, field=exc.field
        ) from None
    return cfg


@dataclass
class ConvertedModel:
    """A converted model and where it came from."""

    model: DCLDM
    source: dict[str, Any]


def _schedule_ignore(state: dict[str, Tensor]) -> set[str]:
    return {k for k in ORIGINAL_SCHEDULE_BUFFERS if k in state}


def load_label2img(
    label2img_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
) -> ConvertedModel:
    """The CompVis label2img model as a class-conditional :class:`DCLDM` (ClassEmbedder conditioning).

    Args:
        label2img_dir: folder with ``config.yaml`` and ``model.ckpt``.
        checkpoint: another checkpoint file instead of ``model.ckpt``.

    Raises:
        ConfigError / CheckpointError: unsupported config, missing files, unknown keys, wrong shapes.
    """
    d = Path(label2img_dir)
    cfg = read_label2img_config(d / "config.yaml", time_cond=False)
    ckpt = Path(checkpoint) if checkpoint is not None else d / "model.ckpt"
    obj = load_torch_file(ckpt)
    state = _state_dict_from(obj, "state_dict", ckpt)
    if cfg.class_embedder is None:
        raise ConfigError(
            "the config's cond stage is not a ClassEmbedder",
            path=d / "config.yaml",
            field="cond_stage_config.target",
        )
    schedule = NoiseSchedule(cfg.schedule)
    scale = _scale_factor(state, cfg.scale_factor)
    model = DCLDM(cfg.unet, cfg.vq, ClassEmbedder(cfg.class_embedder), schedule, scale_factor=scale)
    km = unet_key_map(cfg.unet)
    km.update(vq_key_map(cfg.vq))
    km.update(cond_key_map(None, cfg.class_embedder))
    ignore = _schedule_ignore(state) | ({"scale_factor"} if "scale_factor" in state else set())
    converted, report = apply_key_map(state, km, model.state_dict(), ckpt, ignore=ignore)
    report.schedule_buffers = check_schedule_buffers(state, schedule, ckpt)
    model.load_state_dict(converted, strict=True)
    model.eval()
    _logger.info(
        "%s: converted %d tensors (label2img, %d classes)",
        ckpt,
        report.converted,
        cfg.class_embedder.n_classes,
    )
    return ConvertedModel(
        model,
        {
            "format": "CompVis label2img LDM",
            "files": {"config.yaml": file_sha256(d / "config.yaml"), ckpt.name: file_sha256(ckpt)},
            "schedule_buffers_checked": report.schedule_buffers,
            "ignored_keys": report.ignored,
        },
    )


def _scale_factor(state: dict[str, Tensor], default: float) -> float:
    if "scale_factor" in state:
        v = state["scale_factor"]
        if v.numel() != 1:
            raise CheckpointError(f"scale_factor has shape {list(v.shape)}", field="scale_factor")
        return float(v)
    return float(default)


def load_finetuned(
    finetuned: str | os.PathLike,
    label2img_dir: str | os.PathLike,
    mbm: str | os.PathLike | None = None,
    encoder_heads: int | None = None,
) -> ConvertedModel:
    """A MinD-Vis ``finetuned.pth`` as a complete fMRI-conditioned :class:`DCLDM`.

    The architecture comes from ``label2img_dir/config.yaml`` (only the YAML is read), with ``global_pool``
    and ``use_time_cond`` taken from the pickled generative config; the encoder's sizes from the tensors and
    its head count from the stage-A checkpoint ``mbm`` (or ``encoder_heads``). Every weight, the trained
    ``pos_embed`` and the encoder-width ``mask_token`` included, comes from ``finetuned``.

    Raises:
        ConfigError / CheckpointError: unsupported config, missing files, unknown keys, wrong shapes, or a
        generative config that contradicts the stored keys.
    """
    fpath = Path(finetuned)
    obj = load_torch_file(fpath)
    state = _state_dict_from(obj, "model_state_dict", fpath)
    gen_cfg = obj.get("config") if isinstance(obj, dict) else None
    gen = plain_config(gen_cfg) if gen_cfg is not None else {}
    if not isinstance(gen, dict):
        raise CheckpointError(
            f"unexpected config object {type(gen_cfg).__name__}", path=fpath, field="config"
        )
    has_channel_mapper = f"{COND_PREFIX}channel_mapper.0.weight" in state
    has_time = any(k.startswith(f"{UNET_PREFIX}{TIME_COND}") for k in state)
    global_pool = gen.get("global_pool")
    use_time_cond = gen.get("use_time_cond")
    if global_pool is None:
        global_pool = not has_channel_mapper
        _logger.warning("%s: no pickled config; global_pool=%s inferred from the keys", fpath, global_pool)
    if use_time_cond is None:
        use_time_cond = has_time
        _logger.warning(
            "%s: no pickled config; use_time_cond=%s inferred from the keys", fpath, use_time_cond
        )
    if bool(global_pool) == has_channel_mapper:
        raise CheckpointError(
            f"config.global_pool={global_pool} contradicts the state dict "
            f"({'has' if has_channel_mapper else 'lacks'} cond_stage_model.channel_mapper)",
            path=fpath,
            field="config.global_pool",
        )
    if bool(use_time_cond) != has_time:
        raise CheckpointError(
            f"config.use_time_cond={use_time_cond} contradicts the state dict "
            f"({'has' if has_time else 'lacks'} {TIME_COND})",
            path=fpath,
            field="config.use_time_cond",
        )
    ldir = Path(label2img_dir)
    cfg = read_label2img_config(ldir / "config.yaml", time_cond=bool(use_time_cond))
    schedule = NoiseSchedule(cfg.schedule)

    base = None
    files = {fpath.name: file_sha256(fpath), "config.yaml": file_sha256(ldir / "config.yaml")}
    if mbm is not None:
        mpath = Path(mbm)
        base = load_mbm_weights(mpath)[0] if mpath.is_dir() else load_original_mbm_checkpoint(mpath)[0]
        if mpath.is_file():
            files[mpath.name] = file_sha256(mpath)
    enc_cfg = encoder_config_from_state(state, encoder_heads, base, fpath)
    encoder = FMRIEncoder(enc_cfg, global_pool=bool(global_pool))
    dim_w = state.get(f"{COND_PREFIX}dim_mapper.weight")
    if dim_w is None or dim_w.ndim != 2:
        raise CheckpointError("missing or malformed", path=fpath, field=f"{COND_PREFIX}dim_mapper.weight")
    if int(dim_w.shape[0]) != cfg.unet.context_dim:
        raise CheckpointError(
            f"dim_mapper gives width {int(dim_w.shape[0])} but the UNet's context_dim is "
            f"{cfg.unet.context_dim}",
            path=fpath,
            field=f"{COND_PREFIX}dim_mapper.weight",
        )
    cond_tokens = COND_TOKENS
    if has_channel_mapper:
        cond_tokens = int(state[f"{COND_PREFIX}channel_mapper.1.weight"].shape[0])
    cond_cfg = DCConditionerConfig(
        num_tokens=1 if global_pool else enc_cfg.num_patches,
        token_dim=enc_cfg.embed_dim,
        context_dim=cfg.unet.context_dim,
        time_embed_dim=cfg.unet.time_embed_dim,
        cond_tokens=cond_tokens,
        global_pool=bool(global_pool),
        use_time_cond=bool(use_time_cond),
    )
    conditioner = DCConditioner(cond_cfg)
    model = DCLDM(
        cfg.unet,
        cfg.vq,
        conditioner,
        schedule,
        fmri_encoder=encoder,
        scale_factor=_scale_factor(state, cfg.scale_factor),
    )
    km = unet_key_map(cfg.unet)
    km.update(vq_key_map(cfg.vq))
    km.update(cond_key_map(list(encoder.state_dict().keys()), cond_cfg))
    ignore = _schedule_ignore(state) | ({"scale_factor"} if "scale_factor" in state else set())
    converted, report = apply_key_map(state, km, model.state_dict(), fpath, ignore=ignore)
    report.schedule_buffers = check_schedule_buffers(state, schedule, fpath)
    model.load_state_dict(converted, strict=True)
    model.eval()
    _logger.info(
        "%s: converted %d tensors (global_pool=%s, use_time_cond=%s, %d voxels)",
        fpath,
        report.converted,
        global_pool,
        use_time_cond,
        enc_cfg.num_voxels,
    )
    return ConvertedModel(
        model,
        {
            "format": "MinD-Vis finetuned stage-B checkpoint",
            "files": files,
            "original_config": gen,
            "schedule_buffers_checked": report.schedule_buffers,
            "ignored_keys": report.ignored,
        },
    )


def init_from_label2img_and_mbm(
    label2img_dir: str | os.PathLike,
    mbm: str | os.PathLike,
    global_pool: bool = False,
    use_time_cond: bool = True,
    seed: int = 0,
    original_quirks: bool = False,
) -> ConvertedModel:
    """The stage-B starting point, as the original builds it before fine-tuning.

    UNet and VQ from the label2img checkpoint (its class embedder is dropped), the fMRI encoder from the
    stage-A checkpoint, fresh mappers and time conditioner (PyTorch default initialisation, seeded).

    Args:
        original_quirks: with ``global_pool``, skip the encoder's LayerNorm weights as the original loader
            does (off by default: that is a bug).
    """
    base = load_label2img(label2img_dir)
    prior = base.model
    with torch.random.fork_rng(devices=[]):  # seeded fresh weights without touching the caller's RNG
        torch.manual_seed(seed)
        encoder = FMRIEncoder.from_mbm(mbm, global_pool=global_pool, original_quirks=original_quirks)
        unet = build_unet(dataclasses.replace(prior.unet_config, time_cond=bool(use_time_cond)))
        unet.load_state_dict(prior.unet.state_dict(), strict=True)
        model = DCLDM.for_fmri(
            LDMConfig(unet=prior.unet_config, vq=prior.vq_config),
            encoder,
            use_time_cond=use_time_cond,
            schedule=prior.schedule,
            unet=unet,
            vq=prior.vq,
        )
    model.scale_factor = prior.scale_factor
    model.eval()
    src = dict(base.source)
    src.update(
        {
            "format": "label2img LDM + stage-A encoder (untrained conditioner)",
            "mbm": str(Path(mbm).name),
            "seed": seed,
        }
    )
    return ConvertedModel(model, src)


def convert(
    out_dir: str | os.PathLike,
    finetuned: str | os.PathLike | None = None,
    label2img_dir: str | os.PathLike | None = None,
    mbm: str | os.PathLike | None = None,
    encoder_heads: int | None = None,
    global_pool: bool = False,
    use_time_cond: bool = True,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Convert original checkpoints to a mindvis folder.

    * ``finetuned`` (+ ``label2img_dir`` for its config.yaml, + ``mbm`` or ``encoder_heads``): a complete
      fMRI pipeline folder;
    * ``label2img_dir`` + ``mbm``: the untrained stage-B starting point (pipeline folder);
    * ``label2img_dir`` alone: the class-conditional prior (pipeline folder with a class embedder);
    * ``mbm`` alone: a stage-A model folder.

    Raises:
        ConfigError: a combination that makes no sense.
        CheckpointError / OutputExistsError: see the loaders; the output folder appears complete or not at all.
    """
    out_dir = Path(out_dir)
    prepare_output_dir(out_dir, overwrite=overwrite)
    if finetuned is not None:
        if label2img_dir is None:
            raise ConfigError(
                "converting a finetuned checkpoint needs --label2img-dir (its config.yaml gives "
                "the architecture)",
                field="label2img_dir",
            )
        conv = load_finetuned(finetuned, label2img_dir, mbm=mbm, encoder_heads=encoder_heads)
    elif label2img_dir is not None and mbm is not None:
        conv = init_from_label2img_and_mbm(
            label2img_dir, mbm, global_pool=global_pool, use_time_cond=use_time_cond, seed=seed
        )
    elif label2img_dir is not None:
        conv = load_label2img(label2img_dir)
    elif mbm is not None:
        return convert_mbm_checkpoint(mbm, out_dir, overwrite=overwrite)
    else:
        raise ConfigError(
            "nothing to convert: give --finetuned, --label2img-dir and/or --mbm", field="inputs"
        )
    pipe = MindVisPipeline(conv.model)
    pipe.save_pretrained(out_dir, overwrite=overwrite, source=conv.source)
    return out_dir


__all__ = [
    "ConversionReport",
    "ConvertedModel",
    "KeyMap",
    "OriginalLDMConfig",
    "apply_key_map",
    "key_map_problems",
    "check_schedule_buffers",
    "cond_key_map",
    "convert",
    "encoder_config_from_state",
    "init_from_label2img_and_mbm",
    "load_finetuned",
    "load_label2img",
    "plain_config",
    "read_label2img_config",
    "unet_key_map",
    "vq_key_map",
]
