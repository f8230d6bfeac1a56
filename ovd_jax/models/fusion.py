"""GLIP's deep vision-language fusion: bi-directional cross-attention (X-MHA) between the image
feature pyramid and the text tokens.

Three modules, from the inside out:

* `BiMultiHeadAttention(v_dim, l_dim, embed_dim=2048, num_heads=8, dropout=0.1, ...)`
  `(v [N, Sv, v_dim], lang [N, Sl, l_dim], l_mask [N, Sl] bool | None, deterministic=True)
  -> (dv [N, Sv, v_dim], dl [N, Sl, l_dim])`: one logit matrix `q_v · k_l` per head is used twice,
  by image queries attending over text (softmax over tokens, padded tokens masked) and, transposed,
  by text queries attending over image positions (softmax over positions, nothing masked).
* `BiAttentionBlock(v_dim, l_dim, ..., init_values=1e-4, drop_path=0.0)`: pre-LayerNorm on both
  streams, the attention above, layer-scale vectors and drop-path. Same call and return shapes.
* `VLFuse(init_values=1/6, ...)` `(levels: list of [N, H_i, W_i, C], text [N, L, D],
  text_mask [N, L] bool, deterministic=True) -> (list of [N, H_i, W_i, C], [N, L, D])`: flattens
  every pyramid level into one image sequence, runs the block once, splits the result back.

Numerics follow the official implementation (constants below): queries scaled by head_dim**-0.5,
logits clamped to +-50000 (the fp16 range guard), the text->image direction re-centred on its row
maximum and clamped again, padded tokens pushed to -9e15. The residual of the block is added to
the *normalised* streams, as upstream does (the block outputs LN(v) + gamma_v * dv).

Parameter names mirror GLIP's checkpoint (`v_proj`, `l_proj`, `values_v_proj`, `values_l_proj`,
`out_v_proj`, `out_l_proj`, `layer_norm_v`, `layer_norm_l`, `gamma_v`, `gamma_l`, VLFuse's block
is `b_attn`), so an importer only transposes kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovd_jax.models.layers import Dtype, dense, layer_norm
from ovd_jax.models.swin import DropPath

# Upstream's range guard for half precision (CLAMP_{MIN,MAX}_FOR_{UNDER,OVER}FLOW).
CLAMP = 50000.0
# Additive value upstream gives to padded text tokens before the image->text softmax.
MASK_VALUE = -9e15

_XAVIER = nn.initializers.xavier_uniform()


def _check_streams(name: str, v, lang, l_mask, v_dim: int | None, l_dim: int | None):
    if v.ndim != 3 or lang.ndim != 3:
        raise ValueError(f"{name}: v must be [N, Sv, Dv] and lang [N, Sl, Dl]; got v {v.shape}, "
                         f"lang {lang.shape}.")
    if v.shape[0] != lang.shape[0]:
        raise ValueError(f"{name}: v and lang must have the same batch size; got {v.shape[0]} and "
                         f"{lang.shape[0]}.")
    if v_dim is not None and v.shape[-1] != v_dim:
        raise ValueError(f"{name}: v has {v.shape[-1]} channels but v_dim={v_dim}; build the "
                         "module with the image stream's width.")
    if l_dim is not None and lang.shape[-1] != l_dim:
        raise ValueError(f"{name}: lang has {lang.shape[-1]} channels but l_dim={l_dim}; build the "
                         "module with the text stream's width.")
    if l_mask is not None and tuple(l_mask.shape) != tuple(lang.shape[:2]):
        raise ValueError(f"{name}: l_mask must be [N, Sl] = {tuple(lang.shape[:2])} (True = real "
                         f"token); got {tuple(l_mask.shape)}.")


class BiMultiHeadAttention(nn.Module):
    """Bi-directional image<->text multi-head attention (GLIP's `BiMultiHeadAttention`).

    Constructor: `BiMultiHeadAttention(v_dim: int, l_dim: int, embed_dim: int = 2048,
    num_heads: int = 8, dropout: float = 0.1, stable_softmax_2d: bool = False,
    clamp_min_for_underflow: bool = True, clamp_max_for_overflow: bool = True,
    dtype=jnp.float32, param_dtype=jnp.float32)`.

    Call: `(v [N, Sv, v_dim], lang [N, Sl, l_dim], l_mask [N, Sl] bool | None = None,
    deterministic: bool = True) -> (dv [N, Sv, v_dim], dl [N, Sl, l_dim])`, in `dtype`.
    `l_mask` is True for real tokens; padded tokens receive no attention from image positions
    (their own rows in `dl` are computed like any other and are meaningless). Image positions are
    never masked (GLIP has no image padding mask). Dropout (rate `dropout`) acts on both
    attention-probability tensors and needs the 'dropout' rng when `deterministic=False`.

    `stable_softmax_2d` subtracts the maximum logit of the whole batch before the clamp (GLIP's
    STABLE_SOFTMAX_2D option, Grounding DINO's only behaviour); off by default, as in GLIP.
    Logits and softmaxes are computed in float32 even when `dtype` is bfloat16 (float64 when
    `dtype` is float64).
    """

    v_dim: int
    l_dim: int
    embed_dim: int = 2048
    num_heads: int = 8
    dropout: float = 0.1
    stable_softmax_2d: bool = False
    clamp_min_for_underflow: bool = True
    clamp_max_for_overflow: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _clamp(self, x):
        if self.clamp_min_for_underflow:
            x = jnp.maximum(x, -CLAMP)
        if self.clamp_max_for_overflow:
            x = jnp.minimum(x, CLAMP)
        return x

    @nn.compact
    def __call__(self, v, lang, l_mask=None, deterministic: bool = True):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"BiMultiHeadAttention: embed_dim={self.embed_dim} is not divisible "
                             f"by num_heads={self.num_heads}; pick a head count that divides it.")
        _check_streams("BiMultiHeadAttention", v, lang, l_mask, self.v_dim, self.l_dim)
        n, sv, _ = v.shape
        sl = lang.shape[1]
        heads, head_dim = self.num_heads, self.embed_dim // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_XAVIER)

        def proj(x, name):
            y = dense(self.embed_dim, ("embed", "heads"), name=name, **kw)(x)
            return y.reshape(*y.shape[:-1], heads, head_dim)

        q = proj(v, "v_proj") * jnp.asarray(head_dim**-0.5, self.dtype)
        k = proj(lang, "l_proj")
        val_v = proj(v, "values_v_proj")
        val_l = proj(lang, "values_l_proj")

        # [N, heads, Sv, Sl]; at least float32 because the clamps and the -9e15 mask live there.
        acc = jnp.promote_types(self.dtype, jnp.float32)
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=acc)
        if self.stable_softmax_2d:
            logits = logits - jnp.max(logits)
        logits = self._clamp(logits)

        # Text queries over image positions: the transposed logits, re-centred per row.
        logits_l = jnp.swapaxes(logits, -1, -2)
        logits_l = self._clamp(logits_l - jnp.max(logits_l, axis=-1, keepdims=True))
        probs_l = jax.nn.softmax(logits_l, axis=-1)

        # Image queries over text tokens: only here are padded tokens masked out.
        if l_mask is not None:
            logits = jnp.where(l_mask.astype(bool)[:, None, None, :], logits, MASK_VALUE)
        probs_v = jax.nn.softmax(logits, axis=-1)

        probs_v = nn.Dropout(self.dropout)(probs_v, deterministic=deterministic)
        probs_l = nn.Dropout(self.dropout)(probs_l, deterministic=deterministic)

        out_v = jnp.einsum("nhqk,nkhd->nqhd", probs_v.astype(self.dtype), val_l)
        out_l = jnp.einsum("nhkq,nqhd->nkhd", probs_l.astype(self.dtype), val_v)
        out_v = out_v.reshape(n, sv, self.embed_dim)
        out_l = out_l.reshape(n, sl, self.embed_dim)
        out_v = dense(self.v_dim, ("heads", "embed"), name="out_v_proj", **kw)(out_v)
        out_l = dense(self.l_dim, ("heads", "embed"), name="out_l_proj", **kw)(out_l)
        return out_v, out_l


class BiAttentionBlock(nn.Module):
    """Pre-LN bi-directional attention block with layer scale (GLIP's `BiAttentionBlock*`).

    Constructor: `BiAttentionBlock(v_dim: int, l_dim: int, embed_dim: int = 2048,
    num_heads: int = 8, dropout: float = 0.1, drop_path: float = 0.0, init_values: float = 1e-4,
    stable_softmax_2d: bool = False, clamp_min_for_underflow: bool = True,
    clamp_max_for_overflow: bool = True, layer_norm_eps: float = 1e-5, dtype=jnp.float32,
    param_dtype=jnp.float32)`. GLIP builds it with `init_values = 1 / number of DyHead layers`.

    Call: `(v [N, Sv, v_dim], lang [N, Sl, l_dim], l_mask [N, Sl] bool | None = None,
    deterministic: bool = True) -> (v_out [N, Sv, v_dim], l_out [N, Sl, l_dim])` with
    `v_out = LN_v(v) + DropPath(gamma_v * dv)` and `l_out = LN_l(lang) + DropPath(gamma_l * dl)`,
    where (dv, dl) = BiMultiHeadAttention(LN_v(v), LN_l(lang)). As upstream, the residual starts
    from the normalised streams, not from the raw inputs.
    """

    v_dim: int
    l_dim: int
    embed_dim: int = 2048
    num_heads: int = 8
    dropout: float = 0.1
    drop_path: float = 0.0
    init_values: float = 1e-4
    stable_softmax_2d: bool = False
    clamp_min_for_underflow: bool = True
    clamp_max_for_overflow: bool = True
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, v, lang, l_mask=None, deterministic: bool = True):
        _check_streams("BiAttentionBlock", v, lang, l_mask, self.v_dim, self.l_dim)
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        v = layer_norm(epsilon=self.layer_norm_eps, name="layer_norm_v", **dt)(v)
        lang = layer_norm(epsilon=self.layer_norm_eps, name="layer_norm_l", **dt)(lang)
        dv, dl = BiMultiHeadAttention(
            self.v_dim, self.l_dim, self.embed_dim, self.num_heads, self.dropout,
            self.stable_softmax_2d, self.clamp_min_for_underflow, self.clamp_max_for_overflow,
            name="attn", **dt,
        )(v, lang, l_mask, deterministic)
        init = nn.initializers.constant(self.init_values)
        gamma_v = self.param("gamma_v", nn.with_logical_partitioning(init, ("norm",)),
                             (self.v_dim,), self.param_dtype)
        gamma_l = self.param("gamma_l", nn.with_logical_partitioning(init, ("norm",)),
                             (self.l_dim,), self.param_dtype)
        v = v + DropPath(self.drop_path)(gamma_v.astype(self.dtype) * dv, deterministic)
        lang = lang + DropPath(self.drop_path)(gamma_l.astype(self.dtype) * dl, deterministic)
        v = nn.with_logical_constraint(v, ("batch", None, "embed"))
        lang = nn.with_logical_constraint(lang, ("batch", "length", "embed"))
        return v, lang


class VLFuse(nn.Module):
    """GLIP's early-fusion step (`VLFuse`, type MHA-B) over a whole feature pyramid.

    Constructor: `VLFuse(embed_dim: int = 2048, num_heads: int = 8, dropout: float = 0.1,
    drop_path: float = 0.0, init_values: float = 1/6, stable_softmax_2d: bool = False,
    clamp_min_for_underflow: bool = True, clamp_max_for_overflow: bool = True,
    dtype=jnp.float32, param_dtype=jnp.float32)`. Set `init_values = 1 / num_dyhead_layers`
    (GLIP: 1/6 for Swin-T, 1/8 for Swin-L). Widths are taken from the inputs.

    Call: `(levels: Sequence[[N, H_i, W_i, C]], text [N, L, D], text_mask [N, L] bool (True = real
    token) | None, deterministic: bool = True) -> (list[[N, H_i, W_i, C]], text_out [N, L, D])`.
    All levels are flattened row-major and concatenated into ONE image sequence of
    sum_i H_i * W_i positions, so every text token attends over the whole pyramid at once.
    The block's parameters live under `b_attn`.
    """

    embed_dim: int = 2048
    num_heads: int = 8
    dropout: float = 0.1
    drop_path: float = 0.0
    init_values: float = 1.0 / 6
    stable_softmax_2d: bool = False
    clamp_min_for_underflow: bool = True
    clamp_max_for_overflow: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, levels: Sequence[jax.Array], text, text_mask=None,
                 deterministic: bool = True):
        levels = list(levels)
        if not levels:
            raise ValueError("VLFuse: levels is empty; pass the list of FPN maps [N, H, W, C].")
        n, _, _, c = levels[0].shape
        for i, x in enumerate(levels):
            if x.ndim != 4 or x.shape[0] != n or x.shape[-1] != c:
                raise ValueError(f"VLFuse: every level must be [N={n}, H, W, C={c}]; level {i} "
                                 f"is {x.shape}.")
        sizes = [(x.shape[1], x.shape[2]) for x in levels]
        flat = jnp.concatenate([x.reshape(n, h * w, c) for x, (h, w) in zip(levels, sizes)],
                               axis=1)
        v, lang = BiAttentionBlock(
            v_dim=c, l_dim=text.shape[-1], embed_dim=self.embed_dim, num_heads=self.num_heads,
            dropout=self.dropout, drop_path=self.drop_path, init_values=self.init_values,
            stable_softmax_2d=self.stable_softmax_2d,
            clamp_min_for_underflow=self.clamp_min_for_underflow,
            clamp_max_for_overflow=self.clamp_max_for_overflow,
            dtype=self.dtype, param_dtype=self.param_dtype, name="b_attn",
        )(flat, text, text_mask, deterministic)
        out, start = [], 0
        for h, w in sizes:
            out.append(v[:, start:start + h * w].reshape(n, h, w, c))
            start += h * w
        out = [nn.with_logical_constraint(x, ("batch", None, None, "embed")) for x in out]
        return out, lang
