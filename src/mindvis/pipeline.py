"""Reconstruction pipeline of MinD-Vis (Chen et al., CVPR 2023): fMRI -> conditioning -> latents -> images.

:class:`MindVisPipeline` follows the diffusers pipeline shape: one ``__call__`` with ``num_inference_steps``
and ``generator``/``seed``, an output dataclass, and ``save_pretrained`` / ``from_pretrained`` on a local
folder::

    model_index.json                 components, format version, provenance
    fmri_encoder/config.json + model.safetensors   (absent for a class-conditional prior)
    conditioner/config.json  + model.safetensors   (DCConditioner, or ClassEmbedder for a prior)
    unet/config.json         + model.safetensors   (our UNetConfig; weights of a diffusers UNet2DConditionModel)
    vq/config.json           + model.safetensors   (our VQConfig; weights of a diffusers VQModel)
    scheduler/config.json                          (NoiseScheduleConfig)

Generation is batched across fMRI items and samples. Randomness is drawn per item on the CPU from
``seed + item_index`` (or one generator per item), and then per sample, so an item gets the same images
whatever the batch size or the other items in the call.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mindvis import __version__
from mindvis.errors import CheckpointError, ConfigError, DataError
from mindvis.models.conditioning import (
    ClassEmbedder,
    ClassEmbedderConfig,
    Conditioning,
    DCConditioner,
    DCConditionerConfig,
)
from mindvis.models.folder import (
    load_safetensors,
    load_state_dict_checked,
    read_folder_config,
    read_model_json,
    save_model_folder,
)
from mindvis.models.ldm import DCLDM, UNetConfig, VQConfig, images_to_uint8
from mindvis.models.mbm import FMRIEncoder
from mindvis.sampling import (
    DEFAULT_STEPS,
    SAMPLERS,
    NoiseSchedule,
    NoiseScheduleConfig,
    model_calls,
    run_sampler,
)
from mindvis.utils.io import atomic_dir, write_json

_logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
FORMAT_VERSION = 1
_COMPONENT_CLASSES = {
    "conditioner": {
        "DCConditioner": (DCConditioner, DCConditionerConfig),
        "ClassEmbedder": (ClassEmbedder, ClassEmbedderConfig),
    },
}


@dataclass
class MindVisPipelineOutput:
    """Result of :meth:`MindVisPipeline.__call__`.

    Attributes:
        images: ``[N, S, H, W, 3]`` uint8 (``S`` samples per item), or ``[N, S, 3, H, W]`` float in [-1, 1]
            with ``output_type="pt"``.
        latents: ``[N, S, C, h, w]`` float32 final latents (CPU), or ``None`` when not asked for.
        seeds: the seed each item's randomness came from.
        sampler / num_inference_steps: what was run.
    """

    images: np.ndarray | Tensor
    latents: Tensor | None
    seeds: list[int] = field(default_factory=list)
    sampler: str = "plms"
    num_inference_steps: int = 0


def _as_fmri(fmri: Any, num_voxels: int, what: str = "fmri") -> Tensor:
    """Validate fMRI input: ``[N, V]`` (or ``[V]``) real numbers, finite, ``V`` equal to the model's."""
    if isinstance(fmri, Tensor):
        arr = fmri.detach().cpu()
        if not arr.is_floating_point():
            raise DataError(f"expected floating-point voxels, got dtype {arr.dtype}", field=what)
    else:
        a = np.asarray(fmri)
        if a.dtype.kind != "f":
            raise DataError(f"expected floating-point voxels, got dtype {a.dtype}", field=what)
        arr = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if arr.ndim == 3 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise DataError(f"expected fMRI of shape [N, V], got {list(arr.shape)}", field=what)
    if arr.shape[0] == 0:
        raise DataError("no fMRI samples (the array has 0 rows)", field=what)
    if arr.shape[1] != num_voxels:
        raise DataError(
            f"expected {num_voxels} voxels per sample (the model's), got {arr.shape[1]}", field=what
        )
    arr = arr.float()
    if not bool(torch.isfinite(arr).all()):
        bad = int((~torch.isfinite(arr)).any(dim=1).sum())
        raise DataError(f"{bad} sample(s) contain NaN or infinite values", field=what)
    return arr


def _check_index(index: dict[str, Any], path: Path) -> dict[str, str]:
    """The components of a parsed ``model_index.json``, after checking the types of the keys it is read for.

    Required: ``components`` (an object of class names, with ``conditioner``, ``unet``, ``vq`` and
    ``scheduler``) and ``scale_factor`` (both written since format version 1). Optional, each checked when
    present: ``default_sampler`` (a string), ``default_guidance_scale`` (checked by the pipeline),
    ``default_steps`` (checked against the schedule by the caller) and ``source`` (an object).

    Raises:
        CheckpointError: naming ``path`` and the field.
    """
    comps = index.get("components")
    if not isinstance(comps, dict):
        raise CheckpointError(
            f"expected an object of components, got {type(comps).__name__ if comps is not None else 'nothing'}",
            path=path,
            field="components",
        )
    for need in ("conditioner", "unet", "vq", "scheduler"):
        if need not in comps:
            raise CheckpointError("component missing from the index", path=path, field=need)
    for name, value in comps.items():
        if not isinstance(value, str):
            raise CheckpointError(
                f"expected a class name (a string), got {value!r:.80}", path=path, field=f"components.{name}"
            )
    if "scale_factor" not in index:
        raise CheckpointError("missing required field", path=path, field="scale_factor")
    scale = index["scale_factor"]
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise CheckpointError(
            f"expected a finite number > 0, got {scale!r:.80}", path=path, field="scale_factor"
        )
    sampler = index.get("default_sampler", "plms")
    if not isinstance(sampler, str):
        raise CheckpointError(
            f"expected a sampler name, got {sampler!r:.80}", path=path, field="default_sampler"
        )
    guidance = index.get("default_guidance_scale", 1.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise CheckpointError(
            f"expected a number, got {guidance!r:.80}", path=path, field="default_guidance_scale"
        )
    if not isinstance(index.get("source", {}), dict):
        raise CheckpointError(
            f"expected an object, got {type(index['source']).__name__}", path=path, field="source"
        )
    return comps


def _check_encoder_fits(encoder: Any, conditioner: Any, path: Path) -> None:
    """The conditioner must take the encoder's tokens: count, width and pooling (else sampling fails later)."""
    c = getattr(conditioner, "config", None)
    if not isinstance(c, DCConditionerConfig):
        raise CheckpointError(
            f"an fMRI encoder needs a DCConditioner, got {type(conditioner).__name__}",
            path=path,
            field="_class_name",
        )
    tokens = 1 if encoder.global_pool else encoder.num_patches
    for name, want, got in (
        ("global_pool", encoder.global_pool, c.global_pool),
        ("num_tokens", tokens, c.num_tokens),
        ("token_dim", encoder.embed_dim, c.token_dim),
    ):
        if want != got:
            raise CheckpointError(
                f"{got!r} does not fit the fMRI encoder ({want!r}, from fmri_encoder/config.json)",
                path=path,
                field=name,
            )


class MindVisPipeline:
    """fMRI (or class labels, for a class-conditional prior) -> images.

    Args:
        model: the :class:`~mindvis.models.ldm.DCLDM`.
        default_sampler / default_steps: used when a call does not say.
        default_guidance_scale: the classifier-free guidance scale used when a call does not say (1: off). A
            stage B model trained with conditioning dropout records the scale it was validated with.
    """

    def __init__(
        self,
        model: DCLDM,
        default_sampler: str = "plms",
        default_steps: int | None = None,
        default_guidance_scale: float = 1.0,
    ):
        if default_sampler not in SAMPLERS:
            raise ConfigError(
                f"unknown sampler {default_sampler!r}; choose {', '.join(SAMPLERS)}", field="sampler"
            )
        self.model = model.eval()
        self.default_sampler = default_sampler
        self.default_steps = default_steps
        if isinstance(default_guidance_scale, bool) or not isinstance(default_guidance_scale, (int, float)):
            raise ConfigError(
                f"expected a number, got {default_guidance_scale!r}", field="default_guidance_scale"
            )
        if not np.isfinite(default_guidance_scale):
            raise ConfigError(
                f"expected a finite number, got {default_guidance_scale}", field="default_guidance_scale"
            )
        self.default_guidance_scale = float(default_guidance_scale)
        #: Provenance recorded in ``model_index.json`` (e.g. the converted files and their hashes).
        self.source: dict[str, Any] = {}

    # ---- properties ------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.unet.parameters()).dtype

    @property
    def num_voxels(self) -> int | None:
        """Voxels per fMRI sample the model takes (``None`` for a class prior)."""
        enc = self.model.fmri_encoder
        return None if enc is None else int(enc.config.num_voxels)

    @property
    def image_size(self) -> int:
        return self.model.vq_config.resolution

    def to(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        memory_format: torch.memory_format | None = None,
    ) -> MindVisPipeline:
        """Move every network to ``device`` and cast its weights to ``dtype`` (e.g. bfloat16 on a GPU).

        Sampling arithmetic and the schedule stay in float32; only the networks run in ``dtype``. Each network
        is fed in its own dtype, so one may be cast back afterwards (e.g. ``pipe.to(dtype=torch.bfloat16)``
        then ``pipe.model.vq.float()`` keeps the image decoder, and its codebook search, in float32).
        ``memory_format=torch.channels_last`` stores the UNet's and the autoencoder's convolution weights
        channels-last, so their convolutions run in that layout (results equal up to rounding).
        """
        if device is not None:
            self.model.to(device)
        if dtype is not None:
            for name in ("fmri_encoder", "conditioner", "unet", "vq"):
                mod = getattr(self.model, name)
                if mod is not None:
                    mod.to(dtype=dtype)
        if memory_format is not None:
            self.model.unet.to(memory_format=memory_format)
            self.model.vq.to(memory_format=memory_format)
        return self

    # ---- saving ----------------------------------------------------------------------------------------

    def save_pretrained(
        self, directory: str | os.PathLike, overwrite: bool = False, source: dict[str, Any] | None = None
    ) -> Path:
        """Write the pipeline folder (see the module docstring); it appears complete or not at all.

        Raises:
            OutputExistsError: the folder exists, is not empty, and ``overwrite`` is False.
        """
        m = self.model
        directory = Path(directory)
        with atomic_dir(directory, overwrite=overwrite) as tmp:
            components: dict[str, str] = {}
            if m.fmri_encoder is not None:
                m.fmri_encoder.save_pretrained(tmp / "fmri_encoder")
                components["fmri_encoder"] = type(m.fmri_encoder).__name__
            cname = type(m.conditioner).__name__
            save_model_folder(m.conditioner, tmp / "conditioner", cname, m.conditioner.config.to_dict())
            components["conditioner"] = cname
            save_model_folder(m.unet, tmp / "unet", "UNet2DConditionModel", m.unet_config.to_dict())
            components["unet"] = "UNet2DConditionModel"
            save_model_folder(m.vq, tmp / "vq", "VQModel", m.vq_config.to_dict())
            components["vq"] = "VQModel"
            write_json(
                tmp / "scheduler" / "config.json",
                {"_class_name": "NoiseSchedule", **m.schedule.config.to_dict()},
            )
            components["scheduler"] = "NoiseSchedule"
            write_json(
                tmp / MODEL_INDEX,
                {
                    "_class_name": "MindVisPipeline",
                    "_format_version": FORMAT_VERSION,
                    "_mindvis_version": __version__,
                    "components": components,
                    "scale_factor": m.scale_factor,
                    "default_sampler": self.default_sampler,
                    "default_steps": self.default_steps,
                    "default_guidance_scale": self.default_guidance_scale,
                    "source": source or {},
                },
            )
        _logger.info("saved pipeline to %s", directory)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> MindVisPipeline:
        """Load a folder written by :meth:`save_pretrained` (strict: every key and shape must match).

        Every JSON file is checked before anything is built: wrong types, missing keys and sizes beyond the
        bounds of :mod:`mindvis.models.ldm` are refused naming the file and the field, and weights are checked
        for keys, shapes and dtypes (see :func:`~mindvis.models.folder.load_state_dict_checked`).

        Raises:
            CheckpointError: the folder or a component file is missing, corrupt, of the wrong type or shape,
                or does not fit its config.
            ConfigError: a config holds invalid values.
        """
        d = Path(directory)
        if not d.is_dir():
            raise CheckpointError("model folder not found", path=d)
        if not (d / MODEL_INDEX).is_file():
            raise CheckpointError(f"not a mindvis pipeline folder (missing {MODEL_INDEX})", path=d)
        index_path = d / MODEL_INDEX
        index = read_model_json(index_path, newest=FORMAT_VERSION)
        comps = _check_index(index, index_path)

        def load_into(module: torch.nn.Module, sub: str) -> None:
            load_state_dict_checked(
                module, load_safetensors(d / sub / "model.safetensors"), source=d / sub / "model.safetensors"
            )

        encoder = FMRIEncoder.from_pretrained(d / "fmri_encoder") if "fmri_encoder" in comps else None
        cmeta = read_folder_config(d / "conditioner")
        cname = cmeta.get("_class_name", comps["conditioner"])
        if not isinstance(cname, str) or cname not in _COMPONENT_CLASSES["conditioner"]:
            raise CheckpointError(
                f"unknown conditioner class {cname!r}",
                path=d / "conditioner" / "config.json",
                field="_class_name",
            )
        ccls, ccfg = _COMPONENT_CLASSES["conditioner"][cname]
        conditioner = ccls(ccfg.from_dict(cmeta, source=d / "conditioner" / "config.json"))
        if encoder is not None:
            _check_encoder_fits(encoder, conditioner, d / "conditioner" / "config.json")
        load_into(conditioner, "conditioner")
        ucfg = UNetConfig.from_dict(read_folder_config(d / "unet"), source=d / "unet" / "config.json")
        vcfg = VQConfig.from_dict(read_folder_config(d / "vq"), source=d / "vq" / "config.json")
        smeta = read_model_json(d / "scheduler" / "config.json")
        schedule = NoiseSchedule(NoiseScheduleConfig.from_dict(smeta, source=d / "scheduler" / "config.json"))
        steps = index.get("default_steps")
        if steps is not None and (
            isinstance(steps, bool)
            or not isinstance(steps, int)
            or not 1 <= steps < schedule.num_train_timesteps
        ):
            raise CheckpointError(
                f"expected null or an integer in [1, {schedule.num_train_timesteps - 1}], got {steps!r}",
                path=index_path,
                field="default_steps",
            )
        try:
            model = DCLDM(
                ucfg, vcfg, conditioner, schedule, fmri_encoder=encoder, scale_factor=index["scale_factor"]
            )
        except ConfigError as exc:  # the components' configs disagree (context width, time vector, latents)
            where = index_path if exc.field == "conditioner" else d / "unet" / "config.json"
            raise CheckpointError(
                f"the components do not fit together: {exc.detail}", path=where, field=exc.field
            ) from None
        load_into(model.unet, "unet")
        load_into(model.vq, "vq")
        try:
            pipe = cls(
                model,
                default_sampler=index.get("default_sampler", "plms"),
                default_steps=steps,
                default_guidance_scale=index.get("default_guidance_scale", 1.0),
            )
        except ConfigError as exc:
            raise CheckpointError(exc.detail, path=index_path, field=exc.field) from None
        pipe.source = index.get("source", {})
        return pipe.to(device, dtype)

    # ---- generation ------------------------------------------------------------------------------------

    def _item_seeds(
        self,
        n: int,
        seed: int | Sequence[int] | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
    ) -> list[int]:
        hi = 2**63 - 1
        if generator is not None:
            if isinstance(generator, torch.Generator):
                return [int(torch.randint(0, hi, (1,), generator=generator)) for _ in range(n)]
            gens = list(generator)
            if len(gens) != n:
                raise ConfigError(f"got {len(gens)} generators for {n} items", field="generator")
            return [int(torch.randint(0, hi, (1,), generator=g)) for g in gens]
        if seed is None:
            base = int(torch.randint(0, 2**31 - 1, (1,)))
            _logger.info("no seed given; using base seed %d", base)
            return [base + i for i in range(n)]
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            return [int(seed) + i for i in range(n)]
        seeds = [int(s) for s in seed]
        if len(seeds) != n:
            raise ConfigError(f"got {len(seeds)} seeds for {n} items", field="seed")
        return seeds

    @torch.inference_mode()
    def __call__(
        self,
        fmri: np.ndarray | Tensor | None = None,
        *,
        labels: np.ndarray | Tensor | Sequence[int] | None = None,
        num_samples: int = 5,
        num_inference_steps: int | None = None,
        sampler: Literal["plms", "ddim", "dpmsolver++"] | None = None,
        eta: float = 0.0,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        batch_size: int | None = None,
        guidance_scale: float | None = None,
        progress: bool = True,
        output_type: Literal["uint8", "pt"] = "uint8",
        return_latents: bool = True,
    ) -> MindVisPipelineOutput:
        """Reconstruct images.

        Args:
            fmri: ``[N, V]`` voxels (numpy or torch, floating point; ``[V]`` is one item).
            labels: ``[N]`` class labels instead of ``fmri``, for a class-conditional prior.
            num_samples: S, images per item.
            num_inference_steps: sampler steps (default: the pipeline's, else PLMS 250 / DDIM 50 / DPM++ 25).
            sampler: ``"plms"`` (the original's), ``"ddim"`` or ``"dpmsolver++"``.
            eta: DDIM noise (0 is deterministic); PLMS and DPM-Solver++ need 0.
            seed: base seed (item ``i`` uses ``seed + i``) or one seed per item.
            generator: one ``torch.Generator`` per item (or one for all, consumed in item order).
            batch_size: latents per UNet call (default: all ``N * S`` at once).
            guidance_scale: classifier-free guidance against a zero (null) condition; 1 disables it (the
                original has none). Default: the pipeline's ``default_guidance_scale``.
            progress: show a progress bar.
            output_type: ``"uint8"`` images ``[N, S, H, W, 3]`` (255 * clamp((x + 1) / 2) truncated, as the
                original) or ``"pt"``: float ``[N, S, 3, H, W]`` in [-1, 1] before clamping.
            return_latents: keep the final latents in the output.

        Raises:
            DataError: bad fMRI (dtype, shape, voxel count, NaN, empty) or labels.
            ConfigError: bad options.
        """
        m = self.model
        sampler = sampler or self.default_sampler
        if sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {sampler!r}; choose {', '.join(SAMPLERS)}", field="sampler")
        steps = (
            num_inference_steps
            or (self.default_steps if sampler == self.default_sampler else None)
            or DEFAULT_STEPS[sampler]
        )
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ConfigError(f"expected num_samples >= 1, got {num_samples!r}", field="num_samples")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ConfigError(f"expected batch_size >= 1, got {batch_size!r}", field="batch_size")
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        if not np.isfinite(guidance_scale):
            raise ConfigError(
                f"expected a finite guidance_scale, got {guidance_scale}", field="guidance_scale"
            )
        if output_type not in ("uint8", "pt"):
            raise ConfigError(f"unknown output_type {output_type!r}", field="output_type")
        device, dtype = self.device, self.dtype
        # each network is fed in its own dtype (e.g. a bfloat16 UNet with a float32 image decoder)
        vq_dtype = next(m.vq.parameters()).dtype

        # conditioning input
        if m.is_fmri_conditioned:
            if fmri is None:
                raise DataError("this model is conditioned on fMRI; pass fmri=[N, V]", field="fmri")
            cond_in: Tensor = _as_fmri(fmri, self.num_voxels or 0)
        else:
            if labels is None:
                raise DataError("this model is a class-conditional prior; pass labels=[N]", field="labels")
            cond_in = torch.as_tensor(np.asarray(labels))
            if cond_in.ndim == 0:
                cond_in = cond_in[None]
            if cond_in.numel() == 0:
                raise DataError("no labels given", field="labels")
        n, S = int(cond_in.shape[0]), int(num_samples)
        total = n * S
        bs = total if batch_size is None else batch_size
        seeds = self._item_seeds(n, seed, generator)

        # randomness: per item, then per sample, always on the CPU
        C, h, w = m.latent_shape
        x_T = torch.empty(n, S, C, h, w)
        sample_gens: list[list[torch.Generator]] = []
        for i, s_i in enumerate(seeds):
            g = torch.Generator().manual_seed(s_i)
            x_T[i] = torch.randn((S, C, h, w), generator=g)
            subs = torch.randint(0, 2**62, (S,), generator=g).tolist()
            sample_gens.append([torch.Generator().manual_seed(int(s)) for s in subs])

        # conditioning, in chunks of items
        conds: list[Conditioning] = []
        item_bs = max(1, bs // S) if batch_size is not None else n
        for a in range(0, n, item_bs):
            chunk = cond_in[a : a + item_bs].to(device)
            if m.is_fmri_conditioned:
                chunk = chunk.to(next(m.fmri_encoder.parameters()).dtype)
            conds.append(m.condition(chunk))
        cond_all = Conditioning.cat(conds)
        null = None
        if guidance_scale != 1.0:
            null = m.conditioner.null_conditioning(1, cond_all.context)

        units = [(i, s) for i in range(n) for s in range(S)]
        calls = model_calls(sampler, steps, m.num_timesteps) * (-(-total // bs))
        from tqdm.auto import tqdm

        bar = tqdm(total=calls, disable=not progress, desc=f"{sampler} x{steps}", unit="step", leave=False)
        latents = torch.empty(n, S, C, h, w)
        images: Any = None
        try:
            for a in range(0, total, bs):
                chunk_units = units[a : a + bs]
                items = torch.tensor([i for i, _ in chunk_units], device=device)
                cond = cond_all.index(items)
                gens = [sample_gens[i][s] for i, s in chunk_units]
                x = torch.stack([x_T[i, s] for i, s in chunk_units]).to(device)
                eps_fn = self._eps_fn(cond, null, guidance_scale, dtype, bar)

                def noise_fn(step: int, shape: torch.Size, gens: list[torch.Generator] = gens) -> Tensor:
                    return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in gens])

                z = run_sampler(sampler, eps_fn, x, m.schedule, steps, eta=eta, noise_fn=noise_fn)
                dec = m.decode_latents(z.to(vq_dtype)).float()
                out = images_to_uint8(dec).cpu().numpy() if output_type == "uint8" else dec.cpu()
                if images is None:
                    shape = (n, S, *out.shape[1:])
                    images = np.empty(shape, dtype=np.uint8) if output_type == "uint8" else torch.empty(shape)
                for k, (i, s) in enumerate(chunk_units):
                    images[i, s] = out[k]
                    latents[i, s] = z[k].float().cpu()
        finally:
            bar.close()
        return MindVisPipelineOutput(
            images=images,
            latents=latents if return_latents else None,
            seeds=seeds,
            sampler=sampler,
            num_inference_steps=int(steps),
        )

    def _eps_fn(
        self, cond: Conditioning, null: Conditioning | None, scale: float, dtype: torch.dtype, bar: Any
    ):
        m = self.model
        cond = cond.to(dtype=dtype)
        if null is not None:
            b = len(cond)
            null_b = Conditioning(
                null.context.expand(b, *null.context.shape[1:]).to(dtype=dtype),
                None if null.time_cond is None else null.time_cond.expand(b, -1).to(dtype=dtype),
            )
            both = Conditioning.cat([null_b, cond])

        def eps_fn(x: Tensor, t: Tensor) -> Tensor:
            if null is None:
                e = m.eps(x.to(dtype), t, cond).float()
            else:
                e_u, e_c = m.eps(torch.cat([x, x]).to(dtype), torch.cat([t, t]), both).float().chunk(2)
                e = e_u + scale * (e_c - e_u)
            bar.update(1)
            return e

        return eps_fn


__all__ = ["MODEL_INDEX", "MindVisPipeline", "MindVisPipelineOutput"]
