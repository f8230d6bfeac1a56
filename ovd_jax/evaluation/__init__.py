"""ovd_jax.evaluation: COCO / LVIS box AP (pycocotools / lvis-api semantics), OVD splits."""

from ovd_jax.evaluation.coco_eval import evaluate_coco
from ovd_jax.evaluation.gt_boxes_protocol import (
    gt_box_detections,
    gt_box_inputs,
    zero_shot_gt_box_metrics,
)
from ovd_jax.evaluation.lvis_eval import evaluate_lvis
from ovd_jax.evaluation.metrics_only import format_table, run
from ovd_jax.evaluation.ovd import load_ovd_split, ovd_split_metrics
from ovd_jax.evaluation.validate import parse_detections, validate_detections

__all__ = [
    "evaluate_coco",
    "evaluate_lvis",
    "format_table",
    "gt_box_detections",
    "gt_box_inputs",
    "load_ovd_split",
    "ovd_split_metrics",
    "parse_detections",
    "run",
    "validate_detections",
    "zero_shot_gt_box_metrics",
]
