"""Box arithmetic: areas, IoU / generalized IoU, clipping, format changes and the delta coder.

Boxes are `[..., 4]` arrays of (x1, y1, x2, y2) in input-image pixels unless a name says
otherwise. Formulas follow torchvision.ops (areas are not clamped, so a box with x2 < x1 has a
negative area exactly as torchvision computes it) except where torchvision would return NaN: a pair
whose union (or enclosing box) has zero area gets IoU 0 (GIoU: IoU minus 0) instead of NaN, so
padded all-zero boxes are harmless inside jit.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp


def box_area(boxes):
    """Area of `boxes` [..., 4] (x1, y1, x2, y2) -> [...]; (x2 - x1) * (y2 - y1), not clamped."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _inter_union(a, b):
    area_a = box_area(a)
    area_b = box_area(b)
    lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = jnp.maximum(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    # Same association as torchvision: (area_a + area_b) - inter.
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return inter, union


def _safe_div(num, den):
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def box_iou(a, b):
    """Pairwise IoU of `a` [..., N, 4] and `b` [..., M, 4] -> [..., N, M].

    torchvision.ops.box_iou semantics; a pair whose union area is 0 gets 0 instead of NaN.
    """
    inter, union = _inter_union(a, b)
    return _safe_div(inter, union)


def generalized_box_iou(a, b):
    """Pairwise generalized IoU of `a` [..., N, 4] and `b` [..., M, 4] -> [..., N, M].

    torchvision.ops.generalized_box_iou semantics (IoU - (enclosing - union) / enclosing); a zero
    union gives IoU 0 and a zero enclosing area contributes 0 instead of NaN.
    """
    inter, union = _inter_union(a, b)
    iou = _safe_div(inter, union)
    lt = jnp.minimum(a[..., :, None, :2], b[..., None, :, :2])
    rb = jnp.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = jnp.maximum(rb - lt, 0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - _safe_div(enclosing - union, enclosing)


def clip_boxes(boxes, height, width):
    """Clamp `boxes` [..., 4] to x in [0, width], y in [0, height].

    `height`/`width` are scalars or arrays broadcastable to `boxes[..., 0]` (e.g. per-image
    sizes of shape [B, 1] for boxes [B, R, 4]). Returns an array of the same shape and dtype.
    """
    h = jnp.asarray(height, boxes.dtype)
    w = jnp.asarray(width, boxes.dtype)
    x1 = jnp.clip(boxes[..., 0], 0, w)
    y1 = jnp.clip(boxes[..., 1], 0, h)
    x2 = jnp.clip(boxes[..., 2], 0, w)
    y2 = jnp.clip(boxes[..., 3], 0, h)
    return jnp.stack([x1, y1, x2, y2], axis=-1)


def xyxy_to_cxcywh(boxes):
    """(x1, y1, x2, y2) [..., 4] -> (centre x, centre y, width, height) [..., 4]."""
    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
    return jnp.stack([(x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1], axis=-1)


def cxcywh_to_xyxy(boxes):
    """(centre x, centre y, width, height) [..., 4] -> (x1, y1, x2, y2) [..., 4]."""
    cx, cy, w, h = (boxes[..., i] for i in range(4))
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


@dataclasses.dataclass(frozen=True)
class BoxCoder:
    """detectron2 `Box2BoxTransform`: (dx, dy, dw, dh) deltas between boxes, no "+1" widths.

    encode: dx = wx (tcx - rcx) / rw, dy = wy (tcy - rcy) / rh, dw = ww log(tw / rw),
    dh = wh log(th / rh); decode inverts it with dw, dh clamped above at `scale_clamp` so exp()
    cannot overflow. Centres are x1 + 0.5 w.
    """

    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    scale_clamp: float = math.log(1000.0 / 16)

    def encode(self, reference_boxes, target_boxes):
        """Deltas [..., 4] that turn `reference_boxes` [..., 4] into `target_boxes` [..., 4]."""
        wx, wy, ww, wh = self.weights
        rw = reference_boxes[..., 2] - reference_boxes[..., 0]
        rh = reference_boxes[..., 3] - reference_boxes[..., 1]
        rcx = reference_boxes[..., 0] + 0.5 * rw
        rcy = reference_boxes[..., 1] + 0.5 * rh
        tw = target_boxes[..., 2] - target_boxes[..., 0]
        th = target_boxes[..., 3] - target_boxes[..., 1]
        tcx = target_boxes[..., 0] + 0.5 * tw
        tcy = target_boxes[..., 1] + 0.5 * th
        dx = wx * (tcx - rcx) / rw
        dy = wy * (tcy - rcy) / rh
        dw = ww * jnp.log(tw / rw)
        dh = wh * jnp.log(th / rh)
        return jnp.stack([dx, dy, dw, dh], axis=-1)

    def decode(self, deltas, reference_boxes):
        """Apply `deltas` [..., 4] to `reference_boxes` [..., 4] -> boxes [..., 4] (x1y1x2y2)."""
        reference_boxes = reference_boxes.astype(deltas.dtype)
        wx, wy, ww, wh = self.weights
        w = reference_boxes[..., 2] - reference_boxes[..., 0]
        h = reference_boxes[..., 3] - reference_boxes[..., 1]
        cx = reference_boxes[..., 0] + 0.5 * w
        cy = reference_boxes[..., 1] + 0.5 * h
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = jnp.minimum(deltas[..., 2] / ww, self.scale_clamp)
        dh = jnp.minimum(deltas[..., 3] / wh, self.scale_clamp)
        pcx = dx * w + cx
        pcy = dy * h + cy
        pw = jnp.exp(dw) * w
        ph = jnp.exp(dh) * h
        return jnp.stack(
            [pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], axis=-1
        )
