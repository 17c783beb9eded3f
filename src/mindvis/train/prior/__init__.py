"""Training the image prior of stage B: a VQ autoencoder, then a class-conditional latent diffusion UNet.

MinD-Vis starts stage B from the CompVis "label2img" latent diffusion model (Rombach et al., CVPR 2022): a VQ-f4
autoencoder (VQGAN-style training, Esser et al., CVPR 2021) and a UNet that denoises the autoencoder's latents
with a class embedding as cross-attention context. Those weights are ImageNet-trained and not available
offline, so mindvis trains both halves on an image corpus:

1. :class:`VQAutoencoderModule` trains a diffusers ``VQModel`` with a reconstruction loss (L1 or L2), the
   codebook term ``|sg[h] - e|^2`` and the commitment term ``beta |h - sg[e]|^2``, optionally an LPIPS
   perceptual term (only with locally available backbone weights) and a patch-GAN hinge loss with the
   adaptive weight of VQGAN. Codebook usage (perplexity, dead codes) is logged; dead codes can be
   re-initialised from encoder outputs.
2. :class:`ClassPriorModule` trains a ``UNet2DConditionModel`` with epsilon prediction on the frozen VQ's
   pre-quantisation latents (scale factor 1, as the original), conditioned on a class embedding
   ``[B, 1, C]`` as cross-attention context, optionally with an EMA of the weights.

The modules, each importing only those listed before it:

- :mod:`~mindvis.train.prior.corpus`: :class:`ImageCorpus`, :func:`load_image_corpus`, :class:`ImageLabelDataset`;
- :mod:`~mindvis.train.prior.losses`: :class:`LocalLPIPS`, :class:`PatchDiscriminator`;
- :mod:`~mindvis.train.prior.model`: :func:`build_class_prior`,
  :func:`sample_class_grid`, :func:`save_prior_pipeline`;
- :mod:`~mindvis.train.prior.evaluate`: :func:`psnr_ssim`, :func:`codebook_usage`, :func:`evaluate_vq`,
  :func:`class_sample_accuracy`, :func:`classifier_callable`;
- :mod:`~mindvis.train.prior.vq`: :class:`VQAutoencoderModule` (its settings: :class:`mindvis.train.config.VQTrainConfig`);
- :mod:`~mindvis.train.prior.unet` (settings: :class:`mindvis.train.config.UNetTrainConfig`): :class:`LatentLabelDataset`, :func:`encode_corpus`,
  :class:`ClassPriorModule`;
- :mod:`~mindvis.train.prior.run`: :func:`train_prior`, the whole run (its settings: :class:`mindvis.train.config.PriorTrainConfig`), and
  :func:`run_train_prior`, the same from a corpus on disk.

The conversions between uint8 images and the model's ``[-1, 1]`` tensors, the grids and the PNG files are in
:mod:`mindvis.utils.images`.
"""

from mindvis.train.config import PriorTrainConfig, warn_instance_norm
from mindvis.train.prior.corpus import ImageCorpus, ImageLabelDataset, load_image_corpus
from mindvis.train.prior.evaluate import (
    class_sample_accuracy,
    classifier_callable,
    codebook_usage,
    evaluate_vq,
    psnr_ssim,
)
from mindvis.train.prior.losses import LocalLPIPS, PatchDiscriminator
from mindvis.train.prior.model import (
    build_class_prior,
    sample_class_grid,
    save_prior_pipeline,
)
from mindvis.train.prior.run import resolve_corpus_path, run_train_prior, train_prior
from mindvis.train.prior.unet import ClassPriorModule, LatentLabelDataset, encode_corpus
from mindvis.train.prior.vq import VQAutoencoderModule

__all__ = [
    "ClassPriorModule",
    "ImageCorpus",
    "ImageLabelDataset",
    "LatentLabelDataset",
    "LocalLPIPS",
    "PatchDiscriminator",
    "PriorTrainConfig",
    "VQAutoencoderModule",
    "build_class_prior",
    "class_sample_accuracy",
    "classifier_callable",
    "codebook_usage",
    "encode_corpus",
    "evaluate_vq",
    "load_image_corpus",
    "psnr_ssim",
    "resolve_corpus_path",
    "run_train_prior",
    "sample_class_grid",
    "save_prior_pipeline",
    "train_prior",
    "warn_instance_norm",
]
