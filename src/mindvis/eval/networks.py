"""Metrics computed with pretrained networks, only ever from local weight files.

- NSD-style feature metrics (MindEye, Brain-Diffuser, Takagi & Nishimoto conventions):

  ==============  ======================  =====================  ================================
  metric          network (torchvision)   layer                  score
  ==============  ======================  =====================  ================================
  AlexNet(2)      alexnet                 ``features.4``, 256px  2-way identification (feature r)
  AlexNet(5)      alexnet                 ``features.11``, 256px 2-way identification (feature r)
  Inception       inception_v3            ``avgpool``, 342px     2-way identification (feature r)
  EffNet-B        efficientnet_b1         ``avgpool``, 255px     mean correlation distance (lower)
  SwAV            resnet50 (SwAV weights) ``avgpool``, 224px     mean correlation distance (lower)
  CLIP            ViT-L/14                final embedding        not supported offline (reported)
  ==============  ======================  =====================  ================================

  Inputs are resized (antialiased bilinear) and normalised with the ImageNet mean and std.
- LPIPS (Zhang et al., CVPR 2018), AlexNet variant: AlexNet backbone weights from a local file, the
  LPIPS v0.1 linear calibration weights shipped inside torchmetrics. The pairwise tensor ``[N, S, N]`` is
  computed from per-image normalised features with one matrix product per layer.

:class:`MetricWeights` collects the local files; :meth:`MetricWeights.discover` looks in a folder, in
``$MINDVIS_WEIGHTS_DIR`` and in torch's hub checkpoint cache for the usual file names. Nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np

from mindvis.errors import CheckpointError, MindVisError, WeightsUnavailable
from mindvis.eval.classifier import load_state_dict_file
from mindvis.eval.metrics import feature_corr_matrix, two_way_identification
from mindvis.safeload import load_state_dict
from mindvis.utils.images import to_float_resized

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# file-name patterns of the usual public weight files, searched by MetricWeights.discover
_PATTERNS: dict[str, tuple[str, ...]] = {
    "inception_fid": ("pt_inception-2015-12-05*.pth", "weights-inception-2015-12-05*.pth"),
    "alexnet": ("alexnet-owt-*.pth", "alexnet*.pth", "alexnet*.safetensors"),
    "inception_v3": ("inception_v3_google-*.pth", "inception_v3*.safetensors"),
    "efficientnet_b1": ("efficientnet_b1*.pth", "efficientnet_b1*.safetensors"),
    "swav": ("swav_800ep_pretrain.pth.tar", "swav*.pth*", "swav*.safetensors"),
    "clip": ("ViT-L-14*.pt",),
}


@dataclass
class MetricWeights:
    """Local weight files for the network-based metrics (None: that metric is unavailable)."""

    inception_fid: Path | None = None
    alexnet: Path | None = None
    inception_v3: Path | None = None
    efficientnet_b1: Path | None = None
    swav: Path | None = None
    clip: Path | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                setattr(self, f.name, Path(v))

    @classmethod
    def discover(cls, folder: str | Path | None = None, **explicit: str | Path | None) -> MetricWeights:
        """Explicit paths first, then files with the usual names in ``folder``, ``$MINDVIS_WEIGHTS_DIR``
        and ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``)."""
        dirs = [Path(folder)] if folder else []
        if os.environ.get("MINDVIS_WEIGHTS_DIR"):
            dirs.append(Path(os.environ["MINDVIS_WEIGHTS_DIR"]))
        torch_home = os.environ.get("TORCH_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
        )
        dirs.append(Path(torch_home) / "hub" / "checkpoints")
        found: dict[str, Path | None] = {}
        for name, patterns in _PATTERNS.items():
            if explicit.get(name) is not None:
                found[name] = Path(explicit[name])  # type: ignore[arg-type]
                continue
            found[name] = None
            for d in dirs:
                hits = sorted(p for pat in patterns for p in d.glob(pat)) if d.is_dir() else []
                if hits:
                    found[name] = hits[0]
                    logger.info("using %s weights %s", name, hits[0])
                    break
        return cls(**found)

    def as_dict(self) -> dict[str, str | None]:
        return {
            f.name: None if getattr(self, f.name) is None else str(getattr(self, f.name))
            for f in fields(self)
        }


@dataclass(frozen=True)
class NetMetricSpec:
    """One NSD-style network metric."""

    key: str
    label: str
    weights: str  # MetricWeights field
    arch: str
    layer: str
    resize: int
    score: Literal["two_way", "distance"]


NSD_NET_METRICS: tuple[NetMetricSpec, ...] = (
    NetMetricSpec("nsd_alexnet2", "AlexNet(2)", "alexnet", "alexnet", "features.4", 256, "two_way"),
    NetMetricSpec("nsd_alexnet5", "AlexNet(5)", "alexnet", "alexnet", "features.11", 256, "two_way"),
    NetMetricSpec("nsd_inception", "Inception", "inception_v3", "inception_v3", "avgpool", 342, "two_way"),
    NetMetricSpec("nsd_effnet", "EffNet-B", "efficientnet_b1", "efficientnet_b1", "avgpool", 255, "distance"),
    NetMetricSpec("nsd_swav", "SwAV", "swav", "resnet50", "avgpool", 224, "distance"),
)


def _load_torchvision_backbone(arch: str, weights_path: Path):
    """A torchvision model with weights from a local file (SwAV/DDP prefixes and heads are tolerated)."""
    from torchvision.models import get_model_builder

    sd = load_state_dict_file(weights_path)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    kwargs = (
        {"aux_logits": any(k.startswith("AuxLogits.") for k in sd), "init_weights": False}
        if arch == "inception_v3"
        else {}
    )
    model = get_model_builder(arch)(weights=None, **kwargs)
    own = model.state_dict()
    if arch == "resnet50":  # SwAV checkpoints carry a projection head and prototypes but no fc
        sd = {k: v for k, v in sd.items() if k in own}
        missing = [k for k in own if k not in sd and not k.startswith("fc.")]
        if missing:
            raise CheckpointError(f"not ResNet-50 weights: missing {missing[:3]}...", path=weights_path)
        sd = {**{k: own[k] for k in own if k.startswith("fc.") and k not in sd}, **sd}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"weights do not fit torchvision {arch}: {str(exc)[:300]}", path=weights_path
        ) from None
    return model.eval()


def _imagenet_input(images: np.ndarray, size: int):
    import torch

    x = to_float_resized(images, size)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def layer_features(model, layer: str, images: np.ndarray, size: int, batch_size: int = 32) -> np.ndarray:
    """Flattened activations of module ``layer`` for ``images: [B, H, W, 3]`` -> ``[B, D]``."""
    import torch

    modules = dict(model.named_modules())
    if layer not in modules:
        raise CheckpointError(f"model has no layer {layer!r}")
    captured: list = []
    handle = modules[layer].register_forward_hook(lambda _m, _i, out: captured.append(out.flatten(1).clone()))
    try:
        out = []
        with torch.no_grad():
            for a in range(0, len(images), batch_size):
                captured.clear()
                model(_imagenet_input(images[a : a + batch_size], size))
                out.append(captured[-1].double().numpy())
    finally:
        handle.remove()
    return np.concatenate(out)


def nsd_network_scores(recons: np.ndarray, gt: np.ndarray, weights: MetricWeights) -> dict[str, dict]:
    """Per-reconstruction scores ``[N, S]`` of each NSD network metric that has local weights.

    Returns:
        ``{key: {"values": [N, S] or None, "spec": NetMetricSpec, "reason": str | None}}``; ``values`` is
        None (with a reason) when weights are missing.
    """
    n, s = recons.shape[:2]
    out: dict[str, dict] = {}
    models: dict[str, object] = {}
    for spec in NSD_NET_METRICS:
        path = getattr(weights, spec.weights)
        if path is None:
            out[spec.key] = {
                "values": None,
                "spec": spec,
                "reason": f"no weights: {spec.arch} (pass --{spec.weights.replace('_', '-')}-weights)",
            }
            continue
        if not Path(path).is_file():
            out[spec.key] = {"values": None, "spec": spec, "reason": f"no weights: {path} not found"}
            continue
        if spec.weights not in models:
            models[spec.weights] = _load_torchvision_backbone(spec.arch, Path(path))
        model = models[spec.weights]
        fg = layer_features(model, spec.layer, gt, spec.resize)
        fr = layer_features(model, spec.layer, recons.reshape((n * s,) + recons.shape[2:]), spec.resize)
        sim = feature_corr_matrix(fr.reshape(n, s, -1), fg)
        if spec.score == "two_way":
            values = two_way_identification(sim)
        else:
            values = 1.0 - sim[np.arange(n), :, np.arange(n)]
        out[spec.key] = {"values": values, "spec": spec, "reason": None}
    out["nsd_clip"] = {
        "values": None,
        "spec": NetMetricSpec("nsd_clip", "CLIP", "clip", "ViT-L/14", "final", 224, "two_way"),
        "reason": "no weights: CLIP ViT-L/14 is not supported offline by mindvis (needs the CLIP package "
        "and its checkpoint)",
    }
    return out


class LPIPSAlex:
    """LPIPS with an AlexNet backbone from a local file and the LPIPS v0.1 linear weights from torchmetrics."""

    LAYERS = (1, 4, 7, 9, 11)  # relu1..relu5 inside alexnet.features

    def __init__(self, alexnet_weights: str | Path):
        import torch

        self.backbone = _load_torchvision_backbone("alexnet", Path(alexnet_weights)).features
        try:
            import torchmetrics.functional.image.lpips as tm_lpips

            lin_path = Path(tm_lpips.__file__).parent / "lpips_models" / "alex.pth"
            lin = load_state_dict(lin_path)
            self.lin = [lin[f"lin{i}.model.1.weight"].flatten().double() for i in range(5)]
        except (ImportError, MindVisError, KeyError, AttributeError) as exc:
            raise WeightsUnavailable(
                f"no weights: LPIPS linear layers not found in torchmetrics ({exc})"
            ) from None
        self.shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        self.scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def _features(self, images: np.ndarray, batch_size: int = 64) -> list:
        """Unit-normalised (over channels) relu1..5 features of ``[B, H, W, 3]`` uint8, float64."""
        import torch

        feats: list[list] = [[] for _ in self.LAYERS]
        with torch.no_grad():
            for a in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[a : a + batch_size])).permute(0, 3, 1, 2)
                x = (x.float() / 127.5 - 1.0 - self.shift) / self.scale
                for i, layer in enumerate(self.backbone):
                    x = layer(x)
                    if i in self.LAYERS:
                        f = x.double()
                        f = f / torch.sqrt(1e-10 + (f * f).sum(dim=1, keepdim=True))
                        feats[self.LAYERS.index(i)].append(f)
                    if i >= self.LAYERS[-1]:
                        break
        return [torch.cat(f) for f in feats]

    def matrix(self, recons: np.ndarray, gt: np.ndarray) -> np.ndarray:
        """LPIPS distance of every reconstruction to every ground truth, ``[N, S, N]`` (lower = closer).

        ``recons`` must already have the ground truth's resolution.
        """
        n, s = recons.shape[:2]
        fr = self._features(recons.reshape((n * s,) + recons.shape[2:]))
        fg = self._features(gt)
        total = np.zeros((n * s, n))
        for w, a, b in zip(self.lin, fr, fg, strict=True):
            hw = a.shape[2] * a.shape[3]
            wa = a * w.view(1, -1, 1, 1)
            sq_a = (wa * a).sum(dim=(1, 2, 3)) / hw
            sq_b = (b * b * w.view(1, -1, 1, 1)).sum(dim=(1, 2, 3)) / hw
            cross = wa.flatten(1) @ b.flatten(1).T / hw
            total += (sq_a[:, None] + sq_b[None, :] - 2.0 * cross).numpy()
        return np.maximum(total, 0.0).reshape(n, s, n)
