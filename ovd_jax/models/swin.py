"""Swin Transformer (v1) backbone: classification logits and multi-scale detection features.

Semantics (both upstreams agree except where noted):
  * patch embedding: 4×4 stride-4 conv + LayerNorm. The input is zero-padded on the right/bottom to
    a multiple of the patch size first (official/GLIP); torchvision floors instead, so the two agree
    whenever H and W are multiples of 4 (detection inputs are padded to multiples of 32 anyway).
  * each block: x + DropPath(W-MSA(LN(x))), then x + DropPath(MLP(LN(x))); the normalised map is
    zero-padded to window multiples, odd blocks cyclically shift by window//2 and mask attention
    across the wrapped-around regions (additive −100, as upstream), relative position bias per head.
  * when the window covers the whole (padded) map in a dimension, torchvision (and the official
    classification model) skips the shift in that dimension; the official detection backbone
    used by GLIP keeps shifting. `skip_shift_if_window_covers` selects the behaviour (True =
    torchvision; the GLIP importer sets False). It only matters for maps ≤ window (e.g. stage 4 of
    inputs below 224 px).
  * patch merging between stages: pad H, W to even, concatenate the 2×2 neighbours in the order
    (0,0), (1,0), (0,1), (1,1), LayerNorm, bias-free linear 4C → 2C.
  * stochastic depth: per-sample drop with rate growing linearly from 0 to
    `stochastic_depth_prob` over all blocks; active only when `deterministic=False` (needs the
    'dropout' rng).

Outputs:
  * `__call__(images [N, H, W, 3]) -> logits [N, num_classes]` — torchvision's classifier: final
    LayerNorm on the last stage, global average pool, linear head.
  * `features(images) -> {"res2", "res3", "res4", "res5"}` NHWC maps at strides 4/8/16/32 with
    C, 2C, 4C, 8C channels: each stage's output *before* the following patch merging, passed through
    that stage's own output LayerNorm when `out_norms[i]` is set (GLIP/mmdet detection backbones,
    checkpoint keys `norm{i}`), raw otherwise (torchvision's `features[1,3,5,7]` outputs).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ovd_jax.models.layers import conv, dense, layer_norm

Dtype = Any

_TRUNC = nn.initializers.truncated_normal(stddev=0.02)
_MASK_VALUE = -100.0  # upstream's additive mask value; kept so pretrained weights behave the same


def _pad_to(x, mult_h: int, mult_w: int):
    """Zero-pads NHWC `x` on the bottom/right so H, W are multiples of (mult_h, mult_w)."""
    _, h, w, _ = x.shape
    ph, pw = (-h) % mult_h, (-w) % mult_w
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    return x


@functools.cache
def relative_position_index(window: int) -> np.ndarray:
    """[w², w²] int index into the ((2w−1)², heads) bias table, upstream's layout."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    coords = coords.reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # [2, T, T], in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]


@functools.cache
def shifted_window_mask(hp: int, wp: int, window: int, shift_h: int, shift_w: int) -> np.ndarray:
    """[num_windows, w², w²] additive mask (0 or −100) for the shifted windows of an hp×wp map."""
    region = np.zeros((hp, wp), np.int32)
    def slices(size, shift):
        # An unshifted dimension is one region (torchvision shifts only the dims it must).
        if shift == 0:
            return (slice(0, size),)
        return (slice(0, size - window), slice(size - window, size - shift),
                slice(size - shift, size))

    h_sl, w_sl = slices(hp, shift_h), slices(wp, shift_w)
    for i, hs in enumerate(h_sl):
        for j, ws in enumerate(w_sl):
            region[hs, ws] = 3 * i + j
    win = region.reshape(hp // window, window, wp // window, window).transpose(0, 2, 1, 3)
    win = win.reshape(-1, window * window)
    return np.where(win[:, None, :] != win[:, :, None], _MASK_VALUE, 0.0).astype(np.float32)


class WindowAttention(nn.Module):
    """(Shifted-)window multi-head self-attention with relative position bias.

    Takes the normalised map `x` [N, H, W, C] and returns [N, H, W, C].
    """

    num_heads: int
    window: int
    shift: int
    skip_shift_if_window_covers: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, h, w, c = x.shape
        ws, heads = self.window, self.num_heads
        x = _pad_to(x, ws, ws)
        hp, wp = x.shape[1:3]
        cover = self.skip_shift_if_window_covers
        sh = 0 if (cover and ws >= hp) else self.shift
        sw = 0 if (cover and ws >= wp) else self.shift
        if sh or sw:
            x = jnp.roll(x, (-sh, -sw), axis=(1, 2))
        nh, nw = hp // ws, wp // ws
        # [N, nh, ws, nw, ws, C] -> [N, nW, T, C] with T = ws² tokens per window.
        t = x.reshape(n, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5)
        t = t.reshape(n, nh * nw, ws * ws, c)

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_TRUNC)
        qkv = dense(3 * c, ("embed", "heads"), name="qkv", **kw)(t)
        qkv = qkv.reshape(n, nh * nw, ws * ws, 3, heads, c // heads)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        q = q * (c // heads) ** -0.5
        logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k).astype(jnp.float32)

        table = self.param(
            "relative_position_bias_table",
            nn.with_logical_partitioning(_TRUNC, (None, None)),
            ((2 * ws - 1) ** 2, heads),
            self.param_dtype,
        )
        idx = relative_position_index(ws)
        bias = jnp.asarray(table, jnp.float32)[idx.reshape(-1)].reshape(ws * ws, ws * ws, heads)
        logits = logits + bias.transpose(2, 0, 1)
        if sh or sw:
            mask = shifted_window_mask(hp, wp, ws, sh, sw)  # [nW, T, T], a trace-time constant
            logits = logits + mask[None, :, None]
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bwhqk,bwkhd->bwqhd", probs, v).reshape(n, nh * nw, ws * ws, c)
        out = dense(c, ("heads", "embed"), name="proj", **kw)(out)

        out = out.reshape(n, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, hp, wp, c)
        if sh or sw:
            out = jnp.roll(out, (sh, sw), axis=(1, 2))
        return out[:, :h, :w]


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's residual branch with prob `rate`, rescales the rest."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


class SwinBlock(nn.Module):
    """One Swin block on an NHWC map: [N, H, W, C] -> [N, H, W, C]."""

    num_heads: int
    window: int
    shift: int
    drop_path: float = 0.0
    mlp_ratio: float = 4.0
    eps: float = 1e-5
    skip_shift_if_window_covers: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        c = x.shape[-1]
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = layer_norm(epsilon=self.eps, name="norm1", **dt)(x)
        y = WindowAttention(self.num_heads, self.window, self.shift,
                            self.skip_shift_if_window_covers, name="attn", **dt)(y)
        x = x + DropPath(self.drop_path)(y, deterministic)
        y = layer_norm(epsilon=self.eps, name="norm2", **dt)(x)
        hidden = int(c * self.mlp_ratio)
        y = dense(hidden, ("embed", "mlp"), name="fc1", kernel_init=_TRUNC, **dt)(y)
        y = jax.nn.gelu(y, approximate=False)
        y = dense(c, ("mlp", "embed"), name="fc2", kernel_init=_TRUNC, **dt)(y)
        x = x + DropPath(self.drop_path)(y, deterministic)
        return nn.with_logical_constraint(x, ("batch", None, None, "embed"))


class PatchMerging(nn.Module):
    """2×2 neighbour concat → LayerNorm → linear: [N, H, W, C] -> [N, ⌈H/2⌉, ⌈W/2⌉, 2C]."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = _pad_to(x, 2, 2)
        x = jnp.concatenate(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1
        )
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layer_norm(epsilon=self.eps, name="norm", **dt)(x)
        return dense(2 * c, ("mlp", "embed"), use_bias=False, name="reduction",
                     kernel_init=_TRUNC, **dt)(x)


class SwinStage(nn.Module):
    """Blocks of one stage, then (optionally) the output norm and the patch merging.

    Returns `(stage_output, next_input)`: the stage output (after `out_norm` if enabled) at this
    stage's stride, and the merged map for the next stage (the raw stage output for the last
    stage, which the classifier's final norm consumes).
    """

    depth: int
    num_heads: int
    window: int
    drop_paths: tuple[float, ...]
    downsample: bool
    out_norm: bool
    mlp_ratio: float = 4.0
    eps: float = 1e-5
    skip_shift_if_window_covers: bool = True
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # static_argnums counts `self` as 0: `deterministic` is argument 2.
        block_cls = nn.remat(SwinBlock, static_argnums=(2,)) if self.remat else SwinBlock
        for i in range(self.depth):
            x = block_cls(
                self.num_heads, self.window, 0 if i % 2 == 0 else self.window // 2,
                self.drop_paths[i], self.mlp_ratio, self.eps, self.skip_shift_if_window_covers,
                name=f"block_{i}", **dt,
            )(x, deterministic)
        out = layer_norm(epsilon=self.eps, name="out_norm", **dt)(x) if self.out_norm else x
        nxt = PatchMerging(self.eps, name="downsample", **dt)(x) if self.downsample else x
        return out, nxt


class SwinTransformer(nn.Module):
    """Swin Transformer v1. See the module docstring for the exact semantics and outputs.

    `num_classes=0` builds no final norm/head (a pure detection backbone; `__call__` then raises).
    `out_norms[i]` adds an output LayerNorm to stage i's detection feature.
    """

    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    stochastic_depth_prob: float = 0.2
    num_classes: int = 1000
    out_norms: Sequence[bool] = (False, False, False, False)
    skip_shift_if_window_covers: bool = True
    layer_norm_eps: float = 1e-5
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if len(self.depths) != len(self.num_heads) or len(self.out_norms) != len(self.depths):
            raise ValueError(
                f"SwinTransformer: depths {self.depths}, num_heads {self.num_heads} and out_norms "
                f"{self.out_norms} must have one entry per stage."
            )
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = self.patch_size
        self.patch_proj = conv(self.embed_dim, (p, p), strides=p, padding="VALID",
                               kernel_init=_TRUNC, **dt)
        self.patch_norm = layer_norm(epsilon=self.layer_norm_eps, **dt)
        total = sum(self.depths)
        rates = [self.stochastic_depth_prob * i / max(total - 1, 1) for i in range(total)]
        stages, start = [], 0
        for s, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            stages.append(SwinStage(
                depth, heads, self.window_size, tuple(rates[start:start + depth]),
                downsample=s < len(self.depths) - 1, out_norm=bool(self.out_norms[s]),
                mlp_ratio=self.mlp_ratio, eps=self.layer_norm_eps,
                skip_shift_if_window_covers=self.skip_shift_if_window_covers,
                remat=self.remat, **dt,
            ))
            start += depth
        self.stages = stages
        if self.num_classes:
            self.norm = layer_norm(epsilon=self.layer_norm_eps, **dt)
            self.head = dense(self.num_classes, ("embed", None), kernel_init=_TRUNC, **dt)

    def _run(self, images, deterministic):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"SwinTransformer: images must be [N, H, W, 3], got {images.shape}.")
        x = _pad_to(images.astype(self.dtype), self.patch_size, self.patch_size)
        x = self.patch_norm(self.patch_proj(x))
        outs = []
        for stage in self.stages:
            out, x = stage(x, deterministic)
            outs.append(out)
        return outs, x

    def features(self, images, deterministic: bool = True) -> dict[str, jax.Array]:
        """images [N, H, W, 3] (normalised pixels) → {"res2".."res5"} NHWC at strides 4..32."""
        outs, _ = self._run(images, deterministic)
        return {f"res{i + 2}": o for i, o in enumerate(outs)}

    def __call__(self, images, deterministic: bool = True):
        """images [N, H, W, 3] → class logits [N, num_classes] (torchvision's head)."""
        if not self.num_classes:
            raise ValueError("SwinTransformer: num_classes=0 has no head; call .features().")
        _, last = self._run(images, deterministic)
        x = self.norm(last).astype(jnp.float32).mean(axis=(1, 2))
        return self.head(x.astype(self.dtype))


# Upstream hyper-parameters (torchvision's swin_t/s/b; stochastic depth 0.2/0.3/0.5).
ARCHS: dict[str, dict[str, Any]] = {
    "swin_t": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                   stochastic_depth_prob=0.2),
    "swin_s": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                   stochastic_depth_prob=0.3),
    "swin_b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                   stochastic_depth_prob=0.5),
    # A few-KB model for tests and smoke configs.
    "swin_tiny_test": dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4),
                           window_size=4, stochastic_depth_prob=0.1, num_classes=10),
}


def swin(arch: str, **overrides) -> SwinTransformer:
    """Builds a preset (`ARCHS` key) with field overrides; ValueError for an unknown arch."""
    if arch not in ARCHS:
        raise ValueError(f"swin: unknown arch {arch!r}; choose one of {sorted(ARCHS)}.")
    return SwinTransformer(**{**ARCHS[arch], **overrides})


def swin_t(**overrides) -> SwinTransformer:
    return swin("swin_t", **overrides)


def swin_s(**overrides) -> SwinTransformer:
    return swin("swin_s", **overrides)


def swin_b(**overrides) -> SwinTransformer:
    return swin("swin_b", **overrides)
