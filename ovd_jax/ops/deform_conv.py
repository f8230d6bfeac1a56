"""Modulated deformable convolution v2 (torchvision.ops.deform_conv2d) in NHWC.

Layout (the same channel order as torchvision, moved to the last axis):
  offset [N, Ho, Wo, 2 * offset_groups * kh * kw]: channel g * 2K + 2k is the y (row) offset and
      g * 2K + 2k + 1 the x (column) offset of kernel tap k = i * kw + j for offset group g
      (torchvision's NCHW offset `o` converts with `o.permute(0, 2, 3, 1)`);
  mask [N, Ho, Wo, offset_groups * kh * kw]: channel g * K + k;
  kernel [kh, kw, Cin, Cout] (torchvision's weight [Cout, Cin, kh, kw] is `w.permute(2, 3, 1, 0)`).
Input channel c belongs to offset group c // (Cin / offset_groups).

Tap (i, j) of output (y, x) samples the input at
  (y * stride - pad + i * dilation + dy, x * stride - pad + j * dilation + dx)
with torchvision's deformable bilinear interpolation: 0 outside (-1, H) x (-1, W), and each of
the four corners that falls outside the map contributes 0 (zero padding). The sample is
multiplied by the mask, then a matmul with the kernel gives the output. Implemented as gathers
from per-image flattened [H*W*groups, Cin/groups] tables plus one einsum: jittable, differentiable
w.r.t. input, offsets, mask and kernel.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _pair(v, name) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints; got {v}.")
    return int(v[0]), int(v[1])


def deform_conv2d(
    x,
    offset,
    mask,
    kernel,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    bias=None,
):
    """torchvision `deform_conv2d` (v2 when `mask` is given, v1 when None) on NHWC arrays.

    x: [N, H, W, Cin]; offset: [N, Ho, Wo, 2*G*kh*kw]; mask: [N, Ho, Wo, G*kh*kw] or None;
    kernel: [kh, kw, Cin, Cout]; bias: [Cout] or None. G (offset groups) is inferred from the
    offset channels. Returns [N, Ho, Wo, Cout] with Ho = (H + 2 pad - dil (kh - 1) - 1) // stride
    + 1 (likewise Wo), in the promoted dtype of x and kernel.
    """
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    n, h, w, cin = x.shape
    kh, kw, kcin, cout = kernel.shape
    if kcin != cin:
        raise ValueError(f"kernel expects {kcin} input channels but x has {cin} (groups=1 only).")
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    k = kh * kw
    if offset.shape[:3] != (n, ho, wo) or offset.shape[-1] % (2 * k) != 0:
        raise ValueError(
            f"offset must be [N, Ho, Wo, 2*groups*kh*kw] = [{n}, {ho}, {wo}, 2*G*{k}]; "
            f"got {offset.shape}."
        )
    g = offset.shape[-1] // (2 * k)
    if cin % g != 0:
        raise ValueError(f"Cin={cin} must be divisible by the offset groups ({g}).")
    if mask is not None and mask.shape != (n, ho, wo, g * k):
        raise ValueError(f"mask must be [N, Ho, Wo, groups*kh*kw] = {(n, ho, wo, g * k)}; "
                         f"got {mask.shape}.")
    cg = cin // g
    f32 = jnp.float32
    off = offset.astype(f32).reshape(n, ho, wo, g, k, 2)
    tap_i = jnp.repeat(jnp.arange(kh), kw) * dh  # [K]
    tap_j = jnp.tile(jnp.arange(kw), kh) * dw
    base_y = (jnp.arange(ho) * sh - ph)[:, None] + tap_i[None, :]  # [Ho, K]
    base_x = (jnp.arange(wo) * sw - pw)[:, None] + tap_j[None, :]  # [Wo, K]
    py = base_y[None, :, None, None, :].astype(f32) + off[..., 0]  # [N, Ho, Wo, G, K]
    px = base_x[None, None, :, None, :].astype(f32) + off[..., 1]
    inside = (py > -1) & (py < h) & (px > -1) & (px < w)
    if mask is not None:
        scale = jnp.where(inside, mask.astype(f32).reshape(n, ho, wo, g, k), 0.0)
    else:
        scale = inside.astype(f32)
    y0 = jnp.floor(py)
    x0 = jnp.floor(px)
    ly = py - y0
    lx = px - x0
    y0 = y0.astype(jnp.int32)
    x0 = x0.astype(jnp.int32)
    # One table per image, gathered under vmap: the batch is a gather batching dimension, so
    # batch-sharded inputs are sampled on their own device (no cross-device gather).
    table = x.reshape(n, h * w * g, cg)
    grp = jnp.arange(g, dtype=jnp.int32)[None, None, None, :, None]
    cols = None
    for yy, wy in ((y0, 1.0 - ly), (y0 + 1, ly)):
        for xx, wx in ((x0, 1.0 - lx), (x0 + 1, lx)):
            ok = (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
            row = (jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)) * g + grp
            wt = jnp.where(ok, wy * wx, 0.0) * scale
            term = jax.vmap(lambda t, r: t[r])(table, row) * wt[..., None]  # [N,Ho,Wo,G,K,Cg]
            cols = term if cols is None else cols + term
    kern = kernel.reshape(k, g, cg, cout)
    dtype = jnp.promote_types(x.dtype, kernel.dtype)
    out = jnp.einsum("nhwgkc,kgco->nhwo", cols.astype(dtype), kern.astype(dtype))
    if bias is not None:
        out = out + bias.astype(dtype)
    return out


class ModulatedDeformConv(nn.Module):
    """Deformable conv v2 layer: owns the kernel (and bias); offsets and mask are inputs.

    (DyHead's spatial attention and DetCLIPv2's classification branch predict offsets/mask with
    their own ordinary conv and pass them here, usually mask = sigmoid(logits).)
    Call with x [N, H, W, Cin], offset [N, Ho, Wo, 2*G*kh*kw], mask [N, Ho, Wo, G*kh*kw] | None;
    returns [N, Ho, Wo, features]. Kernel axes (None, None, 'conv_in', 'conv_out').
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 1
    dilation: int | tuple[int, int] = 1
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, offset, mask=None):
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, (None, None, "conv_in", "conv_out")),
            (kh, kw, x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                (self.features,), self.param_dtype,
            )
            bias = bias.astype(self.dtype)
        return deform_conv2d(
            x.astype(self.dtype), offset, mask, kernel.astype(self.dtype), self.strides,
            self.padding, self.dilation, bias,
        )
