"""Sparse-coded masked brain modeling (MinD-Vis stage A, Chen et al., CVPR 2023).

A one-dimensional ViT masked autoencoder (He et al., "Masked Autoencoders Are Scalable Vision Learners")
over fMRI voxel patches:

* the voxel vector ``x: [N, V]`` is cut into ``L = V / p`` consecutive patches of ``p`` voxels, embedded by
  a Conv1d with kernel = stride = ``p``, and given a fixed 1-D sin-cos position table with a cls slot;
* per sample, a random ``mask_ratio`` of the patches is removed (argsort of uniform noise), the encoder sees
  the rest plus a cls token, and a narrower decoder predicts the raw voxels of every patch;
* the loss is the mean squared error over the removed patches only, against the raw voxels.

:class:`FMRIEncoder` is the encoder alone (no masking, no cls token in the forward pass). It turns fMRI into
the token sequence ``[N, L, D]`` (or its mean, ``[N, 1, D]``) that conditions stage B.

Parameter names are those of the original checkpoints (``cls_token``, ``pos_embed``, ``mask_token``,
``decoder_pos_embed``, ``patch_embed.proj``, ``blocks.i.*``, ``norm``, ``decoder_embed``,
``decoder_blocks.i.*``, ``decoder_norm``, ``decoder_pred``), so a converted original state dict loads with
``strict=True``.

Saved models are folders of :mod:`mindvis.models.folder` (``config.json`` with the :class:`MBMConfig` fields,
``model.safetensors``). :func:`load_original_mbm_checkpoint` turns an original checkpoint file, read by
:mod:`mindvis.models.mbm_original`, into an :class:`MBMConfig` and a state dict checked against the model it
describes, so that :func:`load_mbm` and :meth:`FMRIEncoder.from_mbm` take the original's files as they take our
folders.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mindvis.config import (
    MAX_DEPTH,
    MAX_VOXELS,
    check_bool,
    check_float,
    check_int,
    check_parameters,
    config_from_dict,
)
from mindvis.errors import CheckpointError, ConfigError, DataError
from mindvis.models.folder import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_safetensors,
    load_state_dict_checked,
    read_folder_config,
    save_model_folder,
    state_dict_mismatch,
)
from mindvis.models.mbm_original import read_original_mbm_file

_logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


#: Largest ``mlp_ratio`` accepted (the paper uses 1.0, ViTs 4.0).
MAX_MLP_RATIO = 64.0


@dataclass
class MBMConfig:
    """Sizes and masking settings of the masked brain model.

    Args:
        num_voxels: V, the length of the (padded) voxel vector; a multiple of ``patch_size``.
        patch_size: p, voxels per patch (the paper uses 16).
        embed_dim: D, encoder width.
        depth: number of encoder blocks.
        num_heads: encoder attention heads (``embed_dim`` must be divisible by it).
        decoder_embed_dim: decoder width.
        decoder_depth: number of decoder blocks.
        decoder_num_heads: decoder attention heads.
        mlp_ratio: MLP hidden width is ``int(width * mlp_ratio)`` in every block (the paper uses 1.0).
        mask_ratio: default fraction of patches removed in :meth:`MaskedBrainModel.forward`.
        focus_range: optional ``(start, end)`` voxel range whose patches are masked preferentially.
            Patches ``start // p`` to ``end // p - 1`` get weight ``focus_rate``, all others
            ``1 - focus_rate``; the removed patches are a weighted sample without replacement.
        focus_rate: the weight of patches inside ``focus_range`` (ignored without a range).

    Raises:
        ConfigError: a value is out of range (sizes are bounded as in :mod:`mindvis.models.ldm`: widths and
            head counts <= 65536, depths <= 1024, voxels <= 2^24, ``mlp_ratio`` <= 64, at most 2^32 weights);
            the message names the field.
    """

    num_voxels: int
    patch_size: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 1.0
    mask_ratio: float = 0.75
    focus_range: tuple[float, float] | None = None
    focus_rate: float = 0.6

    def __post_init__(self) -> None:
        check_int("patch_size", self.patch_size)
        check_int("num_voxels", self.num_voxels, maximum=MAX_VOXELS)
        if self.num_voxels < self.patch_size:
            raise ConfigError(
                f"the voxel count ({self.num_voxels}) is smaller than one patch ({self.patch_size} voxels)",
                field="num_voxels",
            )
        if self.num_voxels % self.patch_size:
            raise ConfigError(
                f"the voxel count ({self.num_voxels}) must be a multiple of patch_size ({self.patch_size}); "
                "pad the data first (e.g. wrap padding)",
                field="num_voxels",
            )
        for name in ("embed_dim", "num_heads", "decoder_embed_dim", "decoder_num_heads"):
            check_int(name, getattr(self, name))
        check_int("depth", self.depth, maximum=MAX_DEPTH)
        check_int("decoder_depth", self.decoder_depth, minimum=0, maximum=MAX_DEPTH)
        for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            w, h = getattr(self, width), getattr(self, heads)
            if w % h:
                raise ConfigError(f"{width} ({w}) must be divisible by {heads} ({h})", field=width)
            if w % 2:
                raise ConfigError(f"{width} ({w}) must be even for the sin-cos position table", field=width)
        self.mlp_ratio = check_float("mlp_ratio", self.mlp_ratio, maximum=MAX_MLP_RATIO)
        if int(min(self.embed_dim, self.decoder_embed_dim) * self.mlp_ratio) < 1:
            raise ConfigError(f"mlp_ratio {self.mlp_ratio} gives an empty MLP", field="mlp_ratio")
        self.mask_ratio = check_float("mask_ratio", self.mask_ratio)
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"expected 0 <= mask_ratio < 1, got {self.mask_ratio}", field="mask_ratio")
        self.focus_rate = check_float("focus_rate", self.focus_rate)
        if self.focus_range is not None:
            if not isinstance(self.focus_range, (list, tuple)) or len(self.focus_range) != 2:
                raise ConfigError(
                    f"expected a (start, end) voxel range, got {self.focus_range!r}", field="focus_range"
                )
            start, end = (check_float("focus_range", v) for v in self.focus_range)
            if not 0 <= start < end <= self.num_voxels:
                raise ConfigError(
                    f"expected 0 <= start < end <= num_voxels ({self.num_voxels}), got ({start}, {end})",
                    field="focus_range",
                )
            if int(end) // self.patch_size <= int(start) // self.patch_size:
                raise ConfigError(
                    f"the range ({start}, {end}) selects no patch "
                    f"(patches start // {self.patch_size} to end // {self.patch_size} - 1)",
                    field="focus_range",
                )
            self.focus_range = (self.focus_range[0], self.focus_range[1])
            if not 0.0 < self.focus_rate < 1.0:
                raise ConfigError(f"expected 0 < focus_rate < 1, got {self.focus_rate}", field="focus_rate")
        # blocks: attention 4 w^2 and MLP 2 w h weights each; position tables (L + 1) x w; patch embedding
        # and prediction p x w; decoder embedding D x Dd
        D, Dd, p = self.embed_dim, self.decoder_embed_dim, self.patch_size
        H, Hd = int(D * self.mlp_ratio), int(Dd * self.mlp_ratio)
        check_parameters(
            "masked brain model",
            {
                "embed_dim": self.depth * (4 * D * D + 2 * D * H) + p * D,
                "decoder_embed_dim": self.decoder_depth * (4 * Dd * Dd + 2 * Dd * Hd) + D * Dd + p * Dd,
                "num_voxels": (self.num_patches + 1) * (D + Dd),
            },
        )

    @property
    def num_patches(self) -> int:
        """L, the number of voxel patches (``num_voxels // patch_size``)."""
        return self.num_voxels // self.patch_size

    @property
    def mlp_hidden_dim(self) -> int:
        """Encoder MLP hidden width, ``int(embed_dim * mlp_ratio)``."""
        return int(self.embed_dim * self.mlp_ratio)

    def num_keep(self, mask_ratio: float | None = None) -> int:
        """Patches the encoder sees at ``mask_ratio``: ``int(L * (1 - mask_ratio))``."""
        r = self.mask_ratio if mask_ratio is None else mask_ratio
        return int(self.num_patches * (1 - r))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (``focus_range`` becomes a list)."""
        d = dataclasses.asdict(self)
        if d["focus_range"] is not None:
            d["focus_range"] = list(d["focus_range"])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | os.PathLike | None = None) -> MBMConfig:
        """Build from :meth:`to_dict` output. Keys starting with ``_`` (file metadata) are ignored.

        With ``source`` (the file ``data`` was read from) every field is required, as mindvis writes them all.

        Raises:
            ConfigError: unknown or missing keys, or invalid values (naming ``source`` if given).
        """
        return config_from_dict(cls, data, source)


def mbm_tiny(num_voxels: int, **overrides: Any) -> MBMConfig:
    """Tiny variant for tests and the demo: 64 wide, 2 blocks, 4 heads; decoder 32 x 2, 4 heads."""
    base: dict[str, Any] = dict(
        embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4
    )
    return MBMConfig(num_voxels=num_voxels, **{**base, **overrides})


def mbm_small(num_voxels: int, **overrides: Any) -> MBMConfig:
    """Small variant for CPU runs: 256 wide, 6 blocks, 8 heads; decoder 128 x 2, 4 heads."""
    base: dict[str, Any] = dict(
        embed_dim=256, depth=6, num_heads=8, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4
    )
    return MBMConfig(num_voxels=num_voxels, **{**base, **overrides})


def mbm_large_patch16(num_voxels: int, **overrides: Any) -> MBMConfig:
    """The paper's setting: 1024 wide, 24 blocks, 16 heads, mlp_ratio 1; decoder 512 x 8, 16 heads; mask 0.75."""
    base: dict[str, Any] = dict(
        patch_size=16,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
        mlp_ratio=1.0,
        mask_ratio=0.75,
    )
    return MBMConfig(num_voxels=num_voxels, **{**base, **overrides})


#: Named variants, for command-line choices.
MBM_VARIANTS: dict[str, Callable[..., MBMConfig]] = {
    "tiny": mbm_tiny,
    "small": mbm_small,
    "large": mbm_large_patch16,
    "large_patch16": mbm_large_patch16,
}


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------


def sincos_pos_table(dim: int, num_positions: int, cls_token: bool = True) -> Tensor:
    """Fixed 1-D sin-cos position table.

    Row for position ``q`` (0-based): ``sin(q * w_i)`` in the first ``dim/2`` channels and ``cos(q * w_i)`` in
    the rest, ``w_i = 10000^(-i / (dim/2))``. Computed in float64 and returned as float32.

    Returns:
        ``[1 + num_positions, dim]`` with an all-zero first row (cls slot) if ``cls_token``, else
        ``[num_positions, dim]``.
    """
    if dim % 2:
        raise ConfigError(f"the sin-cos table needs an even width, got {dim}", field="embed_dim")
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)  # [D/2]
    pos = torch.arange(num_positions, dtype=torch.float64)  # [L]
    angles = pos[:, None] * omega[None, :]  # [L, D/2]
    table = torch.cat([angles.sin(), angles.cos()], dim=1)  # [L, D]
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0)
    return table.float()


def interpolate_pos_embed(pos_embed: Tensor, num_patches: int, num_extra_tokens: int = 1) -> Tensor:
    """Resize a position table along the token axis (nearest neighbour), keeping the extra (cls) rows.

    This is what the original loader does when a checkpoint and a model disagree on the patch count.

    Args:
        pos_embed: ``[1, extra + L_old, D]``.
        num_patches: ``L_new``.
        num_extra_tokens: leading rows kept as they are (1: the cls slot).

    Returns:
        ``[1, extra + L_new, D]`` (the input itself when ``L_old == L_new``).
    """
    old = pos_embed.shape[-2] - num_extra_tokens
    if old == num_patches:
        return pos_embed
    extra = pos_embed[:, :num_extra_tokens]
    tokens = pos_embed[:, num_extra_tokens:].transpose(1, 2)  # [1, D, L_old]
    tokens = F.interpolate(tokens, size=num_patches, mode="nearest").transpose(1, 2)  # [1, L_new, D]
    return torch.cat([extra, tokens], dim=1)


class PatchEmbed1D(nn.Module):
    """Voxel patches to tokens: Conv1d with kernel = stride = ``patch_size``.

    ``x: [N, 1, V]`` -> ``[N, L, D]``.
    """

    def __init__(self, num_voxels: int, patch_size: int, embed_dim: int, in_chans: int = 1):
        super().__init__()
        self.num_voxels = num_voxels
        self.patch_size = patch_size
        self.num_patches = num_voxels // patch_size
        self.proj = nn.Conv1d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).transpose(1, 2)  # [N, D, L] -> [N, L, D]


def _make_blocks(width: int, heads: int, depth: int, mlp_ratio: float) -> nn.ModuleList:
    from timm.models.vision_transformer import Block

    # Pre-norm ViT blocks: qkv with bias, exact GELU, plain LayerNorm (eps 1e-5), no dropout or drop-path.
    return nn.ModuleList(
        Block(
            width,
            heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            norm_layer=nn.LayerNorm,
            act_layer=nn.GELU,
        )
        for _ in range(depth)
    )


def _init_vit_weights(module: nn.Module) -> None:
    """MAE-style initialisation: xavier-uniform linears with zero bias, unit LayerNorms, N(0, 0.02) convs."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv1d):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _as_batch(x: Tensor, num_voxels: int, what: str = "fmri") -> Tensor:
    """``[N, V]`` or ``[N, 1, V]`` -> ``[N, 1, V]`` (a view), checking ``V``."""
    if x.ndim == 2:
        x = x.unsqueeze(1)
    if x.ndim != 3 or x.shape[1] != 1:
        raise DataError(f"expected an fMRI batch [N, V] or [N, 1, V], got shape {list(x.shape)}", field=what)
    if x.shape[-1] != num_voxels:
        raise DataError(
            f"expected {num_voxels} voxels per sample (the model's num_voxels), got {x.shape[-1]}", field=what
        )
    return x


@dataclass
class MBMOutput:
    """Result of :meth:`MaskedBrainModel.forward`.

    Attributes:
        loss: scalar, MSE over the removed patches.
        pred: ``[N, L, p]`` predicted voxels of every patch.
        mask: ``[N, L]``, 0 is keep, 1 is remove, in the original patch order.
        latent: ``[N, 1 + len_keep, D]`` encoder output, cls token first.
        ids_restore: ``[N, L]`` int64, the position of each patch in the shuffled order.
    """

    loss: Tensor
    pred: Tensor
    mask: Tensor
    latent: Tensor
    ids_restore: Tensor


@dataclass
class LoadReport:
    """What a non-strict weight load did.

    Attributes:
        missing: model keys that received no value (they keep their initial values).
        unexpected: checkpoint keys the model has no place for (ignored).
        skipped: checkpoint keys deliberately left out before loading (e.g. the norm-skipping quirk).
        interpolated: checkpoint keys resized to the model (``pos_embed`` when the voxel counts differ).
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# Masked brain model
# ----------------------------------------------------------------------------------------------------------


class MaskedBrainModel(nn.Module):
    """1-D ViT masked autoencoder over fMRI voxel patches (stage A).

    Args:
        config: sizes and masking settings.
    """

    def __init__(self, config: MBMConfig):
        super().__init__()
        if not isinstance(config, MBMConfig):
            raise ConfigError(f"expected an MBMConfig, got {type(config).__name__}")
        self.config = config
        c = config
        L = c.num_patches
        # Direct parameters first, in the original's state_dict order.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, c.embed_dim), requires_grad=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, c.decoder_embed_dim), requires_grad=False)
        # Encoder.
        self.patch_embed = PatchEmbed1D(c.num_voxels, c.patch_size, c.embed_dim)
        self.blocks = _make_blocks(c.embed_dim, c.num_heads, c.depth, c.mlp_ratio)
        self.norm = nn.LayerNorm(c.embed_dim)
        # Decoder.
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim)
        self.decoder_blocks = _make_blocks(
            c.decoder_embed_dim, c.decoder_num_heads, c.decoder_depth, c.mlp_ratio
        )
        self.decoder_norm = nn.LayerNorm(c.decoder_embed_dim)
        self.decoder_pred = nn.Linear(c.decoder_embed_dim, c.patch_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Sin-cos position tables; N(0, 0.02) tokens; MAE-style init of every other layer."""
        with torch.no_grad():
            L = self.config.num_patches
            self.pos_embed.copy_(sincos_pos_table(self.config.embed_dim, L).unsqueeze(0))
            self.decoder_pos_embed.copy_(sincos_pos_table(self.config.decoder_embed_dim, L).unsqueeze(0))
            nn.init.normal_(self.cls_token, std=0.02)
            nn.init.normal_(self.mask_token, std=0.02)
            _init_vit_weights(self)

    # -- shapes ----------------------------------------------------------------------------------------------

    def patchify(self, x: Tensor) -> Tensor:
        """Cut voxels into patches. ``x: [N, V]`` or ``[N, 1, V]`` -> ``[N, L, p]`` (a view)."""
        p = self.config.patch_size
        if x.ndim == 3 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim != 2 or x.shape[-1] % p:
            raise DataError(f"expected [N, V] or [N, 1, V] with V a multiple of {p}, got {list(x.shape)}")
        return x.reshape(x.shape[0], x.shape[1] // p, p)

    def unpatchify(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`patchify`. ``x: [N, L, p]`` -> ``[N, 1, L * p]``."""
        return x.reshape(x.shape[0], 1, x.shape[1] * x.shape[2])

    # -- masking ---------------------------------------------------------------------------------------------

    def _focus_weights(self, L: int, device: torch.device) -> Tensor | None:
        fr = self.config.focus_range
        if fr is None:
            return None
        p = self.config.patch_size
        rate = self.config.focus_rate
        w = torch.full((L,), 1.0 - rate, dtype=torch.float64, device=device)
        w[int(fr[0]) // p : int(fr[1]) // p] = rate
        return w

    def random_masking(
        self, x: Tensor, mask_ratio: float, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample random masking by argsort of noise.

        The ``len_keep = int(L * (1 - mask_ratio))`` patches with the smallest noise are kept. With
        ``config.focus_range`` the removed set is instead a weighted sample without replacement (weights
        ``focus_rate`` inside the range, ``1 - focus_rate`` outside), drawn from the same uniform noise by
        the exponential-race construction: patch ``l`` is ranked by ``log(u_l) / w_l``, and the largest
        ``L - len_keep`` ranks are removed. This is distributed like sequential weighted sampling without
        replacement (``torch.multinomial``), and stays a deterministic function of ``noise``.

        Args:
            x: ``[N, L, D]`` tokens.
            mask_ratio: fraction of patches to remove, ``0 <= mask_ratio < 1``.
            noise: ``[N, L]`` uniform noise in [0, 1]; drawn with ``torch.rand`` if None.

        Returns:
            x_masked: ``[N, len_keep, D]`` the kept tokens, in order of increasing noise.
            mask: ``[N, L]`` float (at least float32), 0 is keep, 1 is remove, in the original patch order.
            ids_restore: ``[N, L]`` int64; ``ids_restore[n, l]`` is patch ``l``'s rank in the shuffle.
        """
        N, L, D = x.shape
        if not 0.0 <= mask_ratio < 1.0:
            raise ConfigError(f"expected 0 <= mask_ratio < 1, got {mask_ratio}", field="mask_ratio")
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)
        elif noise.shape != (N, L):
            raise DataError(
                f"expected masking noise of shape {[N, L]}, got {list(noise.shape)}", field="noise"
            )
        weights = self._focus_weights(L, x.device)
        if weights is not None:
            noise = torch.log(noise.to(torch.float64)) / weights  # larger rank = removed first
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(N, len_keep, D))
        # removed iff its rank is past len_keep; at least float32 so that mask.sum() stays exact under autocast
        mask = (ids_restore >= len_keep).to(torch.promote_types(x.dtype, torch.float32))
        return x_masked, mask, ids_restore

    # -- encoder / decoder -----------------------------------------------------------------------------------

    def forward_encoder(
        self, x: Tensor, mask_ratio: float, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Embed, mask and encode.

        Args:
            x: ``[N, V]`` or ``[N, 1, V]`` voxels.
            mask_ratio: fraction of patches removed.
            noise: optional ``[N, L]`` masking noise (see :meth:`random_masking`).

        Returns:
            latent: ``[N, 1 + len_keep, D]``, cls token first, after the final LayerNorm.
            mask: ``[N, L]``, 1 is remove.
            ids_restore: ``[N, L]``.
        """
        x = _as_batch(x, self.config.num_voxels)
        tokens = self.patch_embed(x) + self.pos_embed[:, 1:, :]  # [N, L, D]
        tokens, mask, ids_restore = self.random_masking(tokens, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(tokens.shape[0], -1, -1)
        h = torch.cat([cls, tokens], dim=1)  # [N, 1 + keep, D]
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h), mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Predict every patch's voxels from the visible tokens.

        Args:
            latent: ``[N, 1 + len_keep, D]`` encoder output, cls first.
            ids_restore: ``[N, L]`` from :meth:`random_masking`.

        Returns:
            pred: ``[N, L, p]``.
        """
        h = self.decoder_embed(latent)  # [N, 1 + keep, Dd]
        N, T, Dd = h.shape
        L = ids_restore.shape[1]
        # [cls, kept tokens in shuffled order, mask tokens], then one gather into [cls, patches in order]
        full = torch.cat([h, self.mask_token.expand(N, L + 1 - T, Dd)], dim=1)  # [N, 1 + L, Dd]
        index = torch.cat([ids_restore.new_zeros(N, 1), ids_restore + 1], dim=1)  # [N, 1 + L]
        h = torch.gather(full, 1, index.unsqueeze(-1).expand(N, L + 1, Dd)) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            h = blk(h)
        h = self.decoder_pred(self.decoder_norm(h))  # [N, 1 + L, p]
        return h[:, 1:]

    def forward_loss(self, x: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error on the removed patches, against the raw voxels (no target normalisation).

        Args:
            x: ``[N, V]`` or ``[N, 1, V]`` voxels.
            pred: ``[N, L, p]``.
            mask: ``[N, L]``, 1 is remove.

        Returns:
            scalar loss; 0 when no patch is removed.
        """
        target = self.patchify(x)
        per_patch = (pred - target).pow(2).mean(dim=-1)  # [N, L]
        # clamp_min(1) gives 0 for an empty mask without a host-device sync
        return (per_patch * mask).sum() / mask.sum().clamp_min(1)

    def forward(self, x: Tensor, mask_ratio: float | None = None, noise: Tensor | None = None) -> MBMOutput:
        """Mask, encode, decode and score.

        Args:
            x: ``[N, V]`` or ``[N, 1, V]`` voxels.
            mask_ratio: defaults to ``config.mask_ratio``.
            noise: optional ``[N, L]`` uniform masking noise, for reproducible masks.
        """
        r = self.config.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(x, r, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(x, pred, mask)
        return MBMOutput(loss=loss, pred=pred, mask=mask, latent=latent, ids_restore=ids_restore)

    # -- saving ----------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (each file atomically)."""
        return save_model_folder(self, directory, type(self).__name__, self.config.to_dict())

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"
    ) -> MaskedBrainModel:
        """Load a folder written by :meth:`save_pretrained` (strict: every key and shape must match).

        Raises:
            CheckpointError: a file is missing, corrupt, or does not fit the configuration.
            ConfigError: ``config.json`` holds invalid values.
        """
        directory = Path(directory)
        meta = read_folder_config(directory)
        config = MBMConfig.from_dict(meta, source=directory / CONFIG_NAME)
        model = cls(config)
        state = load_safetensors(directory / WEIGHTS_NAME, map_location)
        load_state_dict_checked(model, state, source=directory / WEIGHTS_NAME)
        return model


# ----------------------------------------------------------------------------------------------------------
# fMRI encoder (conditioning for stage B)
# ----------------------------------------------------------------------------------------------------------


class FMRIEncoder(nn.Module):
    """The stage-A encoder without masking or cls token: fMRI -> tokens that condition stage B.

    It keeps ``cls_token`` and an encoder-width ``mask_token`` as parameters so that its state dict has the
    original conditioner's key set (``cond_stage_model.mae.*``), but neither is used in the forward pass.

    Args:
        config: the stage-A configuration (decoder fields are ignored).
        global_pool: average the tokens before the final LayerNorm, giving ``[N, 1, D]``.
    """

    def __init__(self, config: MBMConfig, global_pool: bool = False):
        super().__init__()
        if not isinstance(config, MBMConfig):
            raise ConfigError(f"expected an MBMConfig, got {type(config).__name__}")
        self.config = config
        self.global_pool = bool(global_pool)
        c = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.embed_dim), requires_grad=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.patch_embed = PatchEmbed1D(c.num_voxels, c.patch_size, c.embed_dim)
        self.blocks = _make_blocks(c.embed_dim, c.num_heads, c.depth, c.mlp_ratio)
        self.norm = nn.LayerNorm(c.embed_dim)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_table(c.embed_dim, c.num_patches).unsqueeze(0))
            nn.init.normal_(self.cls_token, std=0.02)
            nn.init.normal_(self.mask_token, std=0.02)
            _init_vit_weights(self)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    def forward(self, x: Tensor) -> Tensor:
        """Encode fMRI.

        Args:
            x: ``[N, V]`` or ``[N, 1, V]`` voxels (``[1, V]`` is a batch of one).

        Returns:
            ``[N, L, D]`` tokens, or ``[N, 1, D]`` with ``global_pool``.
        """
        x = _as_batch(x, self.config.num_voxels)
        h = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        for blk in self.blocks:
            h = blk(h)
        if self.global_pool:
            h = h.mean(dim=1, keepdim=True)
        return self.norm(h)

    def load_mbm_state_dict(
        self,
        state_dict: Mapping[str, Tensor],
        original_quirks: bool = True,
        source: str | os.PathLike | None = None,
    ) -> LoadReport:
        """Load encoder weights from a stage-A (masked brain model) state dict.

        Decoder keys and the decoder-width ``mask_token`` are not loaded. ``pos_embed`` is resized by nearest
        neighbour along the tokens when the patch counts differ (cls row kept). With ``original_quirks``
        and ``global_pool``, every key containing ``norm`` is skipped, as the original loader does: the
        block LayerNorms and the final one then keep weight 1 and bias 0.

        Raises:
            CheckpointError: a key the encoder has holds a tensor of the wrong shape.
        """
        report = LoadReport()
        state: dict[str, Tensor] = {}
        for k, v in state_dict.items():
            if "mask_token" in k or (original_quirks and self.global_pool and "norm" in k):
                report.skipped.append(k)
            else:
                state[k] = v
        if "pos_embed" in state and state["pos_embed"].ndim == 3:
            resized = interpolate_pos_embed(state["pos_embed"], self.num_patches)
            if resized is not state["pos_embed"]:
                _logger.info(
                    "pos_embed resized from %d to %d patches (nearest)",
                    state["pos_embed"].shape[1] - 1,
                    self.num_patches,
                )
                report.interpolated.append("pos_embed")
                state["pos_embed"] = resized
        own = self.state_dict()
        mismatch = state_dict_mismatch(own, state)
        if mismatch.shapes:
            raise CheckpointError(
                f"tensor shapes do not fit the encoder: {'; '.join(mismatch.shapes[:5])}",
                path=source,
                field=mismatch.first,
            )
        if mismatch.dtypes:
            raise CheckpointError(
                f"tensor dtypes do not fit the encoder: {'; '.join(mismatch.dtypes[:5])}",
                path=source,
                field=mismatch.first,
            )
        result = self.load_state_dict(state, strict=False)
        report.missing = list(result.missing_keys)
        report.unexpected = list(result.unexpected_keys)
        expected_missing = {"mask_token"}
        if original_quirks and self.global_pool:
            expected_missing |= {k for k in own if "norm" in k}
        surprising = [k for k in report.missing if k not in expected_missing]
        if surprising:
            _logger.warning(
                "encoder keys missing from the checkpoint (left at init): %s", ", ".join(surprising)
            )
        if report.skipped:
            _logger.info("checkpoint keys not loaded into the encoder: %s", ", ".join(report.skipped))
        foreign = [
            k for k in report.unexpected if not (k.startswith("decoder_") or k.startswith("nature_img"))
        ]
        if foreign:
            _logger.warning("unexpected checkpoint keys ignored: %s", ", ".join(foreign))
        _logger.debug("missing keys: %s; unexpected keys: %s", report.missing, report.unexpected)
        return report

    @classmethod
    def from_mbm(
        cls,
        source: MaskedBrainModel | str | os.PathLike,
        global_pool: bool = False,
        num_voxels: int | None = None,
        original_quirks: bool = True,
    ) -> FMRIEncoder:
        """Build an encoder from a masked brain model, our saved folder, or an original ``.pth`` checkpoint.

        Args:
            source: a model, a folder from :meth:`MaskedBrainModel.save_pretrained`, or an original
                stage-A file (``checkpoint.pth`` / ``fmri_encoder.pth``).
            global_pool: mean-pool the tokens (``[N, 1, D]`` output).
            num_voxels: the voxel count of the new data; ``pos_embed`` is interpolated when it differs.
            original_quirks: reproduce the original's norm-skipping load with ``global_pool``.
        """
        if isinstance(source, MaskedBrainModel):
            config, state, where = source.config, source.state_dict(), None
        else:
            config, state = load_mbm_weights(source)
            where = source
        if num_voxels is not None and num_voxels != config.num_voxels:
            config = dataclasses.replace(config, num_voxels=num_voxels)
        encoder = cls(config, global_pool=global_pool)
        encoder.load_mbm_state_dict(state, original_quirks=original_quirks, source=where)
        return encoder

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` (with ``global_pool``) and ``model.safetensors``, each atomically."""
        return save_model_folder(
            self, directory, type(self).__name__, {**self.config.to_dict(), "_global_pool": self.global_pool}
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"
    ) -> FMRIEncoder:
        """Load a folder written by :meth:`FMRIEncoder.save_pretrained` (strict)."""
        directory = Path(directory)
        meta = read_folder_config(directory)
        config = MBMConfig.from_dict(meta, source=directory / CONFIG_NAME)
        if "_global_pool" not in meta:
            raise CheckpointError(
                "missing required field (an FMRIEncoder folder records it)",
                path=directory / CONFIG_NAME,
                field="_global_pool",
            )
        try:
            global_pool = check_bool("_global_pool", meta["_global_pool"])
        except ConfigError as exc:
            raise ConfigError(exc.detail, path=directory / CONFIG_NAME, field=exc.field) from None
        model = cls(config, global_pool=global_pool)
        state = load_safetensors(directory / WEIGHTS_NAME, map_location)
        load_state_dict_checked(model, state, source=directory / WEIGHTS_NAME)
        return model


# ----------------------------------------------------------------------------------------------------------
# Loading stage-A weights
# ----------------------------------------------------------------------------------------------------------


def load_original_mbm_checkpoint(
    path: str | os.PathLike, overrides: dict[str, Any] | None = None
) -> tuple[MBMConfig, dict[str, Tensor], dict[str, Any]]:
    """Read an original stage-A checkpoint without executing code (see :mod:`mindvis.models.mbm_original`).

    Args:
        path: ``checkpoint.pth`` or ``fmri_encoder.pth`` (or a bare state dict saved with ``torch.save``).
        overrides: MBMConfig fields to set explicitly, e.g. ``num_heads`` for a bare state dict with no
            pickled config.

    Returns:
        config: our :class:`MBMConfig`, sizes taken from the tensors.
        state: the model state dict, with our (identical) key names, floating point as float32.
        extra: ``epoch`` (int or None), ``original_config`` (dict or None), ``config_class``,
            ``has_optimizer``, ``has_scaler`` and ``dropped_keys`` (keys of modules we do not build).

    Raises:
        CheckpointError: missing, truncated or refused file, or a state dict that is not a stage-A model.
    """
    path = Path(path)
    original = read_original_mbm_file(path, overrides)
    state = original.state
    try:
        config = MBMConfig(**original.fields)
    except ConfigError as exc:
        raise CheckpointError(
            f"the stored sizes give an invalid model ({exc.detail})", path=path, field=exc.field
        ) from None

    # Check keys and shapes against the model these sizes describe, without allocating it.
    with torch.device("meta"):
        expected = MaskedBrainModel(config).state_dict()
    problems = state_dict_mismatch(expected, state).describe(dtypes=False)
    if problems:
        raise CheckpointError(
            "state dict does not match a stage-A model: " + "; ".join(problems), path=path, field="model"
        )
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise CheckpointError(f"non-finite values in {', '.join(nonfinite[:5])}", path=path, field="model")
    state = {k: state[k].to(torch.float32) if state[k].is_floating_point() else state[k] for k in expected}
    _logger.info(
        "%s: stage-A model, %d voxels, %d x %d encoder, %d x %d decoder, epoch %s",
        path,
        config.num_voxels,
        config.depth,
        config.embed_dim,
        config.decoder_depth,
        config.decoder_embed_dim,
        original.extra["epoch"],
    )
    return config, state, original.extra


def load_mbm_weights(source: str | os.PathLike) -> tuple[MBMConfig, dict[str, Tensor]]:
    """Config and state dict of a stage-A model from our folder or an original ``.pth`` file.

    Raises:
        CheckpointError: the path is neither, or the file is refused or corrupt.
    """
    path = Path(source)
    if path.is_dir():
        meta = read_folder_config(path)
        config = MBMConfig.from_dict(meta, source=path / CONFIG_NAME)
        return config, load_safetensors(path / WEIGHTS_NAME)
    if path.is_file():
        config, state, _extra = load_original_mbm_checkpoint(path)
        return config, state
    raise CheckpointError("no such checkpoint file or model folder", path=path)


def load_mbm(source: str | os.PathLike) -> MaskedBrainModel:
    """A :class:`MaskedBrainModel` from our saved folder or an original stage-A ``.pth`` file."""
    config, state = load_mbm_weights(source)
    model = MaskedBrainModel(config)
    load_state_dict_checked(model, state, source=source)
    return model


__all__ = [
    "MBMConfig",
    "MBMOutput",
    "MBM_VARIANTS",
    "FMRIEncoder",
    "LoadReport",
    "MaskedBrainModel",
    "PatchEmbed1D",
    "interpolate_pos_embed",
    "load_mbm",
    "load_mbm_weights",
    "load_original_mbm_checkpoint",
    "mbm_large_patch16",
    "mbm_small",
    "mbm_tiny",
    "sincos_pos_table",
]
