"""Voxel preprocessing for masked brain modeling (MinD-Vis, Chen et al., CVPR 2023, section 3 and supplement).

The paper's recipe, each step an option of :class:`FMRIPreprocessor`:

1. non-finite values (NaN, Inf) are an error by default (``nan_policy``, see below);
2. normalisation with one global mean and standard deviation fitted on the training samples and applied
   unchanged to the test samples (``normalize="global"``); per-voxel z-scoring (``"voxel"``) and no
   normalisation (``"none"``) are the alternatives;
3. padding of the voxel vector to a multiple of the patch size by wrapping around to its first voxels
   (``pad_mode="wrap"``, the paper's best), by a constant (``"constant"``), or cutting the remainder
   (``"cut"``); ``pad_mode="original"`` is the original code's rule (see below);
4. padding (wrap, or constant with ``pad_mode="constant"``) or cropping to a common ``length``, so that
   subjects with different voxel counts share one model.

Two places where the original code (``dataset.py`` of github.com/zjc062/mind-vis) differs from our default,
each available as an option so that a model from an original checkpoint gets what the original fed it:

``pad_mode="original"`` (``pad_to_patch_size``): the original always appends ``p - V % p`` wrapped voxels,
    so a ROI whose ``V`` is already a multiple of ``p`` gets a whole extra patch (``V + p`` voxels; ours,
    ``"wrap"``, keeps ``V``), and it fits the normalisation statistics *after* padding, so the wrapped copies
    of the first voxels count twice in the global mean and std. A model from an original checkpoint trained
    on such a ROI has one patch more than ``"wrap"`` gives. Selected automatically by ``mindvis finetune``
    when ``--init`` is an original checkpoint or its voxel count is the original rule's (``--pad-mode auto``).

``test_normalize`` (how the *test* samples are normalised, ``transform(..., split="test")``):
    ``"train"`` (ours, the default): with the training statistics, like every other sample.
    ``"original"``: the original computes ``tr = normalize(pad(train))`` and then
    ``normalize(pad(test), np.mean(tr), np.std(tr))``: the test samples are normalised with the mean and std
    of the *already normalised* training samples, which are 0 and 1 up to rounding (for ``"global"``), so the
    test fMRI reaches the model essentially as stored (padded, not normalised). ``fit`` computes that mean
    and std exactly (``test_mean_``, ``test_std_``, saved in the JSON) and ``transform(x, split="test")``
    applies them; every other split gets the training statistics. ``mindvis finetune --a2-data original``
    and ``mindvis reconstruct`` with a converted original model use it.

The objects follow the scikit-learn contract: ``__init__`` only stores parameters, :meth:`~FMRIPreprocessor.fit`
sets the attributes ending in ``_``, and :meth:`~FMRIPreprocessor.transform` refuses to run before ``fit``.
A fitted preprocessor is saved as JSON (:meth:`~FMRIPreprocessor.save`) beside the checkpoints, so that later
stages apply exactly the same transform to new data.

``nan_policy`` (the ``--nan-policy`` option of the commands):
    ``"error"`` (default): any NaN or Inf raises :class:`~mindvis.errors.DataError` naming the source and
    the number of affected values and voxels.
    ``"zero"``: statistics are fitted on the finite values only, and non-finite values become 0 after
    normalisation (the training mean under ``"global"``/``"voxel"``).
    ``"drop"``: voxels holding a non-finite value anywhere in the fitting data are removed (their indices are
    kept in ``kept_voxels_`` and removed from every later input too); non-finite values that later inputs
    hold in the remaining voxels become 0 with a warning.

Arrays may be read-only memory maps of any size: fitting and transforming work in row blocks
(:mod:`mindvis.data.streaming`), so memory use is one block plus the output. The padding rules are those of
:mod:`mindvis.data.padding`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mindvis.data.dataset import FMRIDataset
from mindvis.data.padding import PAD_MODES, PadMode, pad_columns, padded_length
from mindvis.data.streaming import RunningMoments, row_blocks
from mindvis.errors import ConfigError, DataError
from mindvis.utils.io import read_json, write_json

_logger = logging.getLogger(__name__)

NormalizeMode = Literal["global", "voxel", "none"]
NanPolicy = Literal["error", "zero", "drop"]
TestNormalize = Literal["train", "original"]

NORMALIZE_MODES: tuple[str, ...] = ("global", "voxel", "none")
NAN_POLICIES: tuple[str, ...] = ("error", "zero", "drop")
#: How test samples are normalised: ``"train"`` (ours: the training statistics) or ``"original"`` (the
#: original code's: the mean and std of the normalised training samples; see the module documentation).
TEST_NORMALIZE_MODES: tuple[str, ...] = ("train", "original")

#: Version of the JSON layout written by :meth:`FMRIPreprocessor.to_dict` (2: ``test_normalize`` and the
#: ``"original"`` pad mode; version 1 files read as ``test_normalize="train"``).
FORMAT_VERSION = 2


class NotFittedError(ConfigError):
    """A preprocessor was used before :meth:`FMRIPreprocessor.fit`."""


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"expected one of {', '.join(choices)}, got {value!r}", field=name)


def _as_2d(x: np.ndarray, source: str | None) -> np.ndarray:
    if not hasattr(x, "ndim") or not hasattr(x, "shape"):
        x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(
            f"expected voxels [samples, voxels], got shape {tuple(x.shape)}", path=source, field="voxels"
        )
    if x.dtype.kind not in "fiu":
        raise DataError(f"expected numeric voxels, got dtype {x.dtype}", path=source, field="voxels")
    return x


class FMRIPreprocessor:
    """Normalise, pad to the patch size and align the length of fMRI voxel vectors.

    Args:
        normalize: ``"global"`` (one mean and std over all training values, the paper's default),
            ``"voxel"`` (z-score each voxel with its own training mean and std) or ``"none"``.
        patch_size: p; the output length is a multiple of it.
        pad_mode: ``"wrap"`` (repeat from the first voxel, the paper's default), ``"constant"`` (fill with
            ``pad_value``), ``"cut"`` (drop the last ``V mod p`` voxels) or ``"original"`` (the original code's:
            always append ``p - V mod p`` wrapped voxels, and fit the statistics after padding).
        pad_value: fill value for ``"constant"`` padding (after normalisation, so 0 is the training mean).
        length: common output length across subjects (a multiple of ``patch_size``). Shorter vectors are
            padded (wrap, or constant with ``pad_mode="constant"``), longer ones cropped (with a warning).
            ``None`` keeps the padded length of the fitting data.
        nan_policy: ``"error"``, ``"zero"`` or ``"drop"`` (see the module documentation).
        eps: standard deviations below this are treated as 1 (constant data is only centred).
        test_normalize: how :meth:`transform` normalises samples of ``split="test"``: ``"train"`` (ours: the
            training statistics, as every other split) or ``"original"`` (the original code's: the mean and
            std of the normalised, padded training samples, about 0 and 1, so test samples stay nearly as
            stored; see the module documentation).

    Attributes (set by :meth:`fit`):
        n_voxels_in_: V, voxels per sample of the fitting data.
        kept_voxels_: ``[V']`` int indices of the voxels kept under ``nan_policy="drop"``, else ``None``.
        mean_, std_: a float each (``"global"``), ``[V']`` arrays (``"voxel"``), or 0 and 1 (``"none"``).
        test_mean_, test_std_: with ``test_normalize="original"``, the global mean and std of the transformed
            training samples (before the common-length alignment), applied to test samples; else ``None``.
        n_voxels_out_: output length, a multiple of ``patch_size``.
        n_samples_seen_: number of samples the statistics came from.
    """

    def __init__(
        self,
        normalize: NormalizeMode = "global",
        patch_size: int = 16,
        pad_mode: PadMode = "wrap",
        pad_value: float = 0.0,
        length: int | None = None,
        nan_policy: NanPolicy = "error",
        eps: float = 1e-8,
        test_normalize: TestNormalize = "train",
    ):
        self.normalize = normalize
        self.patch_size = patch_size
        self.pad_mode = pad_mode
        self.pad_value = pad_value
        self.length = length
        self.nan_policy = nan_policy
        self.eps = eps
        self.test_normalize = test_normalize

    # -- parameters ------------------------------------------------------------------------------------------

    def get_params(self) -> dict[str, Any]:
        return {
            "normalize": self.normalize,
            "patch_size": self.patch_size,
            "pad_mode": self.pad_mode,
            "pad_value": self.pad_value,
            "length": self.length,
            "nan_policy": self.nan_policy,
            "eps": self.eps,
            "test_normalize": self.test_normalize,
        }

    def _validate_params(self) -> None:
        _check_choice("normalize", self.normalize, NORMALIZE_MODES)
        _check_choice("pad_mode", self.pad_mode, PAD_MODES)
        _check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        _check_choice("test_normalize", self.test_normalize, TEST_NORMALIZE_MODES)
        if isinstance(self.patch_size, bool) or not isinstance(self.patch_size, int) or self.patch_size < 1:
            raise ConfigError(f"expected a positive integer, got {self.patch_size!r}", field="patch_size")
        if self.length is not None:
            if (
                isinstance(self.length, bool)
                or not isinstance(self.length, int)
                or self.length < self.patch_size
            ):
                raise ConfigError(
                    f"expected an integer >= patch_size ({self.patch_size}), got {self.length!r}",
                    field="length",
                )
            if self.length % self.patch_size:
                raise ConfigError(
                    f"length {self.length} is not a multiple of patch_size {self.patch_size}", field="length"
                )
        if not math.isfinite(float(self.pad_value)):
            raise ConfigError(f"expected a finite number, got {self.pad_value!r}", field="pad_value")
        if not (float(self.eps) > 0):
            raise ConfigError(f"expected a positive number, got {self.eps!r}", field="eps")

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "n_voxels_out_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call fit() on training data first"
            )

    # -- fit / transform -------------------------------------------------------------------------------------

    def fit(self, x: np.ndarray | FMRIDataset, source: str | os.PathLike | None = None) -> FMRIPreprocessor:
        """Fit the normalisation statistics and output length on training samples.

        Args:
            x: ``[N, V]`` training voxels (any float dtype, possibly a memory map) or an FMRIDataset.
            source: file or name for error messages.

        Raises:
            DataError: non-finite values under ``nan_policy="error"``, fewer voxels than one patch, no samples.
        """
        self._validate_params()
        x, source = self._unwrap(x, source)
        n, v = x.shape
        if n == 0:
            raise DataError("no samples to fit the preprocessing on", path=source, field="voxels")
        kept = None
        if self.nan_policy == "drop":
            bad_cols = np.zeros(v, dtype=bool)
            for a, b in row_blocks(n):
                bad_cols |= ~np.isfinite(x[a:b]).all(axis=0)
            if bad_cols.any():
                kept = np.flatnonzero(~bad_cols)
                _logger.warning(
                    "%s: dropping %d of %d voxels holding NaN/Inf (nan_policy='drop')",
                    source or "voxels",
                    int(bad_cols.sum()),
                    v,
                )
                if not len(kept):
                    raise DataError("every voxel holds NaN/Inf; nothing left", path=source, field="voxels")
        elif self.nan_policy == "error":
            self._raise_if_nonfinite(x, source)
        v_kept = v if kept is None else len(kept)
        if v_kept < self.patch_size:
            raise DataError(
                f"{v_kept} voxels is fewer than one patch ({self.patch_size} voxels); the model needs at least "
                "one whole patch",
                path=source,
                field="voxels",
            )
        n_out = padded_length(v_kept, self.patch_size, self.pad_mode)
        if self.normalize == "none":
            mean, std = 0.0, 1.0
        else:
            moments = RunningMoments(per_column=self.normalize == "voxel")
            # the original fits one global mean/std on the padded vectors (wrapped voxels count twice);
            # per voxel, a wrapped copy has the statistics of its source voxel, so padding changes nothing
            after_padding = self.pad_mode == "original" and self.normalize == "global"
            for a, b in row_blocks(n):
                block = np.asarray(x[a:b] if kept is None else x[a:b][:, kept])
                if after_padding:
                    block = pad_columns(block, n_out, "wrap")
                finite = None if self.nan_policy == "error" else np.isfinite(block)
                if finite is not None and finite.all():
                    finite = None
                moments.update(block, finite)
            mean, std = moments.result()
            if self.normalize == "global":
                if not math.isfinite(std) or std < self.eps:
                    _logger.warning(
                        "%s: the training voxels are constant; only centring them", source or "voxels"
                    )
                    std = 1.0
            else:
                flat = ~np.isfinite(std) | (std < self.eps)
                if flat.any():
                    _logger.warning(
                        "%s: %d constant voxels are only centred", source or "voxels", int(flat.sum())
                    )
                std = np.where(flat, 1.0, std)
                mean = np.where(np.isfinite(mean), mean, 0.0)
        target = self.length if self.length is not None else n_out
        if target < n_out:
            _logger.warning(
                "%s: cropping %d padded voxels to the common length %d (the last %d are dropped)",
                source or "voxels",
                n_out,
                target,
                n_out - target,
            )
        self.n_voxels_in_ = int(v)
        self.kept_voxels_ = kept
        self.mean_ = mean
        self.std_ = std
        self.n_voxels_padded_ = int(n_out)
        self.n_voxels_out_ = int(target)
        self.n_samples_seen_ = int(n)
        self.test_mean_: float | None = None
        self.test_std_: float | None = None
        if self.test_normalize == "original":
            # the original: normalize(pad(test), np.mean(tr), np.std(tr)) with tr the normalised, padded
            # training samples (one subject, before the common-length padding)
            moments = RunningMoments(per_column=False)
            for a, b in row_blocks(n):
                block, _ = self._normalise_and_pad(np.asarray(x[a:b]), test=False)
                moments.update(block, None)
            t_mean, t_std = moments.result()
            if not math.isfinite(t_std) or t_std < self.eps:
                t_std = 1.0
            self.test_mean_, self.test_std_ = float(t_mean), float(t_std)
        return self

    def transform(
        self,
        x: np.ndarray | FMRIDataset,
        source: str | os.PathLike | None = None,
        out: np.ndarray | None = None,
        split: str = "train",
    ) -> np.ndarray:
        """Apply the fitted transform.

        Args:
            x: ``[N, V]`` voxels with the fitting data's V (possibly a memory map).
            source: file or name for error messages.
            out: optional ``[N, n_voxels_out_]`` float32 array (e.g. a slice of a memory map) to write into.
            split: the split ``x`` belongs to. ``"test"`` samples are normalised by the ``test_normalize``
                rule (with ``"original"``: by ``test_mean_`` and ``test_std_``); every other split, and every
                split under ``test_normalize="train"``, by the training statistics.

        Returns:
            ``[N, n_voxels_out_]`` float32 (``out`` when given).

        Raises:
            NotFittedError: :meth:`fit` was not called.
            DataError: wrong voxel count, or non-finite values under ``nan_policy="error"``.
        """
        self._check_fitted()
        x, source = self._unwrap(x, source)
        n, v = x.shape
        if v != self.n_voxels_in_:
            raise DataError(
                f"expected {self.n_voxels_in_} voxels per sample (as in the data the preprocessing was fitted on), "
                f"got {v}",
                path=source,
                field="voxels",
            )
        if out is None:
            out = np.empty((n, self.n_voxels_out_), dtype=np.float32)
        elif out.shape != (n, self.n_voxels_out_):
            raise DataError(f"output has shape {out.shape}, expected {(n, self.n_voxels_out_)}", field="out")
        if self.nan_policy == "error":
            self._raise_if_nonfinite(x, source)
        n_fixed = 0
        test = split == "test" and self.test_normalize == "original"
        for a, b in row_blocks(n):
            out[a:b], fixed = self._transform_block(np.asarray(x[a:b]), test)
            n_fixed += fixed
        if n_fixed:
            _logger.warning("%s: %d NaN/Inf values set to 0 after normalisation", source or "voxels", n_fixed)
        return out

    def fit_transform(
        self, x: np.ndarray | FMRIDataset, source: str | os.PathLike | None = None
    ) -> np.ndarray:
        """:meth:`fit` then :meth:`transform` on the same samples."""
        return self.fit(x, source).transform(x, source)

    def transform_dataset(self, dataset: FMRIDataset) -> FMRIDataset:
        """An FMRIDataset whose voxels are transformed (everything else is shared)."""
        return dataclasses.replace(
            dataset,
            voxels=self.transform(dataset, split=dataset.split),
            meta={**dataset.meta, "preprocessing": self.to_dict()},
        )

    def _transform_block(self, block: np.ndarray, test: bool = False) -> tuple[np.ndarray, int]:
        b, fixed = self._normalise_and_pad(block, test)
        if self.n_voxels_out_ != b.shape[1]:
            b = pad_columns(
                b, self.n_voxels_out_, "constant" if self.pad_mode == "constant" else "wrap", self.pad_value
            )
        return b, fixed

    def _normalise_and_pad(self, block: np.ndarray, test: bool) -> tuple[np.ndarray, int]:
        """Normalise (training statistics, or with ``test`` the test statistics) and pad to whole patches."""
        b = block if self.kept_voxels_ is None else block[:, self.kept_voxels_]
        b = b.astype(np.float32, copy=True)
        if test:
            b = ((b - float(self.test_mean_)) / float(self.test_std_)).astype(np.float32)  # type: ignore[arg-type]
        elif self.normalize != "none":
            mean = np.asarray(self.mean_, dtype=np.float64)
            std = np.asarray(self.std_, dtype=np.float64)
            b = ((b - mean) / std).astype(np.float32)
        fixed = 0
        if self.nan_policy != "error":
            bad = ~np.isfinite(b)
            fixed = int(bad.sum())
            if fixed:
                b[bad] = 0.0
        v = b.shape[1]
        if self.pad_mode == "cut":
            b = b[:, : self.n_voxels_padded_]
        elif self.n_voxels_padded_ > v:
            mode = "constant" if self.pad_mode == "constant" else "wrap"
            b = pad_columns(b, self.n_voxels_padded_, mode, self.pad_value)
        return b, fixed

    def _raise_if_nonfinite(self, x: np.ndarray, source: str | os.PathLike | None) -> None:
        n_bad, bad_cols, n_nan = 0, None, 0
        for a, b in row_blocks(x.shape[0]):
            block = np.asarray(x[a:b])
            if block.dtype.kind != "f":
                return
            bad = ~np.isfinite(block)
            if bad.any():
                n_bad += int(bad.sum())
                n_nan += int(np.isnan(block).sum())
                cols = bad.any(axis=0)
                bad_cols = cols if bad_cols is None else (bad_cols | cols)
        if n_bad:
            raise DataError(
                f"{n_bad} non-finite values ({n_nan} NaN, {n_bad - n_nan} Inf) in {int(bad_cols.sum())} of "
                f"{x.shape[1]} voxels; pass --nan-policy zero or drop to handle them",
                path=source,
                field="voxels",
            )

    @staticmethod
    def _unwrap(
        x: np.ndarray | FMRIDataset, source: str | os.PathLike | None
    ) -> tuple[np.ndarray, str | None]:
        if isinstance(x, FMRIDataset):
            source = source or x.source or f"{x.subject}/{x.split}"
            x = x.voxels
        src = None if source is None else str(source)
        return _as_2d(x, src), src

    # -- serialisation ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters and, when fitted, fitted attributes."""
        d: dict[str, Any] = {"_class_name": type(self).__name__, "_format_version": FORMAT_VERSION}
        d["params"] = self.get_params()
        if self.is_fitted:

            def enc(v: Any) -> Any:
                return v.tolist() if isinstance(v, np.ndarray) else (None if v is None else float(v))

            d["fitted"] = {
                "n_voxels_in": self.n_voxels_in_,
                "kept_voxels": None if self.kept_voxels_ is None else self.kept_voxels_.tolist(),
                "mean": enc(self.mean_),
                "std": enc(self.std_),
                "n_voxels_padded": self.n_voxels_padded_,
                "n_voxels_out": self.n_voxels_out_,
                "n_samples_seen": self.n_samples_seen_,
                "test_mean": self.test_mean_,
                "test_std": self.test_std_,
            }
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | os.PathLike | None = None) -> FMRIPreprocessor:
        """Rebuild from :meth:`to_dict` output.

        Raises:
            ConfigError: unknown parameters, a newer format, or fitted values that do not fit the parameters.
        """
        if not isinstance(data, Mapping) or "params" not in data:
            raise ConfigError("not a preprocessing description (expected a 'params' object)", path=source)
        version = data.get("_format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ConfigError(f"format version {version!r} is newer than this mindvis reads", path=source)
        params = dict(data["params"])
        known = set(cls().get_params())
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(
                f"unknown preprocessing parameter(s): {', '.join(unknown)}", path=source, field=unknown[0]
            )
        obj = cls(**params)
        try:
            obj._validate_params()
        except ConfigError as exc:
            raise ConfigError(exc.detail, path=source, field=exc.field) from None
        fitted = data.get("fitted")
        if fitted is not None:
            try:
                obj.n_voxels_in_ = int(fitted["n_voxels_in"])
                kv = fitted.get("kept_voxels")
                obj.kept_voxels_ = None if kv is None else np.asarray(kv, dtype=np.int64)
                v_kept = obj.n_voxels_in_ if kv is None else len(kv)
                if obj.normalize == "voxel":
                    obj.mean_ = np.asarray(fitted["mean"], dtype=np.float64)
                    obj.std_ = np.asarray(fitted["std"], dtype=np.float64)
                    if obj.mean_.shape != (v_kept,) or obj.std_.shape != (v_kept,):
                        raise ValueError(f"per-voxel mean/std must have {v_kept} entries")
                else:
                    obj.mean_ = float(fitted["mean"])
                    obj.std_ = float(fitted["std"])
                obj.n_voxels_padded_ = int(fitted["n_voxels_padded"])
                obj.n_voxels_out_ = int(fitted["n_voxels_out"])
                obj.n_samples_seen_ = int(fitted.get("n_samples_seen", 0))
                obj.test_mean_, obj.test_std_ = None, None
                if obj.test_normalize == "original":
                    obj.test_mean_ = float(fitted["test_mean"])
                    obj.test_std_ = float(fitted["test_std"])
                    if not (math.isfinite(obj.test_mean_) and math.isfinite(obj.test_std_)):
                        raise ValueError("test_mean/test_std must be finite")
                    if obj.test_std_ <= 0:
                        raise ValueError("test_std must be positive")
                if obj.kept_voxels_ is not None and (
                    obj.kept_voxels_.size
                    and (obj.kept_voxels_.min() < 0 or obj.kept_voxels_.max() >= obj.n_voxels_in_)
                ):
                    raise ValueError("kept_voxels out of range")
                if np.any(np.asarray(obj.std_) <= 0):
                    raise ValueError("std must be positive")
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"invalid fitted values ({exc})", path=source, field="fitted") from None
        return obj

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        path = Path(path)
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FMRIPreprocessor:
        """Read a file written by :meth:`save` (or the target-subject entry of a pretraining JSON)."""
        return load_preprocessor(path)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        state = f", fitted: {self.n_voxels_in_} -> {self.n_voxels_out_} voxels" if self.is_fitted else ""
        return f"{type(self).__name__}({params}{state})"


def load_preprocessor(path: str | os.PathLike, subject: str | None = None) -> FMRIPreprocessor:
    """Read a preprocessing JSON: a single fitted :class:`FMRIPreprocessor`, or one subject of a bundle.

    A bundle (written by pretraining on several subjects) has ``{"subjects": {name: preprocessor}}`` with names
    like ``"god/sbj_1"``; ``subject`` picks one (``"sbj_1"`` is enough when only one dataset has it). A single
    preprocessor is returned whatever ``subject`` is.

    Raises:
        DataError / ConfigError: missing or malformed file, or no such subject.
    """
    data = read_json(path)
    if isinstance(data, Mapping) and "subjects" in data and "params" not in data:
        subjects = data["subjects"]
        key = subject
        if key is not None and key not in subjects:
            # names may carry the dataset ("god/sbj_1"); a bare subject name matches when unambiguous
            matches = [k for k in subjects if k.rsplit("/", 1)[-1] == key]
            key = matches[0] if len(matches) == 1 else None
        if key is None or key not in subjects:
            raise ConfigError(
                f"this file holds per-subject preprocessing; choose a subject from {sorted(subjects)}",
                path=path,
                field="subject",
            )
        return FMRIPreprocessor.from_dict(subjects[key], source=path)
    return FMRIPreprocessor.from_dict(data, source=path)


__all__ = [
    "FMRIPreprocessor",
    "NAN_POLICIES",
    "NORMALIZE_MODES",
    "NanPolicy",
    "NormalizeMode",
    "NotFittedError",
    "TEST_NORMALIZE_MODES",
    "TestNormalize",
    "load_preprocessor",
]
