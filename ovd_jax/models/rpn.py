"""Region proposal network: the head (objectness + box deltas per anchor) and proposal selection.

Single-level (RegionCLIP's C4 detector) and multi-level inputs are both handled: a level is a
feature map [N, H, W, C]; anchors are ordered level-major, then location (row-major), then
anchor cell, matching `ovd_jax.ops.anchors.generate_anchors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovd_jax.models import layers
from ovd_jax.ops import boxes as box_ops
from ovd_jax.ops.nms import nms
from ovd_jax.ops.topk import top_k


class RPNHead(nn.Module):
    """A shared 3x3 conv + ReLU, then per-anchor objectness logits and box deltas.

    Takes a list of feature maps [N, H_l, W_l, C]; returns (objectness [N, A_total],
    deltas [N, A_total, 4]) with anchors flattened level-major as `generate_anchors` orders them.
    """

    num_anchors: int
    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jnp.ndarray]):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = nn.initializers.normal(0.01)
        shared = layers.conv(self.channels, (3, 3), kernel_init=init, name="conv", **kw)
        objectness = layers.conv(self.num_anchors, (1, 1), kernel_init=init, name="objectness",
                                 **kw)
        deltas = layers.conv(self.num_anchors * 4, (1, 1), kernel_init=init, name="deltas", **kw)
        all_obj, all_deltas = [], []
        for f in features:
            h = nn.relu(shared(f))
            n = f.shape[0]
            all_obj.append(objectness(h).reshape(n, -1))
            all_deltas.append(deltas(h).reshape(n, -1, 4))
        return (
            jnp.concatenate(all_obj, axis=1).astype(jnp.float32),
            jnp.concatenate(all_deltas, axis=1).astype(jnp.float32),
        )


def select_proposals(
    anchors: jnp.ndarray,
    objectness: jnp.ndarray,
    deltas: jnp.ndarray,
    image_hw: jnp.ndarray,
    *,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_threshold: float,
    min_size: float = 0.0,
    box_coder: box_ops.BoxCoder | None = None,
):
    """One image's proposals, in detectron2's `find_top_rpn_proposals` order (one level).

    The `pre_nms_topk` anchors with the highest logits are decoded and clipped to the image;
    boxes not wider and taller than `min_size` (or non-finite) are dropped; NMS at
    `nms_threshold` keeps at most `post_nms_topk`, by descending logit.

    Args:
      anchors: [A, 4] input-pixel boxes.
      objectness: [A] logits; deltas: [A, 4] encoded with `box_coder` (default weights 1).
      image_hw: [2] the unpadded input (h, w); proposals are clipped to it.
    Returns:
      proposals [post_nms_topk, 4], their logits [post_nms_topk], valid [post_nms_topk] bool,
      gradients stopped. Padded entries have valid False, box 0 and logit -inf.
    """
    coder = box_coder or box_ops.BoxCoder()
    k = min(int(pre_nms_topk), objectness.shape[0])
    scores, top = top_k(jnp.where(jnp.isfinite(objectness), objectness, -jnp.inf), k)
    boxes = coder.decode(deltas[top], anchors[top])
    boxes = box_ops.clip_boxes(boxes, image_hw[0], image_hw[1])
    wh = boxes[:, 2:] - boxes[:, :2]
    ok = jnp.all(wh > min_size, axis=-1) & jnp.isfinite(scores) & jnp.all(jnp.isfinite(boxes), -1)
    keep, keep_valid = nms(boxes, scores, nms_threshold, post_nms_topk, valid=ok)
    out_boxes = jnp.where(keep_valid[:, None], boxes[keep], 0.0)
    out_logits = jnp.where(keep_valid, scores[keep], -jnp.inf)
    return jax.lax.stop_gradient(out_boxes), jax.lax.stop_gradient(out_logits), keep_valid
