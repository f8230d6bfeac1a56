"""GLIP's DyHead layer (`DyConv`): scale-, spatial- and task-aware attention over a pyramid.

For every level l of the pyramid (finest first) one DyConv layer computes

    same   = Norm(Conv3x3(x_l))                                  (spatial-aware, same level)
    finer  = Norm(Conv3x3_stride2(x_{l-1}))                      (if l > 0)
    coarse = upsample_bilinear(Norm(Conv3x3(x_{l+1})), size(x_l)) (if l < L - 1)
    y_l    = mean_k(f_k * hsigmoid(relu(conv1x1(avgpool(f_k)))))  (scale-aware, use_dyfuse)
    out_l  = DyReLU(y_l)  or  relu(y_l)                            (task-aware, use_dyrelu)

with three convolutions (`conv_coarser`, `conv_same`, `conv_finer`) shared by all levels. With
`use_deform` the convolutions are modulated deformable 3x3 convs whose offsets (18 channels,
torchvision's (dy, dx) per tap order) and mask (9 channels, sigmoid) are predicted by one 3x3 conv
(`offset`) on x_l and reused for all three branches of level l. Norm is GroupNorm(16 groups,
eps 1e-5) when `use_gn` (GLIP's USE_GN), else nothing. The upsampling is bilinear with
align_corners=True (upstream calls `F.upsample_bilinear`). hsigmoid(x) = relu6(x + 3) / 6, so
after the ReLU the scale attention lies in [0.5, 1].

The coarser branch needs offsets at the coarser resolution, but upstream hands the deformable
kernel the offset map of level l. The CUDA kernel does not check shapes: per image it reads the
first 18 * Hc * Wc offset values (and 9 * Hc * Wc mask values) of the NCHW buffer as if they were
an [18, Hc, Wc] map. `coarser_offsets="upstream"` (default) reproduces that read exactly, so GLIP
checkpoints behave as trained; `"subsample"` instead takes the level-l offsets at the coarser
grid's nearest positions, a geometrically meaningful alternative for training from scratch.

Parameter names and GLIP's checkpoint keys (`dyhead_tower.{k}.` prefix):
    conv_coarser/{conv,norm}  DyConv.0.{conv,bn}     conv_same/{conv,norm}  DyConv.1.{conv,bn}
    conv_finer/{conv,norm}    DyConv.2.{conv,bn}     scale_attn             AttnConv.1
    offset                    offset                 dyrelu/{fc1,fc2}       relu.fc.{0,2}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ovd_jax.models.layers import Dtype, conv, dense
from ovd_jax.ops.deform_conv import ModulatedDeformConv

_NORMAL_001 = nn.initializers.normal(0.01)
# PyTorch's default Conv2d/Linear weight init (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)).
_TORCH_DEFAULT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_default_bias(fan_in: int):
    """PyTorch's default bias init U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def hard_sigmoid(x):
    """relu6(x + 3) / 6, the `h_sigmoid` of GLIP's DyHead."""
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D linear interpolation with align_corners=True."""
    src = np.zeros(n_out) if n_out == 1 else np.arange(n_out) * ((n_in - 1) / (n_out - 1))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - w1)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m


def resize_bilinear_align_corners(x, height: int, width: int):
    """Bilinear resize with align_corners=True (torch `F.upsample_bilinear`).

    x: [N, h, w, C] -> [N, height, width, C], in x's dtype. Separable, so two small matmuls.
    """
    my = jnp.asarray(_interp_matrix(x.shape[1], height), x.dtype)
    mx = jnp.asarray(_interp_matrix(x.shape[2], width), x.dtype)
    y = jnp.einsum("oh,nhwc->nowc", my, x)
    return jnp.einsum("pw,nowc->nopc", mx, y)


def _upstream_coarser_read(a, hc: int, wc: int):
    """The offset/mask map of level l as upstream's kernel reads it for the coarser input.

    a: [N, H, W, K] (NHWC); returns [N, hc, wc, K]: per image, the first K*hc*wc values of the
    NCHW buffer reinterpreted as a [K, hc, wc] map.
    """
    n, _, _, k = a.shape
    flat = jnp.transpose(a, (0, 3, 1, 2)).reshape(n, -1)[:, : k * hc * wc]
    return jnp.transpose(flat.reshape(n, k, hc, wc), (0, 2, 3, 1))


def _subsample(a, hc: int, wc: int):
    """Nearest-position subsampling of an [N, H, W, K] map onto an hc x wc grid."""
    h, w = a.shape[1:3]
    iy = (np.arange(hc) * h) // hc
    ix = (np.arange(wc) * w) // wc
    return a[:, iy][:, :, ix]


class DyReLU(nn.Module):
    """Dynamic ReLU (GLIP's `DYReLU` with its DyHead settings: K2, bias, reduction 4, lambda 1).

    Takes x [N, H, W, C] and returns [N, H, W, C]:
      theta = hsigmoid(fc2(relu(fc1(mean_hw(x))))) split into (a1, b1, a2, b2), each [N, C];
      out = max(x * ((a1 - .5) * 2 + 1) + (b1 - .5), x * ((a2 - .5) * 2) + (b2 - .5)).
    fc1: C -> C // 4, fc2: C // 4 -> 4 C (PyTorch default init, as upstream).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        squeeze = c // 4
        if squeeze < 1:
            raise ValueError(f"DyReLU: needs at least 4 channels; got {c}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_TORCH_DEFAULT)
        y = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        y = dense(squeeze, ("embed", "mlp"), name="fc1", bias_init=_torch_default_bias(c), **kw)(y)
        y = jax.nn.relu(y)
        y = dense(4 * c, ("mlp", "embed"), name="fc2", bias_init=_torch_default_bias(squeeze),
                  **kw)(y)
        y = hard_sigmoid(y)[:, None, None, :]
        a1, b1, a2, b2 = jnp.split(y, 4, axis=-1)
        a1 = (a1 - 0.5) * 2.0 + 1.0
        a2 = (a2 - 0.5) * 2.0
        return jnp.maximum(x * a1 + (b1 - 0.5), x * a2 + (b2 - 0.5))


class _Conv3x3Norm(nn.Module):
    """3x3 conv (plain or modulated deformable), padding 1, then optional GroupNorm."""

    features: int
    stride: int
    deformable: bool
    use_gn: bool
    gn_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, offset=None, mask=None):
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.deformable:
            # Upstream's ModulatedDeformConv keeps its own U(+-1/sqrt(fan_in)) init.
            y = ModulatedDeformConv(self.features, (3, 3), strides=self.stride, padding=1,
                                    kernel_init=_TORCH_DEFAULT, name="conv", **dt)(x, offset, mask)
        else:
            y = conv(self.features, (3, 3), self.stride, ((1, 1), (1, 1)),
                     kernel_init=_NORMAL_001, name="conv", **dt)(x)
        if self.use_gn:
            if self.features % self.gn_groups:
                raise ValueError(f"DyConv: {self.features} channels are not divisible by "
                                 f"gn_groups={self.gn_groups}; change one of them.")
            y = nn.GroupNorm(
                num_groups=self.gn_groups, epsilon=1e-5, use_fast_variance=False,
                scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                name="norm", **dt,
            )(y)
        return y


class DyConv(nn.Module):
    """One DyHead layer over a feature pyramid (GLIP's `DyConv`).

    Constructor: `DyConv(out_channels: int = 256, use_deform: bool = True,
    use_dyrelu: bool = True, use_dyfuse: bool = True, use_gn: bool = True, gn_groups: int = 16,
    coarser_offsets: str = "upstream", dtype=jnp.float32, param_dtype=jnp.float32)`.
    GLIP-T/L use all switches on; `use_deform=False, use_dyrelu=False` is a cheap CPU variant.
    (GLIP's first layer keeps these switches only when its input width equals out_channels.)

    Call: `(levels: Sequence[[N, H_l, W_l, C_in]]) -> list[[N, H_l, W_l, out_channels]]`, finest
    level first; each level must be the stride-2 reduction of the previous one
    (H_l = ceil(H_{l-1} / 2), likewise W). The input width may differ from out_channels.
    """

    out_channels: int = 256
    use_deform: bool = True
    use_dyrelu: bool = True
    use_dyfuse: bool = True
    use_gn: bool = True
    gn_groups: int = 16
    coarser_offsets: str = "upstream"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, levels: Sequence[jax.Array]):
        levels = [jnp.asarray(x) for x in levels]
        self._check(levels)
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cin = levels[0].shape[-1]

        def branch(stride, name):
            return _Conv3x3Norm(self.out_channels, stride, self.use_deform, self.use_gn,
                                self.gn_groups, name=name, **dt)

        conv_coarser = branch(1, "conv_coarser")
        conv_same = branch(1, "conv_same")
        conv_finer = branch(2, "conv_finer")
        offset_conv = None
        if self.use_deform:
            offset_conv = conv(27, (3, 3), 1, ((1, 1), (1, 1)), kernel_init=_TORCH_DEFAULT,
                               bias_init=_torch_default_bias(9 * cin), name="offset", **dt)
        scale_attn = None
        if self.use_dyfuse:
            scale_attn = conv(1, (1, 1), 1, "VALID", kernel_init=_NORMAL_001, name="scale_attn",
                              **dt)
        act = DyReLU(name="dyrelu", **dt) if self.use_dyrelu else jax.nn.relu

        outs = []
        for i, x in enumerate(levels):
            h, w = x.shape[1:3]
            offset = mask = None
            if offset_conv is not None:
                om = offset_conv(x)
                offset, mask = om[..., :18], jax.nn.sigmoid(om[..., 18:])
            feats = [conv_same(x, offset, mask)]
            if i > 0:
                feats.append(conv_finer(levels[i - 1], offset, mask))
            if i < len(levels) - 1:
                up = levels[i + 1]
                hc, wc = up.shape[1:3]
                off_c = mask_c = None
                if offset is not None:
                    resample = (_upstream_coarser_read if self.coarser_offsets == "upstream"
                                else _subsample)
                    off_c, mask_c = resample(offset, hc, wc), resample(mask, hc, wc)
                feats.append(resize_bilinear_align_corners(conv_coarser(up, off_c, mask_c), h, w))
            if scale_attn is not None:
                weighted = []
                for f in feats:
                    pooled = jnp.mean(f.astype(jnp.float32), axis=(1, 2), keepdims=True)
                    attn = hard_sigmoid(jax.nn.relu(scale_attn(pooled.astype(self.dtype))))
                    weighted.append(f * attn)
                feats = weighted
            y = sum(feats[1:], feats[0]) / len(feats)
            outs.append(nn.with_logical_constraint(act(y), ("batch", None, None, "embed")))
        return outs

    def _check(self, levels):
        if self.coarser_offsets not in ("upstream", "subsample"):
            raise ValueError(f"DyConv: coarser_offsets={self.coarser_offsets!r}; use 'upstream' "
                             "or 'subsample'.")
        if not levels:
            raise ValueError("DyConv: levels is empty; pass the list of pyramid maps [N, H, W, C].")
        n, _, _, c = levels[0].shape
        for i, x in enumerate(levels):
            if x.ndim != 4 or x.shape[0] != n or x.shape[-1] != c:
                raise ValueError(f"DyConv: every level must be [N={n}, H, W, C={c}]; level {i} "
                                 f"is {x.shape}.")
            if i > 0:
                ph, pw = levels[i - 1].shape[1:3]
                if x.shape[1:3] != ((ph + 1) // 2, (pw + 1) // 2):
                    raise ValueError(
                        f"DyConv: level {i} is {x.shape[1]}x{x.shape[2]} but a stride-2 reduction "
                        f"of level {i - 1} ({ph}x{pw}) is {(ph + 1) // 2}x{(pw + 1) // 2}; pass "
                        "consecutive pyramid levels, finest first.")
