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
import math
import os
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from mindvis.data.formats.common import check_declared_size, regular_file, zip_member_problem
from mindvis.errors import CheckpointError, DataError

_logger = logging.getLogger(__name__)

#: Config classes that the original MinD-Vis pickles into its checkpoints (module ``config``).
ORIGINAL_CONFIG_CLASSES = (
    "Config_MAE_fMRI",
    "Config_MBM_fMRI",
    "Config_MBM_finetune",
    "Config_Generative_Model",
)


def _make_standin(name: str) -> type:
    # A plain class that only stores attributes; pickle's BUILD fills its __dict__.
    cls = type(
        name, (), {"__module__": "config", "__doc__": f"Inert stand-in for the original config.{name}."}
    )
    cls.__qualname__ = name
    return cls


_STANDINS = tuple(_make_standin(n) for n in ORIGINAL_CONFIG_CLASSES)


def _to_namespace(obj: Any) -> Any:
    """Replace stand-in config instances (anywhere in nested dicts/lists) by SimpleNamespace, in place.

    Iterative, and each container is visited once: a pickle can share a container many times over (2^n paths
    through n nested levels) or put a list inside itself.
    """

    def convert(v: Any) -> Any:
        ns = SimpleNamespace(**vars(v))
        ns.__dict__["_class"] = type(v).__name__
        return ns

    if isinstance(obj, _STANDINS):
        return convert(obj)
    seen: set[int] = set()
    todo = [obj]
    while todo:
        cur = todo.pop()
        if id(cur) in seen or not isinstance(cur, dict | list):
            continue
        seen.add(id(cur))
        # keep the dict type (OrderedDict state dicts stay ordered)
        items = list(cur.items()) if isinstance(cur, dict) else list(enumerate(cur))
        for key, value in items:
            if isinstance(value, _STANDINS):
                cur[key] = convert(value)
            elif isinstance(value, dict | list):
                todo.append(value)
    return obj


def load_torch_file(
    path: str | os.PathLike, map_location: str = "cpu", verify_crc: bool = True, mmap: bool = False
) -> Any:
    """Load a PyTorch pickle file safely: tensors, containers and the original config objects only.

    Args:
        path: a ``torch.save`` file (zip format, or the legacy pickle format).
        map_location: where tensors are placed.
        verify_crc: for zip-format files, check every member's CRC-32 first. PyTorch's reader does not,
            so without this a file with damaged tensor bytes loads silently with wrong values.
        mmap: memory-map the tensor data instead of reading it (zip-format files; the legacy format is read
            normally). Tensors then stay backed by the file until they are copied.

    Warnings that ``torch.load`` raises while reading (e.g. about a pickle protocol above 2) are not printed:
    a refused file gives only the :class:`CheckpointError`, and a loaded file logs them at debug level.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or names a global outside the allow-list.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file not found", path=path)
    if path.stat().st_size == 0:
        raise CheckpointError("checkpoint file is empty", path=path)
    is_zip = zipfile.is_zipfile(path)
    if verify_crc and is_zip:
        _verify_zip_crc(path)
    try:
        # torch warns about what it reads (a pickle protocol above 2, deprecated storages) through the
        # warnings module, which prints them before our one-line refusal; they are logged at debug level instead
        with (
            warnings.catch_warnings(record=True) as caught,
            torch.serialization.safe_globals(list(_STANDINS)),
        ):
            warnings.simplefilter("always")
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=bool(mmap and is_zip))
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        first = _unsupported_global(msg)
        opcode = re.search(r"Unsupported operand (\d+)", msg)
        if opcode:
            code = int(opcode.group(1))
            raise CheckpointError(
                f"refused to load: pickle opcode {code} ({chr(code)!r}) is not one the safe loader reads "
                "(a pickle protocol above 2, or a damaged or crafted file)",
                path=path,
            ) from None
        if first:
            raise CheckpointError(
                f"refused to load: the file names a Python global outside the allow-list ({first}); "
                "loading it could execute code",
                path=path,
            ) from None
        raise CheckpointError(f"not a loadable checkpoint ({_first_line(msg)})", path=path) from None
    except (
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        ValueError,
        OSError,
        KeyError,
        AttributeError,
        TypeError,
        IndexError,
        struct.error,
        NotImplementedError,
        OverflowError,
        RecursionError,
        MemoryError,
    ) as exc:
        raise CheckpointError(
            f"truncated or corrupt checkpoint ({type(exc).__name__}: {_first_line(str(exc))})", path=path
        ) from None
    for w in caught:
        _logger.debug("%s: torch.load: %s: %s", path, w.category.__name__, _first_line(str(w.message)))
    try:
        return _to_namespace(obj)
    except TypeError as exc:  # e.g. a config object whose attribute names are not strings
        raise CheckpointError(
            f"malformed config object in checkpoint ({_first_line(str(exc))})", path=path
        ) from None


#: Keys under which training scripts commonly nest the weights of a checkpoint.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")


def load_state_dict(
    path: str | os.PathLike,
    map_location: str = "cpu",
    mmap: bool = False,
    unwrap: tuple[str, ...] = STATE_DICT_KEYS,
) -> dict[str, Any]:
    """Read the weights of a model from ``.safetensors`` or a ``torch.save`` file, without running code.

    A torch file goes through :func:`load_torch_file`. When the loaded object holds one of ``unwrap`` as a
    dict (``{"state_dict": {...}, "epoch": 3}``), that inner dict is taken; the keys are tried in order.

    Raises:
        CheckpointError: the file is missing, unreadable or refused, or holds no dict of weights.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError("weights file not found", path=path)
        try:
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device=map_location)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(
                f"not a readable safetensors file ({type(exc).__name__}: {_first_line(str(exc))})", path=path
            ) from None
    else:
        sd = load_torch_file(path, map_location=map_location, mmap=mmap)
    for key in unwrap:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise CheckpointError(f"expected a dict of weights, got {type(sd).__name__}", path=path)
    return sd


def _verify_zip_crc(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            _check_member_sizes(path, zf)
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise CheckpointError(
            f"truncated or corrupt checkpoint ({type(exc).__name__}: {_first_line(str(exc))})", path=path
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"corrupt checkpoint: the CRC-32 of archive member '{bad}' does not match its contents", path=path
        )


def _check_member_sizes(path: Path, zf: zipfile.ZipFile) -> None:
    """Refuse members whose declared sizes the archive cannot hold, before anything is inflated."""
    archive = path.stat().st_size
    for info in zf.infolist():
        problem = zip_member_problem(info, archive)
        if problem:
            raise CheckpointError(f"archive member '{info.filename}' {problem}", path=path)


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


#: Arrays built by a pickled constructor call (not from the pickle's own bytes) hold at most this many bytes;
#: genuine numpy pickles build empty arrays and fill them from their data (BUILD).
_MAX_CONSTRUCTED_BYTES = 1 << 16
_SAFE_ENCODINGS = ("latin1", "latin-1", "iso-8859-1", "iso8859-1", "utf-8", "utf8", "ascii")


class _NdarrayType:
    """What a pickle's reference to ``numpy.ndarray`` becomes: usable as ``_reconstruct``'s subtype only.

    Calling ``numpy.ndarray(shape)`` from a pickle would allocate any size it names, so the class itself is
    never handed out.
    """

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayType()


def _refuse(msg: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(msg)


def _check_plain_dtype(dtype: Any) -> np.dtype:
    if not isinstance(dtype, np.dtype):
        raise _refuse(f"expected a numpy dtype, got {type(dtype).__name__}")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise _refuse(f"structured or sub-array dtype {dtype} is not allowed")
    return dtype


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not _NDARRAY:
        raise _refuse(f"_reconstruct of {subtype!r} is not allowed (only numpy.ndarray)")
    dt = _check_plain_dtype(np.dtype(dtype) if isinstance(dtype, str | bytes) else dtype)
    shape = (shape,) if isinstance(shape, int) else shape
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise _refuse(f"bad array shape {shape!r}")
    if math.prod(shape) * dt.itemsize > _MAX_CONSTRUCTED_BYTES:
        raise _refuse(f"an array of shape {shape} {dt} built by a constructor call (not from stored data)")
    return np.ndarray.__new__(np.ndarray, shape, dt)


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None) -> np.ndarray:
    """numpy's protocol-5 array reconstructor, with the buffer length checked against shape and dtype."""
    dt = _check_plain_dtype(dtype)
    if dt.hasobject:
        raise _refuse("an object array from a raw buffer")
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise _refuse(f"bad array shape {shape!r}")
    if not isinstance(buf, bytes | bytearray | pickle.PickleBuffer):
        raise _refuse(f"array data of type {type(buf).__name__}")
    if memoryview(buf).nbytes != math.prod(shape) * dt.itemsize:
        raise _refuse(f"array of shape {shape} {dt} with {memoryview(buf).nbytes} bytes of data")
    if order not in ("C", "F", "K") or (
        axis_order is not None and sorted(axis_order) != list(range(len(shape)))
    ):
        raise _refuse(f"bad array order {order!r} {axis_order!r}")
    arr = np.frombuffer(buf, dtype=dt)
    if order == "K" and axis_order is not None:
        return arr.reshape(shape, order="C").transpose(axis_order)
    return arr.reshape(shape, order="F" if order == "F" else "C")


def _safe_scalar(dtype: Any, obj: Any = None) -> Any:
    from numpy._core.multiarray import scalar

    return scalar(_check_plain_dtype(dtype), obj)


def _safe_dtype(spec: Any, align: bool = False, copy: bool = True) -> np.dtype:
    # copy=True: a later BUILD sets the state of this new object, never of numpy's shared dtype instances
    return _check_plain_dtype(np.dtype(spec, bool(align), True))


def _safe_bytes(*args: Any) -> bytes:
    if args and isinstance(args[0], int) and args[0] > _MAX_CONSTRUCTED_BYTES:
        raise _refuse(f"bytes({args[0]}) would allocate from a number in the file")
    return bytes(*args)


def _safe_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if str(encoding).lower() not in _SAFE_ENCODINGS or errors != "strict":
        raise _refuse(f"_codecs.encode with encoding {encoding!r} is not allowed")
    import codecs

    return codecs.encode(obj, encoding, errors)


def _dtype_class(cls: type) -> Any:
    def make(*args: Any) -> np.dtype:
        return _check_plain_dtype(cls(*args))

    return make


def _check_array_state(state: Any) -> None:
    """The state a pickle gives ``ndarray.__setstate__``: shape, dtype and data must agree.

    numpy trusts the length of an object array's item list; a list shorter than the shape makes it read
    past the list (a crash), so every state is checked here first.
    """
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise _refuse("malformed ndarray state")
    shape, dtype, fortran, raw = state[-4:]
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise _refuse(f"bad array shape {shape!r}")
    dt = _check_plain_dtype(dtype)
    if not isinstance(fortran, bool | int):
        raise _refuse("malformed ndarray state (order flag)")
    count = math.prod(shape)
    if dt.hasobject:
        if not isinstance(raw, list) or len(raw) != count:
            got = len(raw) if isinstance(raw, list) else type(raw).__name__
            raise _refuse(f"object array of shape {shape} with {got} items")
    elif not isinstance(raw, bytes | bytearray | str) or len(raw) != count * dt.itemsize:
        got = len(raw) if isinstance(raw, bytes | bytearray | str) else type(raw).__name__
        raise _refuse(f"array of shape {shape} {dt} with {got} bytes of data")


def _check_dtype_state(dtype: np.dtype, state: Any) -> None:
    """A pickled dtype's state may set its byte order only; everything else must be what it already is."""
    fresh = dtype.__reduce__()[2]
    ok = (
        isinstance(state, tuple)
        and len(state) == len(fresh)
        and state[0] == fresh[0]
        and isinstance(state[1], str)
        and state[1] in ("<", ">", "|", "=")
        and all(type(a) is type(b) and a == b for a, b in zip(state[2:], fresh[2:], strict=True))
    )
    if not ok:
        raise _refuse(f"dtype state {state!r} is not allowed")


class NumpyUnpickler(pickle._Unpickler):
    """An unpickler that builds numpy arrays, dtypes, scalars and builtin containers, and nothing else.

    Only the globals in :attr:`_ALLOWED` resolve, several of them to checked versions; object state (pickle's
    BUILD) is accepted for numpy arrays and dtypes only and is checked before numpy sees it (see
    :func:`_check_array_state`). This is the pure-Python unpickler, so that BUILD can be checked.
    """

    _SAFE = {
        "_reconstruct": _safe_reconstruct,
        "_frombuffer": _safe_frombuffer,
        "scalar": _safe_scalar,
        "dtype": _safe_dtype,
        "bytes": _safe_bytes,
        "encode": _safe_encode,
    }
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
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

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as pickle.Unpickler maps them
            import _compat_pickle

            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in self._ALLOWED:
            if (module, name) == ("numpy", "ndarray"):
                return _NDARRAY
            if name in self._SAFE:
                return self._SAFE[name]
            return super().find_class(module, name)
        if module.startswith("numpy") and name.endswith("DType") and module.endswith("dtypes"):
            return _dtype_class(super().find_class(module, name))
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")

    def load_build(self) -> None:
        if len(self.stack) < 2:
            raise _refuse("BUILD with an empty stack")
        state, inst = self.stack[-1], self.stack[-2]
        if type(inst) is np.ndarray:
            _check_array_state(state)
        elif isinstance(inst, np.dtype):
            _check_dtype_state(inst, state)
        else:
            raise _refuse(f"setting the state of a {type(inst).__name__} object is not allowed")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build

    def load(self) -> Any:
        try:
            obj = super().load()
        except struct.error as exc:  # a short read in the pure-Python unpickler
            raise pickle.UnpicklingError(f"pickle data was truncated ({exc})") from None
        if obj is _NDARRAY:
            raise _refuse("a bare numpy.ndarray reference")
        return obj


def load_pickled_numpy(path: str | os.PathLike) -> Any:
    """Load a ``.npy`` holding a pickled object (e.g. a dict name -> image array) without running code.

    Raises:
        DataError: the file is missing or corrupt, or its pickle names a global outside the allow-list.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=path)
    regular_file(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        buf = io.BytesIO(raw)
        if raw[:6] == b"\x93NUMPY":
            version = np.lib.format.read_magic(buf)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(buf)
            else:
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(buf)
            if not dtype.hasobject:
                check_declared_size(shape, dtype, len(raw) - buf.tell(), path=path)
                buf.seek(0)
                return np.load(buf, allow_pickle=False)
        obj = NumpyUnpickler(buf, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"refused to load pickle: {_first_line(str(exc))}", path=path) from None
    except (
        EOFError,
        ValueError,
        OSError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        RecursionError,
        MemoryError,
        OverflowError,
    ) as exc:
        raise DataError(
            f"truncated or corrupt file ({type(exc).__name__}: {_first_line(str(exc))})", path=path
        ) from None
    # np.save of a 0-d object array: unwrap it
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    return obj
