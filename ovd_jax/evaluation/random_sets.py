"""Deterministic random COCO/LVIS-style ground truths and detections, for tests and benchmarks.

The sets are built to exercise every corner of the reference evaluators: crowd boxes, images
without GT, categories without GT, duplicated GT boxes (equal IoUs), tied scores, boxes of every
area range, degenerate (zero-width) boxes, a GT with id 0, and for LVIS r/c/f frequencies,
``neg_category_ids``, ``not_exhaustive_category_ids`` and detections of unverified categories.
"""

from __future__ import annotations

import numpy as np


def _boxes(rng: np.random.Generator, n: int, size: float) -> np.ndarray:
    """n xywh boxes inside a size x size image, log-uniform side lengths (all area ranges)."""
    wh = np.exp(rng.uniform(np.log(2.0), np.log(size * 0.9), size=(n, 2)))
    xy = rng.uniform(0, 1, size=(n, 2)) * (size - wh)
    return np.concatenate([xy, wh], axis=1)


def _jitter(rng: np.random.Generator, box: np.ndarray, scale: float) -> np.ndarray:
    """Shifts and rescales xywh boxes by a relative amount ~ scale (IoUs spread over 0.3..1)."""
    n = box.shape[0]
    out = box.copy()
    out[:, :2] += rng.normal(0, scale, (n, 2)) * box[:, 2:]
    out[:, 2:] *= np.exp(rng.normal(0, scale, (n, 2)))
    exact = rng.random(n) < 0.05  # some exact copies: IoU exactly 1
    out[exact] = box[exact]
    return out


def _round_some(rng: np.random.Generator, x: np.ndarray, frac: float) -> np.ndarray:
    """Rounds a fraction of the rows to integers (creates exact IoU ties between boxes)."""
    m = rng.random(x.shape[0]) < frac
    x = x.copy()
    x[m] = np.round(x[m])
    return x


def random_coco(
    seed: int,
    *,
    num_images: int = 20,
    num_categories: int = 8,
    gt_per_image: float = 6.0,
    dets_per_image: int = 40,
    image_size: float = 640.0,
    lvis: bool = False,
    empty_images: float = 0.1,
    crowd_frac: float = 0.05,
    tie_frac: float = 0.3,
) -> tuple[dict, list]:
    """A random instances dict and a matching list of COCO result dicts.

    Args:
      seed: everything is a deterministic function of it.
      num_images, num_categories: set sizes; about a fifth of the categories get no GT.
      gt_per_image: mean GT boxes per image (Poisson); ``empty_images`` of the images get none.
      dets_per_image: detections per image (exact count; LVIS caps at 300 by default).
      lvis: add LVIS fields (frequency, neg/not-exhaustive category ids, a few ``ignore``/zero
        area GTs) instead of crowd boxes.
      tie_frac: fraction of scores quantised to 2 decimals (tied scores).
    Returns:
      (gt dict with images/annotations/categories, list of detection dicts).
    """
    rng = np.random.default_rng(seed)
    cat_ids = np.sort(rng.choice(np.arange(1, num_categories * 3 + 1), num_categories, False))
    img_ids = np.sort(rng.choice(np.arange(1, num_images * 5 + 1), num_images, False))
    with_gt_cats = cat_ids[rng.random(num_categories) > 0.2]
    if with_gt_cats.size == 0:
        with_gt_cats = cat_ids[:1]
    categories = []
    for c in cat_ids.tolist():
        cat = {"id": c, "name": f"cat{c}"}
        if lvis:
            cat["frequency"] = "rcf"[rng.integers(3)]
            cat["synset"] = f"cat{c}.n.01"
        categories.append(cat)

    images, annotations, detections = [], [], []
    ann_id = 1
    for img in img_ids.tolist():
        n_gt = 0 if rng.random() < empty_images else rng.poisson(gt_per_image)
        gbox = _round_some(rng, _boxes(rng, n_gt, image_size), 0.3)
        gcat = rng.choice(with_gt_cats, n_gt)
        if n_gt > 1:  # duplicated GT boxes: equal IoUs, exercises the tie-break
            dup = rng.random(n_gt) < 0.1
            src = rng.integers(0, n_gt, n_gt)
            gbox[dup] = gbox[src[dup]]
            gcat[dup] = gcat[src[dup]]
        for b, c in zip(gbox.tolist(), gcat.tolist()):
            ann = {
                "id": ann_id,
                "image_id": img,
                "category_id": c,
                "bbox": b,
                "area": b[2] * b[3] * float(rng.uniform(0.5, 1.0)),
            }
            if lvis:
                u = rng.random()
                if u < 0.02:
                    ann["ignore"] = 1
                elif u < 0.03:
                    ann["area"] = 0.0  # dropped by lvis-api's get_ann_ids
            else:
                ann["iscrowd"] = int(rng.random() < crowd_frac)
            annotations.append(ann)
            ann_id += 1
        im = {"id": img, "width": int(image_size), "height": int(image_size)}
        pos = sorted(set(gcat.tolist()))
        if lvis:
            others = np.setdiff1d(cat_ids, pos)
            neg = rng.choice(others, min(others.size, rng.integers(0, 6)), replace=False)
            nel = [c for c in pos if rng.random() < 0.2]
            im["neg_category_ids"] = sorted(int(c) for c in neg)
            im["not_exhaustive_category_ids"] = nel
        images.append(im)

        # Detections: jittered GTs (true and near misses), plus random boxes.
        n_det = dets_per_image
        n_near = min(n_det, int(n_det * 0.6)) if n_gt else 0
        src = rng.integers(0, max(n_gt, 1), n_near)
        dbox = np.concatenate(
            [
                _jitter(rng, gbox[src], rng.choice([0.03, 0.1, 0.25], n_near)[:, None]),
                _boxes(rng, n_det - n_near, image_size),
            ]
        )
        dbox = _round_some(rng, dbox, 0.2)
        dbox[:, 2:] = np.maximum(dbox[:, 2:], 0.0)
        if n_det:
            dbox[rng.random(n_det) < 0.01, 2] = 0.0  # zero-width boxes
        if lvis:
            pool = np.concatenate([np.asarray(pos, np.int64), im["neg_category_ids"]])
            if pool.size == 0:
                pool = cat_ids
            rand_cat = np.where(
                rng.random(n_det) < 0.8, rng.choice(pool, n_det), rng.choice(cat_ids, n_det)
            )
        else:
            rand_cat = rng.choice(cat_ids, n_det)
        dcat = rand_cat.copy()
        if n_near:
            same = rng.random(n_near) < 0.8
            dcat[:n_near] = np.where(same, gcat[src], rand_cat[:n_near])
        score = rng.random(n_det)
        tied = rng.random(n_det) < tie_frac
        score[tied] = np.round(score[tied], 2)
        perm = rng.permutation(n_det)
        for j in perm.tolist():
            detections.append(
                {
                    "image_id": img,
                    "category_id": int(dcat[j]),
                    "bbox": dbox[j].tolist(),
                    "score": float(score[j]),
                }
            )
    if annotations and not lvis:
        annotations[int(rng.integers(len(annotations)))]["id"] = 0  # pycocotools' id-0 quirk
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, detections
