"""OpenAI CLIP's ModifiedResNet image tower (RN50 ... RN50x64) in Flax, NHWC.

Differences from a torchvision ResNet, as in CLIP: a 3-convolution stem followed by a 2x2 average
pool; anti-aliased strides (a 2x2 average pool after the 3x3 conv of a strided block and before
the 1x1 conv of its shortcut, every conv has stride 1 except the first stem conv); an attention
pool (AttentionPool2d) instead of global average pooling. Batch norm is frozen (detectron2 and
RegionCLIP do the same), statistics in the 'batch_stats' collection.

RegionCLIP splits the tower in two at stride 16: `res4` (stem..layer3) is the detector backbone;
`roi_head` (= `attnpool(res5(x))`) runs on each 14x14 RoIAlign crop of the res4 map.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovd_jax.models.attention import MultiHeadAttention
from ovd_jax.models.layers import Dtype, FrozenBatchNorm, conv
from ovd_jax.models.remat import remat_module


def avg_pool2(x, stride: int):
    """`stride`x`stride` average pool with stride `stride`, floor on odd sizes (torch AvgPool2d)."""
    if stride == 1:
        return x
    return nn.avg_pool(x, (stride, stride), strides=(stride, stride), padding="VALID")


def _cubic_weights(t, a: float = -0.75):
    """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 (torch: a=-0.75)."""

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return jnp.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_matrix(in_size: int, out_size: int) -> jnp.ndarray:
    """[out_size, in_size] matrix of 1-D bicubic interpolation with align_corners=False and
    border replication, the same sampling as torch `F.interpolate(mode='bicubic')`."""
    scale = in_size / out_size
    src = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale - 0.5
    base = jnp.floor(src)
    w = _cubic_weights(src - base)  # [out, 4]
    idx = jnp.clip(base[:, None].astype(jnp.int32) + jnp.arange(-1, 3)[None], 0, in_size - 1)
    return jnp.sum(jax.nn.one_hot(idx, in_size, dtype=jnp.float32) * w[..., None], axis=1)


def resize_bicubic(grid, out_hw: tuple[int, int]):
    """Resize a [h, w, C] grid to [H, W, C] with torch-compatible bicubic interpolation.

    No antialiasing (torch's default), so it matches `F.interpolate(..., mode='bicubic',
    align_corners=False)` also when shrinking; the CLIP/ViT position-embedding resizes in
    open_clip and timm use exactly that call.
    """
    h, w = grid.shape[:2]
    if (h, w) == tuple(out_hw):
        return grid
    mh = _bicubic_matrix(h, out_hw[0]).astype(grid.dtype)
    mw = _bicubic_matrix(w, out_hw[1]).astype(grid.dtype)
    return jnp.einsum("Hh,Ww,hwc->HWc", mh, mw, grid, precision=jax.lax.Precision.HIGHEST)


class Bottleneck(nn.Module):
    """CLIP bottleneck block: 1x1 -> 3x3 -> [avgpool stride] -> 1x1 (x4), anti-aliased shortcut.

    Takes [N, H, W, Cin] and returns [N, H/stride, W/stride, planes*4].
    """

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out_ch = self.planes * 4
        y = conv(self.planes, (1, 1), padding="VALID", use_bias=False, name="conv1", **kw)(x)
        y = nn.relu(FrozenBatchNorm(name="bn1", **kw)(y))
        y = conv(self.planes, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv2",
                 **kw)(y)
        y = nn.relu(FrozenBatchNorm(name="bn2", **kw)(y))
        y = avg_pool2(y, self.stride)
        y = conv(out_ch, (1, 1), padding="VALID", use_bias=False, name="conv3", **kw)(y)
        y = FrozenBatchNorm(name="bn3", **kw)(y)
        shortcut = x
        if self.stride > 1 or x.shape[-1] != out_ch:
            shortcut = avg_pool2(x, self.stride)
            shortcut = conv(out_ch, (1, 1), padding="VALID", use_bias=False,
                            name="downsample_conv", **kw)(shortcut)
            shortcut = FrozenBatchNorm(name="downsample_bn", **kw)(shortcut)
        return nn.relu(y + shortcut.astype(y.dtype))


class AttentionPool2d(nn.Module):
    """CLIP's attention pool: the mean token (plus position embeddings) attends to all tokens.

    The position embedding holds `spatial_dim**2 + 1` rows (mean token first). An input whose
    h x w differs from spatial_dim x spatial_dim gets the spatial rows resized with
    torch-compatible bicubic interpolation (`resize_bicubic`); at CLIP's native sizes (224/32 = 7,
    RegionCLIP's 14x14 RoI -> 7x7 res5) nothing is interpolated.

    Takes [M, h, w, C] and returns [M, output_dim]. Only the mean-token query is computed: the
    other outputs of OpenAI's full self-attention are discarded by CLIP anyway.
    """

    spatial_dim: int
    num_heads: int
    output_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        m, h, w, c = x.shape
        pos = self.param(
            "positional_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(c**-0.5), ("pos", "embed")),
            (self.spatial_dim**2 + 1, c),
            self.param_dtype,
        )
        if (h, w) != (self.spatial_dim, self.spatial_dim):
            grid = pos[1:].reshape(self.spatial_dim, self.spatial_dim, c)
            pos = jnp.concatenate([pos[:1], resize_bicubic(grid, (h, w)).reshape(h * w, c)], 0)
        tokens = x.reshape(m, h * w, c).astype(self.dtype)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        tokens = tokens + pos.astype(self.dtype)[None]
        out = MultiHeadAttention(
            num_heads=self.num_heads, out_features=self.output_dim, dtype=self.dtype,
            param_dtype=self.param_dtype, attention_impl=self.attention_impl, name="attn",
        )(tokens[:, :1], tokens)
        return out[:, 0]


class ModifiedResNet(nn.Module):
    """CLIP ModifiedResNet. Input images are NHWC, float, already normalised with CLIP's mean/std.

    Attributes:
      layers: blocks per stage (4 ints).
      output_dim: width of the attention-pooled embedding.
      heads: attention-pool heads (width*32/64 in CLIP).
      input_resolution: the pretraining image size; sets the attention-pool position grid
        (input_resolution/32).
      width: stem width; stage i has width*2**i planes and width*2**i*4 output channels.
      remat: rematerialise each bottleneck in the backward pass (saves activation memory);
        the same as remat_policy="full".
      remat_policy: which values of each bottleneck the backward pass keeps
        (`ovd_jax.models.remat`: "none", "full", "dots", ...).
      attention_impl: the attention pool's core, "auto", "xla" or "cudnn"
        (`ovd_jax.models.attention`).

    Methods (each usable as `model.apply(variables, x, method=...)`):
      `__call__(images[N,H,W,3]) -> [N, output_dim]` (CLIP encode_image, unnormalised)
      `res4(images) -> [N, H/16, W/16, width*16]`
      `res5(x[M,h,w,width*16]) -> [M, h/2, w/2, width*32]`
      `attnpool(x[M,h,w,width*32]) -> [M, output_dim]`
      `roi_head(x[M,h,w,width*16]) -> [M, output_dim]` (= attnpool(res5(x)))
    """

    layers: Sequence[int]
    output_dim: int
    heads: int
    input_resolution: int = 224
    width: int = 64
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "none"
    attention_impl: str = "auto"

    def setup(self):
        if len(self.layers) != 4:
            raise ValueError(f"ModifiedResNet.layers must have 4 entries, got {self.layers}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        w = self.width
        pad = ((1, 1), (1, 1))
        self.conv1 = conv(w // 2, (3, 3), 2, padding=pad, use_bias=False, **kw)
        self.bn1 = FrozenBatchNorm(**kw)
        self.conv2 = conv(w // 2, (3, 3), 1, padding=pad, use_bias=False, **kw)
        self.bn2 = FrozenBatchNorm(**kw)
        self.conv3 = conv(w, (3, 3), 1, padding=pad, use_bias=False, **kw)
        self.bn3 = FrozenBatchNorm(**kw)
        block = remat_module(Bottleneck, self.remat, self.remat_policy)
        stages = []
        for i, n in enumerate(self.layers):
            stride = 1 if i == 0 else 2
            stages.append(
                [block(w * 2**i, stride if j == 0 else 1, **kw) for j in range(n)]
            )
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attn_pool = AttentionPool2d(
            self.input_resolution // 32, self.heads, self.output_dim,
            attention_impl=self.attention_impl, **kw
        )

    def stem(self, images):
        """[N, H, W, 3] -> [N, H/4, W/4, width]."""
        x = images.astype(self.dtype)
        x = nn.relu(self.bn1(self.conv1(x)))
        x = nn.relu(self.bn2(self.conv2(x)))
        x = nn.relu(self.bn3(self.conv3(x)))
        return avg_pool2(x, 2)

    def res4(self, images):
        """Stem + layer1..3: [N, H, W, 3] -> [N, H/16, W/16, width*16] (RegionCLIP's C4 map)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"ModifiedResNet expects NHWC images [N, H, W, 3], got shape {images.shape}."
            )
        x = self.stem(images)
        for blk in (*self.layer1, *self.layer2, *self.layer3):
            x = blk(x)
        return x

    def res5(self, x):
        """layer4: [M, h, w, width*16] -> [M, h/2, w/2, width*32]."""
        for blk in self.layer4:
            x = blk(x)
        return x

    def attnpool(self, x):
        """AttentionPool2d: [M, h, w, width*32] -> [M, output_dim]."""
        return self.attn_pool(x)

    def roi_head(self, x):
        """RegionCLIP's region head: attnpool(res5(x)), [M, h, w, width*16] -> [M, output_dim]."""
        return self.attnpool(self.res5(x))

    def __call__(self, images):
        """CLIP image embedding (unnormalised): [N, H, W, 3] -> [N, output_dim]."""
        return self.attnpool(self.res5(self.res4(images)))


# OpenAI's released ResNet CLIPs: (layers, width, output_dim, input_resolution).
_PRESETS = {
    "RN50": ((3, 4, 6, 3), 64, 1024, 224),
    "RN101": ((3, 4, 23, 3), 64, 512, 224),
    "RN50x4": ((4, 6, 10, 6), 80, 640, 288),
    "RN50x16": ((6, 8, 18, 8), 96, 768, 384),
    "RN50x64": ((3, 15, 36, 10), 128, 1024, 448),
    # Tests and the CPU demo: 4 stages of one block, res4 has 256 channels, res5 512.
    "tiny": ((1, 1, 1, 1), 16, 64, 224),
}


def clip_resnet(name: str, **kw) -> ModifiedResNet:
    """A ModifiedResNet preset: 'RN50', 'RN101', 'RN50x4', 'RN50x16', 'RN50x64' or 'tiny'.

    Keyword arguments override the preset's fields (e.g. dtype=jnp.bfloat16, remat=True).
    Heads follow CLIP: width*32/64 (2 for 'tiny').
    """
    if name not in _PRESETS:
        raise ValueError(f"Unknown CLIP ResNet preset {name!r}; choose one of {list(_PRESETS)}.")
    layers, width, out_dim, res = _PRESETS[name]
    cfg = dict(layers=layers, width=width, output_dim=out_dim, input_resolution=res,
               heads=2 if name == "tiny" else width * 32 // 64)
    cfg.update(kw)
    return ModifiedResNet(**cfg)
