"""One entry point to every dataset reader: ``load_dataset(name, data_dir, subject, split, **options)``.

Data folders follow nilearn's convention: an explicit ``data_dir``, else ``$MINDVIS_DATA/<folder>``, else
``~/mindvis_data/<folder>``, where ``<folder>`` is the dataset's usual folder name (``GOD``, ``BOLD5000``,
``NSD``, ``nifti``, ``synthetic``; for GOD the original repository's ``Kamitani/npz`` is found as well).
``"synthetic"`` reads the GOD layout written by the simulator under ``<folder>/GOD``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from mindvis.data.dataset import FMRIDataset
from mindvis.data.formats.common import default_data_root
from mindvis.errors import ConfigError, DataError

DatasetName = Literal["god", "bold5000", "nsd", "nifti", "synthetic"]
DATASET_NAMES: tuple[str, ...] = ("god", "bold5000", "nsd", "nifti", "synthetic")
#: What the ``roi`` option of the GOD layout (``god``, ``synthetic``) is, for users: the help text of every
#: command's ``--roi`` (:func:`mindvis.commands._options.dataset_options`) and of the stage A configs' ``roi``.
GOD_ROI_HELP = "ROI mask key of the GOD layout, e.g. VC or V1 (default: VC)."

#: Folder names looked for under the data root, in order.
DEFAULT_FOLDERS: dict[str, tuple[str, ...]] = {
    "god": ("GOD", "god", "Kamitani/npz", "Kamitani"),
    "bold5000": ("BOLD5000", "bold5000"),
    "nsd": ("NSD", "nsd", "natural-scenes-dataset"),
    "nifti": ("nifti",),
    "synthetic": ("synthetic", "SYNTHETIC"),
}


def resolve_data_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder of dataset ``name``: ``data_dir`` itself when given, else found under the data root.

    For ``"synthetic"`` the GOD folder inside the simulator output is returned (``<dir>/GOD`` when present).
    """
    name = _check_name(name)
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
    else:
        root = default_data_root()
        cands = [root / sub for sub in DEFAULT_FOLDERS[name]]
        folder = next((c for c in cands if c.exists()), cands[0])
    if name == "synthetic" and (folder / "GOD").is_dir():
        folder = folder / "GOD"
    if not folder.exists():
        hint = "" if data_dir is not None else " (set --data-dir or the MINDVIS_DATA environment variable)"
        raise DataError(f"{name} data folder not found{hint}", path=folder)
    return folder


def _check_name(name: str) -> str:
    key = str(name).lower()
    if key not in DATASET_NAMES:
        raise ConfigError(
            f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}", field="dataset"
        )
    return key


def _god(folder: Path, subject: str | None, split: str, **options: Any) -> FMRIDataset:
    from mindvis.data.formats.god import list_god_subjects, load_god

    if subject is None:
        subs = list_god_subjects(folder)
        if not subs:
            raise DataError("no sbj_N.npz files", path=folder, field="subject")
        subject = subs[0]
    return load_god(folder, subject=subject, split=split, **options)  # type: ignore[arg-type]


def _bold5000(folder: Path, subject: str | None, split: str, **options: Any) -> FMRIDataset:
    from mindvis.data.formats.bold5000 import load_bold5000

    return load_bold5000(folder, subject=subject or "CSI1", split=split, **options)  # type: ignore[arg-type]


def _nsd(folder: Path, subject: str | None, split: str, **options: Any) -> FMRIDataset:
    from mindvis.data.formats.nsd import load_nsd

    return load_nsd(folder, subject=subject or "subj01", split=split, **options)  # type: ignore[arg-type]


def _nifti(folder: Path, subject: str | None, split: str, **options: Any) -> FMRIDataset:
    from mindvis.data.formats.nifti import load_nifti_dataset

    return load_nifti_dataset(folder, subject=subject, split=split, **options)  # type: ignore[arg-type]


_LOADERS: dict[str, Callable[..., FMRIDataset]] = {
    "god": _god,
    "synthetic": _god,
    "bold5000": _bold5000,
    "nsd": _nsd,
    "nifti": _nifti,
}


def load_dataset(
    name: DatasetName | str,
    data_dir: str | os.PathLike | None = None,
    subject: str | None = None,
    split: str = "train",
    **options: Any,
) -> FMRIDataset:
    """Load one subject and split of a dataset by format name.

    Args:
        name: ``"god"``, ``"bold5000"``, ``"nsd"``, ``"nifti"`` or ``"synthetic"``.
        data_dir: the dataset folder (see :func:`resolve_data_dir` for the default).
        subject: subject name in the dataset's own naming (``"sbj_3"``, ``"CSI1"``, ``"subj01"``...); default
            the first subject.
        split: ``"train"`` or ``"test"`` (GOD BData also ``"imagery"``).
        **options: passed to the format's reader (``roi``, ``average_test``, ``include_images``,
            ``nan_policy``...).
    """
    key = _check_name(name)
    if options.get("roi") is not None and key not in ("god", "synthetic"):
        raise ConfigError(
            f"an ROI mask applies to the GOD layout (god, synthetic), not to {key}; leave --roi out",
            field="roi",
        )
    folder = resolve_data_dir(key, data_dir)
    ds = _LOADERS[key](folder, subject, split, **options)
    if key == "synthetic":
        ds.meta["format"] = "synthetic"
    return ds


def list_subjects(name: DatasetName | str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Subject names available for dataset ``name`` in its folder."""
    key = _check_name(name)
    folder = resolve_data_dir(key, data_dir)
    if key in ("god", "synthetic"):
        from mindvis.data.formats.god import list_god_subjects

        return list_god_subjects(folder)
    if key == "bold5000":
        from mindvis.data.formats.bold5000 import list_bold5000_subjects

        return list_bold5000_subjects(folder)
    if key == "nsd":
        from mindvis.data.formats.nsd import list_nsd_subjects

        return list_nsd_subjects(folder)
    from mindvis.data.formats.nifti import list_nifti_subjects

    return list_nifti_subjects(folder)
