"""BERT text encoder (HF `BertModel` semantics, no pooler), used as GLIP's / DetCLIPv2's text tower.

Layout follows the original post-LayerNorm BERT: embeddings (word + absolute position + token type)
→ LayerNorm → N × [self-attention → residual → LayerNorm → GELU MLP → residual → LayerNorm].
`BertLayer` is exposed on its own because GLIP's deep fusion runs extra BERT layers on the text
stream between fusion blocks.

Activation constraints use the logical names ('batch', 'length', 'embed'); parameters use the
vocabulary in `ovd_jax/models/layers.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovd_jax.models.layers import dense, layer_norm
from ovd_jax.models.remat import remat_module

Dtype = Any

# HF's default initializer_range; only matters for models trained from scratch.
_INIT = nn.initializers.normal(stddev=0.02)

_ACTIVATIONS = {
    # HF "gelu" is the exact erf form; "gelu_new"/"gelu_pytorch_tanh" are the tanh approximation.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The subset of HF `BertConfig` fields this encoder uses (hashable, so a module field)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; fix the config."
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"BertConfig: hidden_act={self.hidden_act!r} is not supported; use one of "
                f"{sorted(_ACTIVATIONS)}."
            )

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        """Builds a config from an HF config dict (unknown keys are ignored)."""
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"BertConfig: position_embedding_type={d['position_embedding_type']!r} is not "
                "supported; only 'absolute' BERT checkpoints can be imported."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BertConfig:
        """Reads an HF `config.json`."""
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _constrain(x):
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class BertLayer(nn.Module):
    """One post-LN BERT encoder layer.

    Takes `hidden` [N, L, H] and `attention_mask` [N, L] (1/True = real token, 0 = padding; keys
    that are padding get no attention weight) and returns [N, L, H]. Rows of padding queries are
    computed like any other row and are meaningless, as in HF. With `carry_output` it returns the
    pair (out, out), the (carry, per-layer output) form `nn.scan` wants.
    """

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    carry_output: bool = False

    @nn.compact
    def __call__(self, hidden, attention_mask, deterministic: bool = True):
        cfg = self.config
        n, length, h = hidden.shape
        heads = cfg.num_attention_heads
        head_dim = h // heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_INIT)

        def project(name):
            y = dense(h, ("embed", "heads"), name=name, **kw)(hidden)
            return y.reshape(n, length, heads, head_dim)

        q, k, v = project("query"), project("key"), project("value")
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(head_dim)
        # Softmax in float32 so bf16 compute keeps the same masking/normalisation behaviour.
        logits = logits.astype(jnp.float32)
        key_ok = attention_mask.astype(bool)[:, None, None, :]
        logits = jnp.where(key_ok, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        ctx = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, length, h)
        attn = dense(h, ("heads", "embed"), name="attention_output", **kw)(ctx)
        attn = nn.Dropout(cfg.hidden_dropout_prob)(attn, deterministic=deterministic)
        ln_kw = dict(epsilon=cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        x = layer_norm(name="attention_norm", **ln_kw)(attn + hidden)

        y = dense(cfg.intermediate_size, ("embed", "mlp"), name="intermediate", **kw)(x)
        y = _ACTIVATIONS[cfg.hidden_act](y)
        y = dense(h, ("mlp", "embed"), name="output", **kw)(y)
        y = nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=deterministic)
        out = _constrain(layer_norm(name="output_norm", **ln_kw)(y + x))
        return (out, out) if self.carry_output else out


class BertEncoder(nn.Module):
    """BERT embeddings + encoder stack (no pooler).

    `__call__(input_ids [N, L] int, attention_mask [N, L] (1 = token, 0 = padding),
    token_type_ids [N, L] or None (= zeros), deterministic)` returns
    `{"last_hidden_state": [N, L, H], "hidden_states": (num_hidden_layers + 1) × [N, L, H]}` where
    `hidden_states[0]` is the embedding output, as HF's `output_hidden_states=True`.
    `remat=True` rematerialises each layer in the backward pass (activation memory ∝ 1 layer),
    as `remat_policy="full"`; other policies are listed in `ovd_jax.models.remat`.
    `scan_layers=True` runs the layers as one `nn.scan`ned module `layer` whose parameters carry
    a leading layer axis (logical name "layers") instead of `layer_<i>`
    (`ovd_jax.models.scan_layout` converts between the layouts).
    """

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "none"
    scan_layers: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        cfg = self.config
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"BertEncoder: input_ids {input_ids.shape} and attention_mask "
                f"{attention_mask.shape} must both be [N, L]."
            )
        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"BertEncoder: sequence length {length} exceeds max_position_embeddings="
                f"{cfg.max_position_embeddings}; truncate the tokens."
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)

        def embed(num, axes, name):
            return nn.Embed(
                num, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                embedding_init=nn.with_logical_partitioning(_INIT, axes), name=name,
            )

        x = embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
        x = x + embed(cfg.max_position_embeddings, ("pos", "embed"), "position_embeddings")(
            jnp.arange(length)[None, :]
        )
        x = x + embed(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(
            token_type_ids
        )
        x = layer_norm(
            epsilon=cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
            name="embeddings_norm",
        )(x)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        x = _constrain(x)

        # static_argnums counts `self` as 0, so `deterministic` is argument 3.
        layer_cls = remat_module(BertLayer, self.remat, self.remat_policy, static_argnums=(3,))
        if self.scan_layers:
            scanned = nn.scan(
                layer_cls, variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            out, per_layer = scanned(cfg, self.dtype, self.param_dtype, carry_output=True,
                                     name="layer")(x, attention_mask, deterministic)
            hidden_states = (x, *(per_layer[i] for i in range(cfg.num_hidden_layers)))
            return {"last_hidden_state": out, "hidden_states": hidden_states}
        hidden_states = [x]
        for i in range(cfg.num_hidden_layers):
            x = layer_cls(cfg, self.dtype, self.param_dtype, name=f"layer_{i}")(
                x, attention_mask, deterministic
            )
            hidden_states.append(x)
        return {"last_hidden_state": x, "hidden_states": tuple(hidden_states)}


def mean_pool(hidden, attention_mask):
    """Attention-mask-weighted mean over tokens: [N, L, H], [N, L] → [N, H] (sentence-BERT)."""
    m = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
