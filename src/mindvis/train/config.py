"""The settings of the training stages, apart from the training code, so that the commands build their
options from them (:func:`~mindvis.config.setting`) without loading torch: stage B (:class:`StageBConfig`) and
the image prior (:class:`PriorTrainConfig`) with its VQ autoencoder (:class:`VQTrainConfig`) and
class-conditional UNet (:class:`UNetTrainConfig`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from mindvis.config import setting
from mindvis.errors import ConfigError

_logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mindvis.data.paired import PairedAugmentConfig

TrainableName = Literal["original", "cond-only", "full"]
#: Our preset names -> :meth:`mindvis.models.ldm.DCLDM.named_trainable_parameters` presets.
TRAINABLE_PRESETS: dict[str, str] = {
    "original": "original",
    "cond-only": "cond_stage",
    "full": "unet_and_cond",
}
#: The original's batch size per dataset (GOD 5, BOLD5000 25).
DATASET_BATCH_SIZE: dict[str, int] = {"god": 5, "bold5000": 25}
#: What the fMRI context may be (:attr:`StageBConfig.context_basis`).
CONTEXT_BASES = ("free", "prior-classes")
#: What ``StageBConfig.val_schedule`` may be: the original's quick/full schedule, or a full pass every time.
VAL_SCHEDULES = ("original", "full")
#: Prefix of the quick pass's figures (``val_schedule="original"``); full-pass figures are ``val/<key>``.
QUICK_PREFIX = "val/quick/"

#: How ``mindvis train`` runs stage B unless told otherwise (:class:`~mindvis.train.common.TrainerConfig` fields):
#: full precision, as the original, and training metrics every 10 steps.
STAGE_B_TRAINER: dict[str, Any] = {"precision": "32", "log_every_n_steps": 10}
#: How ``mindvis train-prior`` runs unless told otherwise: bf16 on GPUs that have it, fp32 on CPUs.
PRIOR_TRAINER: dict[str, Any] = {"precision": "auto", "log_every_n_steps": 20}


@dataclass
class StageBConfig:
    """Settings of one stage B finetune; the defaults are the original's, except where a help text says
    "not in the original".

    The fields declared with :func:`~mindvis.config.setting` are the options of ``mindvis train``, generated from
    them with their default and help text (``mindvis train --help`` lists them). The others:

    Attributes:
        dataset: the dataset kind, used only to resolve ``batch_size`` (``--dataset``).
        quick_items, quick_samples: with ``val_schedule="original"``, the quick pass's test items (the first 5) and
            images per item (3; at most ``num_samples``); see the module docstring of
            :mod:`mindvis.train.stage_b_validation`.
        full_val_every: with ``original``, every this many validations is a full pass (15).
        full_val_threshold: with ``original``, the quick pass's 50-way semantic top-1 above which a full pass
            follows (0.15); for other n (and the stand-in without a classifier) the same distance above chance,
            see :func:`mindvis.train.stage_b_validation.full_pass_trigger`.
        encoder_init: ``pretrained`` (the stage A encoder) or ``random`` (the "no pretraining" ablation,
            ``--random-encoder``).
        grid_items: rows of the saved sample grid.
        n_way: n of the n-way metrics logged at validation.
        eval_trials: random trials per n-way metric at validation.
        seed: seed of initialisation, data order, timesteps and the validation samples (``--seed``).
        num_workers: data-loader workers (``--num-workers``).
    """

    trainable: TrainableName = setting(
        "original",
        "original (encoder, conditioner, cross-attention + norm2), cond-only, or full (whole UNet).",
    )
    lr: float = setting(5.3e-5, "AdamW learning rate.")
    weight_decay: float = setting(0.01, "AdamW weight decay (torch's default, as the original).")
    batch_size: int | None = setting(
        None,
        "Batch per device (default: the original's for the dataset: 5 for GOD, 25 for BOLD5000, else 5).",
    )
    dataset: str = "god"
    epochs: int = setting(500, "Training epochs.")
    clip_grad: float | None = setting(0.5, "Gradient-norm clip (0: off).")
    val_every: int = setting(5, "Validate every N epochs.")
    val_schedule: Literal["original", "full"] = setting(
        "original",
        "original (the original's): a quick pass (first 5 test items x 3 samples, logged as "
        "val/quick/...), and a full pass (every item x --num-samples, logged as val/...) when its top-1 "
        "exceeds 0.15 or at every 15th validation (and, not in the original, at the first and last "
        "validation of a run). full (not in the original, about 16x the compute): a full pass every time. "
        "The best checkpoint is chosen on full-pass figures in both.",
    )
    quick_items: int = 5
    quick_samples: int = 3
    full_val_every: int = 15
    full_val_threshold: float = 0.15
    image_size: int | None = setting(None, "Resolution (default: the prior's).")
    crop_ratio: float = setting(0.2, "Random crop removes this fraction.")
    crop_p: float = setting(0.5, "Probability of the random crop.")
    sparse_rate: float = setting(
        0.0,
        "Fraction of voxels zeroed per training sample. 0 (the default) is the original's behaviour: its "
        "dropout is a no-op. 0.2 (not in the original) drops what the paper describes.",
    )
    cond_dropout: float = setting(0.0, "Conditioning dropout for classifier-free guidance (0: off).")
    global_pool: bool = setting(False, "Mean-pool fMRI tokens.")
    use_time_cond: bool = setting(True, "Time-embedding conditioning.", flag="--time-cond/--no-time-cond")
    use_cross_attn: bool = setting(True, "Cross-attention conditioning.", flag="--cross-attn/--no-cross-attn")
    standardize_tokens: bool = setting(
        False,
        "Z-score the encoder tokens with training statistics before the conditioner (not in the "
        "original; helps small encoders whose tokens vary little between samples).",
    )
    context_basis: Literal["free", "prior-classes"] = setting(
        "free",
        "free (the original) or prior-classes (not in the original): every context token is a "
        "softmax mixture of the class-conditional prior's class embeddings, so the UNet reads the fMRI "
        "from the start and stage B learns from the diffusion loss alone, without class labels.",
    )
    basis_balance: float = setting(
        0.0,
        "With --context-basis prior-classes: weight of the reward for using all classes across a "
        "batch (the entropy of its mean mixture); keeps label-free training from sending every fMRI to "
        "one class. 0: off.",
    )
    align_epochs: int = setting(
        0,
        "Context warm start (not in the original; 0: off): first train the encoder and conditioner "
        "for N epochs so that each training fMRI's context is the prior's embedding of its image's class. "
        "Needs a class-conditional prior and labelled training images.",
    )
    align_lr: float = setting(1e-3, "Adam learning rate of the warm start.")
    validate_start: bool = setting(
        False,
        "Also validate the untrained model and, with --align-epochs, the model right after the warm "
        "start (validation_start.json), so the validation curve starts before training.",
    )
    encoder_init: Literal["pretrained", "random"] = "pretrained"
    num_samples: int = setting(5, "Images per test item in a full validation pass.")
    sampler: str = setting("plms", "plms, ddim or dpmsolver++.")
    sample_steps: int = setting(250, "Sampler steps at validation.", flag="--steps")
    guidance_scale: float = setting(
        1.0, "Classifier-free guidance of the validation samples (1: off; needs --cond-dropout)."
    )
    val_items: int | None = setting(None, "Test items generated at validation (default: all).")
    grid_items: int = 10
    n_way: tuple[int, ...] = (2, 10, 50)
    eval_trials: int = 50
    monitor: str = setting(
        "auto",
        "Metric for the best checkpoint, e.g. val/ident_pcc_2way (auto: the largest feasible n-way "
        "semantic top-1 with a classifier, else that). Full-pass figures only.",
    )
    seed: int = 2022
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE_PRESETS:
            raise ConfigError(
                f"expected one of {', '.join(TRAINABLE_PRESETS)}, got {self.trainable!r}", field="trainable"
            )
        if self.batch_size is None:
            self.batch_size = DATASET_BATCH_SIZE.get(str(self.dataset).lower(), 5)
        for name in (
            "batch_size",
            "epochs",
            "val_every",
            "num_samples",
            "sample_steps",
            "grid_items",
            "eval_trials",
            "quick_items",
            "quick_samples",
            "full_val_every",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"expected an integer >= 1, got {v!r}", field=name)
        for name in ("lr", "align_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, int | float) and v > 0):
                raise ConfigError(f"expected a positive number, got {v!r}", field=name)
        if isinstance(self.align_epochs, bool) or not (
            isinstance(self.align_epochs, int) and self.align_epochs >= 0
        ):
            raise ConfigError(f"expected an integer >= 0, got {self.align_epochs!r}", field="align_epochs")
        if self.weight_decay < 0:
            raise ConfigError(f"expected >= 0, got {self.weight_decay}", field="weight_decay")
        if self.clip_grad == 0:
            self.clip_grad = None  # 0 turns clipping off, as on the command line
        if self.clip_grad is not None and self.clip_grad < 0:
            raise ConfigError(f"expected >= 0, got {self.clip_grad}", field="clip_grad")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ConfigError(
                f"expected a probability in [0, 1), got {self.cond_dropout}", field="cond_dropout"
            )
        if not (isinstance(self.guidance_scale, int | float) and math.isfinite(self.guidance_scale)):
            raise ConfigError(
                f"expected a finite number, got {self.guidance_scale!r}", field="guidance_scale"
            )
        if self.guidance_scale != 1.0 and self.cond_dropout <= 0:
            raise ConfigError(
                "guidance needs the null condition trained: give cond_dropout > 0 as well",
                field="guidance_scale",
            )
        if not (self.use_time_cond or self.use_cross_attn):
            raise ConfigError(
                "at least one of the time and cross-attention conditioning must be on", field="use_time_cond"
            )
        if self.context_basis not in CONTEXT_BASES:
            raise ConfigError(
                f"expected one of {', '.join(CONTEXT_BASES)}, got {self.context_basis!r}",
                field="context_basis",
            )
        if isinstance(self.basis_balance, bool) or not (
            isinstance(self.basis_balance, int | float) and self.basis_balance >= 0
        ):
            raise ConfigError(f"expected a number >= 0, got {self.basis_balance!r}", field="basis_balance")
        if self.basis_balance and self.context_basis == "free":
            raise ConfigError(
                "the balance term needs a context basis: give context_basis prior-classes as well",
                field="basis_balance",
            )
        if self.encoder_init not in ("pretrained", "random"):
            raise ConfigError(
                f"expected pretrained or random, got {self.encoder_init!r}", field="encoder_init"
            )
        if self.val_schedule not in VAL_SCHEDULES:
            raise ConfigError(
                f"expected one of {', '.join(VAL_SCHEDULES)}, got {self.val_schedule!r}", field="val_schedule"
            )
        if isinstance(self.full_val_threshold, bool) or not (
            isinstance(self.full_val_threshold, int | float) and 0.0 <= self.full_val_threshold <= 1.0
        ):
            raise ConfigError(
                f"expected a top-1 accuracy in [0, 1], got {self.full_val_threshold!r}",
                field="full_val_threshold",
            )
        from mindvis.sampling import SAMPLERS  # torch; a command's --help reads this module

        if self.sampler not in SAMPLERS:
            raise ConfigError(f"expected one of {', '.join(SAMPLERS)}, got {self.sampler!r}", field="sampler")
        if self.val_items is not None and self.val_items < 2:
            raise ConfigError(
                f"validation needs at least 2 test items, got {self.val_items}", field="val_items"
            )
        if self.monitor != "auto" and not str(self.monitor).startswith("val/"):
            raise ConfigError(
                f"expected 'auto' or a validation metric such as val/ident_pcc_2way, got {self.monitor!r}",
                field="monitor",
            )
        if str(self.monitor).startswith(QUICK_PREFIX):
            full_name = "val/" + self.monitor[len(QUICK_PREFIX) :]
            raise ConfigError(
                f"the best checkpoint is chosen on full-pass figures: give {full_name} instead of {self.monitor!r}",
                field="monitor",
            )
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"expected an image size >= 8, got {self.image_size}", field="image_size")
        self.n_way = tuple(int(n) for n in self.n_way)
        _ = self.augment  # validates the augmentation values

    @property
    def augment(self) -> PairedAugmentConfig:
        from mindvis.data.paired import PairedAugmentConfig  # torch; a command's --help reads this module

        return PairedAugmentConfig(
            crop_ratio=self.crop_ratio, crop_p=self.crop_p, sparse_rate=self.sparse_rate
        )

    @property
    def model_preset(self) -> str:
        """The :class:`~mindvis.models.ldm.DCLDM` preset name of ``trainable``."""
        return TRAINABLE_PRESETS[self.trainable]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_way"] = list(self.n_way)
        return d


@dataclass
class VQTrainConfig:
    """Training settings of the VQ autoencoder.

    The fields declared with :func:`~mindvis.config.setting` are options of ``mindvis train-prior``, generated
    from them with their default and help text. The others:

    Attributes:
        codebook_decay: decay of the codes' moving averages with ``codebook_ema``.
        disc_lr: discriminator learning rate (``None``: ``lr``).
        disc_layers, disc_channels: discriminator size.
        grad_clip: gradient norm clip (``None``: off).
        flip: random horizontal flips of training images (the prior's ``--flip``).
    """

    lr: float = setting(2e-4, "VQ Adam learning rate (betas 0.5, 0.9 as VQGAN).", flag="--vq-lr")
    recon_loss: Literal["l1", "l2"] = setting("l1", "Pixel reconstruction loss: l1 or l2.")
    codebook_weight: float = setting(
        1.0, "Weight of the codebook loss |sg(h) - e|^2 (unused with --codebook-ema)."
    )
    codebook_ema: bool = setting(
        True,
        "Update codes as moving averages of their encoder outputs (online k-means, van den Oord et al. 2017) "
        "instead of by the codebook loss; converges much faster from a random start.",
    )
    codebook_decay: float = 0.99
    commitment_weight: float = setting(0.25, "Commitment loss weight (beta of |h - sg(e)|^2).")
    lpips_weight: float = setting(
        1.0, "Weight of the perceptual term (LPIPS or --perceptual-classifier).", flag="--lpips-weight"
    )
    lpips_weights: str | None = setting(
        None,
        "Local torchvision backbone weights for the LPIPS term (without them, or --perceptual-classifier, "
        "there is no perceptual term).",
    )
    lpips_net: Literal["vgg", "alex", "squeeze"] = setting("vgg", "LPIPS backbone: vgg, alex or squeeze.")
    perceptual_classifier: str | None = setting(
        None,
        "A benchmark classifier folder whose CNN features give the perceptual term instead of LPIPS (when no "
        "ImageNet backbone is at hand); train it apart from the judge (another seed or architecture).",
    )
    gan_weight: float = setting(0.0, "Patch-GAN weight (0: no discriminator).")
    gan_start_step: int = setting(0, "Step at which the GAN terms start.", flag="--gan-start")
    disc_lr: float | None = None
    disc_layers: int = 3
    disc_channels: int = 64
    dead_code_reinit: bool = setting(True, "Re-initialise unused codes from encoder outputs.")
    dead_code_every: int = setting(100, "Steps per dead-code window.")
    grad_clip: float | None = 1.0
    flip: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"must be positive, got {self.lr}", field="vq.lr")
        if self.recon_loss not in ("l1", "l2"):
            raise ConfigError(f"must be 'l1' or 'l2', got {self.recon_loss!r}", field="vq.recon_loss")
        for name in ("codebook_weight", "commitment_weight", "lpips_weight", "gan_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, name)}", field=f"vq.{name}")
        if self.dead_code_every < 1:
            raise ConfigError(f"must be >= 1, got {self.dead_code_every}", field="vq.dead_code_every")
        if not 0.0 < self.codebook_decay < 1.0:
            raise ConfigError(f"must be in (0, 1), got {self.codebook_decay}", field="vq.codebook_decay")
        if self.lpips_net not in ("vgg", "alex", "squeeze"):
            raise ConfigError(f"must be vgg, alex or squeeze, got {self.lpips_net!r}", field="vq.lpips_net")
        if self.lpips_weights is not None and self.perceptual_classifier is not None:
            raise ConfigError(
                "give one perceptual term: LPIPS weights or a perceptual classifier, not both",
                field="vq.perceptual_classifier",
            )

    @property
    def use_gan(self) -> bool:
        return self.gan_weight > 0

    @property
    def use_lpips(self) -> bool:
        return self.lpips_weights is not None and self.lpips_weight > 0

    @property
    def use_perceptual_classifier(self) -> bool:
        return self.perceptual_classifier is not None and self.lpips_weight > 0


@dataclass
class UNetTrainConfig:
    """Training settings of the image prior's class-conditional denoiser.

    The fields declared with :func:`~mindvis.config.setting` are options of ``mindvis train-prior``; ``ema_decay``
    is set by ``--ema/--no-ema`` and ``--ema-decay`` (``None``: no EMA; with EMA, validation samples and the
    exported prior use the averaged weights). The others:

    Attributes:
        weight_decay: AdamW weight decay.
        grad_clip: gradient norm clip (``None``: off).
        sample_every: draw class sample grids every this many validation runs.
    """

    lr: float = setting(2e-4, "UNet AdamW learning rate.", flag="--unet-lr")
    weight_decay: float = 0.0
    ema_decay: float | None = 0.999
    class_dropout: float = setting(
        0.0, "Null-class dropout (for classifier-free guidance; 0 = never, as the original prior)."
    )
    grad_clip: float | None = 1.0
    sample_every: int = 1
    samples_per_class: int = setting(4, "Columns of the class grids.")
    sample_steps: int = setting(50, "Sampler steps of the class grids.", flag="--steps")
    sampler: Literal["plms", "ddim", "dpmsolver++"] = setting(
        "ddim", "Sampler of the class grids: plms, ddim, dpmsolver++."
    )
    guidance_scale: float = setting(
        1.0,
        "Classifier-free guidance of the grids and scored samples (needs --class-dropout > 0; 1 = none).",
        flag="--guidance",
    )

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"must be positive, got {self.lr}", field="unet.lr")
        if self.guidance_scale != 1.0 and self.class_dropout <= 0:
            _logger.warning(
                "guidance_scale %s without class_dropout: the null class is never trained",
                self.guidance_scale,
            )
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"must be in (0, 1) or None, got {self.ema_decay}", field="unet.ema_decay")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"must be in [0, 1), got {self.class_dropout}", field="unet.class_dropout")
        for name in ("sample_every", "samples_per_class", "sample_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", field=f"unet.{name}")
        if self.sampler not in ("plms", "ddim", "dpmsolver++"):
            raise ConfigError(
                f"must be plms, ddim or dpmsolver++, got {self.sampler!r}", field="unet.sampler"
            )


@dataclass
class PriorTrainConfig:
    """Everything ``mindvis train-prior`` learns and how long.

    Attributes:
        preset: model sizes (:func:`mindvis.models.ldm.ldm_preset`: ``tiny``, ``small``, ``label2img``).
        resolution: image size; ``None`` takes the preset's. The UNet's latent size follows from it.
        vq_epochs, unet_epochs: training length of each half.
        vq_batch_size, unet_batch_size: batch sizes (per process).
        holdout: fraction of the corpus held out for validation (VQ PSNR/SSIM, UNet validation loss).
        flip: horizontal flips (VQ images; the UNet trains on the latents of both orientations).
        val_every: validation every this many epochs (both halves).
        final_samples_per_class: samples per class drawn at the end to measure class accuracy.
        seed: split and initialisation seed.
        num_workers: data-loader workers.
        vq, unet: the two halves' loss and optimiser settings.
        vq_model, unet_model: overrides of the preset's :class:`~mindvis.models.ldm.VQConfig` /
            :class:`~mindvis.models.ldm.UNetConfig` fields (e.g. ``{"ch": 32}``, ``{"model_channels": 32}``).
    """

    preset: str = setting("small", "Model sizes: tiny, small or label2img.")
    resolution: int | None = setting(None, "Image size (default: the preset's).")
    vq_epochs: int = setting(20, "VQ training epochs.")
    unet_epochs: int = setting(60, "UNet training epochs.")
    vq_batch_size: int = setting(16, "VQ batch per device.")
    unet_batch_size: int = setting(64, "UNet batch per device.")
    holdout: float = setting(0.1, "Fraction of images held out for validation.")
    flip: bool = setting(True, "Horizontal flip augmentation.")
    val_every: int = setting(5, "Validate every N epochs.")
    final_samples_per_class: int = setting(10, "Samples per class scored at the end.", flag="--final-samples")
    seed: int = 0
    num_workers: int = 0
    vq: VQTrainConfig = field(default_factory=VQTrainConfig)
    unet: UNetTrainConfig = field(default_factory=UNetTrainConfig)
    vq_model: dict[str, Any] = field(default_factory=dict)
    unet_model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.vq, dict):
            self.vq = VQTrainConfig(**self.vq)
        if isinstance(self.unet, dict):
            self.unet = UNetTrainConfig(**self.unet)
        if self.vq.flip != self.flip:  # one switch for both halves: the VQ's images and the UNet's latents
            self.vq = dataclasses.replace(self.vq, flip=self.flip)
        for name in ("vq_epochs", "unet_epochs", "vq_batch_size", "unet_batch_size", "val_every"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if "epochs" in name else 1)
            ):
                raise ConfigError(f"expected a non-negative integer, got {value!r}", field=name)
        if not 0.0 < self.holdout < 0.5:
            raise ConfigError(f"expected a fraction in (0, 0.5), got {self.holdout}", field="holdout")
        if self.final_samples_per_class < 0:
            raise ConfigError("must be >= 0", field="final_samples_per_class")
        self.ldm_config(2)  # validates preset and resolution

    def ldm_config(self, num_classes: int) -> Any:
        """The :class:`~mindvis.models.ldm.LDMConfig` of the prior (no time conditioning)."""
        from mindvis.models.ldm import LDMConfig, ldm_preset  # torch; a command's --help reads this module

        base = ldm_preset(self.preset, time_cond=False)
        vq_changes = dict(self.vq_model)
        if self.resolution is not None:
            vq_changes["resolution"] = int(self.resolution)
        unet_changes = {k: v for k, v in self.unet_model.items()}
        if "time_cond" in unet_changes:
            raise ConfigError("the prior has no time conditioning", field="unet_model.time_cond")
        try:
            vq = dataclasses.replace(base.vq, **vq_changes)
            unet_changes.setdefault("sample_size", vq.latent_size)
            unet_changes.setdefault("in_channels", vq.embed_dim)
            unet_changes.setdefault("out_channels", vq.embed_dim)
            unet = dataclasses.replace(base.unet, **unet_changes)
        except TypeError as exc:
            raise ConfigError(f"unknown model field ({exc})", field="vq_model/unet_model") from None
        ldm = LDMConfig(unet=unet, vq=vq)
        warn_instance_norm(ldm)
        return ldm

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def warn_instance_norm(ldm: Any) -> list[str]:
    """Warn about layers whose GroupNorm has one channel per group (``width == norm_groups``).

    Such a GroupNorm normalises every channel over space on its own, which erases any per-channel constant: in
    the UNet the time embedding (and a class embedding seen through cross-attention to a single token) added to
    the features, in the autoencoder the global colour. A model built that way cannot learn the noise level;
    use ``norm_groups`` of at most half the narrowest width. Returns the warnings.
    """
    out = []
    u, v = ldm.unet, ldm.vq
    if min(u.block_channels) <= u.norm_groups:
        out.append(
            f"UNet width {min(u.block_channels)} with {u.norm_groups} GroupNorm groups: one channel per "
            "group removes the time embedding (the denoiser cannot tell the noise level); set "
            f"norm_groups <= {min(u.block_channels) // 2}"
        )
    if v.ch * min(v.ch_mult) <= v.norm_groups:
        out.append(
            f"VQ width {v.ch * min(v.ch_mult)} with {v.norm_groups} GroupNorm groups: one channel per "
            f"group removes global colour offsets; set norm_groups <= {v.ch * min(v.ch_mult) // 2}"
        )
    for msg in out:
        _logger.warning(msg)
    return out
