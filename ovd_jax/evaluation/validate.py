"""Checks and vectorised parsing of COCO-format detection results against a ground truth.

A detection is a dict ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` (boxes in
image pixels, top-left corner plus width and height). Malformed entries raise a ``ValueError``
that names the first offending entry (its index and values) and the fix; nothing is silently
dropped.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from ovd_jax.evaluation._io import check_gt, load_json, no_gc

_KEYS = ("image_id", "category_id", "bbox", "score")


def _show(det) -> str:
    text = repr(det)
    return text if len(text) <= 200 else text[:197] + "..."


def _ids_to_index(values: list, ids: np.ndarray, id_list: list, what: str, dets: Sequence):
    """Maps raw ids to their rank in the sorted GT ids; ValueError naming the first unknown one."""
    try:
        arr = np.asarray(values)
        if arr.dtype.kind not in "iu" or ids.dtype.kind not in "iu":
            raise TypeError
        arr = arr.astype(np.int64)
        pos = np.searchsorted(ids, arr)
        bad = (pos >= ids.shape[0]) | (ids[np.minimum(pos, ids.shape[0] - 1)] != arr)
    except (TypeError, ValueError, OverflowError):
        lookup = {v: i for i, v in enumerate(id_list)}
        pos = np.array([lookup.get(v, -1) if isinstance(v, Hashable) else -1 for v in values],
                       dtype=np.int64)
        bad = pos < 0
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        shown = ", ".join(map(str, id_list[:5])) + (", ..." if len(id_list) > 5 else "")
        raise ValueError(
            f"detections[{i}] = {_show(dets[i])}: {what} {values[i]!r} is not in the ground "
            f"truth ({int(bad.sum())} detection(s) affected; known {what}s: {shown}). Fix: "
            f"evaluate against the annotation file the detections were produced for, or drop "
            f"detections whose {what} is not in it."
        )
    return pos.astype(np.int64)


def parse_detections(
    detections: Sequence[Mapping],
    image_ids: Sequence,
    category_ids: Sequence,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validates detections and turns them into arrays.

    Args:
      detections: list of COCO result dicts.
      image_ids, category_ids: the ground truth's ids, sorted ascending.
    Returns:
      (image index int64 [D], category index int64 [D], bbox float64 [D, 4] as x, y, w, h,
      score float64 [D]); indices are positions in ``image_ids`` / ``category_ids``.
    Raises:
      ValueError naming the first offending entry: not a dict, missing key, image or category id
      not in the ground truth, bbox not 4 finite numbers, negative width/height, score not a
      finite number.
    """
    if not isinstance(detections, (list, tuple)):
        raise ValueError(
            f"detections must be a list of dicts (COCO results format), got "
            f"{type(detections).__name__}. Fix: pass the list loaded from the results JSON."
        )
    with no_gc():
        return _parse(detections, image_ids, category_ids)


def _parse(detections, image_ids, category_ids):
    n = len(detections)
    try:
        imgs = [d["image_id"] for d in detections]
        cats = [d["category_id"] for d in detections]
        boxes = [d["bbox"] for d in detections]
        scores = [d["score"] for d in detections]
    except (KeyError, TypeError, IndexError):
        for i, d in enumerate(detections):
            if not isinstance(d, Mapping):
                raise ValueError(
                    f"detections[{i}] = {_show(d)} is not a dict. Fix: every detection must be "
                    f'{{"image_id", "category_id", "bbox": [x, y, w, h], "score"}}.'
                ) from None
            missing = [k for k in _KEYS if k not in d]
            if missing:
                raise ValueError(
                    f"detections[{i}] = {_show(d)} lacks {missing}. Fix: every detection must "
                    f'be {{"image_id", "category_id", "bbox": [x, y, w, h], "score"}}.'
                ) from None
        raise
    img_ids = np.asarray(image_ids)
    cat_ids = np.asarray(category_ids)
    img_idx = _ids_to_index(imgs, img_ids, list(image_ids), "image_id", detections)
    cat_idx = _ids_to_index(cats, cat_ids, list(category_ids), "category_id", detections)

    box = None
    try:
        lens = np.fromiter(map(len, boxes), dtype=np.int64, count=n)
        if n and (lens != 4).any():
            raise ValueError
        box = np.fromiter(
            itertools.chain.from_iterable(boxes), dtype=np.float64, count=4 * n
        ).reshape(n, 4)
    except (TypeError, ValueError):
        for i, b in enumerate(boxes):
            ok = isinstance(b, (list, tuple)) and len(b) == 4
            if ok:
                try:
                    [float(v) for v in b]
                except (TypeError, ValueError):
                    ok = False
            if not ok:
                raise ValueError(
                    f"detections[{i}] = {_show(detections[i])}: bbox must be 4 numbers "
                    f"[x, y, width, height] in pixels. Fix: convert the box (e.g. from x1, y1, "
                    f"x2, y2 to x1, y1, x2 - x1, y2 - y1)."
                ) from None
        raise
    bad = ~np.isfinite(box).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"detections[{i}] = {_show(detections[i])}: bbox has a NaN or infinite value "
            f"({int(bad.sum())} detection(s) affected). Fix: drop or repair those boxes."
        )
    bad = (box[:, 2] < 0) | (box[:, 3] < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"detections[{i}] = {_show(detections[i])}: negative width or height "
            f"({int(bad.sum())} detection(s) affected). The bbox is [x, y, width, height]; "
            f"Fix: convert x1, y1, x2, y2 boxes to x1, y1, x2 - x1, y2 - y1."
        )
    try:
        score = np.fromiter(scores, dtype=np.float64, count=n)
    except (TypeError, ValueError):
        for i, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, (int, float, np.number)):
                raise ValueError(
                    f"detections[{i}] = {_show(detections[i])}: score must be a number. Fix: "
                    f"write the detection confidence as a float."
                ) from None
        raise
    bad = ~np.isfinite(score)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"detections[{i}] = {_show(detections[i])}: score {score[i]!r} is not finite "
            f"({int(bad.sum())} detection(s) affected). Fix: drop those detections or clip the "
            f"scores (NaN usually comes from a division by zero upstream)."
        )
    return img_idx, cat_idx, box, score


def validate_detections(gt: Mapping, detections: Sequence[Mapping]) -> None:
    """Raises ValueError naming the first malformed detection; returns None when all are fine.

    gt: a COCO/LVIS instances dict or path (``images`` and ``categories`` are used).
    """
    gt = check_gt(load_json(gt, "ground truth"))
    image_ids = sorted({im["id"] for im in gt["images"]})
    cat_ids = sorted({c["id"] for c in gt["categories"]})
    parse_detections(detections, image_ids, cat_ids)
