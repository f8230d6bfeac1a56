"""Feature pyramid network producing P3..P7 for GLIP's DyHead (maskrcnn_benchmark's FPN).

Given backbone maps C3, C4, C5 (strides 8, 16, 32, finest first):

    lateral_i = Conv1x1(C_i);  top-down: M5 = lateral_5, M_i = lateral_i + nearest_up(M_{i+1})
    P_i = Conv3x3(M_i)
    P6 = Conv3x3_stride2(P5)   (p6_from="p5": GLIP's Swin and CvT builds, whose P6P7 block gets
                                in_channels == out_channels and therefore reads P5)
    P6 = Conv3x3_stride2(C5)   (p6_from="c5": RetinaNet-style ResNet builds with USE_C5)
    P7 = Conv3x3_stride2(relu(P6))

Convs have biases, no norm and no activation (GLIP leaves FPN.USE_GN / USE_RELU off) and the
kaiming_uniform(a=1) init of maskrcnn_benchmark. Nearest upsampling is PyTorch's 'nearest'
(src = floor(dst * in / out)). Stride-2 convs pad 1 on every side as PyTorch does.

GLIP's default config also enables DropBlock (prob 0.3, block 3) on M3 and M4 during training;
here it is `drop_block_prob` (default 0: plain FPN) and needs the 'dropout' rng.

Backbones: Swin gives res2..res5 (pass the last three, e.g. 192/384/768 channels for Swin-T);
CLIP ResNet gives res3/res4/res5. A single-scale backbone (CLIP ViT, stride 16) is handled by
`single_scale_input=True`: a simple pyramid in the spirit of ViTDet makes C3 with a 2x2 stride-2
transposed conv, keeps C4 = the ViT map and makes C5 with a 2x2 stride-2 max-pool, then the FPN
above runs unchanged.

Parameter names: `lateral_{i}`, `output_{i}` (i = 0 for the finest input; GLIP's `fpn_inner*`,
`fpn_layer*`), `p6`, `p7` (GLIP's `top_blocks.p6/p7`), `vit_up` for the ViT adapter.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ovd_jax.models.layers import Dtype, conv

# maskrcnn_benchmark's conv_with_kaiming_uniform: kaiming_uniform_(w, a=1) = U(+-sqrt(3/fan_in)).
_KAIMING_A1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
_PAD1 = ((1, 1), (1, 1))


def resize_nearest(x, height: int, width: int):
    """PyTorch `F.interpolate(mode='nearest', size=...)` on NHWC: [N, h, w, C] -> [N, H, W, C]."""
    h, w = x.shape[1:3]
    iy = np.minimum((np.arange(height) * h) // height, h - 1)
    ix = np.minimum((np.arange(width) * w) // width, w - 1)
    return x[:, iy][:, :, ix]


def drop_block(x, rng, prob: float, block_size: int):
    """DropBlock as GLIP's DropBlock2D: x [N, H, W, C] -> same shape.

    Seeds are drawn per (image, position) with probability prob / block_size**2, grown to
    block_size x block_size squares, zeroed in all channels, and the survivors rescaled by
    (#positions / #kept positions) over the whole batch.
    """
    n, h, w, _ = x.shape
    gamma = prob / block_size**2
    seeds = jax.random.bernoulli(rng, gamma, (n, h, w, 1)).astype(x.dtype)
    pad = block_size // 2
    grown = nn.max_pool(seeds, (block_size, block_size), strides=(1, 1),
                        padding=((pad, pad), (pad, pad)))
    if block_size % 2 == 0:
        grown = grown[:, :-1, :-1]
    keep = 1.0 - grown
    scale = keep.size / jnp.maximum(keep.sum(), 1.0)
    return x * keep * scale


class FPN(nn.Module):
    """Feature pyramid P3..P(5 + num_extra_levels), each with `out_channels` channels.

    Constructor: `FPN(out_channels: int = 256, num_inputs: int = 3, num_extra_levels: int = 2,
    p6_from: str = "p5", single_scale_input: bool = False, drop_block_prob: float = 0.0,
    drop_block_size: int = 3, dtype=jnp.float32, param_dtype=jnp.float32)`.
    `num_extra_levels` in {0, 1, 2} drops P7 / P6 for small images; `p6_from` is "p5" (GLIP's
    Swin build) or "c5". GLIP-T's training config would use `drop_block_prob=0.3`.

    Call: `(features: Sequence[[N, H_i, W_i, C_i]], deterministic: bool = True)
    -> list[[N, H_l, W_l, out_channels]]`, finest first. `features` is the backbone's maps,
    finest first; the last `num_inputs` are used (C3, C4, C5). With `single_scale_input=True`,
    pass exactly one stride-16 map. P6/P7 have size ceil(H/2) of the level below.
    """

    out_channels: int = 256
    num_inputs: int = 3
    num_extra_levels: int = 2
    p6_from: str = "p5"
    single_scale_input: bool = False
    drop_block_prob: float = 0.0
    drop_block_size: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], deterministic: bool = True):
        feats = self._inputs(list(features))
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_KAIMING_A1)
        if self.single_scale_input:
            (x,) = feats
            c = x.shape[-1]
            up = nn.ConvTranspose(
                c, (2, 2), strides=(2, 2), padding="VALID", name="vit_up",
                kernel_init=nn.with_logical_partitioning(_KAIMING_A1,
                                                         (None, None, "conv_in", "conv_out")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                dtype=self.dtype, param_dtype=self.param_dtype,
            )(x)
            down = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            feats = [up, x, down]

        laterals = [conv(self.out_channels, (1, 1), 1, "VALID", name=f"lateral_{i}", **dt)(f)
                    for i, f in enumerate(feats)]
        merged = [None] * len(laterals)
        merged[-1] = laterals[-1]
        for i in range(len(laterals) - 2, -1, -1):
            h, w = laterals[i].shape[1:3]
            merged[i] = laterals[i] + resize_nearest(merged[i + 1], h, w)
        outs = []
        for i, m in enumerate(merged):
            # Upstream drops blocks on every merged map but the top one (which it never merges).
            if self.drop_block_prob > 0 and not deterministic and i < len(merged) - 1:
                m = drop_block(m, self.make_rng("dropout"), self.drop_block_prob,
                               self.drop_block_size)
            outs.append(conv(self.out_channels, (3, 3), 1, _PAD1, name=f"output_{i}", **dt)(m))

        if self.num_extra_levels >= 1:
            src = outs[-1] if self.p6_from == "p5" else feats[-1]
            p6 = conv(self.out_channels, (3, 3), 2, _PAD1, name="p6", **dt)(src)
            outs.append(p6)
            if self.num_extra_levels >= 2:
                outs.append(conv(self.out_channels, (3, 3), 2, _PAD1, name="p7", **dt)(
                    jax.nn.relu(p6)))
        return [nn.with_logical_constraint(o, ("batch", None, None, "embed")) for o in outs]

    def _inputs(self, features):
        if self.num_extra_levels not in (0, 1, 2):
            raise ValueError(f"FPN: num_extra_levels={self.num_extra_levels}; use 0, 1 or 2.")
        if self.p6_from not in ("p5", "c5"):
            raise ValueError(f"FPN: p6_from={self.p6_from!r}; use 'p5' or 'c5'.")
        if self.single_scale_input:
            if len(features) != 1:
                raise ValueError(f"FPN: single_scale_input=True takes one stride-16 map; got "
                                 f"{len(features)} maps.")
        elif len(features) < self.num_inputs or self.num_inputs < 1:
            raise ValueError(f"FPN: needs at least num_inputs={self.num_inputs} backbone maps "
                             f"(finest first); got {len(features)}.")
        else:
            features = features[len(features) - self.num_inputs:]
        n = features[0].shape[0]
        for i, f in enumerate(features):
            if f.ndim != 4 or f.shape[0] != n:
                raise ValueError(f"FPN: backbone maps must be [N={n}, H, W, C]; map {i} is "
                                 f"{f.shape}.")
        return features
