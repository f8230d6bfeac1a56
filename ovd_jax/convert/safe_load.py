"""Reading PyTorch checkpoints without running code from them.

A pickle can name any importable function and have the unpickler call it, so a full unpickle of
a downloaded `.pth` runs whatever the file asks for. Two readers here rebuild tensors only:

* `torch_load_tensors`: `torch.load(weights_only=True)` with the allow-list extended by the
  numpy globals that detectron2-style checkpoints hold (numpy arrays and scalars inside
  `{"model": ...}`); any other global is refused with a `ValueError` naming the file and the
  global, and nothing in the file has run.
* `read_torchscript_tensors`: TorchScript archives (OpenAI's CLIP releases) are zip files whose
  `<root>/data.pkl` pickles the module tree; its tensors are stored as `<root>/data/<key>` records.
  A restricted unpickler turns every `__torch__.*` class into an inert attribute holder, rebuilds
  tensors from the storage records with numpy, and refuses every other global. The archive's
  TorchScript code (`<root>/code/`) is never read, compiled or run.

`full_unpickle` is the unsafe fallback, only reached through an explicit `allow_pickle=True`
(the convert CLI's `--allow_pickle`), and warns.
"""

from __future__ import annotations

import collections
import io
import logging
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# torch storage class name -> numpy dtype of its records (bfloat16 read as uint16, widened).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}  # fmt: skip


def _refusal(path: str, what: str) -> ValueError:
    return ValueError(
        f"{path} holds {what}, which a tensors-only reader refuses (unpickling it could run code "
        "from the file). Re-save it as a plain state dict or .safetensors, or, only if you trust "
        "the file, re-run `python -m ovd_jax.convert` with --allow_pickle."
    )


# ----------------------------------------------------------------------------- torch.load


def _numpy_globals() -> list:
    """(object, pickled name) pairs for numpy arrays/scalars/dtypes inside a checkpoint, under
    both the numpy 1.x (`numpy.core`) and 2.x (`numpy._core`) module names."""
    try:
        from numpy._core import multiarray  # noqa: PLC0415 - numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # noqa: PLC0415

    out = []
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(multiarray._reconstruct, f"{mod}._reconstruct"),
                (multiarray.scalar, f"{mod}.scalar")]
    out += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
              np.uint8, np.bool_):
        cls = type(np.dtype(t))
        out.append((cls, f"numpy.dtypes.{cls.__name__}"))
    return out


def torch_load_tensors(path: str) -> Any:
    """`torch.load(path, weights_only=True)` plus numpy arrays/scalars; returns the loaded object
    (tensors, numpy arrays, containers and plain values only).

    Raises ValueError naming the file and the refused global when it holds anything else.
    """
    import torch  # noqa: PLC0415

    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).split("\n")
        detail = next((ln.strip() for ln in first if "GLOBAL" in ln or "global" in ln),
                      first[0].strip())
        raise _refusal(path, f"a Python object other than tensors ({detail[:200]})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ValueError(
            f"Cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {str(e)[:300]}); "
            "is the file complete and a torch.save output?") from None


def full_unpickle(path: str) -> Any:
    """Unsafe: `torch.load(weights_only=False)` (TorchScript: `torch.jit.load`), which runs any
    code the file names. Only for files you trust; warns every time."""
    import torch  # noqa: PLC0415

    msg = (f"--allow_pickle: fully unpickling {path}; this runs any code the file holds - only "
           "do this for checkpoints from a source you trust.")
    warnings.warn(msg, stacklevel=2)
    log.warning(msg)
    if is_torchscript(path):
        return torch.jit.load(path, map_location="cpu")
    return torch.load(path, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------- TorchScript


def is_torchscript(path: str) -> bool:
    """TorchScript archives are zip files holding `<root>/constants.pkl` and `<root>/code/`."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


class _ScriptObject:
    """An inert stand-in for a pickled `__torch__.*` module: it only stores its attributes."""

    def __setstate__(self, state):
        self.__dict__["_state"] = state if isinstance(state, Mapping) else {}


class _Storage:
    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES[name]
        self.bfloat16 = name == "BFloat16Storage"


def _rebuild_tensor(storage, offset, size, stride, *_rest):
    """torch._utils._rebuild_tensor_v2 in numpy: a strided view of the storage, copied."""
    arr, bf16 = storage
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if any(s < 0 for s in stride) or offset < 0:
        raise pickle.UnpicklingError("negative tensor stride/offset")
    needed = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
    if needed > arr.size:
        raise pickle.UnpicklingError(f"tensor of size {size} overruns its storage")
    view = np.lib.stride_tricks.as_strided(
        arr[offset:], shape=size, strides=tuple(s * arr.itemsize for s in stride))
    view = np.array(view)
    if bf16:  # bfloat16 = the upper half of a float32
        view = (view.astype(np.uint32) << 16).view(np.float32)
    return view


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript `data.pkl`, allowing only tensor rebuilding and inert modules."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, path: str):
        super().__init__(io.BytesIO(data))
        self._zip, self._root, self._path = archive, root, path

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_ScriptObject,), {})
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(name)
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *_: data
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise _refusal(self._path, f"the global {module}.{name} in its TorchScript data.pkl")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
                and isinstance(pid[1], _Storage)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        try:
            raw = self._zip.read(f"{self._root}/data/{pid[2]}")
        except KeyError:
            raise pickle.UnpicklingError(f"missing tensor record data/{pid[2]}") from None
        dtype = np.dtype(pid[1].dtype).newbyteorder("<")
        return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False), \
            pid[1].bfloat16


def _collect(obj, prefix: str, out: dict[str, np.ndarray], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for key, value in obj.__dict__.get("_state", {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, np.ndarray):
            out[name] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, name + ".", out, seen)


def read_torchscript_tensors(path: str) -> dict[str, np.ndarray]:
    """The parameters and buffers of a TorchScript archive as {dotted name: np.ndarray}, in the
    module's state_dict naming, without executing any of the archive's code.

    Raises ValueError naming the file when the archive holds other objects or is damaged.
    """
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not names:
            raise ValueError(f"{path} is a zip file without <root>/data.pkl; it is not a "
                             "TorchScript archive or PyTorch checkpoint.")
        root = names[0].split("/")[0]
        try:
            obj = _ArchiveUnpickler(z.read(names[0]), z, root, path).load()
        except ValueError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError) as e:
            raise ValueError(f"{path}: the TorchScript archive's data.pkl is damaged or "
                             f"unsupported ({type(e).__name__}: {e}); re-download it.") from None
    if not isinstance(obj, _ScriptObject):
        raise ValueError(f"{path}: the TorchScript archive holds {type(obj).__name__}, not a "
                         "module; pass the model's archive.")
    out: dict[str, np.ndarray] = {}
    _collect(obj, "", out, set())
    return out
