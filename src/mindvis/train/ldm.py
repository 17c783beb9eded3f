"""MinD-Vis stage B: finetuning the double-conditioned latent diffusion model on fMRI-image pairs.

Chen et al. (CVPR 2023) start from a class-conditional latent diffusion prior (the CompVis label2img model; here
also a prior trained by ``mindvis train-prior``), replace its class embedding by the fMRI encoder of stage A and
the double conditioner (cross-attention context + time-embedding vector; :mod:`mindvis.train.stage_b_model`),
and train with the epsilon loss of latent diffusion on (fMRI, image) pairs: :class:`StageBModule`, run by
:func:`train_stage_b`.

What is trained (``trainable``):

* ``original`` (default): what the original optimises: the fMRI encoder, the conditioner (channel/dim mappers and
  the time-conditioning layers) and, in the UNet, every cross-attention block (``attn2``) with the LayerNorm in
  front of it (``norm2``). Everything else has ``requires_grad=False``, so no weight gradient is computed for
  it. (The original unfreezes the whole model and hands a subset to the optimiser, computing gradients for all
  UNet weights on every step and discarding them.)
* ``cond-only``: the fMRI encoder and the conditioner.
* ``full``: the whole UNet as well (the autoencoder always stays frozen).

The original's settings are the defaults: AdamW, lr 5.3e-5, batch 5 (GOD; 25 for BOLD5000), 500 epochs, gradient
clipping 0.5, float32, no sparse voxel dropout (the original's dropout is a no-op, see
:mod:`mindvis.data.paired`), validation every 5 epochs on the original's schedule
(:mod:`mindvis.train.stage_b_validation`). Not in the original, and off by default: the context warm start
before the finetune (:mod:`mindvis.train.align`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from mindvis.data.dataset import FMRIDataset
from mindvis.data.encoder_input import PREPROCESSING_NAME, find_preprocessing, prepare_voxels
from mindvis.data.formats.registry import list_subjects, load_dataset
from mindvis.data.paired import PairedFMRIDataset
from mindvis.data.preprocessor import load_preprocessor
from mindvis.data.sampler import EpochShuffleSampler
from mindvis.errors import ConfigError, DataError
from mindvis.eval.classifier import load_benchmark_classifier
from mindvis.models.conditioning import Conditioning
from mindvis.models.ldm import prior_class_table
from mindvis.pipeline import MindVisPipeline
from mindvis.train.align import align_context
from mindvis.train.common import TrainerConfig, build_trainer, fit
from mindvis.train.config import QUICK_PREFIX, STAGE_B_TRAINER, StageBConfig
from mindvis.train.optim import make_adamw
from mindvis.train.processes import is_primary_process, seed_everything
from mindvis.train.run_folder import find_resume_checkpoint, read_checkpoint_progress, write_run_config
from mindvis.train.stage_b_model import (
    build_encoder,
    build_stage_b_model,
    check_image_size,
    fit_token_stats,
    keep_modes,
    load_prior,
    prior_context_std,
    save_stage_b_pipeline,
)
from mindvis.train.stage_b_validation import (
    default_monitor,
    full_pass_trigger,
    is_last_validation,
    scheduled_full_pass,
    score_validation,
    val_metric_names,
)
from mindvis.utils.images import image_grid, save_png
from mindvis.utils.io import check_output_apart, prepare_output_dir, write_json

_logger = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
#: The context warm start's record in a stage B run folder.
ALIGN_NAME = "align.json"
#: The validations before training (``StageBConfig.validate_start``) in a stage B run folder.
VALIDATION_START_NAME = "validation_start.json"
#: The subject of the original's released GOD checkpoint and the one its stage B config trains on.
ORIGINAL_GOD_SUBJECT = "sbj_3"


def mixture_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the mean of mixture weights ``[N, T, K]`` over samples and tokens: ``log K`` when the
    batch uses every basis row equally, 0 when every context is the same row."""
    mean = weights.float().mean(dim=tuple(range(weights.ndim - 1)))
    return -(mean * mean.clamp_min(1e-12).log()).sum()


# ----------------------------------------------------------------------------------------------------------
# The Lightning module
# ----------------------------------------------------------------------------------------------------------


class StageBModule(pl.LightningModule):
    """Lightning module of the stage B finetune.

    Batches are dicts from :class:`~mindvis.data.paired.PairedFMRIDataset`: ``fmri [B, V]``, ``image
    [B, 3, S, S]`` in ``[-1, 1]``, ``index [B]``.

    Args:
        model: the fMRI-conditioned :class:`~mindvis.models.ldm.DCLDM`.
        config: stage B settings.
        val_gt: ``[M, S, S, 3]`` uint8 ground truth of the validation items (by dataset index), for metrics.
        classifier: optional :class:`~mindvis.eval.classifier.ImageClassifier` for the semantic metrics.
        sample_dir: where validation grids go (``None``: none).
        preprocessor: the fitted fMRI preprocessing, saved beside exported pipelines.
    """

    def __init__(
        self,
        model: Any,
        config: StageBConfig,
        val_gt: np.ndarray | None = None,
        classifier: Any = None,
        sample_dir: str | os.PathLike | None = None,
        preprocessor: Any = None,
    ) -> None:
        super().__init__()
        if not model.is_fmri_conditioned:
            raise ConfigError("stage B needs an fMRI-conditioned model")
        self.model = model
        self.config = config
        self.trainable_names = model.set_trainable(config.model_preset)
        self.num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.num_total = sum(p.numel() for p in model.parameters())
        _logger.info(
            "trainable parameters (%s): %d tensors, %s of %s values (%.2f%%)",
            config.trainable,
            len(self.trainable_names),
            f"{self.num_trainable:,}",
            f"{self.num_total:,}",
            100.0 * self.num_trainable / max(self.num_total, 1),
        )
        self.model.vq.eval()
        self.val_gt = val_gt
        self.classifier = classifier
        self.sample_dir = None if sample_dir is None else Path(sample_dir)
        self.preprocessor = preprocessor
        self._val_parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._val_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._full_now = True
        self._full_done = False
        #: validations run in training (checkpointed): the ``original`` schedule's count
        self.val_count = 0
        #: the last full pass's figures (``val/<key>``) and the last quick pass's (``val/quick/<key>``)
        self.last_val_metrics: dict[str, float] = {}
        self.last_quick_metrics: dict[str, float] = {}
        self.last_val_results: dict[str, Any] | None = None

    def train(self, mode: bool = True) -> StageBModule:
        super().train(mode)
        self.model.vq.eval()  # the autoencoder is frozen and stays in eval mode
        return self

    # -- training -----------------------------------------------------------------------------------------

    def _condition(self, fmri: torch.Tensor, drop: float) -> Any:
        cond = self.model.condition(fmri)
        if drop <= 0:
            return cond
        mask = torch.rand(fmri.shape[0], device=fmri.device) < drop
        null = self.model.conditioner.null_conditioning(fmri.shape[0], cond.context)
        ctx = torch.where(mask[:, None, None], null.context, cond.context)
        tc = None if cond.time_cond is None else torch.where(mask[:, None], null.time_cond, cond.time_cond)
        return Conditioning(ctx, tc, cond.weights)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        m = self.model
        with torch.no_grad():
            x0 = m.encode_images(batch["image"])
        cond = self._condition(batch["fmri"], self.config.cond_dropout)
        t = torch.randint(0, m.num_timesteps, (x0.shape[0],), device=x0.device)
        out = m.p_losses(x0, cond, t)
        self.log(
            "train/loss",
            out.loss.detach(),
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=x0.shape[0],
        )
        if cond.weights is None or not self.config.basis_balance:
            return out.loss
        balance = mixture_entropy(cond.weights)
        self.log(
            "train/basis_entropy", balance.detach(), on_step=False, on_epoch=True, batch_size=x0.shape[0]
        )
        return out.loss - self.config.basis_balance * balance

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return make_adamw(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def compile_targets(self) -> dict[str, torch.nn.Module]:
        """What ``--compile`` compiles: the UNet and the fMRI encoder."""
        return {"unet": self.model.unet, "fmri_encoder": self.model.fmri_encoder}

    # -- validation ---------------------------------------------------------------------------------------

    def generate(self, fmri: torch.Tensor, index: torch.Tensor, num_samples: int | None = None) -> np.ndarray:
        """``num_samples`` (default: the config's) images per item ``[B, S, H, W, 3]`` uint8; item ``i`` always
        uses seed ``seed + i``."""
        cfg = self.config
        with keep_modes(self.model):
            pipe = MindVisPipeline(self.model)
            out = pipe(
                fmri,
                num_samples=cfg.num_samples if num_samples is None else num_samples,
                num_inference_steps=cfg.sample_steps,
                sampler=cfg.sampler,
                guidance_scale=cfg.guidance_scale,
                seed=[cfg.seed + int(i) for i in index],
                progress=False,
                return_latents=False,
            )
        return out.images

    def _val_loss(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        m = self.model
        x0 = m.encode_images(batch["image"])
        g = torch.Generator().manual_seed(
            self.config.seed + 7919 * (batch_idx + 1)
        )  # the same t, noise each time
        t = torch.randint(0, m.num_timesteps, (x0.shape[0],), generator=g).to(x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        return m.p_losses(x0, m.condition(batch["fmri"]), t, noise=noise).loss

    # -- the validation schedule --------------------------------------------------------------------------

    def _plan_validation(self) -> bool:
        """Count this validation and say whether it is a scheduled full pass (:func:`scheduled_full_pass`)."""
        trainer = self.trainer
        self.val_count += 1
        last = trainer.state.fn == "fit" and is_last_validation(
            self.current_epoch, trainer.check_val_every_n_epoch, trainer.max_epochs
        )
        return scheduled_full_pass(self.config, self.val_count, self._full_done, last)

    def on_fit_start(self) -> None:
        self._full_done = False  # the monitored figure is not among this fit's logged metrics yet

    def on_validation_epoch_start(self) -> None:
        self._val_parts, self._val_inputs = [], []
        self._full_now = True if self.trainer.sanity_checking else self._plan_validation()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self._val_loss(batch, batch_idx)
        self.log("val/loss", loss, batch_size=batch["image"].shape[0], sync_dist=True)
        if self.trainer.sanity_checking:
            return
        if self._full_now:
            images = self.generate(batch["fmri"], batch["index"])
            self._val_parts.append((batch["index"].cpu(), torch.from_numpy(images)))
        else:  # kept for a full pass that the quick pass may call for
            self._val_inputs.append((batch["index"], batch["fmri"]))

    @torch.no_grad()
    def validate_now(self, loader: Any) -> dict[str, float]:
        """The full-pass validation figures of the model as it is now, outside a Lightning run, in this process.

        Same samples (seeds by item), timesteps and noise as :meth:`validation_step`, so the figures continue
        the logged curve.
        """
        with keep_modes(self.model):
            self.model.eval()
            losses, weights, index, images = [], [], [], []
            for batch_idx, batch in enumerate(loader):
                losses.append(float(self._val_loss(batch, batch_idx)))
                weights.append(len(batch["index"]))
                index.append(batch["index"].cpu())
                images.append(self.generate(batch["fmri"], batch["index"]))
        metrics = {"val/loss": float(np.average(losses, weights=weights))}
        metrics.update(self._metrics(np.concatenate(images), torch.cat(index).numpy()))
        return metrics

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the last validation's figures go into metrics.json; a run resumed after its last epoch needs them
        checkpoint["mindvis_last_val_metrics"] = {k: float(v) for k, v in self.last_val_metrics.items()}
        checkpoint["mindvis_val_count"] = int(self.val_count)  # the original schedule continues its count

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.last_val_metrics = dict(checkpoint.get("mindvis_last_val_metrics", {}))
        self.val_count = int(checkpoint.get("mindvis_val_count", 0))

    def on_validation_epoch_end(self) -> None:
        parts, self._val_parts = self._val_parts, []
        inputs, self._val_inputs = self._val_inputs, []
        if self.trainer.sanity_checking:
            return
        if not self._full_now:
            if not self._quick_pass():
                return
            with torch.no_grad(), self.trainer.precision_plugin.val_step_context():
                parts = [(i.cpu(), torch.from_numpy(self.generate(x, i))) for i, x in inputs]
        if not parts:
            return
        self._full_pass(parts)

    def _quick_pass(self) -> bool:
        """The original's quick pass: ``quick_samples`` images of each of the first ``quick_items`` validation
        items (the same in every process), logged as ``val/quick/<key>``. Returns whether a full pass follows."""
        cfg = self.config
        loader = self.trainer.val_dataloaders
        dataset = loader.dataset if hasattr(loader, "dataset") else loader[0].dataset
        n = min(cfg.quick_items, len(dataset))
        items = [dataset[i] for i in range(n)]
        index = torch.stack([torch.as_tensor(it["index"]) for it in items])
        fmri = torch.stack([torch.as_tensor(it["fmri"]) for it in items]).to(self.device)
        with torch.no_grad(), self.trainer.precision_plugin.val_step_context():
            images = self.generate(fmri, index, num_samples=min(cfg.quick_samples, cfg.num_samples))
        index_np = index.numpy()
        quick = {
            QUICK_PREFIX + k[len("val/") :]: v
            for k, v in self._metrics(images, index_np, record=False).items()
        }
        for k, v in quick.items():
            self.log(k, v, sync_dist=False)
        self.last_quick_metrics = quick
        self._save_grid(index_np, images, "-quick")
        trig = full_pass_trigger(quick, cfg.n_way, self.classifier, cfg.full_val_threshold)
        full = bool(trig is not None and trig[2])
        full = bool(self.trainer.strategy.broadcast(full, src=0))  # every process runs the full pass or none
        if trig is not None:
            _logger.info(
                "quick validation (%d items x %d samples): %s = %.4f; %s",
                n,
                min(cfg.quick_samples, cfg.num_samples),
                trig[0],
                trig[1],
                "above the threshold: full pass" if full else "no full pass",
            )
        return full

    def _full_pass(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Figures of the full pass (every validation item, ``num_samples`` each), logged as ``val/<key>``."""
        index = torch.cat([p[0] for p in parts])
        images = torch.cat([p[1] for p in parts])
        if self.trainer.world_size > 1:  # every rank gets every item (DistributedSampler gives equal shares)
            index = self.all_gather(index.to(self.device)).reshape(-1).cpu()
            images = self.all_gather(images.to(self.device)).reshape(-1, *images.shape[1:]).cpu()
        index_np = index.numpy()
        _, first = np.unique(index_np, return_index=True)  # padded duplicates are dropped
        order = first[np.argsort(index_np[first])]
        index_np, recons = index_np[order], images[order].numpy()
        metrics = self._metrics(recons, index_np)
        for k, v in metrics.items():
            self.log(k, v, sync_dist=False)
        self.last_val_metrics = metrics
        self._full_done = True
        self._save_grid(index_np, recons)

    def _save_grid(self, index: np.ndarray, recons: np.ndarray, suffix: str = "") -> None:
        if self.trainer.is_global_zero and self.sample_dir is not None and self.val_gt is not None:
            k = min(self.config.grid_items, len(index))
            grid = image_grid(recons[:k], ground_truth=self.val_gt[index[:k]])
            path = save_png(self.sample_dir / f"epoch{self.current_epoch:04d}{suffix}.png", grid)
            _logger.info("validation samples: %s", path)

    def _metrics(self, recons: np.ndarray, index: np.ndarray, record: bool = True) -> dict[str, float]:
        if self.val_gt is None or len(index) < 2:
            return {}
        results = score_validation(recons, self.val_gt[index], self.classifier, self.config)
        if record:
            self.last_val_results = results
        return val_metric_names(results)

    # -- export -------------------------------------------------------------------------------------------

    def export_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the pipeline folder (plus ``preprocess.json``, the fitted fMRI preprocessing)."""
        save_stage_b_pipeline(self.model, directory, self.config, self.preprocessor)


# ----------------------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------------------


def default_subject(dataset: str, data_dir: Any = None) -> str | None:
    """The subject ``mindvis train`` uses when none is given: for GOD the original's ``sbj_3`` (its stage B
    config and released checkpoint), else ``None`` (the dataset reader's first subject).

    A GOD folder without ``sbj_3`` falls back to its first subject, with a warning.
    """
    if str(dataset).lower() != "god":
        return None

    subjects = list_subjects("god", data_dir)
    if ORIGINAL_GOD_SUBJECT in subjects or not subjects:
        return ORIGINAL_GOD_SUBJECT
    _logger.warning(
        "the original trains on GOD subject %s, which this folder does not have (subjects: %s): using %s; "
        "give --subject to choose",
        ORIGINAL_GOD_SUBJECT,
        ", ".join(subjects),
        subjects[0],
    )
    return subjects[0]


def run_stage_b(
    config: StageBConfig,
    prior: str | os.PathLike,
    mbm: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    subject: str | None = None,
    roi: str | None = None,
    preprocess: str | os.PathLike | None = None,
    classifier: str | os.PathLike | None = None,
    trainer_config: TrainerConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> StageBResult:
    """Stage B on a dataset folder, as ``mindvis train`` runs it: :func:`train_stage_b` on ``config.dataset``'s
    training and test splits of one subject.

    Args:
        config: stage B settings (its ``dataset`` names the reader).
        prior, mbm: the image prior's pipeline folder and the stage A model (see :func:`train_stage_b`).
        out_dir: the run folder; it must not lie inside any input.
        data_dir: the dataset folder (default: found under ``$MINDVIS_DATA``).
        subject: the subject (default: :func:`default_subject`).
        roi: ROI of the GOD layout (default: the reader's, VC).
        preprocess: a fitted preprocessing JSON (default: the stage A run's, else fitted on the training split).
        classifier: a benchmark classifier folder for the semantic validation metrics.
        trainer_config: hardware, precision and logging (default: :data:`STAGE_B_TRAINER`).
    """

    check_output_apart(
        out_dir,
        {
            "--prior": prior,
            "--mbm": mbm,
            "--data-dir": data_dir,
            "--preprocess": preprocess,
            "--classifier": classifier,
        },
    )
    options = {} if roi is None else {"roi": roi}
    if subject is None:
        subject = default_subject(config.dataset, data_dir)
    train_ds = load_dataset(config.dataset, data_dir, subject, "train", **options)
    test_ds = load_dataset(config.dataset, data_dir, subject or train_ds.subject, "test", **options)
    pre = None if preprocess is None else load_preprocessor(preprocess, subject=train_ds.subject)
    return train_stage_b(
        prior,
        mbm,
        train_ds,
        test_ds,
        out_dir,
        config,
        trainer_config or TrainerConfig(**STAGE_B_TRAINER),
        classifier=load_benchmark_classifier(classifier),
        preprocessor=pre,
        resume=resume,
        overwrite=overwrite,
    )


class StageBData(pl.LightningDataModule):
    """Training pairs (augmented) and validation pairs (the test split, not augmented)."""

    def __init__(
        self,
        train: PairedFMRIDataset,
        val: PairedFMRIDataset,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        val_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.val_batch_size = val_batch_size or batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(self.train_set), self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.val_set, batch_size=self.val_batch_size, shuffle=False, num_workers=self.num_workers
        )


@dataclass
class StageBResult:
    """What a stage B run reports.

    Attributes:
        run_dir: the run folder; ``model/`` (final pipeline), ``best/`` (best by ``monitor``).
        monitor: the metric that picked the best checkpoint; best: its best value.
        metrics: the last validation metrics.
        trainable_params: number of trained values; total_params: of the whole model.
        epochs_done, global_step, seconds: progress and wall time.
    """

    run_dir: Path
    monitor: str
    best: float | None
    metrics: dict[str, float]
    trainable_params: int
    total_params: int
    epochs_done: int
    global_step: int
    seconds: float


def train_stage_b(
    prior: Any,
    mbm: Any,
    train: FMRIDataset,
    test: FMRIDataset,
    out_dir: str | os.PathLike,
    config: StageBConfig,
    trainer_config: Any = None,
    classifier: Any = None,
    preprocessor: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: tuple = (),
) -> StageBResult:
    """Finetune stage B from a prior and a stage A model on paired fMRI-image data.

    The run folder gets ``config.json``, ``preprocessing.json``, ``metrics.csv``, ``checkpoints/``,
    ``samples/epochNNNN.png`` (ground truth, then the samples, one test item per row; a quick validation pass's
    are ``epochNNNN-quick.png``), ``model/`` (the final
    pipeline, loadable by :meth:`mindvis.pipeline.MindVisPipeline.from_pretrained`, with its
    ``preprocess.json``), ``best/`` (the best by ``monitor``) and ``metrics.json``.

    Args:
        prior: prior pipeline folder (``mindvis train-prior`` or a converted label2img) or a pipeline/model.
        mbm: stage A run folder, model folder, original ``.pth``, or ``MaskedBrainModel``.
        train, test: paired datasets of one subject.
        out_dir: the run folder.
        config: stage B settings.
        trainer_config: :class:`~mindvis.train.common.TrainerConfig` (devices, strategy, precision, logger);
            its ``max_epochs``, ``val_every_n_epochs`` and ``clip_grad`` are taken from ``config``.
        classifier: optional judge for the semantic validation metrics.
        preprocessor: a fitted :class:`~mindvis.data.preprocessor.FMRIPreprocessor`; default: the stage A
            run's ``preprocessing.json`` when there is one, else fitted on ``train``.
        resume: continue from ``out_dir/checkpoints/last.ckpt``.
        overwrite: replace a non-empty ``out_dir``.
    """
    trainer_config = trainer_config or TrainerConfig()
    out_dir = Path(out_dir)
    for ds, name in ((train, "train"), (test, "test")):
        if ds.num_samples == 0:
            raise DataError(f"the {name} split is empty (0 samples)", path=ds.source, field=name)
        if not ds.paired:
            raise DataError(f"the {name} split has no paired images", path=ds.source, field="images")
    ckpt, resume_step = None, None
    if resume:
        ckpt = find_resume_checkpoint(out_dir)
        resume_step = read_checkpoint_progress(ckpt)["global_step"]
    elif is_primary_process():
        prepare_output_dir(out_dir, overwrite=overwrite)

    prior_model = load_prior(prior)
    image_size = check_image_size(
        prior_model, config.image_size, source=prior if isinstance(prior, str | Path) else None
    )
    seed_everything(config.seed)
    encoder = build_encoder(mbm, config)
    if preprocessor is None and (found := find_preprocessing(mbm)) is not None:
        preprocessor = load_preprocessor(found, subject=train.subject)
        _logger.info("fMRI preprocessing from the stage A run: %s", found)
    x_train, x_test, preprocessor = prepare_voxels(
        train, test, encoder.config.num_voxels, encoder.config.patch_size, preprocessor
    )
    prior_source = prior if isinstance(prior, str | Path) else None
    model = build_stage_b_model(prior_model, encoder, config, source=prior_source)
    if config.standardize_tokens:  # from the initial encoder; a resumed run then loads the saved buffers
        fit_token_stats(
            model, x_train, None if config.context_basis != "free" else prior_context_std(prior_model)
        )
    train_set = PairedFMRIDataset.from_fmri_dataset(
        train, image_size, voxels=x_train, train=True, augment=config.augment
    )
    val_idx = np.arange(
        test.num_samples if config.val_items is None else min(config.val_items, test.num_samples)
    )
    val_set = PairedFMRIDataset.from_fmri_dataset(
        test.subset(val_idx), image_size, voxels=x_test[val_idx], train=False
    )
    data = StageBData(
        train_set,
        val_set,
        config.batch_size,
        config.seed,
        config.num_workers,
        val_batch_size=max(1, min(len(val_set), 16)),
    )
    module = StageBModule(
        model,
        config,
        val_gt=val_set.ground_truth(),
        classifier=classifier,
        sample_dir=out_dir / SAMPLES_DIR,
        preprocessor=preprocessor,
    )
    # a resumed run continues its curve; its checkpoint holds the warm-started weights
    start: list[dict[str, Any]] = []
    if config.validate_start and ckpt is None and is_primary_process():
        start.append({"point": "before training", **module.validate_now(data.val_dataloader())})
    align = None
    if config.align_epochs and ckpt is None:
        align = align_context(
            model,
            x_train,
            train.labels if train.labels is not None else np.full(len(x_train), -1),
            prior_class_table(prior_model, source=prior_source),
            config.align_epochs,
            lr=config.align_lr,
            batch_size=config.batch_size,
            sparse_rate=config.sparse_rate,
            seed=config.seed,
            eval_sets=None if test.labels is None else {"test": (x_test, test.labels)},
            source=train.source,
        )
        if start:
            start.append({"point": "after the warm start", **module.validate_now(data.val_dataloader())})
    del prior_model
    if start:
        _logger.info(
            "validation before the finetune: %s",
            "; ".join(
                f"{p['point']}: "
                + ", ".join(
                    f"{k[4:]} {v:.3g}" for k, v in p.items() if k != "point" and not k.endswith("_best")
                )
                for p in start
            ),
        )

    monitor = (
        default_monitor(config.n_way, classifier, len(val_set))
        if config.monitor == "auto"
        else config.monitor
    )
    if is_primary_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(
            out_dir,
            "train",
            config.to_dict(),
            trainer=trainer_config.to_dict(),
            monitor=monitor,
            image_size=image_size,
            prior=str(prior) if isinstance(prior, str | Path) else None,
            mbm=str(mbm) if isinstance(mbm, str | Path) else None,
            data={"train": train.summary(), "test": test.summary(), "val_items": len(val_set)},
        )
        write_json(out_dir / PREPROCESSING_NAME, preprocessor.to_dict())
        if align is not None:
            write_json(out_dir / ALIGN_NAME, align)
        if start:
            write_json(out_dir / VALIDATION_START_NAME, {"val_items": len(val_set), "points": start})
    tc = replace(
        trainer_config,
        max_epochs=config.epochs,
        val_every_n_epochs=min(config.val_every, config.epochs),
        clip_grad=config.clip_grad,
    )
    trainer = build_trainer(
        tc,
        out_dir,
        monitor=monitor,
        mode="min" if monitor.endswith("loss") else "max",
        callbacks=callbacks,
        resume_step=resume_step,
    )
    t0 = time.perf_counter()
    fit(trainer, module, data, ckpt_path=ckpt, compile=tc.compile)
    seconds = time.perf_counter() - t0
    best = None
    for cb in trainer.callbacks:
        if type(cb).__name__ == "ExportPretrained" and cb.best is not None:
            best = float(cb.best)
    result = StageBResult(
        run_dir=out_dir,
        monitor=monitor,
        best=best,
        metrics=dict(module.last_val_metrics),
        trainable_params=module.num_trainable,
        total_params=module.num_total,
        epochs_done=int(trainer.current_epoch),
        global_step=int(trainer.global_step),
        seconds=seconds,
    )
    if trainer.is_global_zero:
        write_json(
            out_dir / "metrics.json",
            {**asdict(result), "run_dir": str(out_dir), "trainable": config.trainable},
        )
    return result
