"""Free-text queries -> the token arrays an artifact's `encode_queries` takes (no flax).

Two query kinds (see ovd_jax/export/detectors.py):
* "concepts": each query is one concept, tokenized once per prompt template -> tokens / mask
  [Q, T, L]; detect later gets the embeddings padded to a multiple of `bucket` plus a mask.
* "chunks": queries are packed, in order, into as few prompts of L tokens as fit (GLIP's
  chunked vocabulary) -> token ids / mask [C, L], class-token maps [C, Kc, L] and class indices
  [C, Kc] with Kc padded to the exported size (-1 rows are padding).

Also the tokenizer, rebuilt from the files an artifact carries.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ovd_jax.text import grounding, prompts, tokenizers


def parse_queries(text: str, *, one_per_line: bool = False) -> list[str]:
    """"a, b, c" -> ["a", "b", "c"]; with `one_per_line` every line is one query as written
    (so a query may hold commas, e.g. "bat, a club used in baseball"). Blanks are dropped,
    order is kept. Raises ValueError when no query is left.
    """
    if one_per_line:
        parts = [line.strip() for line in text.splitlines()]
    else:
        parts = [p.strip() for line in text.splitlines() for p in line.split(",")]
    out = [p for p in parts if p]
    if not out:
        raise ValueError("the query list is empty: pass --queries \"cat, dog\" or "
                         "--queries @file.txt with one query a line.")
    return out


def load_tokenizer(folder: str, info: dict) -> tokenizers.FixedLengthTokenizer:
    """The tokenizer described by a manifest's `tokenizer` entry, from files in `folder`.

    info: {"kind": "wordpiece" | "clip", "file": name inside `folder`, "context_length": L,
    "lowercase": bool (wordpiece)}.
    """
    path = os.path.join(folder, info["file"])
    if not os.path.exists(path):
        raise ValueError(f"tokenizer file {path} is missing; re-export the artifact.")
    if info["kind"] == "wordpiece":
        return tokenizers.load_wordpiece_tokenizer(path, int(info["context_length"]),
                                                   lowercase=bool(info.get("lowercase", True)))
    if info["kind"] == "clip":
        return tokenizers.load_clip_tokenizer(path, int(info["context_length"]))
    raise ValueError(f"unknown tokenizer kind {info['kind']!r} in the manifest.")


def concept_tokens(tokenizer, queries: Sequence[str], templates: Sequence[str],
                   clean_names: bool) -> dict:
    """"concepts" kind: {"tokens": int32 [Q, T, L], "mask": bool [Q, T, L]}.

    Each query is put into every template ("a photo of a {}."); `clean_names` applies the
    prompt clean-up training used (`prompts.prompt_name`: '_' -> ' ', brackets dropped).
    """
    names = [prompts.prompt_name(q) if clean_names else q for q in queries]
    texts = [t.format(n) for n in names for t in templates]
    ids, mask = tokenizer.encode(texts)
    q, t = len(names), len(templates)
    return {"tokens": ids.reshape(q, t, -1), "mask": mask.reshape(q, t, -1)}


def pad_concepts(emb: np.ndarray, bucket: int) -> dict:
    """[K, D] query embeddings -> {"emb": [K', D], "valid": bool [K']}, K' the next multiple
    of `bucket` (zero rows, masked by the exported detect)."""
    k = emb.shape[0]
    size = -(-k // bucket) * bucket
    out = np.zeros((size, emb.shape[1]), emb.dtype)
    out[:k] = emb
    valid = np.zeros((size,), bool)
    valid[:k] = True
    return {"emb": out, "valid": valid}


def chunk_tokens(tokenizer, queries: Sequence[str], context_length: int,
                 max_per_chunk: int | None, chunk_classes: int) -> dict:
    """"chunks" kind: GLIP prompt chunks of the queries.

    Returns token_ids int32 [C, L], token_mask bool [C, L], class_token_map float32
    [C, Kc, L] and class_index int32 [C, Kc] with Kc = `chunk_classes` (the exported size).
    Raises ValueError when a chunk would hold more queries than that.
    """
    chunks = grounding.vocabulary_chunks(list(queries), tokenizer, int(context_length),
                                         max_per_chunk)
    cmap, index = chunks["class_token_map"], chunks["class_index"]
    c, kc, length = cmap.shape
    if kc > chunk_classes:
        raise ValueError(f"a prompt chunk holds {kc} queries but the artifact was exported for "
                         f"at most {chunk_classes}; use shorter or fewer queries per chunk.")
    full_map = np.zeros((c, chunk_classes, length), np.float32)
    full_map[:, :kc] = cmap
    full_index = np.full((c, chunk_classes), -1, np.int32)
    full_index[:, :kc] = index
    return {"token_ids": np.asarray(chunks["token_ids"], np.int32),
            "token_mask": np.asarray(chunks["token_mask"], bool),
            "class_token_map": full_map, "class_index": full_index}
