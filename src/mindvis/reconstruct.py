"""Images from fMRI with a trained (or converted) MinD-Vis pipeline, written to an output folder.

:func:`reconstruct` does what ``mindvis reconstruct`` does, with its settings in a :class:`ReconstructConfig`:
it reads the fMRI (a ``.npy``/``.npz`` file, :func:`load_fmri_file`, or a dataset split,
:func:`read_dataset_split`), applies the model's preprocessing, samples, and writes into the output folder
``samples/item0000_s0.png`` ... (one PNG per sample), ``grid.png`` (one row per item, the ground truth first
when known, as the original), ``reconstructions.npz`` (``images`` uint8 ``[N, S, H, W, 3]``, ``seeds``,
``ground_truth`` when known) and ``run.json`` (the settings).

This module loads no torch when imported (the command line reads :class:`ReconstructConfig` for its options);
the work imports it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mindvis.config import ConfigMixin, setting
from mindvis.data.formats.registry import load_dataset
from mindvis.errors import ConfigError, DataError
from mindvis.utils.images import image_grid, save_png
from mindvis.utils.io import atomic_dir, check_output_apart, prepare_output_dir, save_npz_atomic, write_json

_logger = logging.getLogger(__name__)

_FMRI_KEYS = ("fmri", "voxels", "X", "arr_0")
_IMAGE_KEYS = ("images", "ground_truth", "test_images", "arr_0")

#: The largest classifier-free guidance scale accepted (the original samples at 1; papers use up to about 10).
MAX_GUIDANCE = 1000.0
#: The largest seed: numpy's seed range (item ``i`` samples with ``seed + i``).
MAX_SEED = 2**32 - 1
#: What :attr:`ReconstructConfig.dtype` may be: the networks' weights while sampling.
DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------------------
# Settings and result
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ReconstructConfig(ConfigMixin):
    """The settings of one reconstruction run.

    The fields declared with :func:`~mindvis.config.setting` are options of ``mindvis reconstruct``, generated
    from them with their default and help text. The other:

    Attributes:
        pad_to_model: wrap-pad (or crop) the voxels to the model's count instead of refusing a different count
            (``--pad-to-model``).

    Raises:
        ConfigError: a value out of range, naming the field.
    """

    limit: int | None = setting(None, "Only the first N items.")
    num_samples: int = setting(5, "Images per fMRI item.")
    steps: int | None = setting(None, "Sampler steps (default per sampler).")
    sampler: str = setting(
        "dpmsolver++",
        "dpmsolver++ (25 steps: PLMS-250's quality at a tenth of the UNet calls, docs/performance.md), ddim, "
        "or plms (the original's, 250 steps).",
    )
    eta: float = setting(0.0, "DDIM noise (0: deterministic).")
    guidance_scale: float | None = setting(
        None,
        "Classifier-free guidance (1: off). Default: the model's; a model trained with --cond-dropout "
        "records the scale it was validated with, any other model 1.",
    )
    seed: int = setting(0, "Item i uses seed + i.")
    batch_size: int | None = setting(None, "Latents per UNet call.")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...")
    dtype: str = setting("float32", "float32, bfloat16 or float16 (GPU).")
    pad_to_model: bool = False

    def __post_init__(self) -> None:
        for name, optional in (
            ("limit", True),
            ("num_samples", False),
            ("steps", True),
            ("batch_size", True),
        ):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"expected an integer >= 1, got {value!r}", field=name)
        from mindvis.sampling import SAMPLERS  # torch; the command line reads this module

        if self.sampler not in SAMPLERS:
            raise ConfigError(
                f"unknown sampler {self.sampler!r}; choose {', '.join(SAMPLERS)}", field="sampler"
            )
        if (
            isinstance(self.eta, bool)
            or not isinstance(self.eta, (int, float))
            or not (math.isfinite(self.eta) and self.eta >= 0)
        ):
            raise ConfigError(f"expected a finite number >= 0, got {self.eta!r}", field="eta")
        g = self.guidance_scale
        if g is not None and (
            isinstance(g, bool) or not isinstance(g, (int, float)) or not abs(g) <= MAX_GUIDANCE
        ):
            raise ConfigError(
                f"{g!r} is not a usable guidance scale: expected a finite number within "
                f"+-{MAX_GUIDANCE:g} (1: off; larger scales overflow the latents)",
                field="guidance_scale",
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"expected an integer in [0, {MAX_SEED}], got {self.seed!r}", field="seed")
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"expected a device name, got {self.device!r}", field="device")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose {', '.join(DTYPES)}", field="dtype")
        if not isinstance(self.pad_to_model, bool):
            raise ConfigError(f"expected true or false, got {self.pad_to_model!r}", field="pad_to_model")


@dataclass(frozen=True)
class ReconstructResult:
    """What :func:`reconstruct` wrote.

    Attributes:
        out: the output folder.
        items: fMRI items reconstructed.
        num_samples: images per item.
        sampler: the sampler that ran.
        num_inference_steps: its step count.
        guidance_scale: the classifier-free guidance scale used (the model's default when not given).
        seconds: time spent sampling.
        run: the contents of ``run.json``.
    """

    out: Path
    items: int
    num_samples: int
    sampler: str
    num_inference_steps: int
    guidance_scale: float
    seconds: float
    run: dict[str, Any]


# ----------------------------------------------------------------------------------------------------------
# Input readers
# ----------------------------------------------------------------------------------------------------------


def _pick_array(path: Path, npz: Any, key: str | None, candidates: tuple[str, ...], what: str) -> np.ndarray:
    names = list(npz.files)
    if key is not None:
        if key not in names:
            raise DataError(
                f"no array named {key!r} (the file has {', '.join(names) or 'none'})", path=path, field=key
            )
        return npz[key]
    if len(names) == 1:
        return npz[names[0]]
    for k in candidates:
        if k in names:
            return npz[k]
    raise DataError(
        f"several arrays ({', '.join(names)}); say which holds the {what} with the key option", path=path
    )


def _load_array(path: Path, key: str | None, candidates: tuple[str, ...], what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError("file not found", path=path)
    if path.stat().st_size == 0:
        raise DataError("file is empty", path=path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return np.asarray(_pick_array(path, npz, key, candidates, what))
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(f"cannot read the array ({exc}); object arrays are refused", path=path) from None
    except (OSError, EOFError) as exc:
        raise DataError(f"not a readable .npy/.npz file ({exc})", path=path) from None
    raise DataError(f"expected a .npy or .npz file, got {suffix or 'no extension'}", path=path)


def load_fmri_file(path: Path, key: str | None = None) -> np.ndarray:
    """Voxels ``[N, V]`` float32 from a ``.npy`` or ``.npz`` (``[V]`` is one item).

    Raises:
        DataError: missing or empty file, unreadable array, non-float dtype, wrong rank, no rows, NaN/Inf.
    """
    arr = _load_array(path, key, _FMRI_KEYS, "fMRI")
    if arr.dtype.kind != "f":
        raise DataError(
            f"expected floating-point voxels, got dtype {arr.dtype}", path=path, field=key or "fmri"
        )
    if arr.ndim == 3 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise DataError(
            f"expected fMRI of shape [N, V], got {list(arr.shape)}", path=path, field=key or "fmri"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"no fMRI values (shape {list(arr.shape)})", path=path, field=key or "fmri")
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise DataError(
            f"{int(bad.sum())} NaN/Inf value(s) in {len(rows)} sample(s) (first: row {rows[0]})",
            path=path,
            field=key or "fmri",
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


def load_images_file(path: Path, key: str | None = None) -> np.ndarray:
    """Ground-truth images ``[N, H, W, 3]`` uint8 from a ``.npy`` / ``.npz`` (gray ``[N, H, W]`` is repeated)."""
    arr = _load_array(path, key, _IMAGE_KEYS, "images")
    if arr.ndim == 3:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise DataError(
            f"expected images [N, H, W, 3], got {list(arr.shape)}", path=path, field=key or "images"
        )
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype != np.uint8:
        if arr.dtype.kind == "f" and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1:
            arr = (arr * 255).astype(np.uint8)
        else:
            raise DataError(
                f"expected uint8 images (or floats in [0, 1]), got {arr.dtype}",
                path=path,
                field=key or "images",
            )
    return arr


def read_dataset_split(
    dataset: str, split: str, data_dir: Path | None, subject: str | None
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Hook for ``--dataset/--split``: voxels ``[N, V]``, ground-truth images ``[N, H, W, 3]`` (or ``None``) and a
    description, read through the dataset readers (:func:`mindvis.data.formats.registry.load_dataset`).

    The voxels are returned as stored; normalisation and padding are applied by the caller
    (``--preprocess`` / ``--pad-to-model``).
    """
    ds = load_dataset(dataset, data_dir=data_dir, subject=subject, split=split)
    voxels = np.asarray(ds.voxels, dtype=np.float32)
    gt = ds.images[ds.image_ids] if ds.paired else None
    return voxels, gt, f"{dataset}:{ds.subject}/{ds.split} ({ds.source or data_dir})"


def original_preprocessing(
    dataset: str,
    data_dir: Path | None,
    subject: str | None,
    num_voxels: int,
    patch_size: int,
) -> Any:
    """The preprocessing the original applies to a converted original model's data, fitted on the training split
    of ``dataset`` (``create_Kamitani_dataset``): the original padding rule (``p - V % p`` wrapped voxels, a
    whole extra patch when ``V % p == 0``), one global mean and std fitted on the padded training fMRI, wrap
    padding or cropping to the model's ``num_voxels``, and the original's test normalisation (the mean and std
    of the normalised training fMRI, about 0 and 1, so test fMRI reaches the model nearly as stored).

    Raises:
        DataError: the dataset has no training split to fit on.
    """
    from mindvis.data.preprocessor import FMRIPreprocessor

    train = load_dataset(dataset, data_dir=data_dir, subject=subject, split="train", include_images=False)
    pre = FMRIPreprocessor(
        normalize="global",
        patch_size=patch_size,
        pad_mode="original",
        length=num_voxels,
        test_normalize="original",
    )
    return pre.fit(train.voxels, source=train.source or f"{dataset}:{train.subject}/train")


def fit_to_model(
    voxels: np.ndarray, num_voxels: int, pad: bool, source: str, patch_size: int | None = None
) -> np.ndarray:
    """Check the voxel count against the model; with ``pad``, wrap-pad (or crop) to it.

    Raises:
        DataError: the counts differ and ``pad`` is off.
    """
    v = voxels.shape[1]
    if v == num_voxels:
        return voxels
    if not pad:
        from mindvis.data.padding import padded_length

        hint = ""
        if patch_size and v >= patch_size and padded_length(v, patch_size, "original") == num_voxels:
            hint = (
                f" (the original's padding rule, p - V mod p = {num_voxels - v} wrapped voxels, gives exactly "
                "the model's count)"
            )
        raise DataError(
            f"the fMRI has {v} voxels per sample but the model takes {num_voxels}; apply the "
            f"training preprocessing (--preprocess) or pass --pad-to-model to wrap-pad/crop{hint}",
            path=source,
            field="voxels",
        )
    from mindvis.data.padding import pad_columns

    if v > num_voxels:
        _logger.warning("cropping %d voxels to the model's %d", v, num_voxels)
    else:
        _logger.info("wrap-padding %d voxels to the model's %d", v, num_voxels)
    return np.ascontiguousarray(pad_columns(voxels, num_voxels, mode="wrap"), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def check_finite_voxels(voxels: np.ndarray, source: str) -> None:
    """Refuse voxels (after preprocessing) that hold NaN or infinity: the samples would be NaN."""
    bad = ~np.isfinite(voxels)
    if bad.any():
        items = np.flatnonzero(bad.any(axis=1))
        raise DataError(
            f"{int(bad.sum())} voxel values are NaN or infinite after preprocessing (items "
            f"{_list(items)}); expected finite fMRI values",
            path=source,
            field="--fmri",
        )


def finite_images_uint8(images: Any, source: str, voxels: np.ndarray) -> np.ndarray:
    """The pipeline's float images ``[N, S, 3, H, W]`` as uint8 ``[N, S, H, W, 3]``, refusing NaN or infinite
    samples, which would otherwise be written as black images that look like results."""
    import torch

    from mindvis.models.ldm import images_to_uint8

    x = torch.as_tensor(images)
    bad = ~torch.isfinite(x).flatten(2).all(dim=2)  # [N, S]
    if bad.any():
        items = np.flatnonzero(bad.any(dim=1).numpy())
        raise DataError(
            f"the samples of items {_list(items)} are NaN or infinite, so nothing was written: the fMRI values "
            f"(largest magnitude {float(np.abs(voxels).max()):.3g}) or the guidance scale are beyond what the "
            "model can take; check the preprocessing (z-scored voxels are of order 1)",
            path=source,
            field="--fmri",
        )
    n, s = x.shape[:2]
    return images_to_uint8(x.flatten(0, 1)).reshape(n, s, x.shape[3], x.shape[4], 3).numpy()


def _list(items: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(i)) for i in items[:limit])
    return shown + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def write_outputs(
    out: Path,
    images: np.ndarray,
    seeds: list[int],
    ground_truth: np.ndarray | None,
    run_info: dict[str, Any],
    overwrite: bool,
) -> Path:
    """Write the PNGs, the grid, the npz and run.json into ``out`` (the folder appears complete or not at all)."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "samples").mkdir()
        for i in range(images.shape[0]):
            for s in range(images.shape[1]):
                save_png(tmp / "samples" / f"item{i:04d}_s{s}.png", images[i, s])
        save_png(tmp / "grid.png", image_grid(images, ground_truth))
        arrays: dict[str, np.ndarray] = {"images": images, "seeds": np.asarray(seeds, dtype=np.int64)}
        if ground_truth is not None:
            arrays["ground_truth"] = ground_truth
        save_npz_atomic(tmp / "reconstructions.npz", compressed=True, **arrays)
        write_json(tmp / "run.json", run_info)
    return out


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> str:
    """The torch device of ``name``: ``auto`` is ``cuda`` when a GPU is present, else ``cpu``.

    Raises:
        ConfigError: ``name`` is not a device torch knows, or names CUDA on a machine without it.
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"{name!r} is not a device; expected auto, cpu, cuda, cuda:1, ...", field="device"
        ) from None
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine", field="device")
    return name


def reconstruct(
    config: ReconstructConfig,
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fmri: str | os.PathLike | None = None,
    fmri_key: str | None = None,
    images: str | os.PathLike | None = None,
    images_key: str | None = None,
    dataset: str | None = None,
    data_dir: str | os.PathLike | None = None,
    subject: str | None = None,
    split: str = "test",
    preprocess: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ReconstructResult:
    """Reconstruct the seen images of the fMRI items with the pipeline folder ``model``, into the folder ``out``.

    The fMRI comes from exactly one of ``fmri`` (voxels ``[N, V]`` in a ``.npy``/``.npz``; ``fmri_key`` names
    the array inside an ``.npz``) and ``dataset`` (its ``split`` of ``subject`` in ``data_dir``, read through
    :func:`~mindvis.data.formats.registry.load_dataset`, with the ground truth when the split is paired).
    ``images`` (with ``images_key``) gives or replaces the ground-truth images.

    The voxels get the fitted preprocessing ``preprocess`` (default: ``preprocess.json`` in the model folder
    when there is one); without one, a model converted from an original checkpoint gets, with ``dataset``, the
    original's preprocessing fitted on the dataset's training split (:func:`original_preprocessing`).
    ``dataset`` items belong to ``split``; ``fmri`` items count as test items. The voxel count must then be the
    model's, unless ``config.pad_to_model``.

    The inputs are checked before the model is loaded; ``out`` is written whole or not at all (the files in the
    module docstring), and an existing non-empty ``out`` is replaced only with ``overwrite``. ``progress``
    shows a progress bar while sampling.

    Raises:
        ConfigError: both or neither of ``fmri`` and ``dataset``; an unusable device; a model that takes no
            fMRI (a class-conditional prior).
        DataError: unreadable or inconsistent inputs (a voxel count other than the model's without
            ``pad_to_model``, NaN or infinite voxels, a ground truth of another length), or samples that came
            out NaN or infinite (nothing is written then).
        CheckpointError: the model folder is missing or corrupt.
        OutputOverlapError: ``out`` equals, contains or lies inside an input.
        OutputExistsError: ``out`` is not empty and ``overwrite`` is False.
    """
    import torch

    from mindvis.data.padding import is_original_checkpoint
    from mindvis.data.preprocessor import load_preprocessor
    from mindvis.pipeline import MindVisPipeline
    from mindvis.utils.steps import provenance

    model = Path(model)
    out = Path(out)
    fmri = None if fmri is None else Path(fmri)
    images = None if images is None else Path(images)
    data_dir = None if data_dir is None else Path(data_dir)
    preprocess = None if preprocess is None else Path(preprocess)
    if (fmri is None) == (dataset is None):
        raise ConfigError("give exactly one of --fmri FILE and --dataset NAME", field="--fmri")
    check_output_apart(
        out,
        {
            "--model": model,
            "--fmri": fmri,
            "--images": images,
            "--data-dir": data_dir,
            "--preprocess": preprocess,
        },
    )
    prepare_output_dir(out, overwrite=overwrite)
    dev = resolve_device(config.device)

    # inputs first (cheap checks before the model load)
    gt: np.ndarray | None = None
    if fmri is not None:
        voxels = load_fmri_file(fmri, fmri_key)
        source = str(fmri)
    else:
        voxels, gt, source = read_dataset_split(str(dataset), split, data_dir, subject)
    if images is not None:
        gt = load_images_file(images, images_key)
    if config.limit is not None:
        voxels = voxels[: config.limit]
        gt = None if gt is None else gt[: config.limit]
    if gt is not None and len(gt) != len(voxels):
        raise DataError(
            f"{len(gt)} ground-truth images for {len(voxels)} fMRI items",
            path=images or source,
            field="--images",
        )

    pipe = MindVisPipeline.from_pretrained(model)
    if pipe.num_voxels is None:
        raise ConfigError(
            "this model is a class-conditional prior, not an fMRI model", path=model, field="--model"
        )
    # Voxel preprocessing. Dataset items belong to the split; file items count as test items (new fMRI to
    # reconstruct), which matters only for a preprocessing whose test_normalize is "original".
    item_split = split if dataset is not None else "test"
    patch_size = int(pipe.model.fmri_encoder.config.patch_size)
    pre_path = preprocess if preprocess is not None else (model / "preprocess.json")
    pre_info: str | None = None
    if preprocess is not None or pre_path.is_file():
        pre = load_preprocessor(pre_path, subject=subject)
        voxels = np.asarray(pre.transform(voxels, source=source, split=item_split), dtype=np.float32)
        pre_info = str(pre_path)
        _logger.info("applied the preprocessing in %s", pre_path)
    elif dataset is not None and is_original_checkpoint(pipe.source):
        # a converted original model: what the original fed it (fitted on the dataset's training split)
        pre = original_preprocessing(str(dataset), data_dir, subject, pipe.num_voxels, patch_size)
        voxels = np.asarray(pre.transform(voxels, source=source, split=item_split), dtype=np.float32)
        pre_info = f"the original's, fitted on the {dataset} training split ({pre.n_voxels_in_} voxels)"
        _logger.info("converted original model: applied %s preprocessing", pre_info)
    voxels = fit_to_model(voxels, pipe.num_voxels, config.pad_to_model, source, patch_size)
    check_finite_voxels(voxels, source)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    pipe.to(dev, dtypes[config.dtype] if config.dtype != "float32" else None)
    guidance_scale = config.guidance_scale
    if guidance_scale is None:
        guidance_scale = pipe.default_guidance_scale
        if guidance_scale != 1.0:
            _logger.info("classifier-free guidance %g (the model's default)", guidance_scale)

    t0 = time.perf_counter()
    result = pipe(
        voxels,
        num_samples=config.num_samples,
        num_inference_steps=config.steps,
        sampler=config.sampler,  # type: ignore[arg-type]
        eta=config.eta,
        seed=config.seed,
        batch_size=config.batch_size,
        guidance_scale=guidance_scale,
        progress=progress,
        output_type="pt",
    )
    elapsed = time.perf_counter() - t0
    imgs = finite_images_uint8(result.images, source, voxels)
    run_info = {
        "model": str(model),
        "fmri": source,
        "items": int(imgs.shape[0]),
        "num_samples": config.num_samples,
        "sampler": result.sampler,
        "num_inference_steps": result.num_inference_steps,
        "eta": config.eta,
        "guidance_scale": guidance_scale,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "device": dev,
        "dtype": config.dtype,
        "pad_to_model": config.pad_to_model,
        "preprocess": pre_info,
        "seconds": round(elapsed, 3),
        "ground_truth": gt is not None,
        **provenance(),
    }
    write_outputs(out, imgs, result.seeds, gt, run_info, overwrite=overwrite)
    return ReconstructResult(
        out=out,
        items=int(imgs.shape[0]),
        num_samples=int(imgs.shape[1]),
        sampler=result.sampler,
        num_inference_steps=int(result.num_inference_steps),
        guidance_scale=float(guidance_scale),
        seconds=elapsed,
        run=run_info,
    )
