"""Double-conditioned latent diffusion (MinD-Vis stage B, Chen et al., CVPR 2023) on diffusers.

The latent diffusion model of Rombach et al. (CVPR 2022) in its CompVis "label2img" form:

* a VQ-regularised autoencoder (diffusers :class:`~diffusers.VQModel`) maps images ``[N, 3, H, W]`` in
  ``[-1, 1]`` to unquantised latents ``[N, 3, H/f, W/f]``; decoding always quantises first;
* a UNet denoiser (diffusers :class:`~diffusers.UNet2DConditionModel`) predicts the noise ``eps`` of a noised
  latent ``x_t`` at timestep ``t``, attending to a context ``[N, T, C]`` by cross-attention. MinD-Vis adds a
  second path: a vector ``[N, 4 * model_channels]`` computed from the context is added to the time embedding
  (passed as ``class_labels`` to a UNet built with ``class_embed_type="identity"``).

:class:`DCLDM` holds the fMRI encoder, the conditioner, the UNet and the autoencoder, and provides the pieces
training and sampling use (conditioning, ``q_sample``, the epsilon loss, image encode/decode).

The builders express the original's configuration through typed configs (:class:`UNetConfig`,
:class:`VQConfig`) with named presets (:func:`ldm_preset`: ``label2img``, ``small``, ``tiny``). Conventions
that the original fixes and diffusers leaves open are set here: time embedding ordered ``[cos, sin]`` with no
frequency shift, one attention head of the full channel width, ResBlock GroupNorm eps 1e-5 and transformer
GroupNorm eps 1e-6, VQ codebook search by ``|z|^2 + |e|^2 - 2 z.e`` with the legacy loss, latent scale 1.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from mindvis.config import (
    MAX_DEPTH,
    MAX_LEVELS,
    MAX_ROWS,
    MAX_SPATIAL,
    ConfigMixin,
    check_bool,
    check_float,
    check_int,
    check_int_tuple,
    check_parameters,
)
from mindvis.errors import ConfigError
from mindvis.models.conditioning import (
    COND_TOKENS,
    ClassEmbedder,
    Conditioning,
    DCConditioner,
    DCConditionerConfig,
)
from mindvis.sampling import NoiseSchedule

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import UNet2DConditionModel, VQModel

_logger = logging.getLogger(__name__)

GROUPNORM_GROUPS = 32


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


@dataclass
class UNetConfig(ConfigMixin):
    """The denoiser, in the CompVis ``UNetModel`` vocabulary.

    Args:
        sample_size: latent height and width.
        in_channels / out_channels: latent channels (3 for VQ-f4).
        model_channels: width of the first level.
        channel_mult: width multiplier per level; one level per entry, a 2x downsampling between levels.
        num_res_blocks: ResBlocks per level on the way down (one more per level on the way up).
        attention_resolutions: downsampling factors (1, 2, 4, ...) of the levels that have cross-attention
            transformers; the middle block always has one.
        num_heads: attention heads; the head width is the level's channel count divided by this.
        transformer_depth: transformer blocks per attention layer.
        context_dim: C, the cross-attention context width.
        time_cond: build the additive time-conditioning input (MinD-Vis); the UNet then requires a
            ``[N, 4 * model_channels]`` vector with every call.
        norm_groups: GroupNorm groups (every level width must be a multiple).

    Derived (read-only): ``time_embed_dim = 4 * model_channels``, ``block_channels``.
    """

    sample_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 5)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8, 4, 2)
    num_heads: int = 1
    transformer_depth: int = 1
    context_dim: int = 512
    time_cond: bool = True
    norm_groups: int = GROUPNORM_GROUPS

    def __post_init__(self) -> None:
        for name in (
            "in_channels",
            "out_channels",
            "model_channels",
            "num_heads",
            "context_dim",
            "norm_groups",
        ):
            check_int(name, getattr(self, name))
        check_int("sample_size", self.sample_size, maximum=MAX_SPATIAL)
        check_int("num_res_blocks", self.num_res_blocks, maximum=MAX_DEPTH)
        check_int("transformer_depth", self.transformer_depth, maximum=MAX_DEPTH)
        self.channel_mult = check_int_tuple("channel_mult", self.channel_mult)
        if len(self.channel_mult) > MAX_LEVELS:
            raise ConfigError(f"more than {MAX_LEVELS} levels", field="channel_mult")
        self.attention_resolutions = check_int_tuple(
            "attention_resolutions", self.attention_resolutions, allow_empty=True, maximum=MAX_SPATIAL
        )
        self.time_cond = check_bool("time_cond", self.time_cond)
        for ch in self.block_channels:
            check_int("model_channels", ch)  # every level's width (model_channels x channel_mult) is bounded
            if ch % self.norm_groups:
                raise ConfigError(
                    f"level width {ch} is not a multiple of the {self.norm_groups} GroupNorm groups",
                    field="model_channels",
                )
            if ch % self.num_heads:
                raise ConfigError(
                    f"level width {ch} is not divisible by num_heads {self.num_heads}", field="num_heads"
                )
        down = 2 ** (len(self.channel_mult) - 1)
        if self.sample_size % down:
            raise ConfigError(
                f"sample_size {self.sample_size} must be divisible by {down} "
                f"({len(self.channel_mult)} levels)",
                field="sample_size",
            )
        bad = [r for r in self.attention_resolutions if r not in self.level_factors]
        if bad:
            raise ConfigError(
                f"attention_resolutions {bad} match no level (factors {self.level_factors})",
                field="attention_resolutions",
            )
        check_parameters("UNet", self._parameter_lower_bounds())

    def _parameter_lower_bounds(self) -> dict[str, int]:
        # per level 2 * num_res_blocks + 1 ResBlocks (down and up), each with at least one 3x3 conv w -> w, and
        # as many transformer blocks (18 w^2 + 2 w C weights each) on the attention levels; the middle block
        # has two ResBlocks and one transformer at the last width
        blocks = 2 * self.num_res_blocks + 1
        res = sum(blocks * 9 * w * w for w in self.block_channels)
        att = sum(
            blocks * self.transformer_depth * (18 * w * w + 2 * w * self.context_dim)
            for w, a in zip(self.block_channels, self.attention_levels, strict=True)
            if a
        )
        w = self.block_channels[-1]
        res += 2 * 9 * w * w + 9 * (self.in_channels + self.out_channels) * self.model_channels
        att += self.transformer_depth * (18 * w * w + 2 * w * self.context_dim)
        return {"model_channels": res + 20 * self.model_channels**2, "transformer_depth": att}

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def block_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def level_factors(self) -> tuple[int, ...]:
        return tuple(2**i for i in range(len(self.channel_mult)))

    @property
    def attention_levels(self) -> tuple[bool, ...]:
        """Per level (finest first): whether it has transformers."""
        return tuple(f in self.attention_resolutions for f in self.level_factors)


@dataclass
class VQConfig(ConfigMixin):
    """The VQ-regularised autoencoder, in the CompVis ``VQModelInterface`` / ``ddconfig`` vocabulary.

    Args:
        resolution: image height and width.
        in_channels / out_ch: image channels.
        ch: width of the first level; ``ch_mult`` one multiplier per level (downsampling ``2^(levels-1)``).
        num_res_blocks: ResnetBlocks per level in the encoder (the decoder has one more).
        z_channels: encoder output channels; ``embed_dim``: codebook vector width; ``n_embed``: codebook size.
        attn_resolutions: resolutions with attention inside the levels; only ``[]`` is supported (label2img).
        beta: commitment weight of the legacy quantiser loss.
    """

    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 3
    embed_dim: int = 3
    n_embed: int = 8192
    attn_resolutions: tuple[int, ...] = ()
    beta: float = 0.25
    norm_groups: int = GROUPNORM_GROUPS

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_ch", "ch", "z_channels", "embed_dim", "norm_groups"):
            check_int(name, getattr(self, name))
        check_int("resolution", self.resolution, maximum=MAX_SPATIAL)
        check_int("num_res_blocks", self.num_res_blocks, maximum=MAX_DEPTH)
        check_int("n_embed", self.n_embed, maximum=MAX_ROWS)
        self.ch_mult = check_int_tuple("ch_mult", self.ch_mult)
        if len(self.ch_mult) > MAX_LEVELS:
            raise ConfigError(f"more than {MAX_LEVELS} levels", field="ch_mult")
        for m in self.ch_mult:
            check_int("ch", self.ch * m)  # every level's width (ch x ch_mult) is bounded
        self.attn_resolutions = check_int_tuple("attn_resolutions", self.attn_resolutions, allow_empty=True)
        if self.attn_resolutions:
            raise ConfigError(
                "attention inside the autoencoder levels is not supported (label2img uses [])",
                field="attn_resolutions",
            )
        self.beta = check_float("beta", self.beta, minimum=0.0)
        for m in self.ch_mult:
            if (self.ch * m) % self.norm_groups:
                raise ConfigError(
                    f"level width {self.ch * m} is not a multiple of {self.norm_groups}", field="ch"
                )
        if self.resolution % self.downsample_factor:
            raise ConfigError(
                f"resolution {self.resolution} must be divisible by {self.downsample_factor}",
                field="resolution",
            )
        # encoder num_res_blocks and decoder num_res_blocks + 1 ResBlocks per level, each with at least one
        # 3x3 conv w -> w; two more in each middle block; the codebook
        widths = [self.ch * m for m in self.ch_mult]
        convs = sum((2 * self.num_res_blocks + 1) * 9 * w * w for w in widths) + 4 * 9 * widths[-1] ** 2
        check_parameters("VQ autoencoder", {"ch": convs, "n_embed": self.n_embed * self.embed_dim})

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.downsample_factor


@dataclass
class LDMConfig(ConfigMixin):
    """UNet and autoencoder sizes of one latent diffusion model; they must agree on the latent shape."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vq: VQConfig = field(default_factory=VQConfig)

    def __post_init__(self) -> None:
        if isinstance(self.unet, Mapping):
            self.unet = UNetConfig.from_dict(self.unet)
        if isinstance(self.vq, Mapping):
            self.vq = VQConfig.from_dict(self.vq)
        if self.unet.in_channels != self.vq.embed_dim or self.unet.out_channels != self.vq.embed_dim:
            raise ConfigError(
                f"the UNet's channels ({self.unet.in_channels}/{self.unet.out_channels}) must equal "
                f"the latent channels ({self.vq.embed_dim})",
                field="unet.in_channels",
            )
        if self.unet.sample_size != self.vq.latent_size:
            raise ConfigError(
                f"the UNet sample_size ({self.unet.sample_size}) must equal the latent size "
                f"({self.vq.latent_size})",
                field="unet.sample_size",
            )

    def to_dict(self) -> dict[str, Any]:
        return {"unet": self.unet.to_dict(), "vq": self.vq.to_dict()}


LDMPreset = Literal["label2img", "small", "tiny"]


def ldm_preset(name: LDMPreset | str, **unet_overrides: Any) -> LDMConfig:
    """Named sizes.

    * ``label2img``: the CompVis ImageNet label2img model MinD-Vis starts from: 256 px images, VQ-f4 (ch 128,
      ch_mult 1,2,4, 8192 codes, 3 channels), UNet 192 x (1,2,3,5) with attention at factors 2, 4, 8, one
      head, context 512 (about 401 M UNet parameters).
    * ``small``: 64 px images, 16 x 16 x 3 latents, UNet 64 x (1,2,2,4), context 256, VQ 64 x (1,2,2),
      1024 codes; for CPU training on the embedded benchmark.
    * ``tiny``: the reference fixtures' size: 64 px, UNet 32 x (1,1,1,1), context 64, VQ 32 x (1,1,1),
      64 codes; for tests.

    ``unet_overrides`` replace UNet fields (e.g. ``context_dim``, ``time_cond``).
    """
    if name == "label2img":
        unet = dict(sample_size=64, model_channels=192, channel_mult=(1, 2, 3, 5), context_dim=512)
        vq = dict(resolution=256, ch=128, ch_mult=(1, 2, 4), n_embed=8192)
    elif name == "small":
        unet = dict(sample_size=16, model_channels=64, channel_mult=(1, 2, 2, 4), context_dim=256)
        vq = dict(resolution=64, ch=64, ch_mult=(1, 2, 2), n_embed=1024)
    elif name == "tiny":
        unet = dict(sample_size=16, model_channels=32, channel_mult=(1, 1, 1, 1), context_dim=64)
        vq = dict(resolution=64, ch=32, ch_mult=(1, 1, 1), n_embed=64)
    else:
        raise ConfigError(f"unknown LDM preset {name!r}; choose label2img, small or tiny", field="preset")
    return LDMConfig(unet=UNetConfig(**{**unet, **unet_overrides}), vq=VQConfig(**vq))


# ----------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------


def build_unet(config: UNetConfig) -> UNet2DConditionModel:
    """A diffusers UNet with the CompVis ``UNetModel`` (legacy, spatial transformer) structure.

    Level ``i`` is a ``CrossAttnDownBlock2D`` when ``2**i`` is in ``attention_resolutions``, else a
    ``DownBlock2D``; the up path mirrors it. ``attention_head_dim`` is diffusers' legacy name for the head
    count, so ``num_heads`` goes there.
    """
    from diffusers import UNet2DConditionModel

    c = config
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in c.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(c.attention_levels))
    return UNet2DConditionModel(
        sample_size=c.sample_size,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        flip_sin_to_cos=True,  # [cos, sin]
        freq_shift=0,  # frequencies exp(-ln(10000) i / half)
        down_block_types=down,
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=up,
        block_out_channels=c.block_channels,
        layers_per_block=c.num_res_blocks,
        downsample_padding=1,
        act_fn="silu",
        norm_num_groups=c.norm_groups,
        norm_eps=1e-5,  # ResBlocks and the output norm; transformer GroupNorms are 1e-6 in diffusers too
        cross_attention_dim=c.context_dim,
        transformer_layers_per_block=c.transformer_depth,
        attention_head_dim=c.num_heads,
        use_linear_projection=False,  # 1x1 conv proj_in / proj_out
        class_embed_type="identity" if c.time_cond else None,
        upcast_attention=False,
        resnet_time_scale_shift="default",
    )


def build_vq(config: VQConfig) -> VQModel:
    """A diffusers VQModel with the CompVis VQ-f4 structure (legacy quantiser loss, latent scale 1)."""
    from diffusers import VQModel

    c = config
    n = len(c.ch_mult)
    return VQModel(
        in_channels=c.in_channels,
        out_channels=c.out_ch,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(c.ch * m for m in c.ch_mult),
        layers_per_block=c.num_res_blocks,
        act_fn="silu",
        latent_channels=c.z_channels,
        sample_size=c.resolution,
        num_vq_embeddings=c.n_embed,
        norm_num_groups=c.norm_groups,
        vq_embed_dim=c.embed_dim,
        scaling_factor=1.0,
        norm_type="group",
        mid_block_add_attention=True,
    )


# ----------------------------------------------------------------------------------------------------------
# VQ autoencoder interface
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Quantized:
    """Result of :func:`vq_quantize`.

    Attributes:
        quant: ``[N, E, h, w]`` straight-through value ``z + (e - z)`` (gradients flow to ``z``).
        indices: ``[N, h, w]`` int64 chosen codes.
        loss: scalar ``mean((e - z)^2) * (1 + beta)`` (legacy placement of beta; the value is what matters).
    """

    quant: Tensor
    indices: Tensor
    loss: Tensor


def vq_encode(vq: VQModel, images: Tensor) -> Tensor:
    """Encoder then ``quant_conv``, no quantisation: ``images: [N, 3, H, W]`` in [-1, 1] -> ``[N, E, H/f, W/f]``."""
    return vq.quant_conv(vq.encoder(images))


#: Elements of one block of the ``[rows, K]`` distance matrix in :func:`vq_quantize` (64 MiB in float32).
VQ_SEARCH_BLOCK = 1 << 24


def vq_quantize(vq: VQModel, z: Tensor, beta: float = 0.25) -> Quantized:
    """Nearest codebook entries of ``z: [N, E, h, w]`` by ``|z|^2 + |e|^2 - 2 z.e``.

    The ``[M, K]`` distances (``M = N h w`` latent vectors, ``K`` codes) are computed in blocks of rows, without
    gradient (the argmin has none), so the search holds at most :data:`VQ_SEARCH_BLOCK` distances at a time:
    decoding five 256 px images (20480 vectors, 8192 codes) otherwise needs about 2 GB for them. The search
    always runs in float32 (also for bfloat16 weights or under autocast), so reduced precision elsewhere does
    not flip codes whose distances differ by less than bfloat16 resolves.
    """
    emb = vq.quantize.embedding.weight  # [K, E]
    zf = z.permute(0, 2, 3, 1).contiguous()  # [N, h, w, E]
    flat = zf.view(-1, zf.shape[-1])  # [M, E]
    rows = max(1, VQ_SEARCH_BLOCK // max(1, emb.shape[0]))
    with torch.no_grad(), torch.autocast(flat.device.type, enabled=False):
        emb32 = emb.float()
        e_sq = (emb32**2).sum(dim=1)  # [K]
        idx = torch.cat(
            [
                torch.argmin(
                    (f**2).sum(dim=1, keepdim=True) + e_sq - 2 * torch.einsum("bd,dn->bn", f, emb32.t()),
                    dim=1,
                )
                for f in flat.float().split(rows)
            ]
        )  # [M]
    e = emb[idx].view(zf.shape)
    loss = torch.mean((e.detach() - zf) ** 2) + beta * torch.mean((e - zf.detach()) ** 2)
    quant = zf + (e - zf).detach()
    return Quantized(quant=quant.permute(0, 3, 1, 2).contiguous(), indices=idx.view(zf.shape[:-1]), loss=loss)


def vq_decode(vq: VQModel, z: Tensor, quantize: bool = True) -> Tensor:
    """Quantise (unless told not to), ``post_quant_conv``, decoder: ``[N, E, h, w]`` -> images in about [-1, 1]."""
    if quantize:
        z = vq_quantize(vq, z).quant
    return vq.decoder(vq.post_quant_conv(z))


def images_to_uint8(images: Tensor) -> Tensor:
    """``[N, 3, H, W]`` in [-1, 1] -> ``[N, H, W, 3]`` uint8, as the original: ``255 * clamp((x + 1) / 2)`` truncated."""
    x01 = torch.clamp((images.float() + 1.0) / 2.0, 0.0, 1.0)
    return (255.0 * x01).permute(0, 2, 3, 1).to(torch.uint8)  # float -> uint8 truncates toward zero


# ----------------------------------------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------------------------------------

TrainablePreset = Literal["original", "cond_stage", "unet_and_cond", "all"]


@dataclass
class LossOutput:
    """Result of :meth:`DCLDM.training_loss`.

    Attributes:
        loss: scalar training loss (the batch mean of the per-sample epsilon MSE).
        loss_simple: the same (``l_simple_weight`` is 1 and the ELBO weight 0, as in the original).
        loss_vlb: the variational-bound-weighted MSE, for logging only.
        model_output: ``[N, C, h, w]`` predicted eps; ``noise``, ``t``, ``x_t``, ``x0``: what it was given.
    """

    loss: Tensor
    loss_simple: Tensor
    loss_vlb: Tensor
    model_output: Tensor
    noise: Tensor
    t: Tensor
    x_t: Tensor
    x0: Tensor


class DCLDM(nn.Module):
    """Double-conditioned latent diffusion model: conditioning stage + UNet + VQ autoencoder + noise schedule.

    With an fMRI encoder, the conditioning input is fMRI ``[N, V]``: encoder tokens ``[N, L, D]`` go through
    the :class:`~mindvis.models.conditioning.DCConditioner`. Without one, ``conditioner`` is a
    :class:`~mindvis.models.conditioning.ClassEmbedder` and the input is class labels ``[N]`` (the
    class-conditional image prior that stage B starts from).

    Args:
        unet_config / vq_config: sizes of the denoiser and the autoencoder.
        conditioner: ``DCConditioner`` or ``ClassEmbedder``.
        schedule: the noise schedule (default: the original's linear 0.0015 -> 0.0195 over 1000 steps).
        fmri_encoder: ``FMRIEncoder`` or ``None``.
        scale_factor: latent scale (1.0 for the original VQ model).
        unet / vq: already built networks (default: fresh ones from the configs).
    """

    def __init__(
        self,
        unet_config: UNetConfig,
        vq_config: VQConfig,
        conditioner: nn.Module,
        schedule: NoiseSchedule | None = None,
        fmri_encoder: nn.Module | None = None,
        scale_factor: float = 1.0,
        unet: UNet2DConditionModel | None = None,
        vq: VQModel | None = None,
    ):
        super().__init__()

        LDMConfig(unet=unet_config, vq=vq_config)  # checks that the two agree
        if fmri_encoder is not None and not isinstance(conditioner, DCConditioner):
            raise ConfigError("an fMRI encoder needs a DCConditioner", field="conditioner")
        if fmri_encoder is None and not isinstance(conditioner, ClassEmbedder):
            raise ConfigError(
                "without an fMRI encoder the conditioner must be a ClassEmbedder", field="conditioner"
            )
        uses_time = getattr(conditioner, "time_dim", None) is not None
        if uses_time != unet_config.time_cond:
            raise ConfigError(
                f"the conditioner {'gives' if uses_time else 'gives no'} time vector but the UNet "
                f"has time_cond={unet_config.time_cond}",
                field="time_cond",
            )
        if uses_time and conditioner.time_dim != unet_config.time_embed_dim:
            raise ConfigError(
                f"the conditioner's time vector has width {conditioner.time_dim}, the UNet's time "
                f"embedding {unet_config.time_embed_dim}",
                field="time_embed_dim",
            )
        ctx_dim = (
            conditioner.config.context_dim
            if isinstance(conditioner, DCConditioner)
            else conditioner.config.embed_dim
        )
        if ctx_dim != unet_config.context_dim:
            raise ConfigError(
                f"the conditioner gives context width {ctx_dim}, the UNet expects {unet_config.context_dim}",
                field="context_dim",
            )
        self.fmri_encoder = fmri_encoder
        self.conditioner = conditioner
        self.unet = unet if unet is not None else build_unet(unet_config)
        self.vq = vq if vq is not None else build_vq(vq_config)
        self.schedule = schedule if schedule is not None else NoiseSchedule()
        schedule = self.schedule
        self.unet_config = unet_config
        self.vq_config = vq_config
        self.scale_factor = float(scale_factor)
        acp = schedule.alphas_cumprod_tensor()
        self.register_buffer("sqrt_alphas_cumprod", acp.sqrt(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1.0 - acp).sqrt(), persistent=False)
        self.register_buffer("lvlb_weights", schedule.lvlb_weights_tensor(), persistent=False)

    @classmethod
    def for_fmri(
        cls,
        ldm: LDMConfig,
        fmri_encoder: nn.Module,
        *,
        use_time_cond: bool = True,
        use_cross_attn: bool = True,
        cond_tokens: int | None = None,
        standardize_tokens: bool = False,
        basis_size: int = 0,
        schedule: NoiseSchedule | None = None,
        unet: UNet2DConditionModel | None = None,
        vq: VQModel | None = None,
    ) -> DCLDM:
        """A model around an fMRI encoder (e.g. ``FMRIEncoder.from_mbm(...)``) with a fresh conditioner.

        The encoder must expose ``embed_dim``, ``num_patches`` and ``global_pool``. ``unet`` / ``vq`` (e.g. from
        a class-conditional prior) are used when given, else built fresh. ``basis_size`` > 0 confines the context
        to a basis that the caller then sets (:meth:`DCConditioner.set_basis`).
        """

        unet_config = dataclasses.replace(ldm.unet, time_cond=bool(use_time_cond))
        gp = bool(getattr(fmri_encoder, "global_pool", False))
        cond = DCConditioner(
            DCConditionerConfig(
                num_tokens=1 if gp else int(fmri_encoder.num_patches),
                token_dim=int(fmri_encoder.embed_dim),
                context_dim=unet_config.context_dim,
                time_embed_dim=unet_config.time_embed_dim,
                cond_tokens=COND_TOKENS if cond_tokens is None else cond_tokens,
                global_pool=gp,
                use_cross_attn=use_cross_attn,
                use_time_cond=use_time_cond,
                standardize_tokens=bool(standardize_tokens),
                basis_size=int(basis_size),
            )
        )
        return cls(unet_config, ldm.vq, cond, schedule, fmri_encoder=fmri_encoder, unet=unet, vq=vq)

    @property
    def is_fmri_conditioned(self) -> bool:
        return self.fmri_encoder is not None

    @property
    def num_timesteps(self) -> int:
        return self.schedule.config.num_train_timesteps

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one latent."""
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (int(cfg.in_channels), int(size), int(size))

    # ---- conditioning ----------------------------------------------------------------------------------

    def condition(self, cond: Tensor) -> Conditioning:
        """fMRI ``[N, V]`` (or class labels ``[N]`` for a class prior) -> context ``[N, T, C]`` + time vector."""
        if self.fmri_encoder is not None:
            tokens = self.fmri_encoder(cond)
            return self.conditioner(tokens.to(next(self.conditioner.parameters()).dtype))
        return self.conditioner(cond)

    # ---- denoiser -------------------------------------------------------------------------------------

    def eps(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Predicted noise. ``x_t: [N, C, h, w]``, ``t: [N]`` int64 -> ``[N, C, h, w]``."""
        return self.unet(
            x_t, t, encoder_hidden_states=cond.context, class_labels=cond.time_cond, return_dict=False
        )[0]

    # ---- autoencoder ----------------------------------------------------------------------------------

    def encode_images(self, images: Tensor) -> Tensor:
        """``images: [N, 3, H, W]`` in [-1, 1] -> diffusion latents ``[N, C, h, w]`` (unquantised, scaled)."""
        return vq_encode(self.vq, images) * self.scale_factor

    def decode_latents(self, z: Tensor) -> Tensor:
        """Diffusion latents ``[N, C, h, w]`` -> images ``[N, 3, H, W]`` in about [-1, 1] (quantises first)."""
        return vq_decode(self.vq, z / self.scale_factor)

    # ---- diffusion ------------------------------------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``sqrt(acp[t]) x0 + sqrt(1 - acp[t]) noise``; ``x0, noise: [N, C, h, w]``, ``t: [N]``."""
        a = self.sqrt_alphas_cumprod[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        s = self.sqrt_one_minus_alphas_cumprod[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return a * x0 + s * noise

    def p_losses(
        self,
        x0: Tensor,
        cond: Conditioning,
        t: Tensor,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """Epsilon-prediction loss at given latents ``x0: [N, C, h, w]`` and timesteps ``t: [N]``."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        out = self.eps(x_t, t, cond)
        per_sample = ((noise.float() - out.float()) ** 2).mean(dim=tuple(range(1, out.ndim)))  # [N]
        loss_simple = per_sample.mean()
        loss_vlb = (self.lvlb_weights[t] * per_sample).mean()
        return LossOutput(
            loss=loss_simple,
            loss_simple=loss_simple,
            loss_vlb=loss_vlb,
            model_output=out,
            noise=noise,
            t=t,
            x_t=x_t,
            x0=x0,
        )

    def training_loss(
        self,
        cond_input: Tensor,
        images: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """The stage-B objective for one batch.

        Args:
            cond_input: fMRI ``[N, V]`` (or class labels ``[N]`` for a class prior).
            images: ``[N, 3, H, W]`` in [-1, 1].
            t: ``[N]`` int64 timesteps; uniform in ``[0, T)`` when omitted.
            noise: ``[N, C, h, w]``; standard normal when omitted.
            generator: drives the random ``t`` and ``noise``.
        """
        with torch.no_grad():
            x0 = self.encode_images(images)
        cond = self.condition(cond_input)
        if t is None:
            t = torch.randint(
                0,
                self.num_timesteps,
                (x0.shape[0],),
                generator=generator,
                device=generator.device if generator is not None else "cpu",
            ).to(x0.device)
        return self.p_losses(x0, cond, t.long(), noise=noise, generator=generator)

    # ---- what to train --------------------------------------------------------------------------------

    def named_trainable_parameters(
        self, preset: TrainablePreset = "original"
    ) -> list[tuple[str, nn.Parameter]]:
        """The parameters a stage-B run optimises.

        * ``original``: what MinD-Vis trains (``train_cond_stage_only``): the fMRI encoder (including its
          ``pos_embed``; the unused cls/mask tokens are left out), the conditioner, and in the UNet every
          cross-attention layer (``attn2``) and the LayerNorm in front of it (transformer ``norm2``). The time
          conditioner belongs to our conditioner. Unlike the original, the VQ GroupNorms its name filter
          caught by accident are not included (they never received gradients), and nothing appears twice.
        * ``cond_stage``: the fMRI encoder and the conditioner only.
        * ``unet_and_cond``: everything except the autoencoder.
        * ``all``: every parameter, the autoencoder included.
        """
        out: list[tuple[str, nn.Parameter]] = []
        unused = {"fmri_encoder.cls_token", "fmri_encoder.mask_token"}
        for name, p in self.named_parameters():
            top = name.split(".", 1)[0]
            if preset == "all":
                keep = True
            elif top in ("fmri_encoder", "conditioner"):
                keep = name not in unused
            elif preset == "unet_and_cond":
                keep = top == "unet"
            elif preset == "cond_stage":
                keep = False
            elif preset == "original":
                keep = top == "unet" and (
                    ".attn2." in name or (".transformer_blocks." in name and ".norm2." in name)
                )
            else:
                raise ConfigError(
                    f"unknown trainable preset {preset!r}; choose original, cond_stage, unet_and_cond or all",
                    field="preset",
                )
            if keep:
                out.append((name, p))
        return out

    def trainable_parameters(self, preset: TrainablePreset = "original") -> list[nn.Parameter]:
        """:meth:`named_trainable_parameters` without the names."""
        return [p for _, p in self.named_trainable_parameters(preset)]

    def set_trainable(self, preset: TrainablePreset = "original") -> list[str]:
        """Set ``requires_grad`` True for the preset's parameters and False for the rest; returns their names."""
        names = {n for n, _ in self.named_trainable_parameters(preset)}
        for n, p in self.named_parameters():
            p.requires_grad_(n in names)
        return sorted(names)


def prior_class_table(
    prior: Any, source: Any = None, field: str = "align_epochs", purpose: str = "the context warm start"
) -> torch.Tensor:
    """The prior's class embeddings ``[K, C]`` (the null row left out): the targets of stage B's context warm
    start (:func:`mindvis.train.align.align_context`) and the basis of a ``prior-classes`` context.

    Raises:
        ConfigError: the prior is not class-conditional.
    """
    cond = getattr(prior, "conditioner", None)
    if not isinstance(cond, ClassEmbedder):
        raise ConfigError(
            f"{purpose} needs a class-conditional prior (mindvis train-prior or a converted "
            f"label2img), but this one is conditioned by {type(cond).__name__}",
            path=source,
            field=field,
        )
    return cond.embedding.weight[:-1].detach().float().clone()


__all__ = [
    "DCLDM",
    "LDMConfig",
    "LDMPreset",
    "LossOutput",
    "Quantized",
    "TrainablePreset",
    "UNetConfig",
    "VQConfig",
    "build_unet",
    "build_vq",
    "images_to_uint8",
    "ldm_preset",
    "prior_class_table",
    "vq_decode",
    "vq_encode",
    "vq_quantize",
]
