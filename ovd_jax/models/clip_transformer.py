"""The pre-LayerNorm transformer stack shared by CLIP's text tower and its ViT image tower."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovd_jax.models.attention import MultiHeadAttention
from ovd_jax.models.layers import Dtype, dense, layer_norm


def quick_gelu(x):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    # torch nn.GELU() / HF "gelu" are the exact erf form, not the tanh approximation.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)); x + mlp(ln_2(x)), MLP width 4x (CLIP's `ResidualAttentionBlock`).

    Takes [N, L, width] and an optional boolean mask broadcastable to [N, heads, L, L];
    returns [N, L, width].
    """

    heads: int
    act: str = "quick_gelu"
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = x.shape[-1]
        y = layer_norm(name="ln_1", **kw)(x)
        x = x + MultiHeadAttention(num_heads=self.heads, name="attn", **kw)(y, mask=mask)
        y = layer_norm(name="ln_2", **kw)(x)
        y = dense(int(width * self.mlp_ratio), ("embed", "mlp"), name="c_fc", **kw)(y)
        y = ACTIVATIONS[self.act](y)
        y = dense(width, ("mlp", "embed"), name="c_proj", **kw)(y)
        x = x + y
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Transformer(nn.Module):
    """`layers` ResidualAttentionBlocks (params `resblocks_<i>`); optional remat per block."""

    layers: int
    heads: int
    act: str = "quick_gelu"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"Unknown activation {self.act!r}; choose one of {list(ACTIVATIONS)}.")
        block = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
        for i in range(self.layers):
            x = block(self.heads, self.act, dtype=self.dtype, param_dtype=self.param_dtype,
                      name=f"resblocks_{i}")(x, mask)
        return x
