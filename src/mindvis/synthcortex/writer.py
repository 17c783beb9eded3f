"""SynthCortex's files (their layout is in ``docs/synthcortex.md``): byte-reproducible ``.npz`` and JSON,
the GOD label tables, a resting-state subject's HCP file, and the stimulus corpus streamed to disk."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from mindvis.synthcortex.config import _REST, SynthConfig
from mindvis.synthcortex.sessions import rest_timeseries
from mindvis.synthcortex.stimuli import StimulusPlan, corpus_reuses_objects, make_corpus
from mindvis.synthcortex.subject import sample_subject
from mindvis.utils.io import atomic_write, save_npz_atomic

FORMAT_VERSION = 1
MANIFEST = "synthcortex.json"


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write an uncompressed ``.npz`` atomically and byte-reproducibly (fixed zip timestamps, no pickle)."""
    save_npz_atomic(path, **arrays)


def _json_dumps(obj: Any, indent: int = 0) -> str:
    """JSON with nested objects indented and flat lists of numbers/strings kept on one line."""
    pad = "  " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad}{json.dumps(str(k))}: {_json_dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(obj, (list, tuple)):
        if any(isinstance(v, (dict, list, tuple)) for v in obj):
            return (
                "[\n" + ",\n".join(pad + _json_dumps(v, indent + 1) for v in obj) + "\n" + "  " * indent + "]"
            )
        return json.dumps(list(obj), separators=(",", ":"))
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "null"
    return json.dumps(obj)


def write_json_compact(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(_json_dumps(obj) + "\n")


def god_label(class_id: int, number: int) -> str:
    """GOD stimulus label ``<category>.<image>`` of a SynthCortex image (category = pseudo WordNet offset)."""
    return f"{WNID_BASE + class_id}.{number:06d}"


#: Class ``k`` is written as the pseudo WordNet id ``n{90000000 + k}`` (real WordNet offsets start with 0).
WNID_BASE = 90_000_000


def _write_god_tables(folder: Path, plan: StimulusPlan) -> None:
    index = {str(k): [f"n{WNID_BASE + k:08d}", name] for k, name in enumerate(plan.class_names)}
    with atomic_write(folder / "imagenet_class_index.json", "w") as fh:
        json.dump(index, fh, indent=1)
        fh.write("\n")
    for split, s in (("training", plan.train), ("testing", plan.test)):
        buf = io.StringIO()
        wr = csv.writer(buf, lineterminator="\n")
        for i, c in enumerate(s.labels.tolist()):
            wr.writerow([god_label(c, i + 1), f"n{WNID_BASE + c:08d}_{i + 1}.png"])
        with atomic_write(folder / f"imagenet_{split}_label.csv", "w") as fh:
            fh.write(buf.getvalue())


def _write_rest_subject(config: SynthConfig, index: int, hcp_dir: Path) -> tuple[str, dict[str, Any]]:
    """Simulate and write one resting-state subject; returns its manifest entry."""
    subj = sample_subject(config, index, "rest")
    ts = rest_timeseries(config, subj, np.random.default_rng([config.seed, _REST, index, 1]))
    parts, start = {}, 0
    for ri, r in enumerate(subj.rois):
        m = int((subj.roi == ri).sum())
        parts[r] = np.ascontiguousarray(ts[:, start : start + m])
        start += m
    (hcp_dir / subj.name).mkdir()
    save_npz(hcp_dir / subj.name / "HCP_visual_voxel.npz", **parts)
    gt = subj.ground_truth()
    return subj.name, {
        "vertices": {r: int(p.shape[1]) for r, p in parts.items()},
        "voxel": {k: gt[k] for k in ("roi", "hemisphere", "x_deg", "y_deg", "sigma_deg", "network")},
    }


def _open_permissions(root: Path) -> None:
    """Give the finished folder the modes of ordinary new files (temporary files are created private)."""
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)


def write_corpus(config: SynthConfig, train_index: np.ndarray, path: Path, class_names: list[str]) -> None:
    """Render the corpus into a temporary ``.npy`` memmap beside ``path`` and stream it into the uncompressed
    ``.npz`` at ``path`` (``images``, ``labels``, ``class_names``, plus ``object_index`` when objects are
    reused): peak memory is one chunk of images, whatever the corpus size. Readers memory-map the images
    (:class:`mindvis.data.formats.common.NpzArchive`)."""
    scratch = path.with_name(f".{path.stem}-images.npy")
    shape = (config.corpus_size, config.resolution, config.resolution, 3)
    images = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=shape)
    try:
        corp = make_corpus(config, train_index, out=images)
        images.flush()
        extra = {"object_index": corp.object_index} if corpus_reuses_objects(config) else {}
        save_npz(path, images=images, labels=corp.labels, class_names=np.array(class_names), **extra)
    finally:
        del images
        scratch.unlink(missing_ok=True)
