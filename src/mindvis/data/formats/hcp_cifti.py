"""HCP resting-state preprocessing for SC-MBM pretraining: CIFTI ``dtseries`` + a parcellation -> V1..V4 time series.

MinD-Vis pretrains its masked brain model on HCP resting-state fMRI restricted to early visual cortex, stored
per subject as ``HCP/npz/<subject>/HCP_visual_voxel.npz`` with keys ``V1``..``V4``, each ``[TRs, vertices]``.
This module makes those files from the HCP release:

* the subject's dense time series, ``<subject>/MNINonLinear/Results/rfMRI_REST1_LR/
  rfMRI_REST1_LR_Atlas_MSMAll.dtseries.nii`` (CIFTI-2; axis 0 = time, axis 1 = brain model columns over the
  left/right cortical surfaces, 32k mesh, medial wall excluded, plus subcortical voxels);
* a parcellation the user supplies as a CIFTI ``dlabel.nii`` on the same mesh, e.g. the Glasser et al. (2016)
  multimodal parcellation, whose label names are ``L_V1_ROI``, ``R_V1_ROI``, ... (any name ``[L_|R_]<area>[_ROI]``
  matches an area).

For each area the columns of the area's vertices are taken, left hemisphere first, in vertex order; the
time series is read in blocks of TRs, so memory stays near one block of the whole-brain series.
:func:`prepare_hcp` runs subjects in parallel processes, skips subjects whose output exists and reads
back, and writes each file atomically. The file layout (name, keys) and its reading for pretraining are those
of :mod:`mindvis.data.hcp`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mindvis.data.formats.common import check_nifti_image, reading
from mindvis.data.hcp import HCP_FILE, HCP_ROIS, hcp_shape
from mindvis.errors import DataError
from mindvis.utils.io import save_npz_atomic

_logger = logging.getLogger(__name__)

CORTEX = ("CIFTI_STRUCTURE_CORTEX_LEFT", "CIFTI_STRUCTURE_CORTEX_RIGHT")

#: Parcellation: area -> structure -> sorted vertex indices; plus structure -> mesh vertex count.
Parcellation = tuple[dict[str, dict[str, np.ndarray]], dict[str, int]]


def read_parcellation(path: str | os.PathLike, areas: tuple[str, ...] = HCP_ROIS) -> Parcellation:
    """Vertices of each area in a CIFTI ``dlabel.nii`` parcellation, per cortical structure.

    Raises:
        DataError: not a CIFTI label file, or an area has no label.
    """
    import nibabel as nib
    from nibabel import cifti2

    path = Path(path)
    if not path.is_file():
        raise DataError("parcellation file not found", path=path)
    try:
        img = nib.load(path)
        label_axis, bm_axis = img.header.get_axis(0), img.header.get_axis(1)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for foreign files
        raise DataError(f"not a CIFTI-2 label file ({type(exc).__name__}: {exc})", path=path) from None
    if not isinstance(label_axis, cifti2.LabelAxis) or not isinstance(bm_axis, cifti2.BrainModelAxis):
        raise DataError(
            "expected a CIFTI dlabel file (label axis x brain model axis)", path=path, field="axes"
        )
    check_nifti_image(img, path=path, field="labels")
    with reading(path, "labels", "CIFTI label file"):
        labels = np.asarray(img.dataobj[0])
    if not np.isfinite(labels).all() or labels.size != len(bm_axis):
        raise DataError(
            f"expected {len(bm_axis)} finite label keys, got {labels.size}", path=path, field="labels"
        )
    labels = labels.astype(np.int64).reshape(-1)
    table = label_axis.label[0]
    out: dict[str, dict[str, np.ndarray]] = {}
    for area in areas:
        pat = re.compile(rf"^(?:[LR]_)?{re.escape(area)}(?:_ROI)?$")
        keys = [k for k, (name, _rgba) in table.items() if pat.match(str(name))]
        if not keys:
            names = sorted(str(n) for n, _ in table.values())
            raise DataError(
                f"no label for area {area!r} (labels: {names[:8]}{'...' if len(names) > 8 else ''})",
                path=path,
                field=area,
            )
        hit = np.isin(labels, keys)
        per: dict[str, np.ndarray] = {}
        for name, slc, bm in bm_axis.iter_structures():
            if name in CORTEX and bm.vertex is not None:
                v = np.sort(bm.vertex[hit[slc]])
                if len(v):
                    per[name] = v
        out[area] = per
    nverts = {k: int(v) for k, v in bm_axis.nvertices.items()}
    return out, nverts


def area_columns(dtseries_axis, parcellation: Parcellation, path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Column indices of each area in a dtseries brain model axis (left hemisphere first).

    Raises:
        DataError: the meshes differ, or an area has no vertex in the time series.
    """
    areas, nverts = parcellation
    col_of: dict[str, dict[int, int]] = {}
    for name, slc, bm in dtseries_axis.iter_structures():
        if name in CORTEX and bm.vertex is not None:
            want = nverts.get(name)
            have = int(dtseries_axis.nvertices[name])
            if want is not None and want != have:
                raise DataError(
                    f"parcellation mesh of {name} has {want} vertices but the time series' mesh has {have}",
                    path=path,
                    field=name,
                )
            start = slc.start or 0
            col_of[name] = {int(v): start + i for i, v in enumerate(bm.vertex)}
    out = {}
    for area, per in areas.items():
        cols = []
        for name in CORTEX:
            lookup = col_of.get(name, {})
            cols.extend(lookup[int(v)] for v in per.get(name, ()) if int(v) in lookup)
        if not cols:
            raise DataError(f"area {area} has no vertex in the time series", path=path, field=area)
        out[area] = np.asarray(cols, dtype=np.int64)
    return out


def extract_areas(
    dtseries: str | os.PathLike, parcellation: Parcellation, block_trs: int = 100
) -> dict[str, np.ndarray]:
    """``{area: [TRs, vertices] float32}`` from one CIFTI dtseries, read in blocks of ``block_trs`` TRs."""
    import nibabel as nib
    from nibabel import cifti2

    path = Path(dtseries)
    try:
        img = nib.load(path)
        series, bm = img.header.get_axis(0), img.header.get_axis(1)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"not a CIFTI-2 file ({type(exc).__name__}: {exc})", path=path) from None
    if not isinstance(series, cifti2.SeriesAxis) or not isinstance(bm, cifti2.BrainModelAxis):
        raise DataError(
            "expected a dense time series (series axis x brain model axis)", path=path, field="axes"
        )
    check_nifti_image(img, path=path, field="series")
    cols = area_columns(bm, parcellation, path)
    n_tr = img.shape[0]
    if len(img.shape) != 2 or img.shape[1] != len(bm):
        raise DataError(
            f"data shape {img.shape} does not match the {len(bm)} brain model columns",
            path=path,
            field="series",
        )
    out = {a: np.empty((n_tr, len(c)), dtype=np.float32) for a, c in cols.items()}
    for i in range(0, n_tr, block_trs):
        with reading(path, "series", "CIFTI time series"):
            block = np.asarray(img.dataobj[i : i + block_trs], dtype=np.float32)
        for a, c in cols.items():
            out[a][i : i + block_trs] = block[:, c]
    return out


def _output_ok(path: Path, areas: tuple[str, ...]) -> bool:
    """True if ``path`` is a readable subject file with every area (checked from the array headers)."""
    try:
        hcp_shape(path, areas)
    except DataError:  # anything unreadable or incomplete is redone
        return False
    return True


def _prepare_one(
    subject: str, dtseries: str, parcellation: Parcellation, out_path: str, areas: tuple[str, ...]
) -> tuple[str, str]:
    data = extract_areas(dtseries, parcellation)
    save_npz_atomic(out_path, **{a: data[a] for a in areas})
    return subject, f"{next(iter(data.values())).shape[0]} TRs, " + ", ".join(
        f"{a} {data[a].shape[1]}" for a in areas
    )


def find_hcp_runs(src: str | os.PathLike, run: str = "rfMRI_REST1_LR") -> dict[str, Path]:
    """Subject -> dtseries file under ``src``.

    ``src`` may hold HCP subject folders (``<subject>/MNINonLinear/Results/<run>/<run>_Atlas*.dtseries.nii``,
    found anywhere below the subject folder; ``_Atlas_MSMAll`` preferred over ``_Atlas``) or flat files
    ``<subject>_*.dtseries.nii`` / ``<subject>.dtseries.nii``.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError("HCP folder not found", path=src)

    def rank(p: Path) -> tuple[int, str]:
        return (0 if "MSMAll" in p.name else 1 if "_Atlas" in p.name else 2, p.name)

    found: dict[str, Path] = {}
    for sub in sorted(p for p in src.iterdir() if p.is_dir()):
        cands = sorted(sub.rglob(f"{run}*.dtseries.nii")) or sorted(sub.rglob("*.dtseries.nii"))
        if cands:
            found[sub.name] = min(cands, key=rank)
    for f in sorted(src.glob("*.dtseries.nii")):
        subject = re.split(r"[._]", f.name, maxsplit=1)[0]
        found.setdefault(subject, f)
    return found


@dataclass
class PrepareReport:
    """What :func:`prepare_hcp` did: subjects written, skipped (already done) and failed (with the reason)."""

    done: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def prepare_hcp(
    src: str | os.PathLike,
    parcellation: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    areas: tuple[str, ...] = HCP_ROIS,
    run: str = "rfMRI_REST1_LR",
    workers: int = 1,
    overwrite: bool = False,
    subjects: list[str] | None = None,
    progress: Callable[[str, str], None] | None = None,
) -> PrepareReport:
    """Write ``<out_dir>/<subject>/HCP_visual_voxel.npz`` for every subject under ``src``.

    Args:
        src: HCP folder (see :func:`find_hcp_runs`).
        parcellation: CIFTI ``dlabel.nii`` with the areas' labels (the user supplies the Glasser file).
        out_dir: output root.
        areas: area names to extract, each becoming one key.
        workers: parallel processes (1 = in this process).
        overwrite: redo subjects whose output already exists.
        subjects: only these subjects.
        progress: called as ``progress(subject, status)`` with status ``"done"``, ``"skipped"`` or
            ``"failed: ..."`` after each subject.

    Returns:
        :class:`PrepareReport`. A failing subject does not stop the others.
    """
    parc = read_parcellation(parcellation, areas)
    runs = find_hcp_runs(src, run)
    if subjects is not None:
        missing = [s for s in subjects if s not in runs]
        if missing:
            raise DataError(f"no dtseries for subject(s) {missing}", path=src, field="subjects")
        runs = {s: runs[s] for s in subjects}
    if not runs:
        raise DataError(f"no *.dtseries.nii found (run {run!r})", path=src)
    out_dir = Path(out_dir)
    report = PrepareReport()
    todo = []
    for subject, f in runs.items():
        target = out_dir / subject / HCP_FILE
        if not overwrite and target.is_file() and _output_ok(target, areas):
            report.skipped.append(subject)
            if progress:
                progress(subject, "skipped")
        else:
            todo.append((subject, str(f), str(target)))

    def record(subject: str, result: str | None, error: str | None) -> None:
        if error is None:
            report.done[subject] = result or ""
            status = "done"
        else:
            report.failed[subject] = error
            status = f"failed: {error}"
            _logger.warning("HCP subject %s failed: %s", subject, error)
        if progress:
            progress(subject, status)

    if workers <= 1 or len(todo) <= 1:
        for subject, f, target in todo:
            try:
                record(*_prepare_one(subject, f, parc, target, areas), None)
            except DataError as exc:
                record(subject, None, str(exc))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_prepare_one, s, f, parc, t, areas): s for s, f, t in todo}
            for fut in as_completed(futures):
                subject = futures[fut]
                try:
                    record(*fut.result(), None)
                except Exception as exc:  # noqa: BLE001 - one bad subject must not stop thousands
                    record(
                        subject,
                        None,
                        f"{type(exc).__name__}: {exc}" if not isinstance(exc, DataError) else str(exc),
                    )
    return report
