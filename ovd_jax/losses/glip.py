"""GLIP's ATSS head losses and inference scores (pure jnp, jit-friendly, masks honoured).

As GLIP's `ATSSLossComputation` (maskrcnn_benchmark/modeling/rpn/loss.py) with the dot-product
token loss, the configuration GLIP-T/L train with:

* assignment: ATSS (top-k 9 anchors per FPN level by centre distance, IoU >= mean + std, centre
  inside the box; an anchor claimed by several boxes takes the highest IoU);
* classification: token-level sigmoid focal loss (alpha 0.25, gamma 2) between every anchor's
  alignment logits and its target row (the matched box's row of the box x token positive map;
  zeros for background), summed over real tokens (padding tokens excluded) / #positive anchors;
* box: GIoU loss (1 - GIoU) of the decoded predicted box against the matched box, weighted by
  the centerness target and normalised by the sum of centerness targets; times `giou_weight`
  (GLIP's MODEL.ATSS.REG_LOSS_WEIGHT = 2.0);
* centerness: BCE between the centerness logit and sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))
  over positive anchors / #positive anchors.

Normalisation over replicas: GLIP divides each GPU's sums by (global #positives / #GPUs) and
DDP then averages the GPUs' gradients, i.e. global sum / global #positives. Here the loss is a
function of the whole global batch, so under jit on a batch sharded over the data axes the sums
and counts below are already global (XLA inserts the all-reduces) and give the same value.
With no positive anchor anywhere we divide by 1 (GLIP by 1 per GPU).

Deliberate differences: IoU has no "+1" on widths (see ops/atss.py); the GIoU target is the
matched box itself rather than GLIP's decode(encode(box)) round trip (identical unless the box
is more than 1000/16 times the anchor's size, where GLIP's clamp would distort it); GLIP's
"[NoObj]" target on the last token of a background anchor is dropped (that position is
padding, hence masked, unless the prompt fills all L tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ovd_jax.losses.common import sigmoid_bce, sigmoid_focal_loss
from ovd_jax.ops.atss import atss_assign
from ovd_jax.ops.boxes import BoxCoder

# GLIP's ATSS box coder weights and loss weights (MODEL.ATSS.REG_LOSS_WEIGHT).
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
GIOU_WEIGHT = 2.0
CENTERNESS_WEIGHT = 1.0


def glip_atss_assign(anchors, anchors_per_level: Sequence[int], gt_boxes, gt_valid,
                     topk: int = 9, anchors_per_location: int = 1):
    """ATSS assignment for a batch.

    anchors [A, 4] (level-major), anchors_per_level: static per-level counts summing to A,
    gt_boxes [N, M, 4], gt_valid [N, M] bool. Returns (matched [N, A] int32: the assigned box
    index, clipped to 0 for background so it can index; foreground [N, A] bool).
    """
    levels = tuple(int(n) for n in anchors_per_level)
    matched = jax.vmap(
        lambda b, v: atss_assign(anchors, levels, b, v, topk=topk,
                                 num_anchors_per_location=anchors_per_location)
    )(gt_boxes, gt_valid)
    fg = matched >= 0
    return jnp.maximum(matched, 0), fg


def centerness_targets(anchors, boxes):
    """sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) of anchor centres [..., 4] inside `boxes`
    [..., 4] -> [...]; 0 where the centre is not strictly inside (never a training target)."""
    cx = (anchors[..., 0] + anchors[..., 2]) / 2
    cy = (anchors[..., 1] + anchors[..., 3]) / 2
    left, top = cx - boxes[..., 0], cy - boxes[..., 1]
    right, bottom = boxes[..., 2] - cx, boxes[..., 3] - cy
    inside = jnp.minimum(jnp.minimum(left, right), jnp.minimum(top, bottom)) > 0
    lr = jnp.minimum(left, right) / jnp.where(inside, jnp.maximum(left, right), 1.0)
    tb = jnp.minimum(top, bottom) / jnp.where(inside, jnp.maximum(top, bottom), 1.0)
    return jnp.where(inside, jnp.sqrt(jnp.where(inside, lr * tb, 1.0)), 0.0)


def giou_loss(pred, target, eps: float = 1e-7):
    """Element-wise 1 - GIoU of boxes [..., 4] (GLIP's `GIoULoss` formula: the predicted x2, y2
    are raised to at least x1, y1, and eps=1e-7 is added to the union and enclosing areas)."""
    px1, py1 = pred[..., 0], pred[..., 1]
    px2, py2 = jnp.maximum(px1, pred[..., 2]), jnp.maximum(py1, pred[..., 3])
    tx1, ty1, tx2, ty2 = (target[..., i] for i in range(4))
    p_area = (px2 - px1) * (py2 - py1)
    t_area = (tx2 - tx1) * (ty2 - ty1)
    iw = jnp.minimum(px2, tx2) - jnp.maximum(px1, tx1)
    ih = jnp.minimum(py2, ty2) - jnp.maximum(py1, ty1)
    inter = jnp.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    enclosing = ((jnp.maximum(px2, tx2) - jnp.minimum(px1, tx1))
                 * (jnp.maximum(py2, ty2) - jnp.minimum(py1, ty1)) + eps)
    union = p_area + t_area - inter + eps
    giou = inter / union - (enclosing - union) / enclosing
    return 1.0 - giou


def glip_atss_loss(anchors, anchors_per_level: Sequence[int], logits, box_deltas, centerness,
                   gt_boxes, gt_valid, box_positive_map, token_mask, *, alpha: float = 0.25,
                   gamma: float = 2.0, box_weights=BOX_WEIGHTS, topk: int = 9,
                   anchors_per_location: int = 1, giou_weight: float = GIOU_WEIGHT,
                   centerness_weight: float = CENTERNESS_WEIGHT) -> dict:
    """GLIP's ATSS losses for a batch (see the module docstring for the formulas).

    Args:
      anchors: [A, 4] x1y1x2y2 input pixels, level-major; anchors_per_level: static per-level
        counts summing to A.
      logits: [N, A, L] token alignment logits; box_deltas: [N, A, 4] (dx, dy, dw, dh) for
        `BoxCoder(box_weights)`; centerness: [N, A] logits.
      gt_boxes: [N, M, 4]; gt_valid: [N, M] bool (padding and dropped boxes False).
      box_positive_map: [N, M, L] box x token targets (nonzero = positive token).
      token_mask: [N, L] bool, real prompt tokens (padding contributes nothing).
    Returns a dict of float32 scalars: cls, box (GIoU, times giou_weight), centerness (times
    centerness_weight), total (their sum) and num_pos (positive anchors in the batch).
    """
    logits = logits.astype(jnp.float32)
    box_deltas = box_deltas.astype(jnp.float32)
    centerness = centerness.astype(jnp.float32)
    anchors = jnp.asarray(anchors, jnp.float32)
    gt_boxes = gt_boxes.astype(jnp.float32)
    gt_valid = gt_valid.astype(bool)
    matched, fg = glip_atss_assign(anchors, anchors_per_level, gt_boxes, gt_valid, topk,
                                   anchors_per_location)
    fgf = fg.astype(jnp.float32)
    num_pos = jnp.sum(fgf)
    norm = jnp.maximum(num_pos, 1.0)

    # Token targets: the matched box's row (binarised), zero for background anchors.
    pos_map = (box_positive_map > 0).astype(jnp.float32)
    targets = jnp.take_along_axis(pos_map, matched[..., None], axis=1) * fgf[..., None]
    focal = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    tmask = token_mask.astype(jnp.float32)[:, None, :]
    cls = jnp.sum(focal * tmask) / norm

    boxes = jnp.take_along_axis(gt_boxes, matched[..., None], axis=1)  # [N, A, 4]
    ctr_t = jnp.where(fg, centerness_targets(anchors[None], boxes), 0.0)
    pred = BoxCoder(tuple(box_weights)).decode(box_deltas, jnp.broadcast_to(anchors, boxes.shape))
    giou = jnp.where(fg, giou_loss(pred, boxes), 0.0)
    box = jnp.sum(giou * ctr_t) / jnp.maximum(jnp.sum(ctr_t), 1e-6)
    ctr_bce = jnp.where(fg, sigmoid_bce(centerness, ctr_t), 0.0)
    ctr = jnp.sum(ctr_bce) / norm
    box, ctr = giou_weight * box, centerness_weight * ctr
    return {"cls": cls, "box": box, "centerness": ctr, "total": cls + box + ctr,
            "num_pos": num_pos}


def glip_scores(logits, centerness, class_token_map):
    """GLIP inference scores: sqrt(mean over a class's tokens of sigmoid(logit) *
    sigmoid(centerness)).

    logits [N, A, L], centerness [N, A] logits, class_token_map [K, L] (or [N, K, L]) with each
    class row averaging its tokens (`vocabulary_chunks`' class_token_map[c]); padding rows
    (all zero) score 0. Returns [N, A, K] float32.
    """
    prob = jax.nn.sigmoid(logits.astype(jnp.float32))
    cmap = class_token_map.astype(jnp.float32)
    if cmap.ndim == 2:
        cls = jnp.einsum("nal,kl->nak", prob, cmap)
    else:
        cls = jnp.einsum("nal,nkl->nak", prob, cmap)
    return jnp.sqrt(cls * jax.nn.sigmoid(centerness.astype(jnp.float32))[..., None])
