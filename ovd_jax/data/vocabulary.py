"""The detection vocabulary: class names in class-index order and the base/novel partition.

Class index k is the position in `class_names`; for a dataset it is the category's rank in id
order (`DetectionDataset.cat_id_to_index`). Base/novel come, in priority order, from a split file
`{"base": [names], "novel": [names]}`, from each category's `"split"` field, or (with
`rare_as_novel=True`) from LVIS frequency `"r"`; otherwise every class is base.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Class names plus which class indices are base (seen in training) and novel (held out).

    Attributes:
      class_names: name of class index k.
      base_indices / novel_indices: sorted class indices; disjoint, together all classes.
      cat_ids: dataset category id of class k (None for a free-form vocabulary).
      definitions: per-class definition sentence (LVIS `def`), or None when unknown.
      synonyms: per-class synonym lists (LVIS `synonyms`), or None when unknown.
    """

    class_names: tuple[str, ...]
    base_indices: tuple[int, ...]
    novel_indices: tuple[int, ...]
    cat_ids: tuple[int, ...] | None = None
    definitions: tuple[str, ...] | None = None
    synonyms: tuple[tuple[str, ...], ...] | None = None

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
        both = set(self.base_indices) & set(self.novel_indices)
        if both or sorted(set(self.base_indices) | set(self.novel_indices)) != list(
            range(len(self.class_names))
        ):
            raise ValueError("Vocabulary base_indices and novel_indices must partition the "
                             f"class indices 0..{len(self.class_names) - 1}.")

    def __len__(self) -> int:
        return len(self.class_names)

    @property
    def base_names(self) -> list[str]:
        return [self.class_names[i] for i in self.base_indices]

    @property
    def novel_names(self) -> list[str]:
        return [self.class_names[i] for i in self.novel_indices]

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
    ) -> Vocabulary:
        """Builds the vocabulary of a dataset.

        Args:
          categories: category dicts (COCO/LVIS); sorted by id here, so index k matches
            `DetectionDataset.cat_id_to_index`.
          split_file: optional JSON `{"base": [names], "novel": [names]}` (names as in the
            categories); every category must be listed exactly once.
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
        names = [str(c["name"]) for c in cats]
        if split_file is not None:
            novel_set = _read_split(split_file, names)
        elif any("split" in c for c in cats):
            novel_set = {c["name"] for c in cats if c.get("split") == "novel"}
        elif rare_as_novel:
            novel_set = {c["name"] for c in cats if c.get("frequency") == "r"}
        else:
            novel_set = set()
        novel_idx = tuple(i for i, n in enumerate(names) if n in novel_set)
        base_idx = tuple(i for i, n in enumerate(names) if n not in novel_set)
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
        return cls(tuple(names), base_idx, novel_idx, tuple(int(c["id"]) for c in cats), defs, syns)


def _read_split(path: str, names: list[str]) -> set[str]:
    if not os.path.isfile(path):
        raise ValueError(f"split file {path!r} does not exist; fix config.data.split_file.")
    with open(path, encoding="utf-8") as f:
        split = json.load(f)
    if not isinstance(split, dict) or not {"base", "novel"} <= set(split):
        raise ValueError(f"split file {path!r} must be a JSON object with 'base' and 'novel' "
                         "lists of category names.")
    base, novel = list(split["base"]), list(split["novel"])
    listed = base + novel
    unknown = sorted(set(listed) - set(names))
    if unknown:
        raise ValueError(f"split file {path!r} names categories not in the dataset: {unknown}.")
    unlisted = sorted(set(names) - set(listed))
    twice = sorted({n for n in listed if listed.count(n) > 1})
    if unlisted or twice:
        raise ValueError(
            f"split file {path!r} must list every category exactly once in 'base' or 'novel' "
            f"(missing: {unlisted}, listed twice: {twice})."
        )
    return set(novel)
