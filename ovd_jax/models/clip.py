"""CLIP: an image tower (ModifiedResNet or VisionTransformer), a text tower and a learned
temperature, plus a JSON-friendly config so imported checkpoints can be rebuilt.

Parameter tree: {'params': {'vision': ..., 'text': ..., 'logit_scale': ()},
'batch_stats': {'vision': ...}} (batch_stats only for ResNet towers).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ovd_jax.models.clip_resnet import ModifiedResNet
from ovd_jax.models.clip_text import TextTransformer
from ovd_jax.models.clip_vit import VisionTransformer


class CLIP(nn.Module):
    """Two towers and `logit_scale` (log of the inverse temperature, init log(1/0.07)).

    `encode_image(images[N,H,W,3]) -> [N, D]`, `encode_text(token_ids[N,L]) -> [N, D]` (both
    unnormalised); `__call__(images, token_ids) -> (image_emb, text_emb, logit_scale)`.
    """

    vision: nn.Module
    text: nn.Module

    def setup(self):
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(np.log(1 / 0.07)), ()),
            (), jnp.float32)

    def encode_image(self, images):
        return self.vision(images)

    def encode_text(self, token_ids):
        return self.text(token_ids)

    def __call__(self, images, token_ids):
        return self.encode_image(images), self.encode_text(token_ids), self.logit_scale


_VISION_FIELDS = {
    "resnet": ("layers", "output_dim", "heads", "input_resolution", "width"),
    "vit": ("input_resolution", "patch_size", "width", "layers", "heads", "output_dim", "act"),
}
_TEXT_FIELDS = ("vocab_size", "context_length", "width", "heads", "layers", "output_dim",
                "eot_token_id", "act")


def clip_config(model: CLIP) -> dict[str, Any]:
    """JSON-serialisable description of a CLIP built from our towers (dtypes excluded)."""
    kind = "resnet" if isinstance(model.vision, ModifiedResNet) else "vit"
    vision = {"type": kind, **{f: getattr(model.vision, f) for f in _VISION_FIELDS[kind]}}
    if kind == "resnet":
        vision["layers"] = list(vision["layers"])
    return {"vision": vision, "text": {f: getattr(model.text, f) for f in _TEXT_FIELDS}}


def build_clip(config: dict[str, Any], **kw) -> CLIP:
    """Rebuild a CLIP from `clip_config` output; `kw` (dtype, param_dtype, remat) go to both
    towers."""
    try:
        vision = dict(config["vision"])
        kind = vision.pop("type")
        text = dict(config["text"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"Not a CLIP model config (needs 'vision' with 'type', and 'text'): "
                         f"{config!r}") from e
    if kind == "resnet":
        vision["layers"] = tuple(vision["layers"])
        vis = ModifiedResNet(**vision, **kw)
    elif kind == "vit":
        vis = VisionTransformer(**vision, **kw)
    else:
        raise ValueError(f"Unknown CLIP vision type {kind!r}; expected 'resnet' or 'vit'.")
    return CLIP(vision=vis, text=TextTransformer(**text, **kw))


def tower_variables(variables: dict, tower: str) -> dict:
    """The variables of one tower ('vision' or 'text'), to apply it on its own:
    `model.vision.apply(tower_variables(v, 'vision'), x, method='res4')`."""
    return {col: tree[tower] for col, tree in variables.items() if tower in tree}
