"""Helpers shared by the checkpoint importers: read PyTorch/safetensors checkpoints into a flat
{key: np.ndarray} dict, convert torch layouts to Flax ones, check a converted tree against a
model, and save/load our own checkpoint format.

Our checkpoint format is a folder with `config.json` (the model description, JSON) and
`variables.msgpack` (flax.serialization msgpack of the variables as numpy arrays), written to a
temporary sibling folder and renamed into place, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import serialization

# Buffers that carry no learned state and never map onto a parameter.
IGNORED_SUFFIXES = ("num_batches_tracked", "position_ids", "attn_mask")


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys/shapes do not fit the model; the message lists what differs."""


# ----------------------------------------------------------------------------- reading


def _to_numpy(value) -> np.ndarray:
    import torch  # noqa: PLC0415

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # fp16/bf16 releases -> float32 (numpy has no bfloat16)
        return value.numpy()
    value = np.asarray(value)
    return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
    """Find the state dict inside common wrappers ({'model': ...}, {'state_dict': ...})."""
    import torch  # noqa: PLC0415

    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            return _unwrap(obj[key], path)
    if not isinstance(obj, Mapping) or not any(hasattr(v, "shape") for v in obj.values()):
        raise ValueError(f"{path} holds no state dict (found {type(obj).__name__}); pass a "
                         "checkpoint saved with torch.save(model.state_dict()).")
    return obj


# Module default for `read_state_dict(allow_pickle=None)`; the convert CLI's --allow_pickle sets
# it (the importers call read_state_dict several layers down).
ALLOW_PICKLE = False


def read_state_dict(path: str, *, allow_pickle: bool | None = None) -> dict[str, np.ndarray]:
    """Read a checkpoint into {key: np.ndarray} (floating tensors as float32), running no code
    from the file.

    Accepts `.safetensors`, torch pickles (`.pt`, `.pth`, `.bin`, possibly wrapped in
    {'model': ...} as detectron2 saves them, numpy arrays included), TorchScript archives
    (OpenAI's CLIP releases: their tensor records are read, their code is never run), or a
    folder holding `model.safetensors` / `pytorch_model.bin` (sharded ones with their index).
    Torch pickles are read with `weights_only=True`; one holding other Python objects is refused
    with a ValueError naming the file and the object. `allow_pickle=True` (default:
    `ALLOW_PICKLE`, set by the convert CLI's --allow_pickle) falls back to a full unpickle, with
    a warning: that runs whatever code the file holds.
    """
    from ovd_jax.convert import safe_load  # noqa: PLC0415

    allow = ALLOW_PICKLE if allow_pickle is None else allow_pickle
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_folder(path, allow)
    if not os.path.exists(path):
        raise ValueError(f"Checkpoint {path} does not exist.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # noqa: PLC0415

        return {k: _to_numpy(v) for k, v in load_file(path).items()}
    try:
        if safe_load.is_torchscript(path):
            return {k: _to_numpy(v) for k, v in safe_load.read_torchscript_tensors(path).items()}
        obj = safe_load.torch_load_tensors(path)
    except ValueError:
        if not allow:
            raise
        obj = safe_load.full_unpickle(path)
    sd = _unwrap(obj, path)
    return {k: _to_numpy(v) for k, v in sd.items() if hasattr(v, "shape")}


def _read_folder(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                 "open_clip_pytorch_model.bin"):
        if os.path.exists(os.path.join(path, name)):
            return read_state_dict(os.path.join(path, name), allow_pickle=allow_pickle)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            out: dict[str, np.ndarray] = {}
            for shard in shards:
                out.update(read_state_dict(os.path.join(path, shard), allow_pickle=allow_pickle))
            return out
    raise ValueError(f"Folder {path} holds no model.safetensors or pytorch_model.bin.")


# ----------------------------------------------------------------------------- layouts


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
    return np.ascontiguousarray(np.asarray(w).T)


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [out, in, kh, kw] -> Flax Conv kernel [kh, kw, in, out]."""
    return np.ascontiguousarray(np.asarray(w).transpose(2, 3, 1, 0))


# ----------------------------------------------------------------------------- trees


def flatten(tree: Mapping, sep: str = "/") -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update({f"{k}{sep}{kk}": vv for kk, vv in flatten(v, sep).items()})
        else:
            out[str(k)] = v
    return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """{'a/b/c': leaf} -> nested dict."""
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def model_shapes(model, *args, method=None) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Flat {'params/a/b': (shape, dtype)} of `model.init(key, *args)` without computing it
    (`args` may be arrays or jax.ShapeDtypeStructs)."""
    abstract = jax.eval_shape(
        lambda *a: nn.meta.unbox(model.init(jax.random.key(0), *a, method=method)), *args)
    return {k: (tuple(v.shape), v.dtype) for k, v in flatten(abstract).items()}


def _short(items: Iterable[str], limit: int = 20) -> str:
    items = sorted(items)
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_and_build(
    converted: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[tuple[int, ...], Any]],
    source: str,
    unexpected: Iterable[str] = (),
) -> dict[str, Any]:
    """Check flat converted arrays against the model's expected shapes and return the nested
    variables (cast to the expected dtypes).

    Raises CheckpointMismatchError listing missing keys, unexpected keys (converted keys the
    model lacks, plus `unexpected` source keys no rule mapped) and shape mismatches.
    """
    missing = [k for k in expected if k not in converted]
    extra = [k for k in converted if k not in expected] + list(unexpected)
    bad = [f"{k}: checkpoint {tuple(np.shape(v))} vs model {expected[k][0]}"
           for k, v in converted.items() if k in expected and tuple(np.shape(v)) != expected[k][0]]
    if missing or extra or bad:
        parts = [f"Checkpoint {source} does not fit the model:"]
        if missing:
            parts.append(f"missing ({len(missing)}): {_short(missing)}")
        if extra:
            parts.append(f"unexpected ({len(extra)}): {_short(extra)}")
        if bad:
            parts.append(f"shape mismatch ({len(bad)}): {_short(bad, 10)}")
        parts.append("Check the --format/--model options, or that the file is the model you meant.")
        raise CheckpointMismatchError("\n  ".join(parts))
    return unflatten({k: np.asarray(v, dtype=expected[k][1]) for k, v in converted.items()})


def convert_keys(
    state_dict: Mapping[str, np.ndarray],
    rule: Callable[[str, np.ndarray], list[tuple[str, np.ndarray]] | None],
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Apply `rule(key, value) -> [(flax_path, array), ...] | None` to every entry.

    Returns (converted flat dict, source keys no rule claimed, ignorable buffers excluded).
    """
    out, unused = {}, []
    for k, v in state_dict.items():
        pairs = rule(k, v)
        if pairs is None:
            if not k.endswith(IGNORED_SUFFIXES):
                unused.append(k)
            continue
        for path, arr in pairs:
            out[path] = arr
    return out, unused


# ----------------------------------------------------------------------------- our format

CONFIG_FILE = "config.json"
VARIABLES_FILE = "variables.msgpack"


def save_checkpoint(directory: str, model_config: Mapping[str, Any], variables: Mapping) -> str:
    """Write `variables` (a pytree of arrays) and `model_config` (JSON-serialisable) to
    `directory`, atomically (temporary sibling folder, then rename). Returns the directory."""
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    host = jax.tree.map(np.asarray, nn.meta.unbox(dict(variables)))
    tmp = tempfile.mkdtemp(prefix=".tmp_ckpt_", dir=parent)
    try:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(dict(model_config), f, indent=2)
        with open(os.path.join(tmp, VARIABLES_FILE), "wb") as f:
            f.write(serialization.msgpack_serialize(host))
        if os.path.exists(directory):
            old = directory + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a folder written by `save_checkpoint`: returns (model_config, variables as numpy)."""
    cfg_path = os.path.join(directory, CONFIG_FILE)
    var_path = os.path.join(directory, VARIABLES_FILE)
    if not (os.path.exists(cfg_path) and os.path.exists(var_path)):
        raise ValueError(f"{directory} is not an ovd_jax checkpoint (needs {CONFIG_FILE} and "
                         f"{VARIABLES_FILE}); convert one with `python -m ovd_jax.convert`.")
    with open(cfg_path) as f:
        config = json.load(f)
    with open(var_path, "rb") as f:
        variables = serialization.msgpack_restore(f.read())
    return config, variables
