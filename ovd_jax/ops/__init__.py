"""ovd_jax.ops: detection ops (boxes, RoIAlign, NMS, anchors, matchers, ATSS, deformable conv)."""

from ovd_jax.ops.anchors import generate_anchors, num_anchors_per_location
from ovd_jax.ops.atss import atss_assign
from ovd_jax.ops.boxes import (
    BoxCoder,
    box_area,
    box_iou,
    clip_boxes,
    cxcywh_to_xyxy,
    generalized_box_iou,
    xyxy_to_cxcywh,
)
from ovd_jax.ops.deform_conv import ModulatedDeformConv, deform_conv2d
from ovd_jax.ops.matchers import iou_matcher, sample_balanced
from ovd_jax.ops.nms import batched_nms, nms, topk_nms
from ovd_jax.ops.roi_align import assign_boxes_to_levels, multilevel_roi_align, roi_align

__all__ = [
    "BoxCoder",
    "ModulatedDeformConv",
    "assign_boxes_to_levels",
    "atss_assign",
    "batched_nms",
    "box_area",
    "box_iou",
    "clip_boxes",
    "cxcywh_to_xyxy",
    "deform_conv2d",
    "generalized_box_iou",
    "generate_anchors",
    "iou_matcher",
    "multilevel_roi_align",
    "nms",
    "num_anchors_per_location",
    "roi_align",
    "sample_balanced",
    "topk_nms",
    "xyxy_to_cxcywh",
]
