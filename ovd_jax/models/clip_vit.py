"""CLIP's ViT image tower (ViT-B/32, B/16, L/14, L/14@336px) in Flax, NHWC input.

Pooled embedding (the class token after ln_post, projected) and dense patch tokens, for any input
size divisible by the patch size: the position embedding's patch grid is resized with
torch-compatible bicubic interpolation when the grid differs from the pretraining one.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ovd_jax.models.clip_resnet import resize_bicubic
from ovd_jax.models.clip_text import canonical_name
from ovd_jax.models.clip_transformer import Transformer
from ovd_jax.models.layers import Dtype, conv, layer_norm


class VisionTransformer(nn.Module):
    """CLIP ViT. Images are NHWC float, already normalised with CLIP's mean/std.

    Attributes:
      input_resolution: pretraining image size (sets the position-embedding grid).
      patch_size, width, layers, heads: ViT size (heads = width/64 in CLIP).
      output_dim: projected embedding width.
      act: 'quick_gelu' (OpenAI) or 'gelu'.
      remat: rematerialise each transformer block in the backward pass.
      remat_policy, scan_layers, attention_impl: passed to the `Transformer` (remat policy name,
        scanned layer stack, attention core); the defaults keep the per-layer reference path.

    `__call__(images[N,H,W,3]) -> [N, output_dim]` (CLIP encode_image, unnormalised).
    `tokens(images, project=False) -> [N, H/p, W/p, width]` patch tokens after ln_post
    (`[N, H/p, W/p, output_dim]` when project=True).
    """

    input_resolution: int
    patch_size: int
    width: int
    layers: int
    heads: int
    output_dim: int
    act: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "none"
    scan_layers: bool = False
    attention_impl: str = "auto"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p, w = self.patch_size, self.width
        self.grid = self.input_resolution // p
        self.conv1 = conv(w, (p, p), p, padding="VALID", use_bias=False, **kw)
        scale = w**-0.5
        self.class_embedding = self.param(
            "class_embedding", nn.with_logical_partitioning(nn.initializers.normal(scale),
                                                            ("embed",)),
            (w,), self.param_dtype)
        self.positional_embedding = self.param(
            "positional_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(scale), ("pos", "embed")),
            (self.grid**2 + 1, w), self.param_dtype)
        self.ln_pre = layer_norm(**kw)
        self.transformer = Transformer(
            self.layers, self.heads, self.act, self.remat, remat_policy=self.remat_policy,
            scan_layers=self.scan_layers, attention_impl=self.attention_impl, **kw)
        self.ln_post = layer_norm(**kw)
        self.proj = self.param(
            "proj", nn.with_logical_partitioning(nn.initializers.normal(scale), ("embed", None)),
            (w, self.output_dim), self.param_dtype)

    def _encode(self, images):
        """[N, H, W, 3] -> ([N, 1 + h*w, width] transformer output, (h, w))."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"VisionTransformer expects NHWC images [N, H, W, 3], got "
                             f"{images.shape}.")
        n, hh, ww, _ = images.shape
        if hh % self.patch_size or ww % self.patch_size:
            raise ValueError(f"Image size {hh}x{ww} is not divisible by the patch size "
                             f"{self.patch_size}; resize or pad the images.")
        x = self.conv1(images.astype(self.dtype))
        h, w = x.shape[1:3]
        x = x.reshape(n, h * w, self.width)
        pos = self.positional_embedding
        if (h, w) != (self.grid, self.grid):
            grid = pos[1:].reshape(self.grid, self.grid, self.width)
            pos = jnp.concatenate([pos[:1], resize_bicubic(grid, (h, w)).reshape(h * w, -1)], 0)
        cls = jnp.broadcast_to(self.class_embedding.astype(self.dtype), (n, 1, self.width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)[None]
        x = self.transformer(self.ln_pre(x))
        return x, (h, w)

    def tokens(self, images, project: bool = False):
        """Dense patch tokens after ln_post: [N, H/p, W/p, width] (output_dim if project)."""
        x, (h, w) = self._encode(images)
        x = self.ln_post(x[:, 1:])
        if project:
            x = x @ self.proj.astype(self.dtype)
        return x.reshape(x.shape[0], h, w, x.shape[-1])

    def __call__(self, images):
        """CLIP image embedding (unnormalised): [N, H, W, 3] -> [N, output_dim]."""
        x, _ = self._encode(images)
        return self.ln_post(x[:, 0]) @ self.proj.astype(self.dtype)


# (input_resolution, patch, width, layers, output_dim); heads = width / 64.
_PRESETS = {
    "ViT-B-32": (224, 32, 768, 12, 512),
    "ViT-B-16": (224, 16, 768, 12, 512),
    "ViT-L-14": (224, 14, 1024, 24, 768),
    "ViT-L-14-336": (336, 14, 1024, 24, 768),
    "tiny": (64, 16, 64, 2, 64),
}


def clip_vit(name: str, **kw) -> VisionTransformer:
    """A VisionTransformer preset: 'ViT-B/32', 'ViT-B/16', 'ViT-L/14', 'ViT-L/14@336px' (or the
    open_clip spellings 'ViT-B-32' ...), or 'tiny' (64 px, patch 16, width 64, 2 layers)."""
    key = canonical_name(name)
    if key not in _PRESETS:
        raise ValueError(f"Unknown CLIP ViT preset {name!r}; choose one of {list(_PRESETS)}.")
    res, patch, width, layers, out = _PRESETS[key]
    cfg = dict(input_resolution=res, patch_size=patch, width=width, layers=layers,
               heads=max(1, width // 64), output_dim=out)
    cfg.update(kw)
    return VisionTransformer(**cfg)
