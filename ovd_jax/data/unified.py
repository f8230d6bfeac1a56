"""DetCLIPv2's unified data formulation: every example is (image, boxes {b_i}, concepts {t_j}).

* Detection: the concepts are the image's positive classes plus negative classes sampled from
  the rest of the vocabulary, each enriched with its definition ("name, definition"; LVIS and
  the synthetic set carry a `def` per category). Box i's target is its class's concept.
* Grounding: the concepts are the caption's phrases that name boxes (the annotation's
  `tokens_positive` spans) plus negatives sampled from a concept dictionary (phrases that do
  not occur in the caption). Box i's targets are the phrases naming it.
* Image-text pairs: no boxes; the concepts are the caption's noun phrases (and, optionally, the
  caption itself).

Concepts are encoded one per text sequence: `encode_concepts` gives `concept_ids` [K, L],
`concept_mask` [K, L] and `concept_valid` [K] for K = `max_concepts` slots (static shapes;
unused slots are padding). `box_concepts` [G, K] marks each box's positive concepts.

`MixedLoader` draws whole batches of one data type at a time from several loaders following a
fixed cyclic schedule (DetCLIPv2's alternating joint training); each batch carries its type
under `DATA_TYPE_KEY` (a host-side string the training loop uses to pick the compiled step).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ovd_jax.data import captions as captions_lib
from ovd_jax.data.pipeline import close_iterator

DATA_TYPE_KEY = "data_type"
CONCEPT_KEYS = ("concept_ids", "concept_mask", "concept_valid")


def enrich(name: str, definition: str | None) -> str:
    """Concept enrichment: "name, definition" (the name alone when there is no definition)."""
    definition = (definition or "").strip()
    return f"{name}, {definition}" if definition else name


def concept_texts(names: Sequence[str], definitions: Sequence[str] | None,
                  use_definitions: bool) -> list[str]:
    """The text of every class concept: enriched with its definition when `use_definitions`
    and definitions are known, the bare name otherwise."""
    if not use_definitions or definitions is None:
        return [str(n) for n in names]
    if len(definitions) != len(names):
        raise ValueError(f"{len(definitions)} definitions for {len(names)} class names; the "
                         "dataset's categories must all carry a 'def' or none.")
    return [enrich(n, d) for n, d in zip(names, definitions)]


def encode_concepts(tokenizer, texts: Sequence[str], max_concepts: int) -> dict:
    """Tokenizes up to `max_concepts` concepts, one sequence each, into fixed-size arrays.

    Returns concept_ids int32 [K, L], concept_mask bool [K, L], concept_valid bool [K]
    (K = max_concepts, L = tokenizer.context_length). Raises ValueError when given more texts
    than slots (callers cut first, so that their box targets stay consistent).
    """
    k = int(max_concepts)
    if len(texts) > k:
        raise ValueError(f"{len(texts)} concepts do not fit max_concepts={k}; raise "
                         "config.data.max_concepts.")
    length = tokenizer.context_length
    ids = np.full((k, length), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((k, length), bool)
    if texts:
        ids[: len(texts)], mask[: len(texts)] = tokenizer.encode(list(texts))
    valid = np.arange(k) < len(texts)
    return {"concept_ids": ids, "concept_mask": mask, "concept_valid": valid}


def _negatives(rng, candidates: Sequence, count: int) -> list:
    count = min(int(count), len(candidates))
    if count <= 0:
        return []
    pick = rng.choice(len(candidates), size=count, replace=False)
    return [candidates[int(i)] for i in pick]


def _targets(box_concepts: list[list[int]], order: list[int], num_boxes: int,
             max_concepts: int) -> np.ndarray:
    """Per-box positive concept slots -> [G, K] float32 (slots permuted by `order`)."""
    slot = {c: s for s, c in enumerate(order)}
    out = np.zeros((num_boxes, max_concepts), np.float32)
    for g, cs in enumerate(box_concepts):
        for c in cs:
            if c in slot:
                out[g, slot[c]] = 1.0
    return out


def detection_concepts(labels, box_mask, class_texts: Sequence[str], rng, *, max_concepts: int,
                       num_negatives: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A detection image's concepts: its positive classes + sampled negatives, shuffled.

    labels [G] int class indices into `class_texts` (-1 padding), box_mask [G] bool. At most
    `max_concepts` concepts: when the image has more positive classes, a random subset is kept
    and the boxes of the others are dropped; negatives fill up to `num_negatives` (never past
    `max_concepts`). Returns (texts [<= K], box_concepts [G, K] float32, box_valid [G] bool).
    """
    labels = np.asarray(labels)
    box_mask = np.asarray(box_mask, bool)
    if np.any(box_mask & ((labels < 0) | (labels >= len(class_texts)))):
        raise ValueError(f"detection labels {labels[box_mask].tolist()} fall outside the "
                         f"{len(class_texts)} training classes.")
    positives = [int(c) for c in rng.permutation(np.unique(labels[box_mask]))]
    positives = positives[: int(max_concepts)]
    kept = set(positives)
    box_valid = box_mask & np.isin(labels, list(kept))
    others = [c for c in range(len(class_texts)) if c not in kept]
    room = int(max_concepts) - len(positives)
    negatives = _negatives(rng, others, min(int(num_negatives), room))
    order = [int(i) for i in rng.permutation(positives + negatives)] if positives or negatives \
        else []
    per_box = [[int(lab)] if ok else [] for lab, ok in zip(labels, box_valid)]
    return ([class_texts[c] for c in order], _targets(per_box, order, len(labels), max_concepts),
            box_valid)


def phrase_text(caption: str, spans) -> str:
    """The phrase a box's `tokens_positive` spans name in `caption` (spans joined by a space,
    lower-cased, whitespace collapsed)."""
    return " ".join(" ".join(caption[int(s):int(e)] for s, e in spans).lower().split())


def grounding_concepts(caption: str, spans_per_box: Sequence, box_mask, rng,
                       negative_pool: Sequence[str], *, max_concepts: int, num_negatives: int
                       ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A grounding example's concepts: the caption's box phrases + negatives, shuffled.

    spans_per_box: per box (G, padded) a list of [start, end] character spans, or None;
    box_mask [G]. Negatives come from `negative_pool` and never occur in the caption. Phrases
    beyond `max_concepts` are dropped with their boxes. Returns (texts, box_concepts [G, K],
    box_valid [G]).
    """
    box_mask = np.asarray(box_mask, bool)
    phrases: list[str] = []
    per_box: list[list[int]] = []
    for g in range(len(box_mask)):
        spans = spans_per_box[g] if g < len(spans_per_box) else None
        if not box_mask[g] or not spans:
            per_box.append([])
            continue
        text = phrase_text(caption, spans)
        if text not in phrases:
            phrases.append(text)
        per_box.append([phrases.index(text)])
    keep = [int(i) for i in rng.permutation(len(phrases))][: int(max_concepts)]
    lowered = caption.lower()
    pool = [p for p in dict.fromkeys(negative_pool) if p not in phrases and p not in lowered]
    room = int(max_concepts) - len(keep)
    negatives = _negatives(rng, pool, min(int(num_negatives), room))
    texts = phrases + negatives
    ids = keep + list(range(len(phrases), len(texts)))
    order = [ids[int(i)] for i in rng.permutation(len(ids))]
    box_valid = box_mask & np.asarray([bool(set(b) & set(keep)) for b in per_box], bool)
    return ([texts[c] for c in order], _targets(per_box, order, len(box_mask), max_concepts),
            box_valid)


def image_text_concepts(caption: str, *, max_concepts: int, parser=None,
                        include_caption: bool = False) -> list[str]:
    """An image-text pair's concepts: the caption's distinct noun phrases (first
    `max_concepts`), preceded by the caption itself when `include_caption`. `parser` is a
    `captions.load_parser` result (None: the fallback noun-phrase parser)."""
    if not caption.strip():
        return []
    phrases = list(dict.fromkeys(captions_lib.noun_phrases([caption], parser)[0]))
    if include_caption:
        phrases = [caption.strip(), *[p for p in phrases if p != caption.strip()]]
    return phrases[: int(max_concepts)]


class MixedLoader:
    """Iterates several loaders, one whole batch at a time, in the cyclic order `schedule`
    (e.g. ("detection", "image_text", "grounding", "image_text") draws image-text every other
    step). Each batch gets `DATA_TYPE_KEY` = its loader's name. The iterator has `get_state` /
    `set_state` (schedule position + every part's state), so a run resumes exactly."""

    def __init__(self, loaders: dict, schedule: Sequence[str]):
        schedule = tuple(schedule)
        if not schedule:
            raise ValueError("the data-type schedule is empty; list at least one of "
                             f"{sorted(loaders)} in config.train.schedule.")
        unknown = sorted(set(schedule) - set(loaders))
        if unknown:
            raise ValueError(f"config.train.schedule names data types {unknown} that have no "
                             f"loader (available: {sorted(loaders)}); enable their data or "
                             "remove them from the schedule.")
        self._loaders = {k: v for k, v in loaders.items() if k in schedule}
        self.schedule = schedule

    def __iter__(self):
        return _MixedIterator({k: iter(v) for k, v in self._loaders.items()}, self.schedule)


class _MixedIterator:
    def __init__(self, iterators: dict, schedule: tuple[str, ...]):
        self._its, self._schedule, self._position = iterators, schedule, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        kind = self._schedule[self._position % len(self._schedule)]
        batch = dict(next(self._its[kind]))
        self._position += 1
        batch[DATA_TYPE_KEY] = kind
        return batch

    def get_state(self) -> dict:
        return {"position": self._position,
                "parts": {k: it.get_state() for k, it in self._its.items()}}

    def close(self) -> None:
        """Closes every part that can be closed (grain worker processes)."""
        for it in self._its.values():
            close_iterator(it)

    def set_state(self, state: dict) -> None:
        parts = state.get("parts", {})
        missing = sorted(set(self._its) - set(parts))
        if missing:
            raise ValueError(f"the saved data-iterator state lacks the data types {missing}; it "
                             "was written with another config.train.schedule.")
        self._position = int(state["position"])
        for k, it in self._its.items():
            it.set_state(parts[k])
