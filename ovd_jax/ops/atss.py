"""ATSS label assignment (Zhang et al. 2020) as GLIP's `ATSSLossComputation.prepare_targets`.

For each gt: per FPN level take the `topk * anchors_per_location` anchors whose centres are
closest (L2) to the gt centre; threshold = mean + std (unbiased, as torch.std) of those
candidates' IoUs; a candidate is positive when its IoU >= threshold and its centre lies inside the
gt (min of the four centre-to-side distances > 0.01). An anchor positive for several gts takes the
one with the highest IoU (first on ties). IoU is torchvision's (no "+1" on widths; GLIP's
maskrcnn_benchmark `boxlist_iou` adds 1 pixel, which we do not).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from ovd_jax.ops.boxes import box_iou
from ovd_jax.ops.topk import top_k


def atss_assign(
    anchors,
    num_anchors_per_level: Sequence[int],
    gt_boxes,
    gt_valid,
    topk: int = 9,
    num_anchors_per_location: int = 1,
):
    """ATSS assignment for one image.

    anchors: [A, 4] (level-major, as `generate_anchors`); num_anchors_per_level: static counts
    summing to A; gt_boxes: [G, 4]; gt_valid: [G] bool (padding never matched).
    Returns matched_gt [A] int32: the assigned gt index, -1 for background.
    """
    a = anchors.shape[0]
    if sum(num_anchors_per_level) != a:
        raise ValueError(
            f"num_anchors_per_level sums to {sum(num_anchors_per_level)} but anchors has {a} rows."
        )
    if gt_boxes.ndim != 2 or gt_valid.shape != gt_boxes.shape[:1]:
        raise ValueError(f"gt_boxes must be [G, 4], gt_valid [G]; got {gt_boxes.shape}, "
                         f"{gt_valid.shape}.")
    g = gt_boxes.shape[0]
    if g == 0:
        return jnp.full((a,), -1, jnp.int32)
    anchors = jnp.asarray(anchors, jnp.float32)
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    gt_valid = jnp.asarray(gt_valid, bool)
    ious = box_iou(gt_boxes, anchors)  # [G, A]
    gcx = (gt_boxes[:, 2] + gt_boxes[:, 0]) / 2.0
    gcy = (gt_boxes[:, 3] + gt_boxes[:, 1]) / 2.0
    acx = (anchors[:, 2] + anchors[:, 0]) / 2.0
    acy = (anchors[:, 3] + anchors[:, 1]) / 2.0
    dist = jnp.sqrt((acx[None, :] - gcx[:, None]) ** 2 + (acy[None, :] - gcy[:, None]) ** 2)
    cands = []
    start = 0
    for n in num_anchors_per_level:
        k = min(topk * num_anchors_per_location, n)
        if k > 0:
            _, idx = top_k(-dist[:, start:start + n], k)
            cands.append(idx + start)
        start += n
    cand = jnp.concatenate(cands, axis=1)  # [G, K]
    cious = jnp.take_along_axis(ious, cand, axis=1)
    thr = jnp.mean(cious, axis=1) + jnp.std(cious, axis=1, ddof=1)
    is_pos = cious >= thr[:, None]
    cx = acx[cand]
    cy = acy[cand]
    side = jnp.stack(
        [cx - gt_boxes[:, 0:1], cy - gt_boxes[:, 1:2], gt_boxes[:, 2:3] - cx,
         gt_boxes[:, 3:4] - cy], axis=0,
    )
    is_pos = is_pos & (jnp.min(side, axis=0) > 0.01) & gt_valid[:, None]
    pos_iou = jnp.full((g, a), -jnp.inf, jnp.float32)
    pos_iou = pos_iou.at[jnp.arange(g)[:, None], cand].set(jnp.where(is_pos, cious, -jnp.inf))
    best = jnp.max(pos_iou, axis=0)
    arg = jnp.argmax(pos_iou, axis=0).astype(jnp.int32)
    return jnp.where(best == -jnp.inf, -1, arg)
