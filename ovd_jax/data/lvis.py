"""LVIS-format instance annotations -> `DetectionDataset`, and repeat-factor sampling.

LVIS v1 images carry no `file_name`, only `coco_url` (e.g. ".../val2017/000000397133.jpg"); LVIS
v1 train mixes COCO train2017 and val2017 images. The image file is `image_dir / <split folder> /
<name>` when `image_dir` has that split folder (image_dir = the COCO root, as detectron2 expects),
else `image_dir / <name>` (a flat folder); `file_name` is used when present instead. The
federated-evaluation fields `neg_category_ids` and `not_exhaustive_category_ids` are kept on each
record as int64 arrays. Categories keep their LVIS fields (`frequency`, `synonyms`, `def`, ...).

Repeat-factor sampling (Gupta et al., LVIS; detectron2 `RepeatFactorTrainingSampler`): with f_c
the fraction of training images holding category c, r_c = max(1, sqrt(t / f_c)); an image
repeats r_I = max over its categories of r_c times per epoch (1 without annotations), the
fractional part by a seeded coin flip.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import numpy as np

from ovd_jax.data.coco import DetectionDataset, build_dataset, load_json


def lvis_file_name(img: dict, image_dir: str | None = None) -> str:
    """File name of an LVIS image relative to `image_dir`: `file_name` if given, else the name
    in `coco_url`, under its split folder ("train2017/...") when `image_dir` holds that folder."""
    if img.get("file_name"):
        return str(img["file_name"])
    url = img.get("coco_url")
    if not url:
        raise ValueError(
            f"LVIS image id {img.get('id')} has neither 'file_name' nor 'coco_url'; add one so "
            "the image file can be found."
        )
    parts = str(url).rstrip("/").split("/")
    if image_dir is not None and len(parts) >= 2 and _is_dir(image_dir, parts[-2]):
        return os.path.join(parts[-2], parts[-1])
    return parts[-1]


@functools.lru_cache(maxsize=64)
def _is_dir(root: str, sub: str) -> bool:
    return os.path.isdir(os.path.join(root, sub))


def load_lvis_detection(
    instances_json: str, image_dir: str, *, check_files: bool = True
) -> DetectionDataset:
    """Loads and validates an LVIS instances JSON whose images live in `image_dir`.

    Same validation and result as `load_coco_detection`; records additionally hold
    `neg_category_ids` and `not_exhaustive_category_ids` (int64 arrays of category ids).
    """
    data = load_json(instances_json, "LVIS instances")
    return build_dataset(
        data, instances_json, image_dir, file_name_of=lambda img: lvis_file_name(img, image_dir),
        check_files=check_files,
        extra_image_fields=("neg_category_ids", "not_exhaustive_category_ids"),
    )


def repeat_factors(records: Sequence[dict], threshold: float) -> np.ndarray:
    """Per-image repeat factors r_I [N] float64 (see the module docstring) of training records.

    Category frequency counts each image once per category (crowd boxes included, as
    detectron2 counts every annotation's category).
    """
    if not threshold > 0:
        raise ValueError(f"config.data.repeat_factor_threshold={threshold} must be > 0 "
                         "(0 disables repeat-factor sampling).")
    cats_per_image = [set(int(c) for c in r["category_ids"]) for r in records]
    counts: dict[int, int] = {}
    for cats in cats_per_image:
        for c in cats:
            counts[c] = counts.get(c, 0) + 1
    n = max(len(records), 1)
    cat_factor = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in counts.items()}
    return np.asarray([max((cat_factor[c] for c in cats), default=1.0)
                       for cats in cats_per_image], np.float64)


def repeat_factor_indices(factors: np.ndarray, seed: int) -> np.ndarray:
    """Record indices of one repeat-factor epoch: index i appears floor(r_i) times plus once
    more with probability frac(r_i) (seeded), in index order (the loader shuffles)."""
    factors = np.asarray(factors, np.float64)
    whole = np.floor(factors)
    extra = np.random.default_rng(seed).random(len(factors)) < factors - whole
    reps = (whole + extra).astype(np.int64)
    return np.repeat(np.arange(len(factors)), reps)


class RepeatedRecords(Sequence):
    """A lazy view `records[indices[i]]` (a `Sequence`, so grain can index it)."""

    def __init__(self, records: Sequence[dict], indices: np.ndarray):
        self._records, self._indices = records, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._records[int(self._indices[i])]
