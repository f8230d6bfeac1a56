"""LVIS bbox evaluation with lvis-api (0.5.3) ``LVISEval`` semantics, vectorised.

Reproduced exactly (tests compare every number with lvis-api at 1e-9):

* results are capped at ``max_dets`` (300) per image, highest scores first, ties in input order
  (``LVISResults.limit_dets_per_image``);
* GT and detections with area not in (0, inf) are dropped (``get_ann_ids`` area filter; the
  detection area is w * h);
* federated protocol: a detection counts only if its category is verified for the image, i.e. in
  the image's ``neg_category_ids`` or among its (kept) GT categories; unmatched detections of a
  category in ``not_exhaustive_category_ids`` are ignored;
* GTs flagged ``ignore`` are ignored; there are no crowd boxes;
* no per-(image, category) cap; APr/APc/APf average the categories of frequency r/c/f.

``fixed_ap=True`` is the "fixed AP" protocol of Dave et al. (2021) that GLIP and DetCLIPv2 report:
no per-image cap, instead the ``max_dets_per_class`` highest-scoring detections of each category
over the whole dataset (ties in input order), then the same evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ovd_jax.evaluation import _engine
from ovd_jax.evaluation._io import annotation_arrays, check_gt, load_json, no_gc, sorted_ids
from ovd_jax.evaluation.validate import parse_detections


def _top_k_per_group(group: np.ndarray, rank: np.ndarray, k: int) -> np.ndarray:
    """Mask of the k best score ranks per group value; ties keep the earlier input entries."""
    order = np.argsort(group * (rank.shape[0] + 1) + rank, kind="stable")
    rank = _engine._group_rank(group[order])
    keep = np.zeros(group.shape[0], bool)
    keep[order[rank < k]] = True
    return keep


def _id_lists_to_pairs(images: list, field: str, img_pos: Mapping, cat_pos: Mapping):
    """(image index, category index) pairs of an image-level category id list field."""
    pairs = [
        (img_pos[im["id"]], cat_pos[c]) for im in images for c in im.get(field, ()) if c in cat_pos
    ]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


@no_gc()
def evaluate_lvis(
    gt: Mapping | str,
    detections: Sequence[Mapping] | str,
    *,
    max_dets: int = 300,
    fixed_ap: bool = False,
    max_dets_per_class: int = 10000,
) -> dict:
    """LVIS bbox metrics of ``detections`` against ``gt``.

    Args:
      gt: an LVIS instances dict (images with ``neg_category_ids`` /
        ``not_exhaustive_category_ids``, categories with ``frequency``) or a path to one.
        Images lacking the two id lists are treated as having empty ones.
      detections: a list of COCO result dicts or a path to such a JSON list.
      max_dets: per-image cap (lvis-api: 300; negative: no cap). Ignored when ``fixed_ap``.
      fixed_ap: use the fixed-AP protocol (no per-image cap, ``max_dets_per_class`` per class).
    Returns:
      {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR@{max_dets}",
      "ARs@{max_dets}", "ARm@{max_dets}", "ARl@{max_dets}": float (-1 where lvis-api gives -1),
      "per_category": {category_id: {"AP": float, "AP50": float}} (-1 without GT)}.
    Raises:
      ValueError for a malformed ground truth or detection.
    """
    gt = check_gt(load_json(gt, "ground truth"))
    detections = load_json(detections, "detections")
    img_ids = sorted_ids(gt["images"])
    cat_ids = sorted_ids(gt["categories"])
    freq = [c.get("frequency") for c in sorted(gt["categories"], key=lambda c: c["id"])]
    bad = [cat_ids[i] for i, f in enumerate(freq) if f not in ("r", "c", "f")]
    if bad:
        raise ValueError(
            f"LVIS categories need a 'frequency' of 'r', 'c' or 'f'; category ids {bad[:5]} have "
            f"none. Fix: use an LVIS annotation file, or evaluate with the COCO metric."
        )
    n_img, n_cat = len(img_ids), len(cat_ids)
    img_pos = {v: i for i, v in enumerate(img_ids)}
    cat_pos = {v: i for i, v in enumerate(cat_ids)}

    # Ground truth: lvis-api keeps annotations with 0 < area < inf.
    _, g_img, g_cat, g_box, g_area, kept = annotation_arrays(gt["annotations"], img_ids, cat_ids)
    ok = (g_area > 0) & (g_area < np.inf)
    kept = [a for a, k in zip(kept, ok.tolist()) if k]
    g_img, g_cat, g_box, g_area = g_img[ok], g_cat[ok], g_box[ok], g_area[ok]
    g_ignore = np.array([bool(a.get("ignore", 0)) for a in kept], bool).reshape(len(kept))
    id_nz = np.array([a["id"] != 0 for a in kept], bool).reshape(len(kept))
    gt_arr = _engine.GtArrays(
        g_img, g_cat, g_box, g_area, g_ignore, np.zeros(len(kept), bool), id_nz
    )

    d_img, d_cat, d_box, d_score = parse_detections(detections, img_ids, cat_ids)
    d_rank = _engine.score_rank(d_score)
    if fixed_ap:
        keep = _top_k_per_group(d_cat, d_rank, int(max_dets_per_class))
    elif max_dets >= 0:
        keep = _top_k_per_group(d_img, d_rank, int(max_dets))
    else:
        keep = np.ones(d_img.shape[0], bool)
    d_area = d_box[:, 2] * d_box[:, 3]
    keep &= (d_area > 0) & (d_area < np.inf)

    # Federated: keep a detection only if its category is verified (positive or negative) for
    # its image. Verified (image, category) pairs as a sorted key set.
    neg = _id_lists_to_pairs(gt["images"], "neg_category_ids", img_pos, cat_pos)
    nel = _id_lists_to_pairs(gt["images"], "not_exhaustive_category_ids", img_pos, cat_pos)
    verified = np.unique(np.concatenate([g_img * n_cat + g_cat, neg[:, 0] * n_cat + neg[:, 1]]))
    nel_keys = np.unique(nel[:, 0] * n_cat + nel[:, 1])
    d_key = d_img * n_cat + d_cat
    keep &= np.isin(d_key, verified)
    dt_arr = _engine.DtArrays(
        d_img[keep],
        d_cat[keep],
        d_box[keep],
        d_score[keep],
        np.isin(d_key[keep], nel_keys),
        d_rank[keep],
    )

    precision, recall = _engine.evaluate(
        gt_arr, dt_arr, num_images=n_img, num_cats=n_cat, max_dets=(None,)
    )
    s = _engine.summarize
    groups = {g: np.array([i for i, f in enumerate(freq) if f == g], np.int64) for g in "rcf"}
    out = {
        "AP": s(precision, recall, ap=True),
        "AP50": s(precision, recall, ap=True, iou_thr=0.5),
        "AP75": s(precision, recall, ap=True, iou_thr=0.75),
        "APs": s(precision, recall, ap=True, area="small"),
        "APm": s(precision, recall, ap=True, area="medium"),
        "APl": s(precision, recall, ap=True, area="large"),
        "APr": s(precision, recall, ap=True, cat_index=groups["r"]),
        "APc": s(precision, recall, ap=True, cat_index=groups["c"]),
        "APf": s(precision, recall, ap=True, cat_index=groups["f"]),
    }
    tag = max_dets  # lvis-api names AR by its max_dets parameter, also for fixed AP
    out[f"AR@{tag}"] = s(precision, recall, ap=False)
    for area in ("small", "medium", "large"):
        out[f"AR{area[0]}@{tag}"] = s(precision, recall, ap=False, area=area)
    ap, ap50 = _engine.per_category(precision)
    out["per_category"] = {
        int(c): {"AP": float(ap[k]), "AP50": float(ap50[k])} for k, c in enumerate(cat_ids)
    }
    return out
