"""The detection vocabulary: class names in class-index order and the base/novel partition.

Class index k is the position in `class_names`; for a dataset it is the category's rank in id
order (`DetectionDataset.cat_id_to_index`). Base/novel come, in priority order, from a split file
`{"base": [names], "novel": [names]}`, from a built-in split named in `BUILTIN_SPLITS`
(`config.data.split`, e.g. "coco_48_17"), from each category's `"split"` field, or (with
`rare_as_novel=True`) from LVIS frequency `"r"`; otherwise every class is base.

A built-in split may cover only part of a dataset's categories (COCO OVD uses 65 of the 80):
the vocabulary then holds only the split's classes, and `restrict_dataset` drops the other
categories' annotations from the ground truth, as the OVD annotation files do.
`drop_annotations_outside` removes training annotations outside the training vocabulary
(novel / rare classes) with a logged count.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence

import numpy as np

from ovd_jax.data.coco import DetectionDataset

log = logging.getLogger(__name__)

# The COCO open-vocabulary split of OVR-CNN, used by RegionCLIP (48 base / 17 novel classes of
# COCO 2017; the other 15 COCO classes are in neither and are left out of training and testing).
COCO_OVD_BASE = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird",
    "horse", "sheep", "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee",
    "skis", "kite", "surfboard", "bottle", "fork", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "pizza", "donut", "chair", "bed", "toilet", "tv",
    "laptop", "mouse", "remote", "microwave", "oven", "toaster", "refrigerator", "book", "clock",
    "vase", "toothbrush",
)
COCO_OVD_NOVEL = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
    "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors",
)
# name -> (base names, novel names); categories of a dataset named in neither are left out.
BUILTIN_SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "coco_48_17": (COCO_OVD_BASE, COCO_OVD_NOVEL),
}


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Class names plus which class indices are base (seen in training) and novel (held out).

    Attributes:
      class_names: name of class index k.
      base_indices / novel_indices: sorted class indices; disjoint, together all classes.
      cat_ids: dataset category id of class k (None for a free-form vocabulary).
      definitions: per-class definition sentence (LVIS `def`), or None when unknown.
      synonyms: per-class synonym lists (LVIS `synonyms`), or None when unknown.
      caption_only_indices: classes whose words only image-text captions teach (no box label
        in training; a split file's "caption_only" list or categories flagged
        `"split": "caption_only"`); neither base nor novel. Base, novel and caption-only
        partition the class indices.
    """

    class_names: tuple[str, ...]
    base_indices: tuple[int, ...]
    novel_indices: tuple[int, ...]
    cat_ids: tuple[int, ...] | None = None
    definitions: tuple[str, ...] | None = None
    synonyms: tuple[tuple[str, ...], ...] | None = None
    caption_only_indices: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.class_names:
            raise ValueError(
                "The vocabulary is empty: set config.data.class_names to a list of class names "
                "(or point the data config at an annotation file with categories)."
            )
        if any(not isinstance(n, str) or not n.strip() for n in self.class_names):
            raise ValueError(
                f"config.data.class_names holds an empty or non-string name: "
                f"{list(self.class_names)!r}; every class needs a non-empty name."
            )
        if len(set(self.class_names)) != len(self.class_names):
            dup = sorted({n for n in self.class_names if self.class_names.count(n) > 1})
            raise ValueError(f"config.data.class_names has duplicate names {dup}; names must be "
                             "unique so each maps to one class.")
        parts = (self.base_indices, self.novel_indices, self.caption_only_indices)
        if sum(map(len, parts)) != len(self.class_names) or sorted(
            i for p in parts for i in p
        ) != list(range(len(self.class_names))):
            raise ValueError("Vocabulary base_indices, novel_indices and caption_only_indices "
                             f"must partition the class indices 0..{len(self.class_names) - 1}.")

    def __len__(self) -> int:
        return len(self.class_names)

    @property
    def base_names(self) -> list[str]:
        return [self.class_names[i] for i in self.base_indices]

    @property
    def novel_names(self) -> list[str]:
        return [self.class_names[i] for i in self.novel_indices]

    @property
    def caption_only_names(self) -> list[str]:
        return [self.class_names[i] for i in self.caption_only_indices]

    def index_of(self, name: str) -> int:
        try:
            return self.class_names.index(name)
        except ValueError:
            names = list(self.class_names)
            raise ValueError(f"{name!r} is not in the vocabulary {names}") from None

    @classmethod
    def from_names(cls, names: Sequence[str], novel: Sequence[str] = ()) -> Vocabulary:
        """A free-form vocabulary (e.g. a detect-CLI prompt); `novel` names must be in `names`."""
        names = tuple(names)
        unknown = [n for n in novel if n not in names]
        if unknown:
            raise ValueError(f"novel names {unknown} are not in config.data.class_names {names}.")
        novel_idx = tuple(sorted(names.index(n) for n in novel))
        base_idx = tuple(i for i in range(len(names)) if i not in set(novel_idx))
        return cls(names, base_idx, novel_idx)

    @classmethod
    def from_categories(
        cls,
        categories: Sequence[dict],
        *,
        split_file: str | None = None,
        class_names: Sequence[str] | None = None,
        rare_as_novel: bool = False,
        split: str | None = None,
    ) -> Vocabulary:
        """Builds the vocabulary of a dataset.

        Args:
          categories: category dicts (COCO/LVIS); sorted by id here, so index k matches
            `DetectionDataset.cat_id_to_index` (with a built-in split: of the split's classes).
          split_file: optional JSON `{"base": [names], "novel": [names]}` (names as in the
            categories); every category must be listed exactly once.
          split: optional name in `BUILTIN_SPLITS` (exclusive with split_file); only the
            split's categories enter the vocabulary, and all of them must be in `categories`.
          class_names: optional override of the names (same length and order as the sorted
            categories), e.g. friendlier prompt names; `config.data.class_names`.
          rare_as_novel: without a split file or `split` fields, treat LVIS frequency "r" as novel.
        """
        cats = sorted(categories, key=lambda c: c["id"])
        if not cats:
            raise ValueError(
                "The dataset has no categories, so the vocabulary would be empty: set "
                "config.data.class_names or use an annotation file with categories."
            )
        if split:
            if split_file is not None:
                raise ValueError(f"config.data.split={split!r} and config.data.split_file="
                                 f"{split_file!r} both give a split; set only one.")
            base, novel = builtin_split(split)
            present = {str(c["name"]) for c in cats}
            missing = [n for n in base + novel if n not in present]
            if missing:
                raise ValueError(
                    f"config.data.split={split!r} names classes the dataset lacks: {missing[:10]}; "
                    "use the dataset the split was made for, or a split file."
                )
            cats = [c for c in cats if str(c["name"]) in set(base + novel)]
        names = [str(c["name"]) for c in cats]
        caption_only = {c["name"] for c in cats if c.get("split") == "caption_only"}
        if split:
            novel_set = set(novel)
        elif split_file is not None:
            novel_set, caption_only = _read_split(split_file, names)
        elif any("split" in c for c in cats):
            novel_set = {c["name"] for c in cats if c.get("split") == "novel"}
        elif rare_as_novel:
            novel_set = {c["name"] for c in cats if c.get("frequency") == "r"}
        else:
            novel_set = set()
        novel_idx = tuple(i for i, n in enumerate(names) if n in novel_set)
        co_idx = tuple(i for i, n in enumerate(names) if n in caption_only and n not in novel_set)
        base_idx = tuple(i for i in range(len(names)) if i not in set(novel_idx + co_idx))
        if class_names is not None:
            class_names = list(class_names)
            if len(class_names) != len(names):
                raise ValueError(
                    f"config.data.class_names has {len(class_names)} names but the dataset has "
                    f"{len(names)} categories; give one name per category in category-id order."
                )
            names = class_names
        defs = tuple(str(c.get("def", "")) for c in cats) if all("def" in c for c in cats) else None
        syns = (tuple(tuple(c["synonyms"]) for c in cats)
                if all("synonyms" in c for c in cats) else None)
        return cls(tuple(names), base_idx, novel_idx, tuple(int(c["id"]) for c in cats), defs, syns,
                   co_idx)


def _read_split(path: str, names: list[str]) -> tuple[set[str], set[str]]:
    """(novel names, caption-only names) of a split file. Its optional "caption_only" list may
    name classes the dataset lacks (a training set never lists them)."""
    if not os.path.isfile(path):
        raise ValueError(f"split file {path!r} does not exist; fix config.data.split_file.")
    with open(path, encoding="utf-8") as f:
        split = json.load(f)
    if not isinstance(split, dict) or not {"base", "novel"} <= set(split):
        raise ValueError(f"split file {path!r} must be a JSON object with 'base' and 'novel' "
                         "lists of category names.")
    base, novel = list(split["base"]), list(split["novel"])
    caption_only = [n for n in split.get("caption_only", []) if n in set(names)]
    unknown = sorted(set(base + novel) - set(names))
    if unknown:
        raise ValueError(f"split file {path!r} names categories not in the dataset: {unknown}.")
    listed = base + novel + caption_only
    unlisted = sorted(set(names) - set(listed))
    twice = sorted({n for n in listed if listed.count(n) > 1})
    if unlisted or twice:
        raise ValueError(
            f"split file {path!r} must list every category exactly once in 'base', 'novel' or "
            f"'caption_only' (missing: {unlisted}, listed twice: {twice})."
        )
    return set(novel), set(caption_only)


def builtin_split(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(base names, novel names) of a built-in split; ValueError naming the known ones."""
    if name not in BUILTIN_SPLITS:
        raise ValueError(f"config.data.split={name!r} is not a built-in split; use one of "
                         f"{sorted(BUILTIN_SPLITS)} or a split file (config.data.split_file).")
    return BUILTIN_SPLITS[name]


def _keep_annotations(record: dict, keep_ids: set[int]) -> dict:
    mask = np.asarray([int(c) in keep_ids for c in record["category_ids"]], bool)
    if mask.all():
        return record
    out = dict(record)
    for key in ("boxes", "category_ids", "iscrowd"):
        out[key] = np.asarray(record[key])[mask]
    for key, value in record.items():  # per-box lists (e.g. grounding phrases)
        if key not in out or key in ("boxes", "category_ids", "iscrowd"):
            continue
        if isinstance(value, list) and len(value) == len(mask):
            out[key] = [v for v, m in zip(value, mask) if m]
    return out


def restrict_dataset(dataset, cat_ids: Sequence[int], *, drop_empty_images: bool = True):
    """A copy of a `DetectionDataset` holding only the categories `cat_ids`.

    Annotations of other categories leave the records and the ground truth; with
    `drop_empty_images`, images left without any annotation leave both as well (the COCO OVD
    annotation files hold only images with an annotation of their 65 classes).
    """
    keep = {int(c) for c in cat_ids}
    records = [_keep_annotations(r, keep) for r in dataset.records]
    if drop_empty_images:
        records = [r for r in records if len(r["category_ids"])]
    image_ids = {r["image_id"] for r in records}
    gt = dict(dataset.gt)
    gt["categories"] = [c for c in gt["categories"] if int(c["id"]) in keep]
    gt["annotations"] = [a for a in gt["annotations"]
                         if int(a["category_id"]) in keep and a["image_id"] in image_ids]
    gt["images"] = [im for im in gt["images"] if im["id"] in image_ids]
    categories = [c for c in dataset.categories if int(c["id"]) in keep]
    cat_id_list = [int(c["id"]) for c in categories]
    log.info("restricted %d categories to %d: %d of %d images kept", len(dataset.categories),
             len(categories), len(records), len(dataset.records))
    return DetectionDataset(
        records=records, categories=categories, class_names=[str(c["name"]) for c in categories],
        cat_ids=cat_id_list, cat_id_to_index={c: k for k, c in enumerate(cat_id_list)}, gt=gt,
    )


def drop_annotations_outside(dataset, keep_cat_ids: Sequence[int], *, novel_names=()):
    """Training annotations of categories outside `keep_cat_ids` removed, counts logged.

    Returns (new DetectionDataset, {category name: removed annotation count}). A warning names
    the removed classes that are in `novel_names` (an OVD training file should not hold them;
    upstream's COCO OVD training file has them removed already). Images keep their place, even
    when left without annotations (the training loader drops those).
    """
    keep = {int(c) for c in keep_cat_ids}
    names = {int(c["id"]): str(c["name"]) for c in dataset.categories}
    removed: dict[str, int] = {}
    for r in dataset.records:
        for c in r["category_ids"]:
            if int(c) not in keep:
                removed[names[int(c)]] = removed.get(names[int(c)], 0) + 1
    if not removed:
        return dataset, removed
    novel = sorted(n for n in removed if n in set(novel_names))
    total = sum(removed.values())
    if novel:
        log.warning(
            "the training file holds %d annotations of novel classes %s; they are removed "
            "(an open-vocabulary detector must not see them)",
            sum(removed[n] for n in novel), novel[:10])
    log.warning("removed %d training annotations of %d classes outside the training vocabulary",
                total, len(removed))
    records = [_keep_annotations(r, keep) for r in dataset.records]
    out = dataclasses.replace(dataset, records=records)
    return out, removed
