"""Import Swin v1 checkpoints (torchvision, official Microsoft, GLIP) into `SwinTransformer`.

Layouts recognised by `load_swin(path, arch)` (the key prefix is found automatically, so a GLIP
checkpoint's `module.backbone.body.` and a `{"model": ...}` wrapper are handled):
  * torchvision `swin_t/s/b().state_dict()`: `features.0.0` (patch conv), `features.0.2` (its
    norm), `features.{2s+1}.{b}.*` (blocks, MLP as `mlp.0`/`mlp.3`), `features.{2s+2}.*` (merging),
    `norm`, `head`;
  * official Microsoft Swin (classification, e.g. `swin_tiny_patch4_window7_224.pth`):
    `patch_embed.proj/norm`, `layers.{s}.blocks.{b}.*` (`mlp.fc1/fc2`), `layers.{s}.downsample.*`,
    `norm`, `head`;
  * GLIP's detection backbone: the official names under `backbone.body.`, with per-stage output
    norms `norm{i}` and no classifier.

Inferred from the checkpoint: window size (bias-table shape), `num_classes` (head, 0 if none),
`out_norms` (`norm{i}` keys). A detection checkpoint (output norms, no head) keeps shifting
windows that cover the whole map, as the official detection code does; classification checkpoints
skip that shift, as torchvision does. `relative_position_index` / `attn_mask` buffers are
recomputed, not read.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ovd_jax.convert.common import CheckpointMismatchError, read_state_dict
from ovd_jax.models.swin import ARCHS, SwinTransformer

_IGNORED = re.compile(r"(relative_position_index|attn_mask)$")


def _torchvision_to_official(key: str) -> str:
    if key.startswith("features.0.0."):
        return "patch_embed.proj." + key[len("features.0.0."):]
    if key.startswith("features.0.2."):
        return "patch_embed.norm." + key[len("features.0.2."):]
    m = re.match(r"features\.(\d+)\.(.*)$", key)
    if not m:
        return key
    k, rest = int(m.group(1)), m.group(2)
    if k % 2 == 1:  # a stage's blocks
        b, rest = rest.split(".", 1)
        rest = re.sub(r"^mlp\.0\.", "mlp.fc1.", re.sub(r"^mlp\.3\.", "mlp.fc2.", rest))
        return f"layers.{(k - 1) // 2}.blocks.{b}.{rest}"
    return f"layers.{k // 2 - 1}.downsample.{rest}"


def normalize_swin_state_dict(sd: dict[str, np.ndarray], source: str = "state dict"):
    """Strips the key prefix, renames torchvision keys to official ones. Returns (sd, layout)."""
    anchors = ("patch_embed.proj.weight", "features.0.0.weight")
    found = sorted({(k[: -len(a)], a) for k in sd for a in anchors if k.endswith(a)})
    if len(found) != 1:
        raise ValueError(
            f"load_swin: {source} has {len(found)} Swin patch embeddings ({found or 'none'}); "
            "expected one torchvision, official Microsoft or GLIP Swin checkpoint."
        )
    prefix, anchor = found[0]
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if anchor.startswith("features"):
        return {_torchvision_to_official(k): v for k, v in sd.items()}, "torchvision"
    return sd, "official"


def _official_name(fpath: tuple[str, ...]) -> tuple[str, str]:
    """flax param path → (official torch key, how to convert: '', 'T' or 'conv')."""
    *mods, leaf = fpath
    t_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(leaf, leaf)
    how = "T" if leaf == "kernel" else ""
    top = mods[0]
    if top == "patch_proj":
        return f"patch_embed.proj.{t_leaf}", ("conv" if leaf == "kernel" else "")
    if top == "patch_norm":
        return f"patch_embed.norm.{t_leaf}", ""
    if top in ("norm", "head"):
        return f"{top}.{t_leaf}", how
    s = int(top.split("_")[1])
    if mods[1] == "out_norm":
        return f"norm{s}.{t_leaf}", ""
    if mods[1] == "downsample":
        return f"layers.{s}.downsample.{mods[2]}.{t_leaf}", how
    b = int(mods[1].split("_")[1])
    sub = {"norm1": "norm1", "norm2": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}.get(mods[2])
    if sub is None:  # attn/{qkv, proj} or attn's bias table
        sub = "attn" if len(mods) == 3 else f"attn.{mods[3]}"
    return f"layers.{s}.blocks.{b}.{sub}.{t_leaf}", how


def swin_variables_from_state_dict(
    sd: dict[str, np.ndarray], model: SwinTransformer, source: str = "state dict"
) -> dict[str, Any]:
    """Official-named Swin state dict → `{"params": ...}` (unboxed, `model.param_dtype`).

    Raises one ValueError listing all missing, unexpected and shape-mismatched keys.
    """
    p = model.patch_size
    x = jnp.zeros((1, 8 * p, 8 * p, 3))
    # Run both paths so the head (classification) and the output norms (detection) exist.
    both = lambda m, x: (m.features(x), m(x) if m.num_classes else None)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, method=both))
    flat = jax.tree_util.tree_flatten_with_path(
        shapes["params"], is_leaf=lambda x: hasattr(x, "unbox"))[0]
    used, missing, mismatched, out = set(), [], [], {}
    for kpath, spec in flat:
        spec = spec.unbox() if hasattr(spec, "unbox") else spec
        fpath = tuple(k.key for k in kpath)
        tkey, how = _official_name(fpath)
        if tkey not in sd:
            missing.append(tkey)
            continue
        used.add(tkey)
        arr = np.asarray(sd[tkey])
        arr = arr.transpose(2, 3, 1, 0) if how == "conv" else (arr.T if how == "T" else arr)
        if arr.shape != spec.shape:
            mismatched.append(f"{tkey}: checkpoint {arr.shape} vs model {spec.shape}")
            continue
        node = out
        for part in fpath[:-1]:
            node = node.setdefault(part, {})
        node[fpath[-1]] = jnp.asarray(arr, dtype=model.param_dtype)
    unexpected = sorted(k for k in sd if k not in used and not _IGNORED.search(k))
    if missing or unexpected or mismatched:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected),
                            ("shape-mismatched", mismatched)):
            if items:
                parts.append(f"{len(items)} {name}: " + ", ".join(items[:8])
                             + (" ..." if len(items) > 8 else ""))
        raise CheckpointMismatchError(
            f"load_swin: {source} does not match the Swin arch ({'; '.join(parts)}); check the "
            "arch argument (swin_t / swin_s / swin_b) against the checkpoint."
        )
    return {"params": out}


def load_swin(
    path: str | os.PathLike,
    arch: str,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    **overrides,
) -> tuple[SwinTransformer, dict[str, Any]]:
    """Loads a Swin v1 checkpoint (see the module docstring) as preset `arch` (`swin_t`, ...).

    `overrides` are `SwinTransformer` fields (e.g. `stochastic_depth_prob`, `remat`) that win over
    the preset and over what is inferred from the checkpoint. Returns `(model, variables)`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"load_swin: {path!r} is not a file; pass a Swin state dict (.pth).")
    if arch not in ARCHS:
        raise ValueError(f"load_swin: unknown arch {arch!r}; choose one of {sorted(ARCHS)}.")
    sd, _ = normalize_swin_state_dict(read_state_dict(path), path)
    fields = dict(ARCHS[arch])
    table = sd.get("layers.0.blocks.0.attn.relative_position_bias_table")
    if table is not None:
        fields["window_size"] = (int(round(np.sqrt(table.shape[0]))) + 1) // 2
    fields["num_classes"] = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
    n_stages = len(fields["depths"])
    fields["out_norms"] = tuple(f"norm{i}.weight" in sd for i in range(n_stages))
    detection = any(fields["out_norms"]) or not fields["num_classes"]
    fields["skip_shift_if_window_covers"] = not detection
    fields.update(overrides)
    model = SwinTransformer(**fields, dtype=dtype, param_dtype=param_dtype)
    return model, swin_variables_from_state_dict(sd, model, source=path)
