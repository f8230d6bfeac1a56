"""COCO bbox evaluation with pycocotools ``COCOeval`` semantics, vectorised.

Reproduced exactly (tests compare every number with pycocotools at 1e-9): every GT image is
evaluated; crowd GTs (``iscrowd``) are ignored, use the detection's area as the IoU union and may
absorb any number of detections; a GT's ``ignore`` field is overridden by ``iscrowd`` (as
pycocotools does for bbox); areas are the GT's ``area`` field and the detection's w * h; at most
``max_dets[-1]`` detections per (image, category), the highest scores, ties in input order;
AP is the 101-point interpolated precision averaged over IoU .50:.05:.95.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ovd_jax.evaluation import _engine
from ovd_jax.evaluation._io import annotation_arrays, check_gt, load_json, no_gc, sorted_ids
from ovd_jax.evaluation.validate import parse_detections

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@no_gc()
def evaluate_coco(
    gt: Mapping | str,
    detections: Sequence[Mapping] | str,
    *,
    category_ids: Sequence[int] | None = None,
    max_dets: Sequence[int] = (1, 10, 100),
) -> dict:
    """COCO bbox metrics of ``detections`` against ``gt``.

    Args:
      gt: a COCO instances dict or a path to one.
      detections: a list of COCO result dicts (``image_id``, ``category_id``, ``bbox`` as
        [x, y, w, h] in pixels, ``score``) or a path to such a JSON list.
      category_ids: evaluate only these GT categories (default: all).
      max_dets: detection caps per image and category, ascending (pycocotools: 1, 10, 100).
    Returns:
      {"AP" (at 100 detections, -1 if 100 is not in max_dets, as pycocotools),
      "AP50", "AP75", "APs", "APm", "APl" (at max_dets[-1]), "AR{m}" for m in max_dets,
      "ARs", "ARm", "ARl" (at max_dets[-1]): float (-1 where pycocotools gives -1),
      "per_category": {category_id: {"AP": float, "AP50": float}} (-1 without GT)}.
    Raises:
      ValueError for a malformed ground truth or detection (naming the offending entry).
    """
    gt = check_gt(load_json(gt, "ground truth"))
    detections = load_json(detections, "detections")
    max_dets = sorted(int(m) for m in max_dets)
    if not max_dets or max_dets[0] < 1:
        raise ValueError(f"max_dets={max_dets} must be positive integers, e.g. (1, 10, 100).")
    img_ids = sorted_ids(gt["images"])
    all_cats = sorted_ids(gt["categories"])
    if category_ids is None:
        cat_ids = all_cats
    else:
        cat_ids = sorted(set(category_ids))
        unknown = sorted(set(cat_ids) - set(all_cats))
        if unknown:
            raise ValueError(
                f"category_ids {unknown[:10]} are not categories of the ground truth. Fix: pass "
                f"ids from gt['categories']."
            )

    _, g_img, g_cat, g_box, g_area, kept = annotation_arrays(gt["annotations"], img_ids, cat_ids)
    # pycocotools (bbox): ignore = iscrowd, whatever the annotation's own "ignore" says.
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in kept], dtype=bool).reshape(len(kept))
    id_nz = np.array([a["id"] != 0 for a in kept], dtype=bool).reshape(len(kept))
    gt_arr = _engine.GtArrays(g_img, g_cat, g_box, g_area, crowd, crowd, id_nz)

    d_img, d_cat_all, d_box, d_score = parse_detections(detections, img_ids, all_cats)
    if category_ids is not None:  # pycocotools drops detections of categories not evaluated
        remap = np.full(len(all_cats), -1, np.int64)
        remap[np.searchsorted(all_cats, cat_ids)] = np.arange(len(cat_ids))
        d_cat = remap[d_cat_all]
        sel = d_cat >= 0
        d_img, d_cat, d_box, d_score = d_img[sel], d_cat[sel], d_box[sel], d_score[sel]
    else:
        d_cat = d_cat_all
    dt_arr = _engine.DtArrays(d_img, d_cat, d_box, d_score, np.zeros(d_img.shape[0], bool))

    precision, recall = _engine.evaluate(
        gt_arr, dt_arr, num_images=len(img_ids), num_cats=len(cat_ids), max_dets=tuple(max_dets)
    )
    return coco_summary(precision, recall, cat_ids, max_dets)


def coco_summary(precision, recall, cat_ids: Sequence[int], max_dets: Sequence[int]) -> dict:
    """pycocotools' ``summarize()`` numbers as a dict (see ``evaluate_coco``)."""
    s = _engine.summarize
    # pycocotools computes the headline AP at maxDets=100 whatever max_dets is (it gives -1
    # when 100 is not among them); the other numbers use max_dets[-1].
    ap_all = (
        s(precision, recall, ap=True, m_index=list(max_dets).index(100))
        if (100 in max_dets)
        else -1.0
    )
    out = {
        "AP": ap_all,
        "AP50": s(precision, recall, ap=True, iou_thr=0.5),
        "AP75": s(precision, recall, ap=True, iou_thr=0.75),
        "APs": s(precision, recall, ap=True, area="small"),
        "APm": s(precision, recall, ap=True, area="medium"),
        "APl": s(precision, recall, ap=True, area="large"),
    }
    for i, m in enumerate(max_dets):
        out[f"AR{m}"] = s(precision, recall, ap=False, m_index=i)
    out["ARs"] = s(precision, recall, ap=False, area="small")
    out["ARm"] = s(precision, recall, ap=False, area="medium")
    out["ARl"] = s(precision, recall, ap=False, area="large")
    ap, ap50 = _engine.per_category(precision)
    out["per_category"] = {
        int(c): {"AP": float(ap[k]), "AP50": float(ap50[k])} for k, c in enumerate(cat_ids)
    }
    return out
