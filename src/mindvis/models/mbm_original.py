"""The checkpoint files of the original MinD-Vis stage A (``checkpoint.pth``, ``fmri_encoder.pth``), read
without executing code.

The original's files hold ``{'model', 'optimizer', 'epoch', 'scaler', 'config'}``: the masked autoencoder state
dict, the training state, and a pickled ``config.Config_MBM_fMRI`` object. They are read with the restricted
unpickler of :mod:`mindvis.safeload` (tensors, containers and inert stand-ins for the config classes only). A
bare state dict saved with ``torch.save`` is read too.

Sizes come from the tensors wherever they can: the patch size from ``patch_embed.proj.weight``, the widths
from the embedding layers, the encoder and decoder depths from the number of ``blocks.*`` and
``decoder_blocks.*`` (the original config never stores the decoder depth), the MLP ratio from ``mlp.fc1``,
and the voxel count as ``(pos_embed.shape[1] - 1) * patch_size``. Head counts and masking settings, which
no tensor shape carries, come from the pickled config.

:func:`read_original_mbm_file` gives the file's contents as plain values (the
:class:`~mindvis.models.mbm.MBMConfig` fields, the state dict, a record of the file);
:func:`mindvis.models.mbm.load_original_mbm_checkpoint` builds the config from them and checks the state dict
against the model it describes.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch import Tensor

from mindvis.errors import CheckpointError
from mindvis.safeload import load_torch_file

_logger = logging.getLogger(__name__)

#: Keys of an optional image-feature decoder the original can build (``use_nature_img_loss``); not ours.
_FOREIGN_PREFIXES = ("nature_img_",)


@dataclass
class OriginalMBMFile:
    """What an original stage-A checkpoint file holds, as plain values.

    Attributes:
        fields: :class:`~mindvis.models.mbm.MBMConfig` keyword arguments (sizes from the tensors, head counts
            and masking settings from the pickled config or the overrides; ``focus_range`` a tuple or None).
        state: the model state dict, with our (identical) key names, without the ``module.`` prefix of a
            wrapped model and without the keys of modules we do not build.
        extra: ``epoch`` (int or None), ``original_config`` (dict or None), ``config_class``,
            ``has_optimizer``, ``has_scaler`` and ``dropped_keys`` (keys of modules we do not build).
    """

    fields: dict[str, Any]
    state: dict[str, Tensor]
    extra: dict[str, Any]


def _count_blocks(state: dict[str, Tensor], prefix: str) -> int:
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    idx = {int(m.group(1)) for k in state if (m := pat.match(k))}
    if idx and idx != set(range(len(idx))):
        raise CheckpointError(f"{prefix}.* indices are not contiguous from 0: {sorted(idx)}", field=prefix)
    return len(idx)


def _need(state: dict[str, Tensor], key: str, ndim: int, path: Path) -> Tensor:
    t = state.get(key)
    if not isinstance(t, Tensor):
        raise CheckpointError("missing tensor in the stage-A state dict", path=path, field=f"model.{key}")
    if t.ndim != ndim:
        raise CheckpointError(
            f"expected a {ndim}-D tensor, got shape {list(t.shape)}", path=path, field=f"model.{key}"
        )
    return t


def _plain(value: Any) -> Any:
    """JSON-friendly copy of a pickled config value."""
    if isinstance(value, SimpleNamespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _config_get(cfg: dict[str, Any], name: str, default: Any) -> Any:
    value = cfg.get(name, default)
    return default if value is None and default is not None else value


def read_original_mbm_file(
    path: str | os.PathLike, overrides: dict[str, Any] | None = None
) -> OriginalMBMFile:
    """Read an original stage-A checkpoint without executing code.

    Args:
        path: ``checkpoint.pth`` or ``fmri_encoder.pth`` (or a bare state dict saved with ``torch.save``).
        overrides: config fields to set explicitly, e.g. ``num_heads`` for a bare state dict with no
            pickled config.

    Raises:
        CheckpointError: missing, truncated or refused file; a state dict that is not a stage-A model's (a
            core tensor missing or of the wrong rank, block indices with gaps); sizes that disagree with the
            pickled config; head counts that are unknown or do not divide the stored widths.
    """
    path = Path(path)
    obj = load_torch_file(path)
    if isinstance(obj, dict) and "model" in obj:
        state = obj["model"]
        raw_cfg = obj.get("config")
    elif isinstance(obj, dict) and "pos_embed" in obj:
        state, raw_cfg = obj, None
    else:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"not a stage-A checkpoint: expected a dict with a 'model' state dict, got {keys}", path=path
        )
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError("'model' is not a state dict of tensors", path=path, field="model")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    dropped = [k for k in state if k.startswith(_FOREIGN_PREFIXES)]
    for k in dropped:
        del state[k]
    if dropped:
        _logger.warning("%s: dropped %d keys of the optional image-feature decoder", path, len(dropped))

    if raw_cfg is not None and not isinstance(raw_cfg, (SimpleNamespace, dict)):
        raise CheckpointError(
            f"unexpected config object of type {type(raw_cfg).__name__}", path=path, field="config"
        )
    cfg = _plain(raw_cfg) if raw_cfg is not None else {}
    config_class = cfg.pop("_class", None) if isinstance(cfg, dict) else None

    proj = _need(state, "patch_embed.proj.weight", 3, path)  # [D, 1, p]
    pos = _need(state, "pos_embed", 3, path)  # [1, 1 + L, D]
    dec = _need(state, "decoder_embed.weight", 2, path)  # [Dd, D]
    fc1 = _need(state, "blocks.0.mlp.fc1.weight", 2, path)  # [H, D]
    embed_dim, patch_size = int(proj.shape[0]), int(proj.shape[2])
    hidden = int(fc1.shape[0])
    if embed_dim < 1:
        raise CheckpointError(
            "the patch embedding has width 0", path=path, field="model.patch_embed.proj.weight"
        )
    mlp_ratio = _config_get(cfg, "mlp_ratio", hidden / embed_dim)
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not math.isfinite(mlp_ratio):
        raise CheckpointError(
            f"expected a finite number, got {mlp_ratio!r:.80}", path=path, field="config.mlp_ratio"
        )
    if int(embed_dim * mlp_ratio) != hidden:
        _logger.warning(
            "%s: config mlp_ratio %s does not give the stored MLP width %d", path, mlp_ratio, hidden
        )
        mlp_ratio = hidden / embed_dim
    num_voxels = (int(pos.shape[1]) - 1) * patch_size
    if "num_voxels" in cfg and cfg["num_voxels"] != num_voxels:
        _logger.warning(
            "%s: config num_voxels %s differs from the stored position table (%d); using %d",
            path,
            cfg["num_voxels"],
            num_voxels,
            num_voxels,
        )
    if "patch_size" in cfg and cfg["patch_size"] != patch_size:
        raise CheckpointError(
            f"config patch_size {cfg['patch_size']} differs from the patch embedding ({patch_size})",
            path=path,
            field="config.patch_size",
        )
    fields: dict[str, Any] = dict(
        num_voxels=num_voxels,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=_count_blocks(state, "blocks"),
        num_heads=_config_get(cfg, "num_heads", None),
        decoder_embed_dim=int(dec.shape[0]),
        decoder_depth=_count_blocks(state, "decoder_blocks"),
        decoder_num_heads=_config_get(cfg, "decoder_num_heads", None),
        mlp_ratio=mlp_ratio,
        mask_ratio=_config_get(cfg, "mask_ratio", 0.75),
        focus_range=_config_get(cfg, "focus_range", None),
        focus_rate=_config_get(cfg, "focus_rate", 0.6),
    )
    fields.update(overrides or {})
    for heads in ("num_heads", "decoder_num_heads"):
        if fields[heads] is None:
            raise CheckpointError(
                f"the checkpoint carries no config, so {heads} is unknown; pass it as an override",
                path=path,
                field=heads,
            )
    for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
        if isinstance(fields[heads], int) and fields[heads] > 0 and fields[width] % fields[heads]:
            raise CheckpointError(
                f"stored width {fields[width]} is not divisible by config {heads} {fields[heads]}",
                path=path,
                field=f"config.{heads}",
            )
    if isinstance(fields["focus_range"], list):
        fields["focus_range"] = tuple(fields["focus_range"])

    epoch = obj.get("epoch") if isinstance(obj, dict) and "model" in obj else None
    extra: dict[str, Any] = {
        "epoch": int(epoch)
        if isinstance(epoch, int) or (isinstance(epoch, float) and math.isfinite(epoch))
        else None,
        "original_config": cfg or None,
        "config_class": config_class,
        "has_optimizer": isinstance(obj, dict) and isinstance(obj.get("optimizer"), dict),
        "has_scaler": isinstance(obj, dict) and bool(obj.get("scaler")),
        "dropped_keys": dropped,
    }
    return OriginalMBMFile(fields=fields, state=state, extra=extra)


__all__ = ["OriginalMBMFile", "read_original_mbm_file"]
