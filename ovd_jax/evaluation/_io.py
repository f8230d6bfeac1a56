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


def _show(entry) -> str:
    text = repr(entry)
    return text if len(text) <= 160 else text[:157] + "..."


def check_gt(gt) -> Mapping:
    """ValueError unless gt looks like a COCO/LVIS instances dict: 'images', 'annotations' and
    'categories' lists, every image and category a dict with a unique integer 'id'.

    Annotations are checked where they are parsed (`annotation_arrays`), at no cost when they
    are well formed.
    """
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
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt[key], list):
            raise ValueError(f"ground truth '{key}' is a {type(gt[key]).__name__}, not a list. "
                             "Fix: pass a COCO/LVIS instances file.")
    for key in ("images", "categories"):
        seen = set()
        for i, entry in enumerate(gt[key]):
            ident = entry.get("id") if isinstance(entry, Mapping) else None
            if isinstance(ident, bool) or not isinstance(ident, int):
                raise ValueError(
                    f"ground truth {key}[{i}] = {_show(entry)} has no integer 'id'. Fix: every "
                    f"entry of '{key}' must be a dict with an integer 'id'.")
            if ident in seen:
                raise ValueError(f"ground truth {key}[{i}] repeats id {ident}. Fix: ids in "
                                 f"'{key}' must be unique.")
            seen.add(ident)
    return gt


_ANN_KEYS = ("id", "image_id", "category_id", "bbox")


def _bad_annotation(anns: list) -> ValueError:
    """The clear error for the first annotation that cannot be parsed (slow path)."""
    for i, a in enumerate(anns):
        problem = None
        if not isinstance(a, Mapping):
            problem = "is not a dict"
        elif [k for k in _ANN_KEYS if k not in a]:
            problem = f"lacks {[k for k in _ANN_KEYS if k not in a]}"
        else:
            try:
                hash(a["image_id"]), hash(a["category_id"])
            except TypeError:
                problem = "has an image_id or category_id that is not a number"
            b = a["bbox"]
            if problem is None and not (
                isinstance(b, (list, tuple)) and len(b) == 4 and all(_is_number(v) for v in b)
            ):
                problem = "has a bbox that is not 4 numbers [x, y, width, height]"
            if problem is None and "area" in a and not _is_number(a["area"]):
                problem = "has an 'area' that is not a number"
        if problem:
            return ValueError(
                f"ground truth annotations[{i}] = {_show(a)} {problem}. Fix: every annotation "
                "needs 'id', 'image_id', 'category_id' and 'bbox': [x, y, width, height] in "
                "pixels (and a numeric 'area' when present).")
    return ValueError("ground truth annotations could not be parsed. Fix: re-export the file.")


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


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
    try:
        img = np.fromiter((img_pos.get(a["image_id"], -1) for a in anns), np.int64, len(anns))
        cat = np.fromiter((cat_pos.get(a["category_id"], -1) for a in anns), np.int64, len(anns))
        keep = (img >= 0) & (cat >= 0)
        kept = [a for a, k in zip(anns, keep.tolist()) if k]
        for a in kept:  # the evaluators read these; a missing one is reported here
            a["id"], a["bbox"]
        box = np.array([a["bbox"] for a in kept], dtype=np.float64).reshape(len(kept), 4)
        area = np.array(
            [a["area"] if "area" in a else a["bbox"][2] * a["bbox"][3] for a in kept],
            dtype=np.float64,
        ).reshape(len(kept))
    except (KeyError, TypeError, IndexError, ValueError):
        raise _bad_annotation(anns) from None
    bad = ~(np.isfinite(box).all(axis=1) & np.isfinite(area)) | (box[:, 2] < 0) | (box[:, 3] < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"ground truth annotation {_show(kept[i])} has a NaN, infinite or negative-size "
            f"bbox/area ({int(bad.sum())} annotation(s) affected). Fix: repair or remove them.")
    return keep, img[keep], cat[keep], box, area, kept
