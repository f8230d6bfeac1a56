"""Import BERT checkpoints (HF folder, sentence-transformers folder, GLIP .pth) into `BertEncoder`.

Accepted inputs for `load_bert(path)`:
  * an HF folder: `config.json` + `model.safetensors` or `pytorch_model.bin` (keys `embeddings.*`,
    `encoder.layer.*`, optionally under `bert.`, as `BertForMaskedLM` etc. save them);
  * a sentence-transformers folder (the BERT lives in the root or in the folder that
    `modules.json` names for its Transformer module, e.g. `0_Transformer/`);
  * a single weights file (`.safetensors`, `.bin`, `.pth`, `.pt`), e.g. a GLIP checkpoint whose
    text tower sits under `language_backbone.body.model.` (optionally `module.`-prefixed and
    wrapped in `{"model": ...}`). Without a config.json next to it the config is inferred from
    the weight shapes, with one head per 64 channels (BERT-base: 12) unless `config` is given.

The prefix in front of `embeddings.word_embeddings.weight` is found automatically; the pooler,
MLM/NSP heads and `position_ids` buffers are ignored. Any other missing, unexpected or
shape-mismatched key raises one ValueError listing them all.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ovd_jax.convert.common import CheckpointMismatchError, read_state_dict
from ovd_jax.models.bert import BertConfig, BertEncoder

_ANCHOR = "embeddings.word_embeddings.weight"
# Keys under the BERT prefix that carry no encoder weights.
_IGNORED = re.compile(r"^(pooler\.|embeddings\.position_ids$|cls\.)")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _find_weights(path: str) -> tuple[str, str | None]:
    """Returns (weights file, config.json or None) for a folder or a file path."""
    if os.path.isfile(path):
        cfg = os.path.join(os.path.dirname(path), "config.json")
        return path, (cfg if os.path.isfile(cfg) else None)
    if not os.path.isdir(path):
        raise ValueError(f"load_bert: {path!r} does not exist; pass an HF BERT folder or file.")
    folders = [path]
    modules = os.path.join(path, "modules.json")
    if os.path.isfile(modules):  # sentence-transformers: follow the Transformer module's folder
        with open(modules) as f:
            for m in json.load(f):
                if m.get("type", "").endswith("Transformer") and m.get("path"):
                    folders.insert(0, os.path.join(path, m["path"]))
    for folder in folders:
        for name in _WEIGHT_FILES:
            w = os.path.join(folder, name)
            if os.path.isfile(w):
                cfg = os.path.join(folder, "config.json")
                return w, (cfg if os.path.isfile(cfg) else None)
    raise ValueError(
        f"load_bert: no {' or '.join(_WEIGHT_FILES)} in {path!r}; pass a folder written by "
        "save_pretrained or a weights file."
    )


def _strip_prefix(sd: dict[str, np.ndarray], source: str, prefix: str | None):
    if prefix is None:
        found = sorted(k[: -len(_ANCHOR)] for k in sd if k.endswith(_ANCHOR))
        if len(found) != 1:
            raise ValueError(
                f"load_bert: {source} has {len(found)} BERT embedding tables "
                f"({found or 'none'}); pass prefix= naming the one to load."
            )
        prefix = found[0]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _infer_config(sd: dict[str, np.ndarray]) -> BertConfig:
    vocab, hidden = sd["embeddings.word_embeddings.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    return BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=sd["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=sd["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=sd["embeddings.token_type_embeddings.weight"].shape[0],
    )


def _torch_names(flax_path: tuple[str, ...]) -> tuple[str, bool]:
    """Maps a flax param path to (torch key, transpose?)."""
    *mods, leaf = flax_path
    t_leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}[leaf]
    top = mods[0]
    if top in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        return f"embeddings.{top}.{t_leaf}", False
    if top == "embeddings_norm":
        return f"embeddings.LayerNorm.{t_leaf}", False
    i = int(top.split("_")[1])
    sub = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attention_output": "attention.output.dense",
        "attention_norm": "attention.output.LayerNorm",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
        "output_norm": "output.LayerNorm",
    }[mods[1]]
    return f"encoder.layer.{i}.{sub}.{t_leaf}", leaf == "kernel"


def _legacy_names(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
    return {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight",
                   re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v for k, v in sd.items()}


def bert_variables_from_state_dict(
    sd: dict[str, np.ndarray], model: BertEncoder, source: str = "state dict"
) -> dict[str, Any]:
    """Converts an (unprefixed) HF BERT state dict to `{"params": ...}` for `model`.

    Arrays are plain (unboxed) `jnp` arrays in `model.param_dtype`. Raises ValueError listing every
    missing, unexpected and shape-mismatched key.
    """
    sd = _legacy_names(sd)
    dummy = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy, dummy))
    shapes = jax.tree_util.tree_map(
        lambda x: x.unbox() if hasattr(x, "unbox") else x, shapes["params"],
        is_leaf=lambda x: hasattr(x, "unbox"),
    )
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    used, missing, mismatched, out = set(), [], [], {}
    for kpath, spec in flat:
        fpath = tuple(k.key for k in kpath)
        tkey, transpose = _torch_names(fpath)
        if tkey not in sd:
            missing.append(tkey)
            continue
        used.add(tkey)
        arr = np.asarray(sd[tkey])
        arr = arr.T if transpose else arr
        if arr.shape != spec.shape:
            mismatched.append(f"{tkey}: checkpoint {arr.shape} vs model {spec.shape}")
            continue
        node = out
        for p in fpath[:-1]:
            node = node.setdefault(p, {})
        node[fpath[-1]] = jnp.asarray(arr, dtype=model.param_dtype)
    unexpected = sorted(k for k in sd if k not in used and not _IGNORED.match(k))
    if missing or unexpected or mismatched:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected),
                            ("shape-mismatched", mismatched)):
            if items:
                parts.append(f"{len(items)} {name}: " + ", ".join(items[:8])
                             + (" ..." if len(items) > 8 else ""))
        raise CheckpointMismatchError(
            f"load_bert: {source} does not match the BERT config ({'; '.join(parts)}); check that "
            "the checkpoint is a BERT model and that config.json belongs to it."
        )
    return {"params": out}


def load_bert(
    path: str | os.PathLike,
    *,
    config: BertConfig | None = None,
    prefix: str | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat: bool = False,
) -> tuple[BertEncoder, dict[str, Any]]:
    """Loads a BERT checkpoint (see the module docstring for the layouts).

    Returns `(model, variables)` with `model.apply(variables, input_ids, attention_mask)` matching
    HF `BertModel(...)` hidden states. `config` overrides config.json / shape inference; `prefix`
    overrides the automatic key prefix detection (e.g. `"language_backbone.body.model."`).
    """
    weights, cfg_file = _find_weights(os.fspath(path))
    sd = _strip_prefix(read_state_dict(weights), weights, prefix)
    if config is None:
        config = BertConfig.from_json(cfg_file) if cfg_file else _infer_config(sd)
    model = BertEncoder(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    return model, bert_variables_from_state_dict(sd, model, source=weights)
