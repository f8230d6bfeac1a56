"""GLIP's text side: detection as phrase grounding (host-side NumPy, run in the input pipeline).

GLIP turns every detection problem into grounding: the class names are joined into one prompt
("person. bicycle. car"), and a box's target is the set of prompt tokens that spell its class (a
box x token *positive map*). Phrase-grounding data (Flickr30k Entities, GQA/VG in MDETR's
flattened format) gives the caption and each box's character spans (`tokens_positive`) directly.

* `build_prompt`: class names -> prompt text and each name's character span.
* `positive_map`: character spans -> token ids and a binary [targets, L] token map; a token is
  positive for a target when its character span overlaps one of the target's spans.
* `detection_prompt`: GLIP's per-image training prompt: the image's classes plus sampled negative
  classes, shuffled, with the box x token map aligned with the image's padded boxes.
* `grounding_targets`: the same for a caption and per-box character spans.
* `vocabulary_chunks`: evaluation prompts; a vocabulary too long for one context (LVIS) is split
  into chunks, each with a class x token averaging map (a class scores the MEAN of its tokens'
  sigmoids, as GLIP's inference does).

Truncation policy (the context length L cuts long prompts): a target is usable only when ALL of
its tokens fit. `positive_map` and `vocabulary_chunks` raise a ValueError naming the target that
does not fit; `detection_prompt` never builds a prompt that cuts a name (classes that do not fit
are left out, and the boxes of a left-out image class are dropped), and `grounding_targets` drops
the boxes whose phrase is cut. Dropped boxes get `box_valid=False` and are counted in
`num_dropped_boxes`, so the caller can mask (and log) them.

Names are cleaned as GLIP's `clean_name` does before they enter a prompt: parenthesised parts
removed ("bow_(weapon)" -> "bow"), underscores to spaces, runs of spaces collapsed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

from ovd_jax.text.tokenizers import FixedLengthTokenizer, TokenOffsets

# GLIP's separator between class names (DATASETS.SEPARATION_TOKENS in its configs).
SEPARATOR = ". "
# GLIP pretraining (O365 / GoldG configs): RANDOM_SAMPLE_NEG 85, CONTROL_PROB (0, 0, 0.5, 0):
# half of the images get all 85 sampled negatives, the others a uniform 1..85.
NUM_NEGATIVES = 85
FULL_NEGATIVE_PROB = 0.5


def clean_name(name: str) -> str:
    """GLIP's class-name cleaning: drop "(...)" parts, "_" -> " ", collapse spaces, strip."""
    name = re.sub(r"\([^)]*\)", "", str(name)).replace("_", " ")
    return " ".join(name.split())


def build_prompt(class_names: Sequence[str], separator: str = SEPARATOR,
                 clean: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """Joins class names into one prompt.

    Returns (prompt, spans): spans[k] = (start, end) character span of (cleaned) name k in the
    prompt, so prompt[start:end] is the name. The separator goes between names only.
    """
    if len(class_names) == 0:
        raise ValueError("build_prompt: class_names is empty; a prompt needs at least one class.")
    prompt, spans = "", []
    for k, raw in enumerate(class_names):
        name = clean_name(raw) if clean else str(raw)
        if not name.strip():
            raise ValueError(f"build_prompt: class {k} ({raw!r}) is empty after cleaning; give "
                             "it a name.")
        if k:
            prompt += separator
        spans.append((len(prompt), len(prompt) + len(name)))
        prompt += name
    return prompt, spans


def _as_span_list(spans, text: str, who: str, t: int) -> list[tuple[int, int]]:
    """One target's spans: a (start, end) pair or a list of them -> list of validated pairs."""
    if len(spans) == 2 and all(isinstance(v, int | np.integer) for v in spans):
        spans = [spans]
    out = []
    for sp in spans:
        if len(sp) != 2 or not 0 <= int(sp[0]) < int(sp[1]) <= len(text):
            raise ValueError(f"{who}: target {t} has span {list(sp)}, not a [start, end) "
                             f"character span inside the text (length {len(text)}).")
        out.append((int(sp[0]), int(sp[1])))
    if not out:
        raise ValueError(f"{who}: target {t} has no character span.")
    return out


def _encode(tokenizer: FixedLengthTokenizer, text: str, context_length: int) -> TokenOffsets:
    if not hasattr(tokenizer, "encode_with_offsets"):
        raise ValueError("GLIP prompts need a FixedLengthTokenizer (ovd_jax.text.tokenizers) "
                         f"with encode_with_offsets; got {type(tokenizer).__name__}.")
    return tokenizer.encode_with_offsets(text, context_length)


def _target_rows(enc: TokenOffsets, span_lists: list[list[tuple[int, int]]]):
    """Token rows for targets: (rows bool [T, L], cut bool [T], empty bool [T]).

    cut: some character of the target lies beyond the context cut (its tokens do not all fit);
    empty: no kept token overlaps the target.
    """
    length = enc.ids.shape[0]
    text_tok = np.zeros((length,), bool)
    text_tok[1:enc.num_text_tokens + 1] = True
    starts, ends = enc.offsets[:, 0], enc.offsets[:, 1]
    rows = np.zeros((len(span_lists), length), bool)
    cut = np.zeros((len(span_lists),), bool)
    for t, spans in enumerate(span_lists):
        for s, e in spans:
            rows[t] |= text_tok & (starts < e) & (ends > s)
            cut[t] |= e > enc.truncated_at
    return rows, cut, ~rows.any(axis=1)


def positive_map(tokenizer: FixedLengthTokenizer, prompt: str, spans_per_target,
                 context_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenizes `prompt` and maps each target's character span(s) to tokens.

    Args:
      tokenizer: a FixedLengthTokenizer (BERT WordPiece for GLIP, or CLIP BPE).
      prompt: the text.
      spans_per_target: T entries, each a (start, end) pair or a list of such pairs (a target
        may own several spans, e.g. a phrase mentioned twice).
      context_length: L, the token row length.
    Returns:
      token_ids int32 [L], token_mask bool [L], pos float32 [T, L] with pos[t, j] = 1 when token
      j's character span overlaps one of target t's spans (start/end/padding tokens never).
    Raises ValueError when a target's tokens do not all fit in L, or a span covers no token
    (e.g. only whitespace) - the message names the target's text.
    """
    span_lists = [_as_span_list(s, prompt, "positive_map", t)
                  for t, s in enumerate(spans_per_target)]
    enc = _encode(tokenizer, prompt, context_length)
    rows, cut, empty = _target_rows(enc, span_lists)
    for t in range(len(span_lists)):
        what = " / ".join(prompt[s:e] for s, e in span_lists[t])
        if cut[t]:
            raise ValueError(
                f"positive_map: target {t} ({what!r}) does not fit in the context length "
                f"{context_length} (the prompt is cut at character {enc.truncated_at} of "
                f"{len(prompt)}); raise the context length or use a shorter prompt "
                "(vocabulary_chunks splits a long vocabulary).")
        if empty[t]:
            raise ValueError(f"positive_map: target {t} ({what!r}) covers no token; its span "
                             "must cover a word.")
    return enc.ids, enc.mask, rows.astype(np.float32)


@functools.lru_cache(maxsize=16)
def _name_costs(tokenizer: FixedLengthTokenizer, names: tuple[str, ...],
                separator: str) -> tuple[np.ndarray, int]:
    """Tokens each name takes in a prompt, and the tokens of one separator."""
    counts = [len(ids) for ids in tokenizer.hf(list(names), add_special_tokens=False)["input_ids"]]
    sep = len(tokenizer.hf(separator, add_special_tokens=False)["input_ids"])
    return np.asarray(counts, np.int64), sep


def _fit(order: list[int], costs: np.ndarray, sep: int, budget: int) -> list[int]:
    """Longest prefix of `order` whose names + separators fit in `budget` tokens."""
    used = 0
    for i, k in enumerate(order):
        used += int(costs[k]) + (sep if i else 0)
        if used > budget:
            return order[:i]
    return order


def _check_labels(labels, num_classes: int, max_boxes: int, who: str) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{who}: labels must be integer class indices, got {labels.dtype}.")
    if labels.shape[0] > max_boxes:
        raise ValueError(f"{who}: {labels.shape[0]} labels but max_boxes is {max_boxes}; pass "
                         "the image's padded [max_boxes] labels.")
    bad = labels[labels >= num_classes]
    if bad.size:
        raise ValueError(f"{who}: label {int(bad[0])} is outside the {num_classes} class names.")
    return labels.astype(np.int64)


def detection_prompt(labels, class_names: Sequence[str], rng: np.random.Generator,
                     tokenizer: FixedLengthTokenizer, context_length: int, max_boxes: int,
                     num_negatives: int = NUM_NEGATIVES, shuffle: bool = True, *,
                     full_negative_prob: float = FULL_NEGATIVE_PROB,
                     separator: str = SEPARATOR) -> dict:
    """GLIP's per-image detection prompt (`od_to_grounding`): positives + sampled negatives.

    All classes present in the image are kept (a random subset when they do not all fit in L,
    as GLIP's `check_for_positive_overflow`). Negatives: `num_negatives` class indices drawn
    without replacement from the whole vocabulary with probability `full_negative_prob`, else a
    uniform 1..num_negatives of them; those that are image classes are discarded, and the rest
    kept while they fit. The kept classes are shuffled (sorted by index when shuffle=False) and
    joined with `separator`.

    Args:
      labels: int [n <= max_boxes] class index per box, -1 for padding (the pipeline's
        `labels`).
      class_names: the K training class names (index = class index).
      rng: numpy Generator (the pipeline's per-example rng).
      tokenizer, context_length: FixedLengthTokenizer and L.
      max_boxes: M.
    Returns a dict:
      token_ids int32 [L], token_mask bool [L];
      box_positive_map float32 [M, L]: row m = tokens of box m's class name (0/1); zero rows
        for padding and dropped boxes;
      box_valid bool [M]: real box whose class is in the prompt (AND it into the box mask);
      num_dropped_boxes int: real boxes whose class did not fit in L;
      prompt str; prompt_classes int32 [k]: class index of each name, in prompt order.
    """
    who = "detection_prompt"
    names = tuple(clean_name(n) for n in class_names)
    if not names:
        raise ValueError(f"{who}: class_names is empty.")
    labels = _check_labels(labels, len(names), max_boxes, who)
    costs, sep = _name_costs(tokenizer, names, separator)
    budget = int(context_length) - 2
    present = sorted({int(v) for v in labels if v >= 0})
    positives = [present[i] for i in rng.permutation(len(present))] if shuffle else present
    positives = _fit(positives, costs, sep, budget)
    negatives: list[int] = []
    if num_negatives > 0:
        n_neg = (num_negatives if rng.random() < full_negative_prob
                 else int(rng.integers(1, num_negatives + 1)))
        drawn = rng.choice(len(names), size=min(n_neg, len(names)), replace=False)
        pos_set = set(present)
        negatives = [int(k) for k in drawn if int(k) not in pos_set]
        negatives = _fit(positives + negatives, costs, sep, budget)[len(positives):]
    while True:
        chosen = positives + negatives
        order = ([chosen[i] for i in rng.permutation(len(chosen))] if shuffle
                 else sorted(chosen))
        if not order:  # an image without boxes and no negatives: an empty prompt
            enc = _encode(tokenizer, "", context_length)
            prompt, rows = "", np.zeros((0, int(context_length)), bool)
            break
        prompt, spans = build_prompt([names[k] for k in order], separator, clean=False)
        enc = _encode(tokenizer, prompt, context_length)
        rows, cut, empty = _target_rows(enc, [[sp] for sp in spans])
        if not cut.any():
            break
        # Token counts of separate names did not add up (rare merges across a separator):
        # drop one name (a negative first) and rebuild.
        (negatives if negatives else positives).pop()
    if order and empty.any():
        k = order[int(np.argmax(empty))]
        raise ValueError(f"{who}: class {k} ({class_names[k]!r}) produces no token; rename it.")
    class_row = {k: rows[i] for i, k in enumerate(order)}
    box_map = np.zeros((max_boxes, int(context_length)), np.float32)
    box_valid = np.zeros((max_boxes,), bool)
    for m, k in enumerate(labels.tolist()):
        if k >= 0 and k in class_row:
            box_map[m] = class_row[k]
            box_valid[m] = True
    return {
        "token_ids": enc.ids, "token_mask": enc.mask, "box_positive_map": box_map,
        "box_valid": box_valid, "num_dropped_boxes": int((labels >= 0).sum() - box_valid.sum()),
        "prompt": prompt, "prompt_classes": np.asarray(order, np.int32),
    }


def grounding_targets(caption: str, tokens_positive_per_box, tokenizer: FixedLengthTokenizer,
                      context_length: int, max_boxes: int) -> dict:
    """Phrase-grounding targets: caption + per-box character spans -> token ids and box map.

    Args:
      caption: the caption text.
      tokens_positive_per_box: n <= max_boxes entries aligned with the image's (padded) boxes;
        each a list of [start, end] character spans of the phrase(s) naming that box (MDETR /
        GLIP `tokens_positive`), or None for a padding box.
      tokenizer, context_length: FixedLengthTokenizer and L.
      max_boxes: M.
    Returns a dict: token_ids int32 [L], token_mask bool [L], box_positive_map float32 [M, L]
    (0/1; zero rows for padding and dropped boxes), box_valid bool [M], num_dropped_boxes int
    (boxes whose phrase is cut by the context length, or covers no token).
    """
    who = "grounding_targets"
    if not isinstance(caption, str) or not caption:
        raise ValueError(f"{who}: caption must be a non-empty string, got {caption!r}.")
    entries = list(tokens_positive_per_box)
    if len(entries) > max_boxes:
        raise ValueError(f"{who}: {len(entries)} boxes but max_boxes is {max_boxes}; raise "
                         "max_boxes or drop boxes first.")
    real = [m for m, sp in enumerate(entries) if sp is not None]
    span_lists = [_as_span_list(entries[m], caption, who, m) for m in real]
    enc = _encode(tokenizer, caption, context_length)
    rows, cut, empty = _target_rows(enc, span_lists)
    box_map = np.zeros((max_boxes, int(context_length)), np.float32)
    box_valid = np.zeros((max_boxes,), bool)
    ok = ~cut & ~empty
    for i, m in enumerate(real):
        if ok[i]:
            box_map[m] = rows[i]
            box_valid[m] = True
    return {"token_ids": enc.ids, "token_mask": enc.mask, "box_positive_map": box_map,
            "box_valid": box_valid, "num_dropped_boxes": int(len(real) - ok.sum())}


def vocabulary_chunks(class_names: Sequence[str], tokenizer: FixedLengthTokenizer,
                      context_length: int, max_classes_per_chunk: int | None = None,
                      separator: str = SEPARATOR) -> dict:
    """Evaluation prompts: the vocabulary split, in order, into as few prompts as fit in L.

    GLIP evaluates LVIS in chunks (TEST.CHUNKED_EVALUATION = 40 classes); here a chunk takes
    classes greedily while its prompt fits in L, and at most `max_classes_per_chunk` of them
    (None: no limit). Every class lands in exactly one chunk.

    Returns a dict (C chunks, Kc = the largest chunk's class count):
      token_ids int32 [C, L], token_mask bool [C, L];
      class_token_map float32 [C, Kc, L]: row k of chunk c is 1/n on the n tokens of that
        chunk's k-th class, so (sigmoid(logits) @ map.T) is the mean of its tokens' sigmoids;
        padding rows are zero;
      class_index int32 [C, Kc]: vocabulary index of each row, -1 for padding;
      prompts list[str] (C).
    Raises ValueError when a single class name does not fit in L, or the vocabulary is empty.
    """
    who = "vocabulary_chunks"
    names = tuple(clean_name(n) for n in class_names)
    if not names:
        raise ValueError(f"{who}: class_names is empty; the vocabulary needs at least one class.")
    if max_classes_per_chunk is not None and max_classes_per_chunk < 1:
        raise ValueError(f"{who}: max_classes_per_chunk must be >= 1 or None, got "
                         f"{max_classes_per_chunk}.")
    limit = max_classes_per_chunk or len(names)
    costs, sep = _name_costs(tokenizer, names, separator)
    budget = int(context_length) - 2
    groups, k = [], 0
    while k < len(names):
        group = _fit(list(range(k, min(k + limit, len(names)))), costs, sep, budget)
        if not group:
            raise ValueError(f"{who}: class {k} ({class_names[k]!r}) takes {int(costs[k])} tokens "
                             f"and does not fit in the context length {context_length} on its "
                             "own; raise the context length or shorten the name.")
        groups.append(group)
        k = group[-1] + 1
    # Token counts are estimates made per name; confirm each chunk with its real tokenization
    # (and split a chunk whose names turn out not to fit).
    done = []
    while groups:
        group = groups.pop(0)
        prompt, spans = build_prompt([names[i] for i in group], separator, clean=False)
        enc = _encode(tokenizer, prompt, context_length)
        rows, cut, empty = _target_rows(enc, [[sp] for sp in spans])
        if cut.any():
            if len(group) == 1:
                raise ValueError(f"{who}: class {group[0]} ({class_names[group[0]]!r}) does not "
                                 f"fit in the context length {context_length}.")
            groups.insert(0, group[-1:])
            groups.insert(0, group[:-1])
            continue
        if empty.any():
            i = group[int(np.argmax(empty))]
            raise ValueError(f"{who}: class {i} ({class_names[i]!r}) produces no token; rename it.")
        done.append((group, prompt, enc, rows))
    kc = max(len(g) for g, *_ in done)
    c, length = len(done), int(context_length)
    token_ids = np.zeros((c, length), np.int32)
    token_mask = np.zeros((c, length), bool)
    class_map = np.zeros((c, kc, length), np.float32)
    class_index = np.full((c, kc), -1, np.int32)
    prompts = []
    for ci, (group, prompt, enc, rows) in enumerate(done):
        token_ids[ci], token_mask[ci] = enc.ids, enc.mask
        class_map[ci, : len(group)] = rows / rows.sum(axis=1, keepdims=True)
        class_index[ci, : len(group)] = group
        prompts.append(prompt)
    return {"token_ids": token_ids, "token_mask": token_mask, "class_token_map": class_map,
            "class_index": class_index, "prompts": prompts}
