"""The pre-LayerNorm transformer stack shared by CLIP's text tower and its ViT image tower.

Layers are separate modules `resblocks_<i>` by default (the layout every importer writes), or,
with `scan_layers=True`, one `nn.scan`ned module `resblocks` whose parameters carry a leading
layer axis (logical name "layers"): one compiled block instead of `layers` copies.
`ovd_jax.models.scan_layout` converts between the two layouts.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovd_jax.models.attention import MultiHeadAttention
from ovd_jax.models.layers import Dtype, dense, layer_norm
from ovd_jax.models.remat import remat_module


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
    returns [N, L, width] (the pair (x, None) when `carry_output`, the form `nn.scan` wants).
    """

    heads: int
    act: str = "quick_gelu"
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    carry_output: bool = False

    @nn.compact
    def __call__(self, x, mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = x.shape[-1]
        y = layer_norm(name="ln_1", **kw)(x)
        x = x + MultiHeadAttention(num_heads=self.heads, attention_impl=self.attention_impl,
                                   name="attn", **kw)(y, mask=mask)
        y = layer_norm(name="ln_2", **kw)(x)
        y = dense(int(width * self.mlp_ratio), ("embed", "mlp"), name="c_fc", **kw)(y)
        y = ACTIVATIONS[self.act](y)
        y = dense(width, ("mlp", "embed"), name="c_proj", **kw)(y)
        x = nn.with_logical_constraint(x + y, ("batch", "length", "embed"))
        return (x, None) if self.carry_output else x


class Transformer(nn.Module):
    """`layers` ResidualAttentionBlocks: [N, L, width] (+ optional boolean mask broadcastable to
    [N, heads, L, L]) -> [N, L, width].

    Attributes:
      layers, heads, act: stack size, attention heads, MLP activation.
      remat: rematerialise each block (the same as remat_policy="full").
      remat_policy: see `ovd_jax.models.remat` ("none", "full", "dots", ...).
      scan_layers: one scanned block with stacked parameters `resblocks` instead of the per-layer
        modules `resblocks_<i>`; the same function, a different parameter layout.
      attention_impl: "auto", "xla" or "cudnn" (see `ovd_jax.models.attention`).
    """

    layers: int
    heads: int
    act: str = "quick_gelu"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = False
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, mask=None):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"Unknown activation {self.act!r}; choose one of {list(ACTIVATIONS)}.")
        block = remat_module(ResidualAttentionBlock, self.remat, self.remat_policy)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                  attention_impl=self.attention_impl)
        if self.scan_layers:
            scanned = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=nn.broadcast, length=self.layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(self.heads, self.act, carry_output=True, name="resblocks", **kw)(x, mask)
            return x
        for i in range(self.layers):
            x = block(self.heads, self.act, name=f"resblocks_{i}", **kw)(x, mask)
        return x
