"""RegionCLIP's zero-shot inference with ground-truth boxes.

Every GT box is classified against the vocabulary (no localisation error involved); reported:
top-1 / top-5 region accuracy and COCO AP of detections made from the GT boxes, one detection
per box for each of its top-k classes scored by the class score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ovd_jax.evaluation._io import check_gt, load_json, sorted_ids
from ovd_jax.evaluation.coco_eval import evaluate_coco


def gt_box_inputs(gt) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """The boxes to classify: every non-crowd GT annotation, in file order.

    Returns (boxes float64 [N, 4] as x, y, w, h pixels, image ids int64 [N], class index int64
    [N] into ``category_ids``, category_ids: the vocabulary, sorted GT category ids).
    """
    gt = check_gt(load_json(gt, "ground truth"))
    cat_ids = sorted_ids(gt["categories"])
    pos = {c: i for i, c in enumerate(cat_ids)}
    anns = [a for a in gt["annotations"] if not a.get("iscrowd", 0)]
    boxes = np.array([a["bbox"] for a in anns], np.float64).reshape(len(anns), 4)
    img = np.array([a["image_id"] for a in anns], np.int64)
    cls = np.array([pos[a["category_id"]] for a in anns], np.int64)
    return boxes, img, cls, cat_ids


def gt_box_detections(
    boxes: np.ndarray,
    image_ids: Sequence[int],
    scores: np.ndarray,
    category_ids: Sequence[int],
    top_k: int = 1,
) -> list[dict]:
    """COCO result dicts from per-box class scores: each box with each of its top_k classes.

    boxes: [N, 4] x, y, w, h pixels; image_ids: [N]; scores: [N, K] class scores (higher is
    better; probabilities for a meaningful AP); category_ids: [K] the column's category ids.
    """
    boxes = np.asarray(boxes, np.float64)
    scores = np.asarray(scores, np.float64)
    image_ids = np.asarray(image_ids)
    k = min(int(top_k), scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    cats = np.asarray(category_ids)
    out = []
    for i in range(scores.shape[0]):
        b = boxes[i].tolist()
        for j in top[i].tolist():
            out.append(
                {
                    "image_id": image_ids[i].item(),
                    "category_id": cats[j].item(),
                    "bbox": b,
                    "score": float(scores[i, j]),
                }
            )
    return out


def zero_shot_gt_box_metrics(
    gt: Mapping | str,
    image_ids: Sequence[int],
    gt_class_index: Sequence[int],
    predicted_scores: np.ndarray,
    *,
    boxes: np.ndarray | None = None,
    category_ids: Sequence[int] | None = None,
    top_k_detections: int = 5,
) -> dict:
    """Region classification accuracy and AP of GT boxes classified over the vocabulary.

    Args:
      gt: COCO instances dict or path.
      image_ids: [N] image id of each classified box.
      gt_class_index: [N] index of each box's true class among the K columns.
      predicted_scores: [N, K] class scores per box.
      boxes: [N, 4] x, y, w, h of the boxes; default: ``gt_box_inputs(gt)`` (non-crowd GT in file
        order, which must then be the rows' order).
      category_ids: [K] category id of each column; default: sorted GT category ids.
      top_k_detections: classes turned into detections per box for the AP.
    Returns:
      {"top1_accuracy", "top5_accuracy", "mean_class_accuracy" (mean over classes present of
      their top-1 accuracy), "num_boxes", "AP", "AP50", "AP75", "per_category"}.
    """
    gt = check_gt(load_json(gt, "ground truth"))
    scores = np.asarray(predicted_scores, np.float64)
    cls = np.asarray(gt_class_index, np.int64)
    if scores.ndim != 2 or scores.shape[0] != cls.shape[0] or len(image_ids) != cls.shape[0]:
        raise ValueError(
            f"predicted_scores must be [num_gt, K] with num_gt = len(image_ids) = "
            f"len(gt_class_index); got {scores.shape}, {len(image_ids)}, {cls.shape[0]}."
        )
    if not np.isfinite(scores).all():
        i = int(np.flatnonzero(~np.isfinite(scores).all(axis=1))[0])
        raise ValueError(f"predicted_scores row {i} has NaN/inf values. Fix the classifier.")
    k = scores.shape[1]
    if cls.size and (cls.min() < 0 or cls.max() >= k):
        raise ValueError(f"gt_class_index must be in [0, {k}); got {cls.min()}..{cls.max()}.")
    if category_ids is None:
        category_ids = sorted_ids(gt["categories"])
    if len(category_ids) != k:
        raise ValueError(
            f"{k} score columns but {len(category_ids)} category ids. Fix: pass category_ids "
            f"naming each column."
        )
    if boxes is None:
        boxes, _, _, _ = gt_box_inputs(gt)
        if boxes.shape[0] != cls.shape[0]:
            raise ValueError(
                f"{cls.shape[0]} rows but the ground truth has {boxes.shape[0]} non-crowd boxes. "
                f"Fix: pass boxes explicitly."
            )
    order = np.argsort(-scores, axis=1, kind="stable")
    top1 = order[:, 0] == cls
    top5 = (order[:, : min(5, k)] == cls[:, None]).any(axis=1)
    per_class = [top1[cls == c].mean() for c in np.unique(cls)]
    dets = gt_box_detections(boxes, image_ids, scores, category_ids, top_k_detections)
    ap = evaluate_coco(gt, dets)
    n = max(cls.shape[0], 1)
    return {
        "top1_accuracy": float(top1.sum() / n),
        "top5_accuracy": float(top5.sum() / n),
        "mean_class_accuracy": float(np.mean(per_class)) if per_class else 0.0,
        "num_boxes": int(cls.shape[0]),
        "AP": ap["AP"],
        "AP50": ap["AP50"],
        "AP75": ap["AP75"],
        "per_category": ap["per_category"],
    }
