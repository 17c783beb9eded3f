"""Double conditioning of the latent diffusion UNet on fMRI (MinD-Vis stage B, Chen et al., CVPR 2023).

The fMRI encoder's tokens ``[N, L, D]`` condition the UNet twice:

* cross-attention context: ``channel_mapper`` (Conv1d over the token axis, ``L -> L // 2 -> T``, kernel 1, no
  nonlinearity) and ``dim_mapper`` (Linear ``D -> C``) give ``[N, T, C]`` with ``T = 77``;
* time embedding: ``time_mapper`` (Conv1d ``T -> T // 2 -> 1`` over the context tokens, then Linear
  ``C -> E``) gives ``[N, E]``, which the UNet adds to its time embedding (``E = 4 * model_channels``).

With ``global_pool`` the encoder gives one token ``[N, 1, D]``: there is no channel mapper, the context is
``[N, 1, C]``, and the time path is a single Linear.

With ``standardize_tokens`` (not in the original; off by default) the tokens are z-scored per token and channel
with fixed statistics of the training fMRI (:meth:`DCConditioner.fit_token_stats`) before the mappers. A small
encoder's tokens vary little between samples next to their shared part (the position embedding survives the
final LayerNorm); the prior's cross-attention was trained on class embeddings that differ completely between
classes, so without this the fMRI context looks nearly constant to the UNet, and stage B learns to ignore it. Either path can be switched off, as in the paper's
ablation (cross-attention only, or time conditioning only, where the attention then sees a zero context).

With ``basis_size`` K > 0 (not in the original; off by default) the context is confined to the prior's own
conditions: ``dim_mapper`` gives K logits per context token instead of C channels, and each token is the
softmax-weighted mixture of the K rows of the fixed buffer ``basis [K, C]`` (the class embeddings of a
class-conditional prior). The UNet then sees only contexts between conditions it was trained on, and stage B can
learn from the diffusion loss alone, without class labels.

:class:`ClassEmbedder` is the label-conditional counterpart (the CompVis label2img prior): labels ``[N]``
-> ``[N, 1, C]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mindvis.config import MAX_ROWS, ConfigMixin, check_bool, check_int, check_parameters
from mindvis.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)

#: Conditioning sequence length of the original (hard-coded there; CLIP's 77).
COND_TOKENS = 77


@dataclass
class Conditioning:
    """What the UNet is conditioned on.

    Attributes:
        context: ``[N, T, C]`` cross-attention context.
        time_cond: ``[N, E]`` vector added to the time embedding, or ``None``.
        weights: with a context basis, the mixture weights ``[N, T, K]`` that gave the context (stage B's
            balance term reads them); the helpers below do not carry them.
    """

    context: Tensor
    time_cond: Tensor | None = None
    weights: Tensor | None = None

    def __len__(self) -> int:
        return int(self.context.shape[0])

    def repeat_interleave(self, repeats: int) -> Conditioning:
        """Each item repeated ``repeats`` times in place: ``[N, ...] -> [N * repeats, ...]``."""
        tc = None if self.time_cond is None else self.time_cond.repeat_interleave(repeats, dim=0)
        return Conditioning(self.context.repeat_interleave(repeats, dim=0), tc)

    def index(self, idx: Tensor | slice) -> Conditioning:
        tc = None if self.time_cond is None else self.time_cond[idx]
        return Conditioning(self.context[idx], tc)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        ctx = torch.cat([p.context for p in parts], dim=0)
        if any(p.time_cond is None for p in parts):
            return Conditioning(ctx, None)
        return Conditioning(ctx, torch.cat([p.time_cond for p in parts], dim=0))  # type: ignore[misc]

    def to(self, *args, **kwargs) -> Conditioning:  # noqa: ANN002, ANN003
        tc = None if self.time_cond is None else self.time_cond.to(*args, **kwargs)
        return Conditioning(self.context.to(*args, **kwargs), tc)


@dataclass
class DCConditionerConfig(ConfigMixin):
    """Sizes of the double conditioner.

    Args:
        num_tokens: L, tokens per sample from the fMRI encoder (its patch count; 1 with ``global_pool``).
        token_dim: D, the encoder width.
        context_dim: C, the UNet's cross-attention width.
        time_embed_dim: E, the UNet's time-embedding width (4 x model_channels).
        cond_tokens: T, context length (77 in the original).
        global_pool: the encoder mean-pools to one token.
        use_cross_attn: feed the fMRI context to cross-attention (off: a zero context ``[N, 1, C]``).
        use_time_cond: compute the time-embedding vector.
        standardize_tokens: z-score the tokens with fixed training statistics (buffers ``token_mean`` and
            ``token_std`` ``[L, D]``) before the mappers.
        basis_size: K > 0 confines every context token to a softmax mixture of the K rows of the buffer
            ``basis [K, C]`` (set it with :meth:`DCConditioner.set_basis`); 0 is the original's free context.
    """

    num_tokens: int
    token_dim: int
    context_dim: int
    time_embed_dim: int
    cond_tokens: int = COND_TOKENS
    global_pool: bool = False
    use_cross_attn: bool = True
    use_time_cond: bool = True
    standardize_tokens: bool = False
    basis_size: int = 0

    #: Fields added after format version 1; a config file without them is read with the default (off).
    _OPTIONAL_IN_FILES = frozenset({"standardize_tokens", "basis_size"})

    def __post_init__(self) -> None:
        for name in ("num_tokens", "token_dim", "context_dim", "time_embed_dim", "cond_tokens"):
            check_int(name, getattr(self, name))
        check_int("basis_size", self.basis_size, minimum=0, maximum=MAX_ROWS)
        if self.basis_size == 1:
            raise ConfigError("a context basis needs at least 2 rows (0 switches it off)", field="basis_size")
        for name in ("global_pool", "use_cross_attn", "use_time_cond", "standardize_tokens"):
            setattr(self, name, check_bool(name, getattr(self, name)))
        if not (self.use_cross_attn or self.use_time_cond):
            raise ConfigError(
                "at least one of use_cross_attn and use_time_cond must be on", field="use_time_cond"
            )
        if self.global_pool and self.num_tokens != 1:
            raise ConfigError(
                f"with global_pool the encoder gives 1 token, not {self.num_tokens}", field="num_tokens"
            )
        if not self.global_pool and self.num_tokens < 2:
            raise ConfigError(
                "the channel mapper needs at least 2 tokens (use global_pool for one)", field="num_tokens"
            )
        if not self.global_pool and self.cond_tokens < 2:
            raise ConfigError("the time mapper needs at least 2 context tokens", field="cond_tokens")
        L, D, C, T = self.num_tokens, self.token_dim, self.context_dim, self.cond_tokens
        check_parameters(
            "conditioner",
            {
                "num_tokens": L * (L // 2) + (L // 2) * T + 2 * L * D,
                "token_dim": D * (self.basis_size or C),
                "cond_tokens": T * (T // 2),
                "time_embed_dim": C * self.time_embed_dim,
                "basis_size": self.basis_size * C,
            },
        )

    @property
    def context_tokens(self) -> int:
        """Length of the context the conditioner computes (``1`` with ``global_pool``)."""
        return 1 if self.global_pool else self.cond_tokens


class DCConditioner(nn.Module):
    """fMRI tokens -> cross-attention context and time-embedding vector.

    Parameters (converted from the original): ``channel_mapper.{0,1}`` (``cond_stage_model.channel_mapper``),
    ``dim_mapper`` (``cond_stage_model.dim_mapper``), ``time_mapper.{0,1,2}`` or ``time_mapper`` (a single
    Linear with ``global_pool``) (``model.diffusion_model.time_embed_condtion``). With ``standardize_tokens``
    also the buffers ``token_mean`` and ``token_std``, and with ``basis_size`` the buffers ``basis`` and
    ``basis_null`` (ours).
    """

    def __init__(self, config: DCConditionerConfig):
        super().__init__()
        if not isinstance(config, DCConditionerConfig):
            raise ConfigError(f"expected a DCConditionerConfig, got {type(config).__name__}")
        self.config = c = config
        if c.standardize_tokens:
            self.register_buffer("token_mean", torch.zeros(c.num_tokens, c.token_dim))
            self.register_buffer("token_std", torch.ones(c.num_tokens, c.token_dim))
        if not c.global_pool:
            self.channel_mapper = nn.Sequential(
                nn.Conv1d(c.num_tokens, c.num_tokens // 2, 1, bias=True),
                nn.Conv1d(c.num_tokens // 2, c.cond_tokens, 1, bias=True),
            )
        else:
            self.channel_mapper = None
        if c.basis_size:
            self.register_buffer("basis", torch.zeros(c.basis_size, c.context_dim))
            self.register_buffer("basis_null", torch.zeros(c.context_dim))
        self.dim_mapper = nn.Linear(c.token_dim, c.basis_size or c.context_dim, bias=True)
        if c.use_time_cond:
            if c.global_pool:
                self.time_mapper: nn.Module | None = nn.Linear(c.context_dim, c.time_embed_dim)
            else:
                self.time_mapper = nn.Sequential(
                    nn.Conv1d(c.cond_tokens, c.cond_tokens // 2, 1, bias=True),
                    nn.Conv1d(c.cond_tokens // 2, 1, 1, bias=True),
                    nn.Linear(c.context_dim, c.time_embed_dim),
                )
        else:
            self.time_mapper = None

    @property
    def time_dim(self) -> int | None:
        """E when the time path is on, else ``None``."""
        return self.config.time_embed_dim if self.time_mapper is not None else None

    def context_from_tokens(self, tokens: Tensor) -> Tensor:
        """``tokens: [N, L, D]`` -> context ``[N, T, C]`` (``[N, 1, C]`` with ``global_pool``)."""
        return self._context_and_weights(tokens)[0]

    def _context_and_weights(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """The context and, with a basis, its mixture weights ``[N, T, K]``."""
        c = self.config
        if tokens.ndim != 3 or tokens.shape[1] != c.num_tokens or tokens.shape[2] != c.token_dim:
            raise DataError(
                f"expected encoder tokens [N, {c.num_tokens}, {c.token_dim}], got {list(tokens.shape)}",
                field="tokens",
            )
        if c.standardize_tokens:
            tokens = (tokens - self.token_mean) / self.token_std
        h = tokens if self.channel_mapper is None else self.channel_mapper(tokens)  # [N, T, D]
        if not c.basis_size:
            return self.dim_mapper(h), None  # [N, T, C]
        weights = torch.softmax(self.dim_mapper(h).float(), dim=-1).to(h.dtype)  # [N, T, K]
        return weights @ self.basis, weights

    @torch.no_grad()
    def set_basis(self, basis: Tensor, null: Tensor | None = None) -> None:
        """Fix the context basis ``[K, C]`` (e.g. a class-conditional prior's class embeddings, null row left out)
        and, optionally, the null context ``[C]`` that classifier-free guidance compares against (e.g. the
        prior's null row; default: zeros, as without a basis).

        Raises:
            ConfigError: this conditioner has no basis; DataError: the basis has the wrong shape.
        """
        c = self.config
        if not c.basis_size:
            raise ConfigError("this conditioner has no context basis", field="basis_size")
        if tuple(basis.shape) != (c.basis_size, c.context_dim) or not torch.isfinite(basis).all():
            raise DataError(
                f"expected a finite context basis [{c.basis_size}, {c.context_dim}], got {list(basis.shape)}",
                field="basis",
            )
        self.basis.copy_(basis.to(self.basis.dtype))
        if null is not None:
            if tuple(null.shape) != (c.context_dim,) or not torch.isfinite(null).all():
                raise DataError(
                    f"expected a finite null context [{c.context_dim}], got {list(null.shape)}", field="null"
                )
            self.basis_null.copy_(null.to(self.basis_null.dtype))

    @torch.no_grad()
    def fit_token_stats(self, tokens: Tensor, floor: float = 0.1, context_std: float | None = None) -> None:
        """Set the standardisation from training tokens ``[N, L, D]``: their mean, and their std floored at
        ``floor`` times its average (so that near-constant channels are not blown up into noise).

        With ``context_std``, the standardised tokens are scaled so that the context these tokens give varies
        across samples by that much (std over samples, averaged over context tokens and channels). The
        context is affine in the standardised tokens, so this scale is exact for the current mappers."""
        c = self.config
        if not c.standardize_tokens:
            raise ConfigError("this conditioner does not standardise tokens", field="standardize_tokens")
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (c.num_tokens, c.token_dim) or len(tokens) < 2:
            raise DataError(
                f"expected at least 2 samples of tokens [N, {c.num_tokens}, {c.token_dim}], "
                f"got {list(tokens.shape)}",
                field="tokens",
            )
        t = tokens.double()
        std = t.std(dim=0)
        self.token_mean.copy_(t.mean(dim=0).to(self.token_mean.dtype))
        self.token_std.copy_(
            std.clamp_min(floor * float(std.mean())).clamp_min(1e-8).to(self.token_std.dtype)
        )
        if context_std is not None:
            if c.basis_size:
                raise ConfigError(
                    "a context confined to a basis has the basis's spread; give no context std",
                    field="context_std",
                )
            if not context_std > 0:
                raise ConfigError(f"expected a positive context std, got {context_std}", field="context_std")
            spread = float(
                self.context_from_tokens(tokens.to(self.token_std.dtype)).double().std(dim=0).mean()
            )
            if spread > 0:
                self.token_std.mul_(spread / context_std)

    def time_from_context(self, context: Tensor) -> Tensor | None:
        """``context: [N, T, C]`` -> ``[N, E]``, or ``None`` when the time path is off."""
        if self.time_mapper is None:
            return None
        return self.time_mapper(context).squeeze(1)  # [N, 1, E] -> [N, E]

    def forward(self, tokens: Tensor) -> Conditioning:
        """``tokens: [N, L, D]`` -> :class:`Conditioning` (context ``[N, T, C]``, time vector ``[N, E]``)."""
        context, weights = self._context_and_weights(tokens)
        time_cond = self.time_from_context(context)
        if not self.config.use_cross_attn:
            context = context.new_zeros(context.shape[0], 1, context.shape[2])
        return Conditioning(context, time_cond, weights)

    def null_conditioning(self, n: int, like: Tensor) -> Conditioning:
        """The unconditional input for classifier-free guidance: a zero context ``[n, T, C]`` (with a basis: its
        null context in every token) and a zero time vector."""
        c = self.config
        ctx = like.new_zeros(n, c.context_tokens if c.use_cross_attn else 1, c.context_dim)
        if c.basis_size and c.use_cross_attn:
            ctx = ctx + self.basis_null.to(ctx.dtype)
        tc = None if self.time_mapper is None else like.new_zeros(n, c.time_embed_dim)
        return Conditioning(ctx, tc)


@dataclass
class ClassEmbedderConfig(ConfigMixin):
    """Label embedding of the class-conditional prior: ``n_classes`` rows of width ``embed_dim`` (= C)."""

    n_classes: int = 1001
    embed_dim: int = 512

    def __post_init__(self) -> None:
        check_int("n_classes", self.n_classes, maximum=MAX_ROWS)
        check_int("embed_dim", self.embed_dim)
        check_parameters("class embedding", {"n_classes": self.n_classes * self.embed_dim})


class ClassEmbedder(nn.Module):
    """Class labels ``[N]`` int64 -> context ``[N, 1, C]`` (CompVis ``ClassEmbedder``; key ``embedding.weight``)."""

    time_dim = None

    def __init__(self, config: ClassEmbedderConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.n_classes, config.embed_dim)

    def forward(self, labels: Tensor) -> Conditioning:
        labels = torch.as_tensor(labels, device=self.embedding.weight.device)
        if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise DataError(
                f"expected integer class labels [N], got {labels.dtype} {list(labels.shape)}", field="labels"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.config.n_classes):
            raise DataError(f"class labels must lie in [0, {self.config.n_classes})", field="labels")
        return Conditioning(self.embedding(labels.long()[:, None]), None)

    def null_conditioning(self, n: int, like: Tensor) -> Conditioning:
        """The last class (1000 of 1001 in the ImageNet prior) as the unconditional input."""
        labels = torch.full((n,), self.config.n_classes - 1, dtype=torch.long, device=like.device)
        return self(labels)


__all__ = [
    "COND_TOKENS",
    "ClassEmbedder",
    "ClassEmbedderConfig",
    "Conditioning",
    "DCConditioner",
    "DCConditionerConfig",
]
