"""Caption and phrase-grounding readers (COCO-captions and MDETR/GLIP flattened formats).

* `load_coco_captions`: COCO captions JSON -> one record per image with all its captions
  (`image_id`, `path`, `height`, `width`, `captions`: list[str]).
* `load_grounding`: flattened grounding JSON (one image entry per image-caption pair, carrying
  `caption`; annotations with `bbox`, `category_id` and `tokens_positive` = [[start, end], ...]
  character spans into that caption) -> a `DetectionDataset` whose records also hold `caption`
  (str) and `tokens_positive` (per box, list of [start, end]). Turning character spans into a
  token positive map needs the text tower's tokenizer (offsets), so it happens there.
"""

from __future__ import annotations

import os

from ovd_jax.data.coco import DetectionDataset, build_dataset, load_json


def load_coco_captions(
    captions_json: str, image_dir: str, *, check_files: bool = True
) -> list[dict]:
    """Loads a COCO captions file; every image must have at least one non-empty caption."""
    data = load_json(captions_json, "captions")
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{captions_json!r} has no 'images'/'annotations' lists; it is not a "
                         "COCO captions file.")
    caps: dict[int, list[str]] = {int(im["id"]): [] for im in data["images"]}
    for a in data["annotations"]:
        iid = a.get("image_id")
        if iid not in caps:
            raise ValueError(f"{captions_json!r}: caption id {a.get('id')} refers to image id "
                             f"{iid}, which is not in 'images'; remove it or add the image.")
        text = a.get("caption")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{captions_json!r}: caption id {a.get('id')} is empty; remove it.")
        caps[iid].append(text.strip())
    records, missing = [], []
    for im in data["images"]:
        iid = int(im["id"])
        if not caps[iid]:
            raise ValueError(f"{captions_json!r}: image id {iid} ({im.get('file_name')!r}) has no "
                             "caption; remove the image or add a caption.")
        path = os.path.join(image_dir, im["file_name"])
        if check_files and not os.path.isfile(path):
            missing.append(path)
        records.append({"image_id": iid, "path": path, "height": int(im["height"]),
                        "width": int(im["width"]), "captions": caps[iid]})
    if missing:
        raise ValueError(f"{captions_json!r}: image file {missing[0]!r} does not exist (and "
                         f"{len(missing) - 1} more); point image_dir at the image folder.")
    return records


def load_grounding(
    grounding_json: str, image_dir: str, *, check_files: bool = True
) -> DetectionDataset:
    """Loads a flattened phrase-grounding file (see module docstring), validating the spans."""
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
            ok = isinstance(spans, list) and spans and all(
                isinstance(sp, list | tuple) and len(sp) == 2 and 0 <= sp[0] < sp[1] <= len(caption)
                for sp in spans
            )
            if not ok:
                raise ValueError(
                    f"{grounding_json!r}: annotation id {ann_id} has tokens_positive={spans!r}, "
                    f"not a list of [start, end] character spans inside its caption "
                    f"{caption!r} (length {len(caption)}); fix the spans."
                )
    return ds
