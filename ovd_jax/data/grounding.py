"""Phrase-grounding readers: MDETR's flattened COCO-style JSON and the ODVG jsonl format.

Both give a `DetectionDataset` (see `ovd_jax.data.coco`) whose records carry, besides the usual
image_id / path / height / width / boxes / category_ids / iscrowd:

    caption          str                   the text the spans index (None for ODVG `od` files)
    tokens_positive  list (one per box)    [[start, end], ...] character spans of the phrase(s)
                                           naming that box in `caption` (None for `od` files)

* `load_grounding` (MDETR / GLIP): Flickr30k Entities `final_flickr_separateGT_*.json`, GQA/VG
  `final_mixed_train(_no_coco).json`, and the synthetic set's `grounding_train.json`: COCO
  layout with one image entry per image-caption pair carrying `caption`, annotations carrying
  `tokens_positive`; all boxes share the category "object".
* `load_odvg` (GroundingDINO / MM-Grounding-DINO): one JSON object per line with `filename`,
  `height`, `width` and either `detection.instances` ([x1,y1,x2,y2] `bbox`, integer `label`;
  needs the `label_map` {"0": "person", ...}) - the `od` kind - or `grounding.caption` with
  `grounding.regions` (`bbox` one box or a list of boxes, `phrase`, optional `tokens_positive`;
  without it the phrase's first occurrence in the caption is used) - the `vg` kind.

Turning character spans into token targets needs the text tower's tokenizer; that happens in
`ovd_jax.text.grounding` (`grounding_targets`, or `detection_prompt` for `od` data).
"""

from __future__ import annotations

import json
import os

from ovd_jax.data.coco import DetectionDataset, build_dataset, load_json

# Category shared by every box of a phrase-grounding file (MDETR writes the same).
OBJECT_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


def _check_spans(source: str, what: str, spans, caption: str) -> None:
    ok = isinstance(spans, list) and spans and all(
        isinstance(sp, list | tuple) and len(sp) == 2
        and all(isinstance(v, int) for v in sp) and 0 <= sp[0] < sp[1] <= len(caption)
        for sp in spans
    )
    if not ok:
        raise ValueError(
            f"{source!r}: {what} has tokens_positive={spans!r}, not a list of [start, end] "
            f"character spans inside its caption {caption!r} (length {len(caption)}); fix the "
            "spans."
        )


def load_grounding(
    grounding_json: str, image_dir: str, *, check_files: bool = True
) -> DetectionDataset:
    """Loads an MDETR/GLIP flattened phrase-grounding file (see the module docstring).

    Every image entry needs a non-empty `caption`; every annotation a `tokens_positive` list of
    [start, end] spans inside it. Raises ValueError naming the entry otherwise (and for all the
    COCO checks of `build_dataset`: unknown ids, boxes outside the image, missing files).
    """
    data = load_json(grounding_json, "grounding")
    ds = build_dataset(
        data, grounding_json, image_dir, file_name_of=lambda im: im["file_name"],
        check_files=check_files, image_text_fields=("caption",),
        annotation_fields=("tokens_positive", "id"),
    )
    for rec in ds.records:
        caption = rec["caption"]
        if not isinstance(caption, str) or not caption:
            raise ValueError(f"{grounding_json!r}: image id {rec['image_id']} has no 'caption'; "
                             "grounding images must carry the caption their spans index.")
        for ann_id, spans in zip(rec.pop("id"), rec["tokens_positive"]):
            _check_spans(grounding_json, f"annotation id {ann_id}", spans, caption)
    return ds


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise ValueError(f"ODVG file {path!r} does not exist; check the path in the data config.")
    lines = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path!r} line {n} is not valid JSON ({e}); ODVG files hold one "
                                 "JSON object per line.") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{path!r} line {n} is not a JSON object.")
            lines.append(obj)
    if not lines:
        raise ValueError(f"ODVG file {path!r} is empty.")
    return lines


def _load_label_map(label_map) -> dict[int, str]:
    if isinstance(label_map, str):
        if not os.path.isfile(label_map):
            raise ValueError(f"ODVG label map {label_map!r} does not exist; `od` files need the "
                             'JSON {"0": "person", ...} they were written with.')
        with open(label_map, encoding="utf-8") as f:
            label_map = json.load(f)
    try:
        out = {int(k): str(v) for k, v in dict(label_map).items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"ODVG label map must map integer labels to names, e.g. "
                         f'{{"0": "person"}}; got {str(label_map)[:80]!r}.') from e
    if not out:
        raise ValueError("ODVG label map is empty: the detector needs at least one class.")
    return out


def _xyxy_to_xywh(box, where: str) -> list[float]:
    if not isinstance(box, list | tuple) or len(box) != 4:
        raise ValueError(f"{where}: bbox={box!r}; ODVG boxes are [x1, y1, x2, y2] in pixels.")
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def load_odvg(
    jsonl_path: str, image_dir: str, *, label_map=None, check_files: bool = True
) -> DetectionDataset:
    """Loads an ODVG jsonl file (see the module docstring).

    Args:
      jsonl_path: the .jsonl annotation file.
      image_dir: folder the `filename`s are relative to.
      label_map: `od` kind: path of (or the dict) {"label": "name"}; None for the `vg` kind.
      check_files: check now that every image exists.
    Returns a DetectionDataset. `od`: categories from the label map (id = label), caption and
    tokens_positive None. `vg`: one category "object" (id 1); each box of a region carries the
    region's spans (a region with several boxes gives several boxes). Image ids are the line
    numbers (1-based). Raises ValueError on a missing field, a line of the other kind, a label
    missing from the label map, a phrase not in its caption, or any COCO check of
    `build_dataset` (boxes must lie inside the image and have positive size).
    """
    lines = _read_jsonl(jsonl_path)
    kind = "od" if label_map is not None else "vg"
    names = _load_label_map(label_map) if kind == "od" else None
    images, anns, spans_of, phrase_of = [], [], {}, {}
    for n, obj in enumerate(lines, start=1):
        where = f"{jsonl_path!r} line {n}"
        for key in ("filename", "height", "width"):
            if key not in obj:
                raise ValueError(f"{where} has no {key!r}; ODVG lines need filename, height, "
                                 "width.")
        field = "detection" if kind == "od" else "grounding"
        if not isinstance(obj.get(field), dict):
            hint = ("pass label_map= if it is an `od` (detection) file" if kind == "vg"
                    else "pass label_map=None if it is a `vg` (grounding) file")
            raise ValueError(f"{where} has no {field!r} object; {hint}.")
        image = {"id": n, "file_name": obj["filename"], "height": obj["height"],
                 "width": obj["width"]}
        if kind == "od":
            for i, inst in enumerate(obj["detection"].get("instances", [])):
                label = inst.get("label")
                if not isinstance(label, int) or label not in names:
                    raise ValueError(f"{where} instance {i} has label {label!r}, which is not in "
                                     "the label map; fix the label or the map.")
                anns.append({"id": len(anns) + 1, "image_id": n, "category_id": label,
                             "bbox": _xyxy_to_xywh(inst.get("bbox"), f"{where} instance {i}")})
        else:
            g = obj["grounding"]
            caption = g.get("caption")
            if not isinstance(caption, str) or not caption:
                raise ValueError(f"{where} has no grounding caption.")
            image["caption"] = caption
            for i, region in enumerate(g.get("regions", [])):
                rwhere = f"{where} region {i}"
                spans = region.get("tokens_positive")
                phrase = region.get("phrase")
                if spans is None:
                    start = caption.find(phrase) if isinstance(phrase, str) and phrase else -1
                    if start < 0:
                        raise ValueError(f"{rwhere}: phrase {phrase!r} does not occur in the "
                                         f"caption {caption!r} and no tokens_positive is given.")
                    spans = [[start, start + len(phrase)]]
                _check_spans(jsonl_path, rwhere, spans, caption)
                boxes = region.get("bbox")
                if isinstance(boxes, list) and boxes and isinstance(boxes[0], list | tuple):
                    box_list = boxes
                else:
                    box_list = [boxes]
                for box in box_list:
                    aid = len(anns) + 1
                    anns.append({"id": aid, "image_id": n, "category_id": OBJECT_CATEGORY["id"],
                                 "bbox": _xyxy_to_xywh(box, rwhere)})
                    spans_of[aid], phrase_of[aid] = [list(s) for s in spans], phrase
        images.append(image)
    if kind == "od":
        categories = [{"id": k, "name": v} for k, v in sorted(names.items())]
    else:
        categories = [dict(OBJECT_CATEGORY)]
    data = {"images": images, "annotations": anns, "categories": categories}
    ds = build_dataset(
        data, jsonl_path, image_dir, file_name_of=lambda im: im["file_name"],
        check_files=check_files, image_text_fields=("caption",), annotation_fields=("id",),
    )
    for rec in ds.records:
        ids = rec.pop("id")
        rec["tokens_positive"] = [spans_of[a] for a in ids] if kind == "vg" else None
        if kind == "vg":
            rec["phrases"] = [phrase_of[a] for a in ids]
    return ds


def aligned_tokens_positive(record: dict, max_boxes: int, *, truncate: bool = False) -> list:
    """A grounding record's tokens_positive in the order the detection pipeline packs its boxes
    (crowd boxes dropped, first `max_boxes` kept when `truncate`), padded with None to
    `max_boxes` - ready for `ovd_jax.text.grounding.grounding_targets`."""
    spans = record.get("tokens_positive")
    if spans is None:
        raise ValueError(f"record {record.get('image_id')} has no tokens_positive; it is not a "
                         "phrase-grounding record.")
    kept = [s for s, crowd in zip(spans, record["iscrowd"].tolist()) if not crowd]
    if len(kept) > max_boxes:
        if not truncate:
            raise ValueError(f"image {record.get('path')!r} has {len(kept)} boxes but max_boxes "
                             f"is {max_boxes}; raise max_boxes (or pass truncate=True).")
        kept = kept[:max_boxes]
    return kept + [None] * (max_boxes - len(kept))
