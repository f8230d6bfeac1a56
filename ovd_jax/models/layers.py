"""Small building blocks shared by every tower: layers whose parameters carry logical axis names.

Every parameter in ovd_jax is created through `nn.with_logical_partitioning`, so the mesh rules in
a config (`config.sharding.rules`, see `ovd_jax/training/sharding.py`) decide where it lives. The
logical names used across the package are:

    'embed'    model width of a transformer / channels of a feature map fed to a dense layer
    'mlp'      hidden width of an MLP
    'heads'    attention heads x head dim (the fused q/k/v output features)
    'vocab'    token vocabulary
    'conv_in'  input channels of a convolution kernel
    'conv_out' output channels of a convolution kernel
    'norm'     scale/bias of a normalisation layer
    'pos'      position-embedding positions
    None       replicated (kernel spatial dims, scalars)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

default_kernel_init = nn.initializers.lecun_normal()


def dense(
    features: int,
    axes: tuple[str | None, str | None] = ("embed", "mlp"),
    *,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init=default_kernel_init,
    bias_init=nn.initializers.zeros,
    name: str | None = None,
) -> nn.Dense:
    """A `nn.Dense` whose kernel is partitioned by `axes` (in, out) and bias by `(axes[1],)`."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)),
        name=name,
    )


def conv(
    features: int,
    kernel_size: Sequence[int] = (3, 3),
    strides: Sequence[int] | int = 1,
    padding: Any = "SAME",
    *,
    use_bias: bool = True,
    feature_group_count: int = 1,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init=default_kernel_init,
    bias_init=nn.initializers.zeros,
    name: str | None = None,
) -> nn.Conv:
    """An NHWC `nn.Conv` with kernel axes (None, None, 'conv_in', 'conv_out')."""
    return nn.Conv(
        features,
        tuple(kernel_size),
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        feature_group_count=feature_group_count,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(bias_init, ("conv_out",)),
        name=name,
    )


def layer_norm(
    *,
    epsilon: float = 1e-5,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.LayerNorm:
    """LayerNorm with scale/bias on the 'norm' axis (computed in float32 when dtype is bf16)."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def l2_normalize(x: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
    """L2 normalisation along `axis` with a gradient that stays finite at x = 0."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + 1e-12)


class FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics, as detectron2 and CLIP use for detection backbones.

    The running mean/var live in the 'batch_stats' collection and are never updated (they come
    from a pretrained checkpoint, or are 0/1 for a model trained from scratch); scale and bias
    are ordinary trainable parameters.

    Takes `x` [..., C] and returns the normalised array of the same shape.
    """

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (c,),
            self.param_dtype,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (c,),
            self.param_dtype,
        )
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), self.param_dtype))
        var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), self.param_dtype))
        mul = scale * jnp.reciprocal(jnp.sqrt(var.value + self.epsilon))
        add = bias - mean.value * mul
        return (x * mul.astype(self.dtype) + add.astype(self.dtype)).astype(self.dtype)
