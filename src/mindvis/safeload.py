"""Loading pickle-based files without executing code.

Two kinds of pickle reach mindvis from outside:

* PyTorch checkpoints of the original MinD-Vis / CompVis code (``.pth``, ``.ckpt``). They go through
  PyTorch's ``weights_only`` unpickler, which builds tensors and plain containers only. The original files
  also pickle config objects by class reference (``config.Config_MBM_fMRI`` and friends, see the reference
  README section 2.4); those four names are allowed as inert stand-in classes and come back as
  :class:`types.SimpleNamespace`. Any other global is refused with :class:`CheckpointError`.
* Pickled numpy objects (BOLD5000's ``img_dict.npy``). They go through :class:`NumpyUnpickler`, which
  allows numpy arrays, dtypes, scalars and builtin containers and strings only.

Neither path ever imports or calls anything a file names beyond its allow-list.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from mindvis.errors import CheckpointError, DataError

_logger = logging.getLogger(__name__)

#: Config classes that the original MinD-Vis pickles into its checkpoints (module ``config``).
ORIGINAL_CONFIG_CLASSES = ("Config_MAE_fMRI", "Config_MBM_fMRI", "Config_MBM_finetune", "Config_Generative_Model")


def _make_standin(name: str) -> type:
    # A plain class that only stores attributes; pickle's BUILD fills its __dict__.
    cls = type(name, (), {"__module__": "config", "__doc__": f"Inert stand-in for the original config.{name}."})
    cls.__qualname__ = name
    return cls


_STANDINS = tuple(_make_standin(n) for n in ORIGINAL_CONFIG_CLASSES)


def _to_namespace(obj: Any) -> Any:
    """Replace stand-in config instances (anywhere in nested dicts/lists) by SimpleNamespace."""
    if isinstance(obj, _STANDINS):
        ns = SimpleNamespace(**vars(obj))
        ns.__dict__["_class"] = type(obj).__name__
        return ns
    if isinstance(obj, dict):
        # keep the dict type (OrderedDict state dicts stay ordered)
        for k in list(obj.keys()):
            obj[k] = _to_namespace(obj[k])
        return obj
    if isinstance(obj, list):
        return [_to_namespace(v) for v in obj]
    return obj


def load_torch_file(path: str | os.PathLike, map_location: str = "cpu", verify_crc: bool = True) -> Any:
    """Load a PyTorch pickle file safely: tensors, containers and the original config objects only.

    Args:
        path: a ``torch.save`` file (zip format, or the legacy pickle format).
        map_location: where tensors are placed.
        verify_crc: for zip-format files, check every member's CRC-32 first. PyTorch's reader does not,
            so without this a file with damaged tensor bytes loads silently with wrong values.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or names a global outside the allow-list.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file not found", path=path)
    if path.stat().st_size == 0:
        raise CheckpointError("checkpoint file is empty", path=path)
    if verify_crc and zipfile.is_zipfile(path):
        _verify_zip_crc(path)
    try:
        with torch.serialization.safe_globals(list(_STANDINS)):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        first = _unsupported_global(msg)
        if first:
            raise CheckpointError(
                f"refused to load: the file names a Python global outside the allow-list ({first}); "
                "loading it could execute code", path=path) from None
        raise CheckpointError(f"not a loadable checkpoint ({_first_line(msg)})", path=path) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError,
            AttributeError, TypeError, IndexError) as exc:
        raise CheckpointError(f"truncated or corrupt checkpoint ({type(exc).__name__}: "
                              f"{_first_line(str(exc))})", path=path) from None
    try:
        return _to_namespace(obj)
    except TypeError as exc:  # e.g. a config object whose attribute names are not strings
        raise CheckpointError(f"malformed config object in checkpoint ({_first_line(str(exc))})", path=path) from None


def _verify_zip_crc(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise CheckpointError(f"truncated or corrupt checkpoint ({type(exc).__name__}: "
                              f"{_first_line(str(exc))})", path=path) from None
    if bad is not None:
        raise CheckpointError(f"corrupt checkpoint: the CRC-32 of archive member '{bad}' does not match "
                              "its contents", path=path)


def _first_line(msg: str) -> str:
    line = msg.strip().splitlines()[0] if msg.strip() else "no detail"
    return line[:200]


def _unsupported_global(msg: str) -> str | None:
    # torch's weights_only error names the offending global, e.g. "Unsupported global: GLOBAL posix.system"
    for marker in ("Unsupported global: GLOBAL ", "GLOBAL "):
        if marker in msg:
            tail = msg.split(marker, 1)[1]
            return tail.split()[0].rstrip(".,:") if tail.split() else tail
    for marker in ("Unsupported operand", "Unsupported class"):
        if marker in msg:
            return _first_line(msg.split(marker, 1)[1])
    return None


class NumpyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dtypes, scalars and builtin containers, and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "str"),
        ("builtins", "bytes"),
        ("builtins", "int"),
        ("builtins", "float"),
        ("builtins", "complex"),
        ("builtins", "bool"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module.startswith("numpy") and name.endswith("DType") and module.endswith("dtypes"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def load_pickled_numpy(path: str | os.PathLike) -> Any:
    """Load a ``.npy`` holding a pickled object (e.g. a dict name -> image array) without running code.

    Raises:
        DataError: the file is missing or corrupt, or its pickle names a global outside the allow-list.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        buf = io.BytesIO(raw)
        if raw[:6] == b"\x93NUMPY":
            version = np.lib.format.read_magic(buf)
            if version == (1, 0):
                _shape, _fortran, dtype = np.lib.format.read_array_header_1_0(buf)
            else:
                _shape, _fortran, dtype = np.lib.format.read_array_header_2_0(buf)
            if not dtype.hasobject:
                buf.seek(0)
                return np.load(buf, allow_pickle=False)
        obj = NumpyUnpickler(buf, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"refused to load pickle: {exc}", path=path) from None
    except (EOFError, ValueError, OSError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise DataError(f"truncated or corrupt file ({type(exc).__name__}: {_first_line(str(exc))})",
                        path=path) from None
    # np.save of a 0-d object array: unwrap it
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    return obj
