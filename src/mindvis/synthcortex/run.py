"""Running SynthCortex: :func:`simulate` writes a whole run into a folder (GOD- and HCP-format fMRI, the
stimulus corpus and the manifest ``synthcortex.json``); :func:`calibration_report` recomputes the calibration
figures of a folder it wrote."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mindvis.errors import ConfigError, DataError
from mindvis.synthcortex.calibration import _calibrate
from mindvis.synthcortex.config import ROIS, SynthConfig
from mindvis.synthcortex.features import feature_maps
from mindvis.synthcortex.sessions import GodRun, run_god_subject
from mindvis.synthcortex.stimuli import make_stimuli
from mindvis.synthcortex.subject import _r
from mindvis.synthcortex.writer import (
    FORMAT_VERSION,
    MANIFEST,
    _open_permissions,
    _write_god_tables,
    _write_rest_subject,
    save_npz,
    write_corpus,
    write_json_compact,
)
from mindvis.utils.io import atomic_dir, prepare_output_dir, read_json

_logger = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


def simulate(
    config: SynthConfig,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    *,
    report: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Run SynthCortex and write the GOD, HCP and stimulus folders into ``out_dir``.

    Everything is written into a temporary folder beside ``out_dir`` and renamed when complete.

    Args:
        config: the run's parameters.
        out_dir: output folder (must not exist or be empty, unless ``overwrite``).
        report: also compute the calibration figures (:func:`calibration_report`) and write
            ``calibration.json``.
        progress: called as ``progress(message, fraction_done)``.
        workers: threads for the resting-state subjects (default: up to 2); the output does not depend on it.

    Returns:
        the manifest (also written as ``synthcortex.json``), with ``calibration`` when ``report``, and
        ``timings`` (wall and CPU seconds per stage; not written, so that files stay reproducible).

    Raises:
        OutputExistsError: ``out_dir`` exists and is not empty, without ``overwrite``.
        DataError: the stimulus source is missing.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    out_dir = Path(out_dir)
    prepare_output_dir(out_dir, overwrite=overwrite)
    if report and config.n_subjects < 1:
        raise ConfigError("the calibration report needs at least one target subject", field="n_subjects")

    def tell(msg: str, frac: float) -> None:
        _logger.debug("%s (%.0f%%)", msg, 100 * frac)
        if progress is not None:
            progress(msg, frac)

    tell("composing stimuli", 0.0)
    # load the sources first: a missing source fails before anything is written
    plan = make_stimuli(config, corpus=False)  # the corpus is streamed to its file below
    timings: dict[str, float] = {
        "stimuli_s": time.perf_counter() - t0,
        "stimuli_cpu_s": time.process_time() - c0,
    }
    w_target = 0.25 if config.n_subjects else 0.0
    w_rest = 0.6 if config.n_rest_subjects else 0.0
    scale = 0.9 / max(w_target + w_rest, 1e-9)
    w_target, w_rest = w_target * scale, w_rest * scale
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        god_dir, hcp_dir, stim_dir = tmp / "GOD", tmp / "HCP" / "npz", tmp / "stimuli"
        for d, needed in (
            (god_dir, config.n_subjects),
            (hcp_dir, config.n_rest_subjects),
            (stim_dir, config.corpus_size > 0),
        ):
            if needed:
                d.mkdir(parents=True, exist_ok=True)
        manifest: dict[str, Any] = {
            "format": "synthcortex",
            "version": FORMAT_VERSION,
            "config": config.to_dict(),
            "class_names": plan.class_names,
            "units": {
                "x_deg/y_deg": "degrees of visual angle, x right, y up, (0, 0) at the image centre",
                "field_deg": config.field_deg,
            },
            "subjects": {},
            "rest_subjects": {},
        }
        t1, c1 = time.perf_counter(), time.process_time()
        runs: list[GodRun] = []
        if config.n_subjects:
            tell("feature maps", 0.05)
            fm_train = feature_maps(plan.train.images, config.field_deg, config.seed)
            fm_test = feature_maps(plan.test.images, config.field_deg, config.seed)
            for k in range(1, config.n_subjects + 1):
                tell(f"target subject sbj_{k}", 0.1 + w_target * (k - 1) / config.n_subjects)
                run = run_god_subject(config, k, plan, fm_train, fm_test)
                masks = {r: run.subject.mask(r) for r in (*ROIS, "VC")}
                save_npz(
                    god_dir / f"sbj_{k}.npz",
                    arr_0=run.train,
                    arr_1=run.test_trials,
                    arr_2=run.test_avg,
                    arr_3=run.train_index,
                    arr_4=run.test_index,
                    arr_5=run.nc,
                    arr_6=run.ncsnr,
                    **masks,
                )
                gt = run.subject.ground_truth(plan.class_names)
                gt["snr"] = _r(run.true_snr, 4)
                gt["noise_ceiling"] = _r(run.true_nc, 4)
                gt["model_r2"] = _r(run.model_r2, 3)
                manifest["subjects"][f"sbj_{k}"] = {
                    "voxels": run.subject.num_voxels,
                    "roi_voxels": {r: int(masks[r].sum()) for r in ROIS},
                    "noise_ceiling_definition": f"fraction of variance of the {config.n_repeats}-repeat average "
                    "that is stimulus-driven: snr^2 / (snr^2 + 1/repeats)",
                    "voxel": gt,
                }
                runs.append(run)
            save_npz(
                god_dir / f"images_{config.resolution}.npz",
                train_images=plan.train.images,
                test_images=plan.test.images,
                train_labels=plan.train.labels,
                test_labels=plan.test.labels,
            )
            _write_god_tables(god_dir, plan)
        timings["target_s"], timings["target_cpu_s"] = time.perf_counter() - t1, time.process_time() - c1
        t2, c2 = time.perf_counter(), time.process_time()
        n_rest = config.n_rest_subjects
        n_workers = max(1, min(workers if workers is not None else min(2, os.cpu_count() or 1), n_rest or 1))
        pool = ThreadPoolExecutor(n_workers)
        try:
            jobs = [pool.submit(_write_rest_subject, config, s, hcp_dir) for s in range(1, n_rest + 1)]
            for i, job in enumerate(jobs):
                name, entry = job.result()
                manifest["rest_subjects"][name] = entry
                tell(f"resting-state subject {i + 1}/{n_rest}", 0.1 + w_target + w_rest * (i + 1) / n_rest)
        finally:
            # on an error or Ctrl-C, drop the queued subjects instead of simulating them all first
            pool.shutdown(wait=True, cancel_futures=True)
        timings["rest_s"], timings["rest_cpu_s"] = time.perf_counter() - t2, time.process_time() - c2
        tell("writing the stimulus corpus", 0.92)
        if config.corpus_size > 0:
            t4 = time.perf_counter()
            write_corpus(config, plan.train.object_index, stim_dir / "corpus.npz", plan.class_names)
            timings["corpus_s"] = time.perf_counter() - t4
        manifest["rest_networks"] = {
            "definition": "network k < bands: eccentricity band k, lower field (dorsal); k >= bands: band "
            "k - bands, upper field (ventral); each voxel is listed with its strongest network",
            "bands": config.rest_ecc_bands,
        }
        write_json_compact(tmp / MANIFEST, manifest)
        if report:
            tell("calibration", 0.95)
            t3, c3 = time.perf_counter(), time.process_time()
            cal = _calibrate(config, plan, runs[0])
            timings["report_s"], timings["report_cpu_s"] = time.perf_counter() - t3, time.process_time() - c3
            write_json_compact(tmp / "calibration.json", cal)
            manifest["calibration"] = cal
        _open_permissions(tmp)
        timings["total_s"], timings["total_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    _logger.info(
        "SynthCortex written to %s in %.1f s (%s)",
        out_dir,
        timings["total_s"],
        ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
    )
    tell("done", 1.0)
    manifest["timings"] = timings
    return manifest


def calibration_report(out_dir: str | os.PathLike, subject: int = 1, write: bool = True) -> dict[str, Any]:
    """Calibration figures of a SynthCortex folder, checkable against published real data.

    The subject and stimuli are regenerated from the manifest's config (the run is deterministic; the
    regenerated training fMRI is checked against ``GOD/sbj_<subject>.npz``). Reports:

    * the distribution of voxel noise ceilings (estimated from the test repeats, and the true ones);
    * identification of 120 novel images from 13-repeat averages and from single trials with the TRUE
      encoding model (Kay et al. 2008: 92 % / 72 % averaged, 51 % / 32 % single trial, subjects S1 / S2);
    * a ridge decoder (voxels -> pixels) trained on the training trials, with its identification accuracy
      among the test images from the averaged test fMRI, and a linear class decoder.

    Args:
        out_dir: a folder written by :func:`simulate`.
        subject: which ``sbj_<subject>`` to calibrate.
        write: also write ``calibration.json`` into ``out_dir``.
    """
    out_dir = Path(out_dir)
    man = read_json(out_dir / MANIFEST)
    if not isinstance(man, dict) or man.get("format") != "synthcortex":
        raise DataError("not a SynthCortex manifest", path=out_dir / MANIFEST)
    config = SynthConfig.from_dict(man["config"])
    if not 1 <= subject <= config.n_subjects:
        raise ConfigError(
            f"subject must be between 1 and {config.n_subjects}, got {subject}", field="subject"
        )
    plan = make_stimuli(config, corpus=False)
    fm_train = feature_maps(plan.train.images, config.field_deg, config.seed)
    fm_test = feature_maps(plan.test.images, config.field_deg, config.seed)
    run = run_god_subject(config, subject, plan, fm_train, fm_test)
    path = out_dir / "GOD" / f"sbj_{subject}.npz"
    with np.load(path) as npz:
        if npz["arr_0"].shape != run.train.shape or not np.array_equal(npz["arr_0"], run.train):
            raise DataError(
                "arr_0 differs from the simulation the manifest describes (edited files, or another "
                "mindvis version)",
                path=path,
                field="arr_0",
            )
    cal = _calibrate(config, plan, run)
    if write:
        write_json_compact(out_dir / "calibration.json", cal)
    return cal
