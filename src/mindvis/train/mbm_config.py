"""The settings of one masked-brain-modeling run (MinD-Vis stage A, Chen et al., CVPR 2023).

:class:`MBMTrainConfig` holds everything a stage A1 (``mindvis pretrain``) or A2 (``mindvis finetune``) run needs;
:meth:`MBMTrainConfig.for_stage` starts from the stage's recipe (:data:`STAGE_DEFAULTS`) and data defaults
(:func:`stage_data_settings`). The training that reads it is :mod:`mindvis.train.mbm`; the recipe is described
there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mindvis.data.pretrain_config import MBMDataConfig
from mindvis.errors import ConfigError
from mindvis.models.mbm import MBM_VARIANTS, MBMConfig
from mindvis.train.common import TrainerConfig

Stage = Literal["pretrain", "finetune"]

#: The original recipes. ``warmup_fraction`` gives the warmup when ``warmup_epochs`` is not set (A1: 40 of 500
#: epochs; A2: 2 of 15). The original tunes A2 for 15 epochs. Tuning on the *training* fMRI instead
#: (``--a2-data train``), 15 epochs stop while the correlation still rises: on SynthCortex (small variant
#: pretrained 20 epochs; target subject 1140 training samples, 60 held out) 15 epochs take the validation
#: masked-patch correlation from 0.19 to 0.31, 100 epochs to 0.435 (0.42 at epoch 60 of that run, flat after
#: epoch 80).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": dict(
        variant="large",
        epochs=500,
        batch_size=100,
        lr=2.5e-4,
        warmup_fraction=40 / 500,
    ),
    "finetune": dict(
        variant=None,
        epochs=15,
        batch_size=16,
        lr=5.3e-5,
        warmup_fraction=2 / 15,
    ),
}

#: The stages' data defaults (:class:`~mindvis.data.pretrain_config.MBMDataConfig` fields). A2's are the
#: original's: the target subject's test fMRI (see :mod:`mindvis.train.mbm`).
STAGE_DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": dict(val_fraction=0.01),
    "finetune": dict(val_fraction=0.05, god_fmri="test"),
}

#: Data settings that follow ``god_fmri`` unless given: tuning on the test fMRI (the original's A2) comes with
#: the original's test normalisation and validation on the tuning rows; the other choices with ours.
GOD_FMRI_LINKED: dict[str, dict[str, Any]] = {
    "test": dict(test_normalize="original", val_holdout=False),
    "train": dict(test_normalize="train", val_holdout=True),
    "train+test": dict(test_normalize="train", val_holdout=True),
}


def stage_data_settings(stage: str, data: Mapping[str, Any] | None) -> dict[str, Any]:
    """The data settings of ``stage``: its defaults, those that follow ``god_fmri``, then ``data`` (given).

    ``include_test_fmri`` given without ``god_fmri`` keeps its old meaning: True is ``"train+test"``, False
    ``"train"``.

    Raises:
        ConfigError: ``include_test_fmri`` and ``god_fmri`` disagree.
    """
    data = dict(data or {})
    if "include_test_fmri" in data and data["include_test_fmri"] is not None:
        include = bool(data["include_test_fmri"])
        if "god_fmri" not in data:
            data["god_fmri"] = "train+test" if include else "train"
        elif include != (data["god_fmri"] != "train"):
            raise ConfigError(
                f"include_test_fmri={include} contradicts god_fmri={data['god_fmri']!r}; give only one",
                field="include_test_fmri",
            )
    defaults = dict(STAGE_DATA_DEFAULTS[stage])
    god = data.get("god_fmri", defaults.get("god_fmri", "train"))
    return {**defaults, **GOD_FMRI_LINKED.get(god, {}), **data}


@dataclass
class MBMTrainConfig:
    """Everything one stage-A run needs: model choice, optimisation, data and trainer settings.

    Create it with :meth:`for_stage` (the stage's defaults plus overrides); derived values (warmup, the
    trainer's epochs, clipping and accumulation) are computed after the overrides, in ``__post_init__``.

    Args:
        stage: ``"pretrain"`` (A1) or ``"finetune"`` (A2).
        variant: model size for pretraining: ``"tiny"``, ``"small"`` or ``"large"`` (the paper's). Finetuning
            takes the architecture from the initial weights and ignores it.
        model_overrides: :class:`~mindvis.models.mbm.MBMConfig` fields that replace the variant's.
        epochs: training epochs.
        batch_size: samples per device per step.
        lr: peak learning rate (not scaled by the batch size).
        min_lr: final learning rate of the cosine decay.
        weight_decay: AdamW weight decay (not applied to biases, norms and 1-D tensors).
        betas: AdamW betas.
        warmup_epochs: linear warmup length in epochs (fractions allowed); ``None``:
            ``round(warmup_fraction * epochs)``.
        warmup_fraction: see ``warmup_epochs``.
        clip_grad: gradient-norm clipping; ``None`` or 0 disables it.
        mask_ratio: fraction of patches removed.
        accumulate: batches per optimizer step.
        seed: seed of initialisation, masking, order, split and augmentation.
        num_workers: data-loader worker processes.
        init: finetuning only: the pretrained model folder.
        data: data settings.
        trainer: hardware, precision, logging (its ``max_epochs``, ``clip_grad`` and ``accumulate`` are set
            from the fields above).
    """

    stage: Stage = "pretrain"
    variant: str | None = "large"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    epochs: int = 500
    batch_size: int = 100
    lr: float = 2.5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float | None = None
    warmup_fraction: float = 40 / 500
    clip_grad: float | None = 0.8
    mask_ratio: float = 0.75
    accumulate: int = 1
    seed: int = 2022
    num_workers: int = 0
    init: str | None = None
    data: MBMDataConfig | None = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        if self.stage not in STAGE_DEFAULTS:
            raise ConfigError(f"expected 'pretrain' or 'finetune', got {self.stage!r}", field="stage")
        if isinstance(self.data, Mapping):
            self.data = MBMDataConfig.from_dict(self.data)
        if self.data is None:
            raise ConfigError("no data settings", field="data")
        if isinstance(self.trainer, Mapping):
            self.trainer = TrainerConfig.from_dict(self.trainer)
        if self.stage == "pretrain":
            if self.variant not in MBM_VARIANTS:
                raise ConfigError(
                    f"expected one of {', '.join(sorted(MBM_VARIANTS))}, got {self.variant!r}",
                    field="variant",
                )
        elif self.init is None:
            raise ConfigError("finetuning needs the pretrained model (--init)", field="init")
        if self.init is not None:
            self.init = str(Path(self.init).expanduser().absolute())
        for name, minimum in (
            ("epochs", 1),
            ("batch_size", 1),
            ("accumulate", 1),
            ("num_workers", 0),
            ("seed", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"expected an integer >= {minimum}, got {value!r}", field=name)
        for name in ("lr", "min_lr", "weight_decay", "warmup_fraction"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ConfigError(f"expected a finite number >= 0, got {value!r}", field=name)
            setattr(self, name, float(value))
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr ({self.min_lr}) is larger than lr ({self.lr})", field="min_lr")
        betas = tuple(float(b) for b in self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"expected two betas in [0, 1), got {self.betas!r}", field="betas")
        self.betas = betas  # type: ignore[assignment]
        if not (isinstance(self.mask_ratio, (int, float)) and 0.0 < float(self.mask_ratio) < 1.0):
            raise ConfigError(f"expected 0 < mask_ratio < 1, got {self.mask_ratio!r}", field="mask_ratio")
        self.mask_ratio = float(self.mask_ratio)
        if self.clip_grad is not None and (not math.isfinite(float(self.clip_grad)) or self.clip_grad < 0):
            raise ConfigError(f"expected a number >= 0, got {self.clip_grad!r}", field="clip_grad")
        self.clip_grad = float(self.clip_grad) if self.clip_grad else None
        if not isinstance(self.model_overrides, Mapping):
            raise ConfigError("expected an object of MBMConfig fields", field="model_overrides")
        self.model_overrides = dict(self.model_overrides)
        fields = {f.name for f in dataclasses.fields(MBMConfig)}
        fixed = {
            "num_voxels": "it comes from the data",
            "patch_size": "set it with the data's patch size",
            "mask_ratio": "set it with mask_ratio",
        }
        for key in self.model_overrides:
            if key not in fields:
                raise ConfigError(f"unknown MBMConfig field {key!r}", field="model_overrides")
            if key in fixed:
                raise ConfigError(f"cannot override {key} here: {fixed[key]}", field="model_overrides")
        # derived values, after every override
        if self.warmup_epochs is None:
            self.warmup_epochs = float(round(self.warmup_fraction * self.epochs))
        self.warmup_epochs = float(self.warmup_epochs)
        if not 0 <= self.warmup_epochs < self.epochs or not math.isfinite(self.warmup_epochs):
            raise ConfigError(
                f"expected 0 <= warmup_epochs < epochs ({self.epochs}), got {self.warmup_epochs}",
                field="warmup_epochs",
            )
        self.trainer = dataclasses.replace(
            self.trainer, max_epochs=self.epochs, clip_grad=self.clip_grad, accumulate=self.accumulate
        )
        self.data.seed = self.seed

    @classmethod
    def for_stage(cls, stage: Stage, **overrides: Any) -> MBMTrainConfig:
        """The stage's default recipe with ``overrides`` applied (``data``/``trainer`` may be dicts of fields;
        the data defaults are :func:`stage_data_settings`)."""
        if stage not in STAGE_DEFAULTS:
            raise ConfigError(f"expected 'pretrain' or 'finetune', got {stage!r}", field="stage")
        defaults = dict(STAGE_DEFAULTS[stage])
        data = overrides.pop("data", None)
        if isinstance(data, MBMDataConfig):
            data = data.to_dict()
        data = stage_data_settings(stage, data)
        trainer = overrides.pop("trainer", None)
        if isinstance(trainer, TrainerConfig):
            trainer = trainer.to_dict()
        return cls(
            stage=stage,
            **{**defaults, **overrides},
            data=MBMDataConfig.from_dict(data),
            trainer=TrainerConfig.from_dict(trainer or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MBMTrainConfig:
        """Rebuild from :meth:`to_dict` output (e.g. a run folder's ``config.json``).

        Raises:
            ConfigError: unknown or invalid fields.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected an object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in names)
        if unknown:
            raise ConfigError(f"unknown field(s) {', '.join(unknown)}", field=unknown[0])
        d = dict(data)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def model_config_for(config: MBMTrainConfig, num_voxels: int) -> MBMConfig:
    """The pretraining model: the named variant at ``num_voxels``, with the patch size of the data, the mask
    ratio of the recipe and ``model_overrides``."""
    assert config.data is not None
    overrides = {
        "patch_size": config.data.patch_size,
        "mask_ratio": config.mask_ratio,
        **config.model_overrides,
    }
    return MBM_VARIANTS[str(config.variant)](num_voxels, **overrides)


__all__ = [
    "GOD_FMRI_LINKED",
    "STAGE_DATA_DEFAULTS",
    "STAGE_DEFAULTS",
    "MBMTrainConfig",
    "Stage",
    "model_config_for",
    "stage_data_settings",
]
