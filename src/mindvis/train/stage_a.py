"""Stage A (masked brain modeling, Chen et al., CVPR 2023) from the settings the commands take.

:func:`pretrain` (stage A1, ``mindvis pretrain``) and :func:`finetune` (stage A2, ``mindvis finetune``) find the
data, resolve the run configuration and train (:func:`mindvis.train.mbm.run_mbm_stage`), and return the run's
:class:`~mindvis.train.mbm.MBMRunResult`, from which the commands print their report. Their settings are :class:`PretrainConfig` and
:class:`FinetuneConfig`, whose fields declared with :func:`~mindvis.config.setting` are the commands' options
(the recipe, preprocessing and hardware ones shared, in :class:`StageAConfig`).

Every setting defaults to ``None``, "not given": the stage's recipe (:data:`mindvis.train.mbm.STAGE_DEFAULTS`)
then supplies the value, and when a run is resumed the run folder's saved configuration does (a given setting
must equal the saved one unless it is in :data:`RESUME_MUTABLE`). :meth:`StageAConfig.given` lists the given
settings by the run-configuration key each one sets (:data:`CONFIG_KEYS`).

This module loads no torch: the commands build their options from it for ``mindvis --help``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mindvis.config import check_bool, setting, settings_of
from mindvis.data.formats.common import default_data_root
from mindvis.data.formats.registry import GOD_ROI_HELP, resolve_data_dir
from mindvis.errors import ConfigError, DataError
from mindvis.utils.io import check_output_apart

if TYPE_CHECKING:
    from mindvis.train.mbm import MBMRunResult
    from mindvis.train.mbm_config import MBMTrainConfig

#: Model sizes of stage A1 (:data:`mindvis.models.mbm.MBM_VARIANTS`; ``large_patch16`` is ``large``), in the
#: order the errors list them.
VARIANTS: tuple[str, ...] = ("large", "large_patch16", "small", "tiny")
#: The largest seed (numpy's and Lightning's range; Lightning would silently replace a larger one by 0).
MAX_SEED = 2**32 - 1

#: ``a2_data`` (``--a2-data``) choices: the data settings each one sets
#: (:class:`~mindvis.data.pretrain_config.MBMDataConfig`).
A2_DATA: dict[str, dict[str, Any]] = {
    # the original: the test fMRI (averaged + single-trial rows), normalised with the statistics of the
    # normalised training fMRI (about 0 and 1), validated on rows it also tunes on
    "original": {"data.god_fmri": "test", "data.test_normalize": "original", "data.val_holdout": False},
    # ours: the training fMRI, 5 % held out, the test fMRI unseen until evaluation
    "train": {"data.god_fmri": "train", "data.test_normalize": "train", "data.val_holdout": True},
    # ours plus the single-trial test fMRI (what --include-test-fmri used to give)
    "train+test": {"data.god_fmri": "train+test", "data.test_normalize": "train", "data.val_holdout": True},
}

#: The run-configuration key each setting sets: a :class:`~mindvis.train.mbm.MBMTrainConfig` field, or
#: ``data.``/``trainer.`` and a field of its :class:`~mindvis.data.pretrain_config.MBMDataConfig` /
#: :class:`~mindvis.train.common.TrainerConfig`. ``None``: not run configuration (``use_hcp`` and
#: ``use_god`` choose the data folders; ``a2_data`` sets the keys of :data:`A2_DATA`).
CONFIG_KEYS: dict[str, str | None] = {
    # StageAConfig
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "min_lr": "min_lr",
    "weight_decay": "weight_decay",
    "warmup_epochs": "warmup_epochs",
    "clip_grad": "clip_grad",
    "mask_ratio": "mask_ratio",
    "accumulate": "accumulate",
    "include_test_fmri": "data.include_test_fmri",
    "nan_policy": "data.nan_policy",
    "normalize": "data.normalize",
    "pad_mode": "data.pad_mode",
    "val_fraction": "data.val_fraction",
    "val_every": "trainer.val_every_n_epochs",
    "accelerator": "trainer.accelerator",
    "devices": "trainer.devices",
    "num_nodes": "trainer.num_nodes",
    "strategy": "trainer.strategy",
    "precision": "trainer.precision",
    "compile": "trainer.compile",
    "num_workers": "num_workers",
    "seed": "seed",
    "logger": "trainer.logger",
    # PretrainConfig
    "use_hcp": None,
    "use_god": None,
    "god_subjects": "data.god_subjects",
    "hcp_limit": "data.hcp_limit",
    "window_trs": "data.window_trs",
    "aug_times": "data.aug_times",
    "length": "data.length",
    "patch_size": "data.patch_size",
    "variant": "variant",
    # PretrainConfig and FinetuneConfig
    "roi": "data.god_roi",
    # FinetuneConfig
    "a2_data": None,
}

#: Run-configuration keys whose value may differ from the saved configuration when a run is resumed.
RESUME_MUTABLE = frozenset(
    {
        "epochs",
        "num_workers",
        "trainer.devices",
        "trainer.num_nodes",
        "trainer.strategy",
        "trainer.precision",
        "trainer.compile",
        "trainer.accelerator",
        "trainer.logger",
        "trainer.progress_bar",
    }
)

_COMPILE_HELP = (
    "torch.compile the model's heavy parts before training (on a CPU it needs a C++ compiler, else it is "
    "skipped with a warning); the first steps are slow while graphs compile. Default: off."
)
_PAD_MODE_HELP = (
    "Padding to whole patches: auto (default: original when finetuning an original checkpoint, or a model "
    "whose voxel count is the original rule's; else wrap), wrap (ours: up to the next multiple of the patch "
    "size), original (the original code's: always p - V mod p more voxels, a whole extra patch when V is a "
    "multiple of p, statistics fitted after padding), constant or cut."
)


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class StageAConfig:
    """The recipe, preprocessing and hardware settings that stages A1 and A2 share; ``None``: not given.

    The stages' configs (:class:`PretrainConfig`, :class:`FinetuneConfig`) add their own settings and give the
    settings whose default is the stage's their help texts. ``__post_init__`` checks what does not depend on
    the stage; the rest (``warmup_epochs`` against ``epochs``, ``length`` against the patch size, the trainer's
    choices) is checked when the run configuration is resolved, before anything is written.
    """

    epochs: int | None = setting(None, "Epochs (default: the stage's).")
    batch_size: int | None = setting(None, "Samples per device per step (default: the stage's).")
    lr: float | None = setting(None, "Peak learning rate (default: the stage's).")
    min_lr: float | None = setting(None, "Final learning rate (default: 0).")
    weight_decay: float | None = setting(None, "AdamW weight decay (default: 0.05).")
    warmup_epochs: float | None = setting(
        None, "Linear warmup epochs (default: the stage's share of --epochs)."
    )
    clip_grad: float | None = setting(None, "Gradient-norm clip, 0 = off (default: 0.8).")
    mask_ratio: float | None = setting(None, "Fraction of patches masked (default: 0.75).")
    accumulate: int | None = setting(None, "Batches per optimizer step (default: 1).")
    include_test_fmri: bool | None = setting(
        None, "Also train on the GOD test-set fMRI (default: the stage's)."
    )
    nan_policy: Literal["error", "zero", "drop"] | None = setting(
        None, "NaN/Inf voxels: error (default), zero (set to the mean) or drop (remove voxel)."
    )
    normalize: Literal["global", "voxel", "none"] | None = setting(
        None, "global (one mean/std per subject, default), voxel (z-score) or none."
    )
    pad_mode: Literal["auto", "wrap", "constant", "cut", "original"] | None = setting(None, _PAD_MODE_HELP)
    val_fraction: float | None = setting(None, "Held-out validation fraction (default: the stage's).")
    val_every: int | None = setting(None, "Validate every N epochs (default: 1).")
    accelerator: str | None = setting(None, "auto (default), cpu, gpu...")
    devices: str | None = setting(None, "auto (default), a count, or indices like 0,1.")
    num_nodes: int | None = setting(None, "Machines (default: 1).")
    strategy: str | None = setting(None, "auto (DDP with several devices), ddp, fsdp...")
    precision: str | None = setting(
        None, "auto (bf16-mixed on GPUs, 32 on CPUs), 32-true, bf16-mixed, 16-mixed."
    )
    compile: bool | None = setting(None, _COMPILE_HELP)
    num_workers: int | None = setting(None, "Data-loader workers (default: 0).")
    seed: int | None = setting(None, "Random seed (default: 2022).")
    logger: str | None = setting(None, "csv (default), tensorboard or wandb (both add the CSV).")

    def __post_init__(self) -> None:
        from mindvis.data.padding import PAD_MODES  # not for --help
        from mindvis.data.preprocessor import NAN_POLICIES, NORMALIZE_MODES

        # the messages are those of the run configuration's checks, which the command line showed before
        for name, minimum in (("epochs", 1), ("batch_size", 1), ("accumulate", 1), ("num_nodes", 1)):
            _check_int(name, getattr(self, name), minimum)
        _check_int("num_workers", self.num_workers, 0)
        _check_int("seed", self.seed, 0)
        if self.seed is not None and self.seed > MAX_SEED:
            raise ConfigError(f"expected an integer <= {MAX_SEED}, got {self.seed!r}", field="seed")
        _check_int("val_every", self.val_every, -math.inf)  # its range is checked with the run configuration
        for name in ("lr", "min_lr", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"expected a finite number >= 0, got {value!r}", field=name)
        if self.warmup_epochs is not None and not _is_number(self.warmup_epochs):
            raise ConfigError(f"expected a number, got {self.warmup_epochs!r}", field="warmup_epochs")
        if self.clip_grad is not None and not (
            _is_number(self.clip_grad) and math.isfinite(self.clip_grad) and self.clip_grad >= 0
        ):
            raise ConfigError(f"expected a number >= 0, got {self.clip_grad!r}", field="clip_grad")
        if self.mask_ratio is not None and not (_is_number(self.mask_ratio) and 0.0 < self.mask_ratio < 1.0):
            raise ConfigError(f"expected 0 < mask_ratio < 1, got {self.mask_ratio!r}", field="mask_ratio")
        if self.val_fraction is not None and not (
            _is_number(self.val_fraction) and 0.0 <= self.val_fraction < 1.0
        ):
            raise ConfigError(
                f"expected 0 <= val_fraction < 1, got {self.val_fraction!r}", field="val_fraction"
            )
        for name, choices in (
            ("normalize", NORMALIZE_MODES),
            ("pad_mode", ("auto", *PAD_MODES)),
            ("nan_policy", NAN_POLICIES),
        ):
            _check_choice(name, getattr(self, name), choices)
        for name in ("accelerator", "devices", "strategy", "precision", "logger"):
            _check_str(name, getattr(self, name))
        for name in ("include_test_fmri", "compile"):
            if getattr(self, name) is not None:
                check_bool(name, getattr(self, name))

    def given(self) -> dict[str, Any]:
        """The settings given (not ``None``) by the run-configuration key each sets (:data:`CONFIG_KEYS`), in
        field order."""
        out: dict[str, Any] = {}
        for f in settings_of(type(self)):
            key, value = CONFIG_KEYS[f.name], getattr(self, f.name)
            if key is not None and value is not None:
                out[key] = value
        return out


@dataclass
class PretrainConfig(StageAConfig):
    """The settings of stage A1 (``mindvis pretrain``): which data, the model size, and the shared recipe.

    Every field is an option of ``mindvis pretrain``; ``None`` is the stage's default (its help text says which).
    ``use_hcp`` / ``use_god``: ``None`` uses each kind of data when it is found, ``False`` leaves it out, ``True``
    requires it. ``god_subjects`` is a comma-separated list of GOD subject names.
    """

    epochs: int | None = setting(None, "Epochs (default: 500).")
    batch_size: int | None = setting(None, "Samples per device per step (default: 100).")
    lr: float | None = setting(None, "Peak learning rate, not scaled by batch (default: 2.5e-4).")
    warmup_epochs: float | None = setting(None, "Linear warmup epochs (default: 8% of --epochs, 40 of 500).")
    include_test_fmri: bool | None = setting(
        None,
        "Also train on the GOD test-set fMRI (non-averaged presentations, no images). Off by default: the test "
        "fMRI then stays unseen until evaluation.",
    )
    normalize: Literal["global", "voxel", "none"] | None = setting(
        None, "global (one mean/std per subject, default), voxel (z-score) or none."
    )
    val_fraction: float | None = setting(
        None, "Held-out validation fraction (default: 0.01, at most 2000 samples)."
    )
    use_hcp: bool | None = setting(None, "Use the HCP data (default: when found).", flag="--hcp")
    use_god: bool | None = setting(None, "Use the GOD data (default: when found).", flag="--god")
    god_subjects: str | None = setting(None, "Comma-separated GOD subjects (default all).")
    hcp_limit: int | None = setting(None, "Use only the first N HCP subjects.")
    roi: str | None = setting(None, GOD_ROI_HELP)
    window_trs: int | None = setting(None, "HCP TRs averaged per sample (default: 10).")
    aug_times: float | None = setting(
        None, "Interpolation augmentation: total size multiplier (default: 1 = none)."
    )
    length: int | None = setting(
        None, "Common voxel length (multiple of the patch size) (default: longest subject)."
    )
    patch_size: int | None = setting(None, "Voxels per patch (default: 16).")
    variant: Literal["tiny", "small", "large", "large_patch16"] | None = setting(
        None, "Model size: tiny, small or large (default: large)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("use_hcp", "use_god"):
            if getattr(self, name) is not None:
                check_bool(name, getattr(self, name))
        for name in ("god_subjects", "roi"):
            _check_str(name, getattr(self, name))
        for name in ("hcp_limit", "window_trs", "patch_size"):
            _check_int(name, getattr(self, name), 1)
        _check_int("length", self.length, -math.inf)  # its range is checked with the run configuration
        if self.aug_times is not None and not (_is_number(self.aug_times) and self.aug_times >= 1):
            raise ConfigError(f"expected aug_times >= 1, got {self.aug_times!r}", field="aug_times")
        _check_choice("variant", self.variant, VARIANTS)

    def given(self) -> dict[str, Any]:
        out = super().given()
        if "data.god_subjects" in out:
            names = [v.strip() for v in out.pop("data.god_subjects").split(",") if v.strip()]
            if names:
                out["data.god_subjects"] = names
        return out


@dataclass
class FinetuneConfig(StageAConfig):
    """The settings of stage A2 (``mindvis finetune``): which fMRI of the target subject, and the shared recipe.

    Every field is an option of ``mindvis finetune``; ``None`` is the stage's default (its help text says which).
    ``include_test_fmri`` is the older spelling of ``a2_data`` (``True``: ``"train+test"``, ``False``:
    ``"train"``); the command hides it.
    """

    epochs: int | None = setting(
        None,
        "Epochs (default: 15, the original's; tuning on the training fMRI (--a2-data train) keeps improving to "
        "about 80-100 epochs on SynthCortex).",
    )
    batch_size: int | None = setting(None, "Samples per device per step (default: 16).")
    lr: float | None = setting(None, "Peak learning rate (default: 5.3e-5).")
    warmup_epochs: float | None = setting(
        None, "Linear warmup epochs (default: 2/15 of --epochs, the original's 2 of 15)."
    )
    include_test_fmri: bool | None = setting(
        None,
        "Older spelling: --include-test-fmri is --a2-data train+test, --no-include-test-fmri is --a2-data train.",
    )
    normalize: Literal["global", "voxel", "none"] | None = setting(
        None,
        "global (one mean/std fitted on the training fMRI, default), voxel (z-score) or none. Test-set rows are "
        "normalised as --a2-data says.",
    )
    val_fraction: float | None = setting(
        None,
        "Fraction of the tuning rows used for validation (default: 0.05): held out with --a2-data train / "
        "train+test; with original drawn from the rows it also tunes on, as the original reports the "
        "correlation on the data it tunes on.",
    )
    roi: str | None = setting(None, GOD_ROI_HELP)
    a2_data: Literal["original", "train", "train+test"] | None = setting(
        None,
        "Which fMRI of the subject A2 tunes on. original (default, the original's): its test-set fMRI only, the "
        "averaged and the single-trial rows, never the training fMRI; the test rows normalised as the original "
        "does (with the mean/std of the normalised training fMRI, about 0 and 1, so nearly as stored) and "
        "validated on rows it also tunes on. The test fMRI is then not unseen when stage B is evaluated. train "
        "(ours): the training fMRI, 5% held out for validation, the test fMRI unseen. train+test: the training "
        "fMRI plus the single-trial test rows (normalised with the training statistics).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_str("roi", self.roi)
        if self.a2_data is not None and self.a2_data not in A2_DATA:
            # named by its flag, as the command line has always named it
            raise ConfigError(
                f"expected one of {', '.join(A2_DATA)}, got {self.a2_data!r}", field="--a2-data"
            )

    def given(self) -> dict[str, Any]:
        out = super().given()
        if self.a2_data is not None:
            out.update(A2_DATA[self.a2_data])
        return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: float) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        what = "an integer" if minimum == -math.inf else f"an integer >= {minimum}"
        raise ConfigError(f"expected {what}, got {value!r}", field=name)


def _check_str(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"expected a string, got {value!r}", field=name)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise ConfigError(f"expected one of {', '.join(choices)}, got {value!r}", field=name)


# ---------------------------------------------------------------------------------------------------------------
# The run configuration
# ---------------------------------------------------------------------------------------------------------------


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"data.x": 1, "lr": 2}`` -> ``{"data": {"x": 1}, "lr": 2}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        head, _, tail = key.partition(".")
        if tail:
            out.setdefault(head, {})[tail] = value
        else:
            out[key] = value
    return out


def resolve_config(stage: str, out: str | os.PathLike, resume: bool, given: dict[str, Any]) -> MBMTrainConfig:
    """The run configuration of stage ``stage`` (``"pretrain"`` or ``"finetune"``): the stage's defaults with
    the ``given`` settings (by run-configuration key), or, with ``resume``, the configuration saved in the run
    folder ``out`` with the given settings that may change on resume (:data:`RESUME_MUTABLE`; the others must
    equal the saved values).

    Raises:
        ConfigError: ``resume`` and a given setting differs from the saved one and may not change; a setting
            the run configuration refuses.
    """
    from mindvis.train.mbm_config import MBMTrainConfig
    from mindvis.train.run_folder import read_run_config

    if not resume:
        return MBMTrainConfig.for_stage(stage, **nest(given))  # type: ignore[arg-type]
    saved = read_run_config(Path(out), stage)["config"]
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in saved.items()}
    for key, value in given.items():
        head, _, tail = key.partition(".")
        current = merged.get(head, {}).get(tail) if tail else merged.get(head)
        if key not in RESUME_MUTABLE and _normalise(current) != _normalise(value):
            raise ConfigError(
                f"cannot change {key} when resuming (the run was started with {current!r}); start a new run instead",
                field=key,
            )
        if tail:
            merged.setdefault(head, {})[tail] = value
        else:
            merged[key] = value
    return MBMTrainConfig.from_dict(merged)


def _normalise(value: Any) -> Any:
    """``value`` as compared on resume: lists for tuples, resolved paths for paths and for strings naming an
    existing file or folder."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, str) and os.path.exists(value):
        return str(Path(value).resolve())
    return value


def _run(stage: str, out: Path, given: dict[str, Any], resume: bool, overwrite: bool) -> MBMRunResult:
    from mindvis.train.mbm import run_mbm_stage

    config = resolve_config(stage, out, resume, given)
    return run_mbm_stage(config, out, resume=resume, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------------------------
# Stage A1
# ---------------------------------------------------------------------------------------------------------------


def pretrain(
    config: PretrainConfig,
    out: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    hcp_dir: str | os.PathLike | None = None,
    god_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> MBMRunResult:
    """Stage A1: pretrain the masked brain model on unlabeled fMRI (HCP resting state + GOD) into run folder
    ``out`` (see :func:`~mindvis.train.mbm.run_mbm_stage` for what it holds).

    Args:
        config: the settings.
        out: the run folder to create, or with ``resume`` to continue.
        data_dir: a folder holding ``HCP/`` and/or ``GOD/`` (e.g. the simulator output); ``None``: the data root
            (``$MINDVIS_DATA``, else ``~/mindvis_data``) unless ``hcp_dir`` or ``god_dir`` is given.
        hcp_dir: the HCP folder (``HCP/npz/<subject>/HCP_visual_voxel.npz``), found under ``data_dir`` if not
            given.
        god_dir: the GOD folder (``sbj_N.npz``), found under ``data_dir`` if not given.
        resume: continue the run in ``out`` from ``checkpoints/last.ckpt``; without a folder or
            ``config.use_hcp``/``use_god`` given, the run's own data folders are used.
        overwrite: replace a non-empty ``out``.
        progress: show Lightning's progress bar (``None``: the run's setting, on for a new run).

    Raises:
        MindVisError subclasses: no data found, ``out`` overlapping an input, bad settings or data, a setting
            changed on resume (see :func:`resolve_config`), unreadable checkpoints.
    """
    out = Path(out)
    paths = {"--data-dir": data_dir, "--hcp-dir": hcp_dir, "--god-dir": god_dir}
    check_output_apart(out, paths)
    given = config.given()
    if progress is not None:
        given["trainer.progress_bar"] = progress
    if not resume or any(x is not None for x in (*paths.values(), config.use_hcp, config.use_god)):
        hcp, god = find_sources(
            None if data_dir is None else Path(data_dir),
            None if hcp_dir is None else Path(hcp_dir),
            None if god_dir is None else Path(god_dir),
            config.use_hcp,
            config.use_god,
        )
        given["data.hcp_dir"], given["data.god_dir"] = hcp, god
        check_output_apart(out, {"--hcp-dir": hcp, "--god-dir": god})  # the folders found
    return _run("pretrain", out, given, resume, overwrite)


def find_sources(
    data_dir: Path | None,
    hcp_dir: Path | None,
    god_dir: Path | None,
    use_hcp: bool | None,
    use_god: bool | None,
) -> tuple[str | None, str | None]:
    """The HCP and GOD folders of stage A1: those given, else those found under ``data_dir`` (``None``: the
    data root, unless a folder is given), each left out when its ``use_*`` is False.

    Raises:
        ConfigError: a ``use_*`` is True and its folder is not found, or no data is found at all.
    """
    root = data_dir if data_dir is not None else (None if (hcp_dir or god_dir) else default_data_root())
    if hcp_dir is None and root is not None and use_hcp is not False:
        if (root / "HCP").is_dir():
            hcp_dir = root / "HCP"
        elif (root / "npz").is_dir() or any(root.glob("*/HCP_visual_voxel.npz")):
            hcp_dir = root
    if god_dir is None and root is not None and use_god is not False:
        for name in ("GOD", "god", "Kamitani/npz"):
            if (root / name).is_dir():
                god_dir = root / name
                break
        else:
            if any(root.glob("sbj_*.npz")):
                god_dir = root
    if use_hcp is False:
        hcp_dir = None
    if use_god is False:
        god_dir = None
    if use_hcp and hcp_dir is None:
        raise ConfigError("--hcp was given but no HCP folder was found (pass --hcp-dir)", field="hcp_dir")
    if use_god and god_dir is None:
        raise ConfigError("--god was given but no GOD folder was found (pass --god-dir)", field="god_dir")
    if hcp_dir is None and god_dir is None:
        where = root if root is not None else "the given folders"
        raise ConfigError(
            f"no HCP or GOD data found under {where} (expected HCP/npz/<subject>/HCP_visual_voxel.npz or "
            "GOD/sbj_N.npz); pass --data-dir, --hcp-dir or --god-dir",
            field="data_dir",
        )
    return (None if hcp_dir is None else str(hcp_dir)), (None if god_dir is None else str(god_dir))


# ---------------------------------------------------------------------------------------------------------------
# Stage A2
# ---------------------------------------------------------------------------------------------------------------


def finetune(
    config: FinetuneConfig,
    out: str | os.PathLike,
    *,
    init: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    subject: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> MBMRunResult:
    """Stage A2: tune the pretrained masked brain model on the target subject's fMRI into run folder ``out``
    (see :func:`~mindvis.train.mbm.run_mbm_stage` for what it holds; ``preprocessing.json`` is the subject's,
    for stage B).

    Args:
        config: the settings.
        out: the run folder to create, or with ``resume`` to continue.
        init: the pretrained model: a :func:`pretrain` run folder, a model folder, or an original ``.pth``
            (required, except with ``resume``: the architecture is then the run's).
        data_dir: the GOD folder (``sbj_N.npz``), or a folder holding ``GOD/``; ``None``: found under the data
            root.
        subject: the target subject (``"sbj_1"``, ``"1"``...); ``None``: the folder's only one.
        resume: continue the run in ``out``; without ``data_dir`` or ``subject``, on the run's own data.
        overwrite: replace a non-empty ``out``.
        progress: show Lightning's progress bar (``None``: the run's setting, on for a new run).

    Raises:
        MindVisError subclasses: no ``init`` for a new run, no or several subjects, ``out`` overlapping an
            input, bad settings, data or ``init`` model, a setting changed on resume, unreadable checkpoints.
    """
    out = Path(out)
    check_output_apart(out, {"--init": init, "--data-dir": data_dir})
    given = config.given()
    if progress is not None:
        given["trainer.progress_bar"] = progress
    if init is not None:
        given["init"] = str(init)
    elif not resume:
        raise ConfigError("give the pretrained model with --init", field="init")
    if not resume or data_dir is not None or subject is not None:
        folder = god_folder(None if data_dir is None else Path(data_dir))
        given["data.god_dir"] = str(folder)
        given["data.god_subjects"] = [pick_subject(folder, subject)]
        check_output_apart(out, {"--data-dir": folder})  # the folder found
    return _run("finetune", out, given, resume, overwrite)


def god_folder(data_dir: Path | None) -> Path:
    """The GOD folder of stage A2: ``data_dir`` (``None``: found under the data root), or the ``GOD/`` (``god/``,
    ``Kamitani/npz/``) inside it when it holds no ``sbj_N.npz``.

    Raises:
        DataError: the folder does not exist.
    """
    folder = resolve_data_dir("god", data_dir)
    if not any(folder.glob("sbj_*.npz")):
        for name in ("GOD", "god", "Kamitani/npz"):
            if (folder / name).is_dir():
                return folder / name
    return folder


def pick_subject(folder: Path, subject: str | None) -> str:
    """The target subject's name (``"sbj_1"``) in GOD folder ``folder``: ``subject``, or the only one there.

    Raises:
        ConfigError: no ``subject`` and the folder holds none or several.
        DataError: ``subject`` is not in the folder.
    """
    from mindvis.data.formats.god import god_subject_name, list_god_subjects  # not for --help

    available = list_god_subjects(folder)
    if subject is None:
        if len(available) == 1:
            return available[0]
        raise ConfigError(
            f"choose the target subject with --subject ({', '.join(available) or 'none found'})",
            path=folder,
            field="subject",
        )
    name = god_subject_name(subject)
    if name not in available:
        raise DataError(
            f"subject {name} not found (subjects here: {', '.join(available) or 'none'})",
            path=folder,
            field="subject",
        )
    return name


__all__ = [
    "A2_DATA",
    "CONFIG_KEYS",
    "RESUME_MUTABLE",
    "VARIANTS",
    "FinetuneConfig",
    "PretrainConfig",
    "StageAConfig",
    "find_sources",
    "finetune",
    "god_folder",
    "nest",
    "pick_subject",
    "pretrain",
    "resolve_config",
]
