"""COCO-format instance annotations -> `DetectionDataset` (one validated record per image).

A record is a plain dict (what the grain pipeline consumes):

    image_id     int
    path         str        image file (image_dir / file_name)
    height,width int        as stated in the JSON (checked against the decoded image later)
    boxes        float32 [n, 4]  x1, y1, x2, y2 in original-image pixels (clipped into the image)
    category_ids int64   [n]     dataset category ids (NOT contiguous indices)
    iscrowd      bool    [n]     crowd regions: kept here, excluded from training targets

Every check raises a `ValueError` that names the offending file/annotation and the fix, because a
silently skipped image or box corrupts training and evaluation without any visible symptom.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import numpy as np

# A box may overhang the image by this many pixels (COCO has boxes ending at width + 0.5 from
# rounding); it is then clipped. Anything further out is an annotation error.
BOX_TOLERANCE_PX = 1.0


@dataclasses.dataclass
class DetectionDataset:
    """Validated detection annotations.

    Attributes:
      records: one dict per image (see module docstring), in the JSON's image order.
      categories: category dicts as in the JSON, sorted by id.
      class_names: category names in id order (index k <-> cat_ids[k]).
      cat_ids: sorted category ids.
      cat_id_to_index: category id -> contiguous class index 0..K-1 (id order).
      gt: the loaded JSON (for the COCO/LVIS evaluators).
    """

    records: list[dict]
    categories: list[dict]
    class_names: list[str]
    cat_ids: list[int]
    cat_id_to_index: dict[int, int]
    gt: dict

    def __len__(self) -> int:
        return len(self.records)


def _preview(ids: list[int], n: int = 10) -> str:
    return str(ids[:n])[:-1] + (", ...]" if len(ids) > n else "]")


def _is_number(v) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool)


def _hashable(v) -> bool:
    return isinstance(v, int | str | float | None) and not isinstance(v, bool)


def _int_field(entry, key: str, source: str, where: str) -> int:
    """entry[key] as an int; ValueError naming the entry when it is not a dict with an int."""
    value = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{source!r}: {where} = {entry!r:.80} has no integer {key!r}; every "
                         f"entry needs one (COCO format).")
    return value


def load_json(path: str, what: str) -> dict:
    """Reads a JSON annotation file; a missing or malformed file is a ValueError naming it."""
    if not os.path.isfile(path):
        raise ValueError(
            f"{what} file {path!r} does not exist; check the path in the data config "
            "(or generate the synthetic set with ovd_jax.data.synthetic.generate)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} file {path!r} is not valid JSON ({e}); re-export it.") from e
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {path!r} must hold a JSON object with 'images', "
                         "'annotations' and 'categories'.")
    return data


def build_dataset(
    data: dict,
    source: str,
    image_dir: str,
    *,
    file_name_of: Callable[[dict], str],
    check_files: bool,
    extra_image_fields: tuple[str, ...] = (),
    image_text_fields: tuple[str, ...] = (),
    annotation_fields: tuple[str, ...] = (),
) -> DetectionDataset:
    """Validates COCO-style `data` (loaded from `source`) and builds the `DetectionDataset`.

    `file_name_of(image_dict)` returns the image's file name relative to `image_dir`;
    `extra_image_fields` are copied from each image dict onto its record (as int64 arrays),
    `image_text_fields` as they are, and `annotation_fields` as per-box lists (box order).
    """
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{source!r} has no '{key}' list; it is not a COCO instances file.")
    categories = []
    for i, cat in enumerate(data["categories"]):
        cid = _int_field(cat, "id", source, f"categories[{i}]")
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{source!r}: category id {cid} has name={name!r}; every category "
                             "needs a non-empty string 'name' (it becomes the text prompt).")
        categories.append(cat)
    categories.sort(key=lambda c: c["id"])
    if not categories:
        raise ValueError(
            f"{source!r} has an empty 'categories' list: the detector needs at least one class. "
            "Add the categories to the annotation file (or set config.data.class_names)."
        )
    cat_ids = [int(c["id"]) for c in categories]
    dup = sorted({c for c in cat_ids if cat_ids.count(c) > 1})
    if dup:
        raise ValueError(f"{source!r} has duplicate category ids {dup[:10]}; each category needs "
                         "its own id - renumber them.")
    names = [c["name"] for c in categories]
    dup_names = sorted({n for n in names if names.count(n) > 1})
    if dup_names:
        raise ValueError(f"{source!r} has several categories named {dup_names[:10]}; names must "
                         "be unique (they are the prompts) - merge or rename them.")
    cat_id_to_index = {cid: k for k, cid in enumerate(cat_ids)}

    def name_of(img: dict) -> str:
        try:
            name = file_name_of(img)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{source!r}: image id {img.get('id')!r} has no usable file name "
                             f"({type(e).__name__}: {e}); add its 'file_name'.") from None
        if not isinstance(name, str) or not name:
            raise ValueError(f"{source!r}: image id {img.get('id')!r} has file name {name!r}; "
                             "it must be a non-empty path relative to the image folder.")
        return name

    images: dict[int, dict] = {}
    for i, img in enumerate(data["images"]):
        iid = _int_field(img, "id", source, f"images[{i}]")
        if iid in images:
            raise ValueError(f"{source!r}: image id {iid} appears twice; image ids must be unique.")
        h, w = img.get("height"), img.get("width")
        if not _is_number(h) or not _is_number(w) or not (0 < h < 1e6 and 0 < w < 1e6):
            raise ValueError(
                f"{source!r}: image id {iid} ({name_of(img)!r}) has height={h!r}, "
                f"width={w!r}; both must be positive numbers of pixels."
            )
        name_of(img)
        images[iid] = img

    per_image: dict[int, list[dict]] = {iid: [] for iid in images}
    ann_ids: set = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise ValueError(f"{source!r}: annotations[{i}] = {ann!r:.80} is not a JSON object; "
                             "each annotation needs id, image_id, category_id and bbox.")
        aid = ann.get("id")
        if aid is not None:
            if not isinstance(aid, int | str) or isinstance(aid, bool):
                raise ValueError(f"{source!r}: annotations[{i}] has id {aid!r:.40}; annotation "
                                 "ids must be integers.")
            if aid in ann_ids:
                raise ValueError(f"{source!r}: annotation id {aid} appears twice; annotation ids "
                                 "must be unique - renumber the annotations.")
            ann_ids.add(aid)
        iid = ann.get("image_id")
        if not _hashable(iid) or iid not in per_image:
            raise ValueError(
                f"{source!r}: annotation id {aid} refers to image id {iid!r:.40}, which is not "
                "in 'images'; remove the annotation or add its image."
            )
        cid = ann.get("category_id")
        if not _hashable(cid) or cid not in cat_id_to_index:
            raise ValueError(
                f"{source!r}: annotation id {aid} (image id {iid}) has category id {cid!r:.40}, "
                f"which is not in 'categories' (known ids: {_preview(cat_ids)}); "
                "fix the category id or add the category."
            )
        bbox = ann.get("bbox")
        img = images[iid]
        if not (isinstance(bbox, list | tuple) and len(bbox) == 4 and all(map(_is_number, bbox))):
            raise ValueError(f"{source!r}: annotation id {aid} has bbox={bbox!r:.80}; expected "
                             "4 numbers [x, y, width, height] in pixels.")
        x, y, bw, bh = (float(v) for v in bbox)
        if not np.isfinite([x, y, bw, bh]).all():
            raise ValueError(
                f"{source!r}: annotation id {aid} (image {name_of(img)!r}) has bbox {list(bbox)} "
                "with a NaN or infinite value; fix or remove the annotation."
            )
        if not (bw > 0 and bh > 0):
            raise ValueError(
                f"{source!r}: annotation id {aid} (image {name_of(img)!r}) has bbox "
                f"{list(bbox)} with non-positive width/height; boxes are [x, y, width, height] "
                "with width, height > 0 - fix or remove the annotation."
            )
        W, H = float(img["width"]), float(img["height"])
        tol = BOX_TOLERANCE_PX
        if x < 0 or y < 0 or x + bw > W + tol or y + bh > H + tol:
            raise ValueError(
                f"{source!r}: annotation id {aid} box [x, y, w, h]={list(bbox)} lies outside its "
                f"image {name_of(img)!r} of size width={img['width']}, "
                f"height={img['height']}; boxes must be in pixels of that image (are they "
                "normalised, or is the image size wrong?) - fix the annotation."
            )
        per_image[iid].append(ann)

    records = []
    missing = []
    for iid, img in images.items():
        path = os.path.join(image_dir, name_of(img))
        if check_files and not os.path.isfile(path):
            missing.append(path)
            continue
        anns = per_image[iid]
        W, H = float(img["width"]), float(img["height"])
        boxes = np.zeros((len(anns), 4), np.float32)
        for k, a in enumerate(anns):
            x, y, bw, bh = (float(v) for v in a["bbox"])
            boxes[k] = (x, y, min(x + bw, W), min(y + bh, H))  # clip the tolerated overhang
        rec = {
            "image_id": iid,
            "path": path,
            "height": int(img["height"]),
            "width": int(img["width"]),
            "boxes": boxes,
            "category_ids": np.asarray([a["category_id"] for a in anns], np.int64),
            "iscrowd": np.asarray([bool(a.get("iscrowd", 0)) for a in anns], bool),
        }
        for field in extra_image_fields:
            rec[field] = np.asarray(img.get(field, []), np.int64)
        for field in image_text_fields:
            rec[field] = img.get(field)
        for field in annotation_fields:
            rec[field] = [a.get(field) for a in anns]
        records.append(rec)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(
            f"{source!r}: image file {missing[0]!r} does not exist{more}; point image_dir "
            f"(currently {image_dir!r}) at the folder holding the images, or pass "
            "check_files=False to defer the check to loading time."
        )
    return DetectionDataset(
        records=records,
        categories=categories,
        class_names=[str(c["name"]) for c in categories],
        cat_ids=cat_ids,
        cat_id_to_index=cat_id_to_index,
        gt=data,
    )


def load_coco_detection(
    instances_json: str, image_dir: str, *, check_files: bool = True
) -> DetectionDataset:
    """Loads and validates a COCO instances JSON whose images live in `image_dir`.

    Args:
      instances_json: path of the COCO instances file (images / annotations / categories).
      image_dir: folder holding the images named by each image's `file_name`.
      check_files: check that every image file exists now (all of them, one error listing the
        first missing path and the count).

    Returns:
      A `DetectionDataset`. Raises ValueError on a missing file, an annotation with an unknown
      image or category id, a box with non-positive size or outside its image (beyond 1 px),
      or an empty category list.
    """
    data = load_json(instances_json, "instances")
    return build_dataset(
        data, instances_json, image_dir, file_name_of=lambda img: img["file_name"],
        check_files=check_files,
    )
