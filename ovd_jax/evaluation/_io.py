"""JSON loading (orjson when installed) and ground-truth parsing shared by the evaluators."""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Mapping

import numpy as np

try:  # orjson parses large result files several times faster; json is the fallback.
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None


def load_json(path_or_obj, what: str):
    """Returns the parsed JSON of a path, or the object itself when it is not a path.

    what: a name for error messages ("ground truth", "detections").
    """
    if not isinstance(path_or_obj, (str, os.PathLike)):
        return path_or_obj
    path = os.fspath(path_or_obj)
    if not os.path.isfile(path):
        raise ValueError(f"{what} file {path!r} does not exist. Fix: pass an existing JSON path.")
    try:
        with no_gc():
            if _orjson is not None:
                with open(path, "rb") as f:
                    return _orjson.loads(f.read())
            with open(path) as f:
                return json.load(f)
    except ValueError as e:  # orjson.JSONDecodeError and json.JSONDecodeError are ValueErrors
        raise ValueError(
            f"{what} file {path!r} is not valid JSON ({e}). Fix: re-export the file."
        ) from None


@contextlib.contextmanager
def no_gc():
    """Pauses the cyclic garbage collector: building millions of small dicts/lists otherwise
    triggers repeated full collections (about 2x slower loads), and none of them form cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def check_gt(gt) -> Mapping:
    """ValueError unless gt looks like a COCO/LVIS instances dict."""
    if not isinstance(gt, Mapping):
        raise ValueError(
            f"ground truth must be a COCO instances dict or a JSON path, got "
            f"{type(gt).__name__}. Fix: pass instances_*.json."
        )
    missing = [k for k in ("images", "annotations", "categories") if k not in gt]
    if missing:
        raise ValueError(
            f"ground truth lacks the keys {missing}. Fix: pass a COCO/LVIS instances file "
            f"(with 'images', 'annotations' and 'categories')."
        )
    return gt


def sorted_ids(items) -> list:
    """Sorted unique ``id`` fields of a list of dicts (the references' image/category order)."""
    return sorted({it["id"] for it in items})


def annotation_arrays(anns: list, img_ids: list, cat_ids: list):
    """Annotations of the given images and categories as arrays, in file order.

    Returns (keep mask bool [N] over ``anns``, image index int64 [G], category index int64 [G],
    bbox float64 [G, 4] (x, y, w, h), area float64 [G], the kept annotation dicts).
    ``area`` is the annotation's own ``area`` field (the references use it, not w * h); when it is
    missing, w * h.
    """
    img_pos = {v: i for i, v in enumerate(img_ids)}
    cat_pos = {v: i for i, v in enumerate(cat_ids)}
    img = np.fromiter((img_pos.get(a["image_id"], -1) for a in anns), np.int64, len(anns))
    cat = np.fromiter((cat_pos.get(a["category_id"], -1) for a in anns), np.int64, len(anns))
    keep = (img >= 0) & (cat >= 0)
    kept = [a for a, k in zip(anns, keep.tolist()) if k]
    box = np.array([a["bbox"] for a in kept], dtype=np.float64).reshape(len(kept), 4)
    area = np.array(
        [a["area"] if "area" in a else a["bbox"][2] * a["bbox"][3] for a in kept],
        dtype=np.float64,
    ).reshape(len(kept))
    return keep, img[keep], cat[keep], box, area, kept
