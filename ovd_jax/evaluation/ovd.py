"""Open-vocabulary base / novel / all metrics from per-category results.

OVD papers (OVR-CNN, RegionCLIP, ...) report COCO AP50 on the 48 base and 17 novel categories
(and all 65) by evaluating on each split's categories; with per-category AP50s in hand that is
the mean over the split's categories that have ground truth. LVIS uses the rare categories as
the novel split (the number reported there is APr).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ovd_jax.evaluation._io import check_gt, load_json


def _mean_valid(per_category: Mapping, ids: Sequence, key: str) -> float:
    vals = [per_category[c][key] for c in ids if c in per_category]
    vals = [v for v in vals if v >= 0]
    return float(np.mean(vals)) if vals else -1.0


def ovd_split_metrics(
    per_category: Mapping[int, Mapping[str, float]],
    base_ids: Sequence[int],
    novel_ids: Sequence[int],
    key: str = "AP50",
    caption_only_ids: Sequence[int] = (),
) -> dict:
    """{"base_<key>", "novel_<key>", "all_<key>"}: means over each split's valid categories.

    Args:
      per_category: {category_id: {"AP": ..., "AP50": ...}} as returned by the evaluators.
      base_ids, novel_ids: category ids of the two splits; "all" is their union (with the
        caption-only ids).
      key: which per-category number to average.
      caption_only_ids: optional third split (classes only image-text captions teach); when
        given, "caption_only_<key>" is added.
    Returns:
      floats; -1 for a split with no category that has ground truth (value >= 0).
    """
    listed = list(base_ids) + list(novel_ids) + list(caption_only_ids)
    unknown = [c for c in listed if c not in per_category]
    if len(unknown) == len(listed) and unknown:
        raise ValueError(
            f"none of the split's category ids ({unknown[:5]}...) is in the evaluated "
            f"categories ({list(per_category)[:5]}...). Fix: use the split of the ground truth "
            f"that was evaluated."
        )
    all_ids = list(dict.fromkeys(listed))
    out = {
        f"base_{key}": _mean_valid(per_category, base_ids, key),
        f"novel_{key}": _mean_valid(per_category, novel_ids, key),
    }
    if len(caption_only_ids):
        out[f"caption_only_{key}"] = _mean_valid(per_category, caption_only_ids, key)
    out[f"all_{key}"] = _mean_valid(per_category, all_ids, key)
    return out


def _resolve(entries: Sequence, by_name: Mapping, ids: set, which: str, path) -> list[int]:
    out = []
    for e in entries:
        if isinstance(e, str) and e in by_name:
            out.append(by_name[e])
        elif not isinstance(e, str) and e in ids:
            out.append(e)
        elif isinstance(e, str) and e.isdigit() and int(e) in ids:
            out.append(int(e))
        else:
            raise ValueError(
                f"split file {path!r}: {which} entry {e!r} is neither a category name nor a "
                f"category id of the ground truth. Fix: list names or ids from gt['categories']."
            )
    return out


def load_ovd_split(gt_dict_or_path, split_file=None) -> tuple[list[int], list[int]]:
    """(base category ids, novel category ids) for the ground truth.

    Sources, first available wins: ``split_file`` (a JSON dict or path ``{"base": [names or
    ids], "novel": [...]}``); each GT category's ``"split": "base" | "novel"`` flag; LVIS
    ``frequency`` with rare ("r") categories as novel, the others as base.
    Raises ValueError when none is available or the split file names unknown categories.
    """
    gt = check_gt(load_json(gt_dict_or_path, "ground truth"))
    cats = gt["categories"]
    by_name = {c["name"]: c["id"] for c in cats if "name" in c}
    ids = {c["id"] for c in cats}
    if split_file is not None:
        split = load_json(split_file, "OVD split")
        if not isinstance(split, Mapping) or not {"base", "novel"} <= set(split):
            raise ValueError(
                f"OVD split {split_file!r} must be a JSON object with 'base' and 'novel' lists "
                f"of category names or ids."
            )
        base = _resolve(split["base"], by_name, ids, "base", split_file)
        novel = _resolve(split["novel"], by_name, ids, "novel", split_file)
        return sorted(set(base)), sorted(set(novel))
    if cats and all("split" in c for c in cats):
        # "caption_only" classes are in neither split (see `load_caption_only_ids`).
        bad = [c["split"] for c in cats if c["split"] not in ("base", "novel", "caption_only")]
        if bad:
            raise ValueError(
                f"category 'split' flags must be 'base', 'novel' or 'caption_only', got "
                f"{bad[0]!r}. Fix the ground truth's categories."
            )
        return (
            sorted(c["id"] for c in cats if c["split"] == "base"),
            sorted(c["id"] for c in cats if c["split"] == "novel"),
        )
    if cats and all("frequency" in c for c in cats):
        return (
            sorted(c["id"] for c in cats if c["frequency"] != "r"),
            sorted(c["id"] for c in cats if c["frequency"] == "r"),
        )
    raise ValueError(
        "no OVD split available: the ground truth's categories carry neither a 'split' "
        "('base'/'novel') nor an LVIS 'frequency' field. Fix: pass a split file "
        '{"base": [names or ids], "novel": [...]} (e.g. --split_file).'
    )


def load_caption_only_ids(gt_dict_or_path, split_file=None) -> list[int]:
    """Category ids of the caption-only split: the split file's optional "caption_only" list
    (names or ids; entries the ground truth lacks are skipped), else the categories flagged
    `"split": "caption_only"`; [] when there is none."""
    gt = check_gt(load_json(gt_dict_or_path, "ground truth"))
    cats = gt["categories"]
    if split_file is not None:
        split = load_json(split_file, "OVD split")
        entries = split.get("caption_only", []) if isinstance(split, Mapping) else []
        by_name = {c["name"]: c["id"] for c in cats if "name" in c}
        ids = {c["id"] for c in cats}
        return sorted({by_name[e] if isinstance(e, str) and e in by_name else e
                       for e in entries if (e in by_name or e in ids)})
    return sorted(c["id"] for c in cats if c.get("split") == "caption_only")
