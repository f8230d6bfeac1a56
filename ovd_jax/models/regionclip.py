"""RegionCLIP's detector: CLIP ResNet res4 -> RPN; RoIAlign -> CLIP res5 -> AttentionPool2d.

Region embeddings come from the CLIP image tower itself (the "C4" layout of RegionCLIP): the
stride-16 res4 map feeds the RPN, each box is pooled with RoIAlign (aligned, detectron2
ROIAlignV2 semantics) and goes through CLIP's last stage and attention pooling, so a pretrained
CLIP checkpoint gives region embeddings in its image-text space. A class-agnostic box regressor
reads the mean-pooled res5 features. The text tower encodes concept prompts.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ovd_jax.models import layers
from ovd_jax.models.layers import l2_normalize
from ovd_jax.models.rpn import RPNHead
from ovd_jax.ops.roi_align import roi_align

RES4_STRIDE = 16


class RegionCLIPDetector(nn.Module):
    """Fields: `vision` a ModifiedResNet (res4/res5/attnpool methods), `text` a TextTransformer,
    RPN and pooler sizes. Methods are called through `model.apply(..., method=...)`."""

    vision: nn.Module
    text: nn.Module
    num_anchors: int
    rpn_channels: int
    pooler_resolution: int = 14
    pooler_sampling_ratio: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.rpn_head = RPNHead(self.num_anchors, self.rpn_channels, dtype=self.dtype,
                                param_dtype=self.param_dtype)
        self.box_head = layers.dense(
            4, ("embed", None), dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(0.001),
        )

    def backbone(self, images: jnp.ndarray) -> jnp.ndarray:
        """images [N, H, W, 3] normalised -> res4 features [N, H/16, W/16, C4]."""
        return self.vision.res4(images)

    def rpn(self, res4: jnp.ndarray):
        """res4 [N, h, w, C4] -> (objectness logits [N, A], deltas [N, A, 4])."""
        return self.rpn_head([res4])

    def region_features(self, res4: jnp.ndarray, boxes: jnp.ndarray):
        """Pools `boxes` [N, R, 4] (input pixels) from res4 and runs CLIP's res5 + attnpool.

        Returns (region embeddings [N, R, D] L2-normalised, box deltas [N, R, 4] float32).
        """
        n, r = boxes.shape[:2]
        p = self.pooler_resolution
        rois = roi_align(res4, boxes.astype(res4.dtype), p, 1.0 / RES4_STRIDE,
                         self.pooler_sampling_ratio, aligned=True)
        rois = rois.reshape((n * r, p, p, rois.shape[-1]))
        c5 = self.vision.res5(rois)
        emb = self.vision.attnpool(c5).astype(jnp.float32)
        emb = l2_normalize(emb)
        deltas = self.box_head(jnp.mean(c5, axis=(1, 2))).astype(jnp.float32)
        return emb.reshape(n, r, -1), deltas.reshape(n, r, 4)

    def encode_text(self, token_ids: jnp.ndarray) -> jnp.ndarray:
        """token_ids [T, L] -> projected text features [T, D] (not normalised)."""
        return self.text(token_ids).astype(jnp.float32)

    def __call__(self, images, boxes, token_ids):
        """Touches every parameter (used by `init`); returns (objectness, emb, text)."""
        res4 = self.backbone(images)
        objectness, _ = self.rpn(res4)
        emb, _ = self.region_features(res4, boxes)
        return objectness, emb, self.encode_text(token_ids)
