"""Multi-head dot-product attention shared by the transformer towers (CLIP, BERT, Swin).

One module with separate q/k/v/out projections (named `q_proj`, `k_proj`, `v_proj`, `out_proj`),
so that checkpoints from OpenAI/open_clip (fused `in_proj_weight`), Hugging Face (separate
projections) and CLIP's AttentionPool2d (`c_proj` output of another width) all map onto the same
parameter tree by a reshape in the importer.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovd_jax.models.layers import Dtype, dense


def causal_mask(length: int) -> jnp.ndarray:
    """Boolean [1, 1, length, length] mask, True where query i may attend to key j (j <= i)."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention.

    Attributes:
      num_heads: number of heads; the q/k/v width must be divisible by it.
      qkv_features: width of the fused q/k/v projections (defaults to the query input width).
      out_features: width of the output projection (defaults to the query input width).
      use_bias: whether the projections have biases.
      dtype / param_dtype: compute and storage dtypes.

    Call with `x_q` [B, Tq, Dq], optional `x_kv` [B, Tk, Dkv] (self-attention when None), an
    optional boolean `mask` broadcastable to [B, heads, Tq, Tk] (True = attend) and an optional
    additive float `bias` of the same broadcast shape. Returns [B, Tq, out_features].
    Softmax is computed in float32 whatever `dtype` is.
    """

    num_heads: int
    qkv_features: int | None = None
    out_features: int | None = None
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_q, x_kv=None, mask=None, bias=None):
        x_kv = x_q if x_kv is None else x_kv
        features = self.qkv_features or x_q.shape[-1]
        if features % self.num_heads:
            raise ValueError(
                f"MultiHeadAttention: width {features} is not divisible by num_heads="
                f"{self.num_heads}; pick a head count that divides the width."
            )
        head_dim = features // self.num_heads
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)

        def proj(x, name):
            y = dense(features, ("embed", "heads"), name=name, **kw)(x)
            return y.reshape(*y.shape[:-1], self.num_heads, head_dim)

        q = proj(x_q, "q_proj")
        k = proj(x_kv, "k_proj")
        v = proj(x_kv, "v_proj")
        # Scores and softmax in float32: bf16 logits lose the small differences that matter.
        logits = jnp.einsum(
            "...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32
        ) * (head_dim**-0.5)
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("...hqk,...khd->...qhd", weights, v)
        out = out.reshape(*out.shape[:-2], features)
        return dense(
            self.out_features or x_q.shape[-1], ("heads", "embed"), name="out_proj", **kw
        )(out)
