"""LVIS-format instance annotations -> `DetectionDataset`.

LVIS v1 images carry no `file_name`, only `coco_url` (e.g. ".../val2017/000000397133.jpg"): the
image file is `image_dir / basename(coco_url)`; `file_name` is used when present instead. The
federated-evaluation fields `neg_category_ids` and `not_exhaustive_category_ids` are kept on each
record as int64 arrays. Categories keep their LVIS fields (`frequency`, `synonyms`, `def`, ...).
"""

from __future__ import annotations

import os

from ovd_jax.data.coco import DetectionDataset, build_dataset, load_json


def lvis_file_name(img: dict) -> str:
    """File name of an LVIS image: `file_name` if given, else the basename of `coco_url`."""
    if img.get("file_name"):
        return str(img["file_name"])
    url = img.get("coco_url")
    if not url:
        raise ValueError(
            f"LVIS image id {img.get('id')} has neither 'file_name' nor 'coco_url'; add one so "
            "the image file can be found."
        )
    return os.path.basename(str(url))


def load_lvis_detection(
    instances_json: str, image_dir: str, *, check_files: bool = True
) -> DetectionDataset:
    """Loads and validates an LVIS instances JSON whose images live in `image_dir`.

    Same validation and result as `load_coco_detection`; records additionally hold
    `neg_category_ids` and `not_exhaustive_category_ids` (int64 arrays of category ids).
    """
    data = load_json(instances_json, "LVIS instances")
    return build_dataset(
        data, instances_json, image_dir, file_name_of=lvis_file_name, check_files=check_files,
        extra_image_fields=("neg_category_ids", "not_exhaustive_category_ids"),
    )
