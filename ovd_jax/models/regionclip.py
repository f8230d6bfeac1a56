"""RegionCLIP's detector: CLIP ResNet res4 -> RPN; RoIAlign -> CLIP res5 -> AttentionPool2d.

Region embeddings come from the CLIP image tower itself (the "C4" layout of RegionCLIP): the
stride-16 res4 map feeds the RPN, each box is pooled with RoIAlign (aligned, detectron2
ROIAlignV2 semantics) and goes through CLIP's last stage and attention pooling, so a pretrained
CLIP checkpoint gives region embeddings in its image-text space. A class-agnostic box regressor
(one linear layer) reads the attention-pooled feature before normalisation, as upstream's
`bbox_pred` does. The text tower encodes concept prompts.

`freeze_at` follows detectron2's FREEZE_AT: 1 stops gradients below the stem's output, 2 below
res2 (layer1), and so on; the optimizer must also freeze those parameters (see
`ovd_jax.methods.regionclip.frozen_params`) so that weight decay does not move them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovd_jax.models import layers
from ovd_jax.models.layers import l2_normalize
from ovd_jax.models.rpn import RPNHead
from ovd_jax.ops.roi_align import roi_align

RES4_STRIDE = 16


class RegionCLIPDetector(nn.Module):
    """Fields: `vision` a ModifiedResNet (stem/layer1..4/attnpool), `text` a TextTransformer (or
    None for a proposal-only model), `num_anchors` anchors per location (0: no RPN head, the
    proposals come from elsewhere), RPN and pooler sizes, `freeze_at` (detectron2 FREEZE_AT).
    Methods are called through `model.apply(..., method=...)`."""

    vision: nn.Module
    text: nn.Module | None
    num_anchors: int
    rpn_channels: int
    pooler_resolution: int = 14
    pooler_sampling_ratio: int = 2
    freeze_at: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        if self.num_anchors:
            self.rpn_head = RPNHead(self.num_anchors, self.rpn_channels, dtype=self.dtype,
                                    param_dtype=self.param_dtype)
        self.box_head = layers.dense(
            4, ("embed", None), dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(0.001),
        )

    def backbone(self, images: jnp.ndarray) -> jnp.ndarray:
        """images [N, H, W, 3] normalised -> res4 features [N, H/16, W/16, C4]."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"RegionCLIPDetector expects NHWC images [N, H, W, 3], got "
                             f"{images.shape}.")
        v = self.vision
        x = v.stem(images)
        if self.freeze_at >= 1:
            x = jax.lax.stop_gradient(x)
        for stage_index, stage in enumerate((v.layer1, v.layer2, v.layer3), start=2):
            for block in stage:
                x = block(x)
            if self.freeze_at >= stage_index:
                x = jax.lax.stop_gradient(x)
        return x

    def rpn(self, res4: jnp.ndarray):
        """res4 [N, h, w, C4] -> (objectness logits [N, A], deltas [N, A, 4]) float32."""
        if not self.num_anchors:
            raise ValueError("this detector has no RPN head (num_anchors=0: the proposals come "
                             "from config.model.offline_rpn).")
        return self.rpn_head([res4])

    def region_features(self, res4: jnp.ndarray, boxes: jnp.ndarray):
        """Pools `boxes` [N, R, 4] (input pixels) from res4 and runs CLIP's res5 + attnpool.

        The boxes stay float32 whatever the compute dtype (bfloat16 would round coordinates
        above 512 px to multiples of 4). Returns (region embeddings [N, R, D] L2-normalised,
        box deltas [N, R, 4]), both float32.
        """
        n, r = boxes.shape[:2]
        p = self.pooler_resolution
        rois = roi_align(res4, boxes.astype(jnp.float32), p, 1.0 / RES4_STRIDE,
                         self.pooler_sampling_ratio, aligned=True)
        rois = rois.reshape((n * r, p, p, rois.shape[-1]))
        pooled = self.vision.attnpool(self.vision.res5(rois))
        deltas = self.box_head(pooled).astype(jnp.float32)
        emb = l2_normalize(pooled.astype(jnp.float32))
        return emb.reshape(n, r, -1), deltas.reshape(n, r, 4)

    def encode_text(self, token_ids: jnp.ndarray) -> jnp.ndarray:
        """token_ids [T, L] -> projected text features [T, D] float32 (not normalised)."""
        return self.text(token_ids).astype(jnp.float32)

    def __call__(self, images, boxes, token_ids):
        """Touches every parameter (used by `init`); returns (objectness or None, emb, text)."""
        res4 = self.backbone(images)
        objectness = self.rpn(res4)[0] if self.num_anchors else None
        emb, _ = self.region_features(res4, boxes)
        text = self.encode_text(token_ids) if self.text is not None else None
        return objectness, emb, text
