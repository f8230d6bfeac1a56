"""Tokenizers producing fixed-length int32 id arrays: CLIP byte-level BPE and BERT WordPiece.

Both are built through Hugging Face `transformers` fast tokenizers from local files (no network)
and share one call interface:

    tok = load_clip_tokenizer()             # or load_wordpiece_tokenizer("vocab.txt", 32)
    ids = tok(["a photo of a cat."])        # np.int32 [N, context_length], zero/pad padded
    ids, mask = tok.encode([...])           # plus the bool attention mask [N, context_length]
    tok.vocab_size, tok.eot_token_id, tok.pad_token_id

Layout: [start] + text tokens + [end], padded with `pad_token_id`; too-long text is cut so that
the end token stays last (open_clip's `tokenize` does the same).
"""

from __future__ import annotations

import gzip
import html
import json
import os
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

CLIP_VOCAB_SIZE = 49408
_CLIP_BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"


class FixedLengthTokenizer:
    """Wraps a `transformers` fast tokenizer into fixed-length [start] ... [end] id arrays.

    Attributes:
      context_length: length of every output row.
      vocab_size: number of ids (embedding rows a text tower needs).
      sot_token_id / eot_token_id / pad_token_id: start, end and padding ids.
    """

    def __init__(self, hf_tokenizer, context_length: int, sot_token_id: int, eot_token_id: int,
                 pad_token_id: int, clean=None):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start + end), got {context_length}.")
        self.hf = hf_tokenizer
        self.context_length = int(context_length)
        self.sot_token_id = int(sot_token_id)
        self.eot_token_id = int(eot_token_id)
        self.pad_token_id = int(pad_token_id)
        self.vocab_size = len(hf_tokenizer)
        self._clean = clean or (lambda s: s)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (ids int32 [N, context_length], mask bool [N, context_length])."""
        if isinstance(texts, str):
            texts = [texts]
        texts = [self._clean(t) for t in texts]
        pieces = self.hf(texts, add_special_tokens=False)["input_ids"] if texts else []
        n = len(texts)
        ids = np.full((n, self.context_length), self.pad_token_id, dtype=np.int32)
        mask = np.zeros((n, self.context_length), dtype=bool)
        long = [i for i, body in enumerate(pieces) if len(body) > self.context_length - 2]
        if long:  # one warning per call (Python shows each distinct message once)
            i = long[0]
            warnings.warn(f"{len(long)} of {n} text(s) are cut to their first "
                          f"{self.context_length - 2} tokens (context_length "
                          f"{self.context_length}), e.g. {texts[i][:80]!r} with "
                          f"{len(pieces[i])} tokens. Shorten them to keep all of the text.",
                          stacklevel=2)
        for i, body in enumerate(pieces):
            row = [self.sot_token_id, *body[: self.context_length - 2], self.eot_token_id]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = True
        return ids, mask

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> int32 [N, context_length] token ids."""
        return self.encode(texts)[0]

    def encode_with_offsets(self, text: str, context_length: int | None = None) -> TokenOffsets:
        """One text -> `TokenOffsets`: the row `encode` gives plus each token's character span.

        offsets [L, 2] int32 are (start, end) character positions in `text` itself (not in a
        cleaned copy); the start, end and padding positions get (0, 0). `context_length`
        overrides the row length L. Raises ValueError when this tokenizer's text cleaning
        (CLIP: ftfy + HTML unescaping) would change the tokens, since offsets into the cleaned
        copy would not index `text`: clean the text first.
        """
        length = self.context_length if context_length is None else int(context_length)
        if length < 2:
            raise ValueError(f"context_length must be >= 2 (start + end), got {length}.")
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        body, spans = list(enc["input_ids"]), list(enc["offset_mapping"])
        cleaned = self._clean(text)
        if cleaned != text and self.hf(cleaned, add_special_tokens=False)["input_ids"] != body:
            raise ValueError(f"text {text!r} tokenizes differently once cleaned ({cleaned!r}); "
                             "pass the cleaned text so that character offsets index it.")
        n = min(len(body), length - 2)
        ids = np.full((length,), self.pad_token_id, np.int32)
        ids[0], ids[1:n + 1], ids[n + 1] = self.sot_token_id, body[:n], self.eot_token_id
        mask = np.zeros((length,), bool)
        mask[: n + 2] = True
        offsets = np.zeros((length, 2), np.int32)
        if n:
            offsets[1:n + 1] = np.asarray(spans[:n], np.int32)
        truncated_at = int(spans[n][0]) if n < len(body) else len(text)
        return TokenOffsets(ids, mask, offsets, n, truncated_at)


class TokenOffsets(NamedTuple):
    """`FixedLengthTokenizer.encode_with_offsets` output for one text (L = context length).

    ids int32 [L], mask bool [L], offsets int32 [L, 2] (character span of each token, (0, 0) for
    start/end/padding), num_text_tokens (text tokens kept, at positions 1..num_text_tokens) and
    truncated_at (character index where the context length cut the text; len(text) if it did
    not).
    """

    ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    num_text_tokens: int
    truncated_at: int


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the other bytes to
    code points from 256 upwards, so every byte has a visible, non-whitespace character.
    Insertion order (printable bytes first, then the rest) is the vocabulary order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    rest = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(rest)})
    return table


def _clip_vocab_from_bpe_gz(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from open_clip's `bpe_simple_vocab_16e6.txt.gz`, in CLIP's order:
    256 byte symbols, the same with '</w>', the 48894 merges, then the 2 special tokens."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # 49408 = 512 byte symbols + 48894 merges + 2 special tokens; line 0 is a version header.
    n_merges = CLIP_VOCAB_SIZE - 512 - 2
    merges = [tuple(m.split()) for m in lines[1 : 1 + n_merges]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _default_clip_bpe() -> str:
    try:
        import open_clip  # noqa: PLC0415
    except ImportError as e:
        raise ValueError(
            "load_clip_tokenizer(path=None) needs the CLIP BPE vocabulary shipped in the "
            "open_clip package: `pip install open-clip-torch`, or pass path= to "
            f"{_CLIP_BPE_NAME}, a folder with vocab.json + merges.txt, or a cached HF model name."
        ) from e
    path = os.path.join(os.path.dirname(open_clip.__file__), _CLIP_BPE_NAME)
    if not os.path.exists(path):
        raise ValueError(f"open_clip is installed but {path} is missing; reinstall "
                         "open-clip-torch.")
    return path


def _clip_clean(text: str) -> str:
    """open_clip's text cleaning: ftfy (when installed), double HTML unescape, collapse spaces."""
    try:
        import ftfy  # noqa: PLC0415

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split())


def load_clip_tokenizer(path: str | None = None, context_length: int = 77) -> FixedLengthTokenizer:
    """CLIP's byte-level BPE tokenizer (lower-cased), ids equal to open_clip's `tokenize`.

    Args:
      path: None (the BPE file inside the installed open_clip package), a
        `bpe_simple_vocab_16e6.txt.gz` file, a folder with `vocab.json` + `merges.txt`, or a
        Hugging Face model name already in the local cache.
      context_length: row length of the output (77 for every released CLIP).
    Returns a FixedLengthTokenizer (start 49406, end 49407, padding 0 for OpenAI's vocabulary).
    """
    from transformers import CLIPTokenizerFast  # noqa: PLC0415

    path = _default_clip_bpe() if path is None else str(path)
    if path.endswith(".gz"):
        if not os.path.exists(path):
            raise ValueError(f"CLIP BPE file {path} does not exist.")
        vocab, merges = _clip_vocab_from_bpe_gz(path)
        # transformers 5 ignores vocab_file=/merges_file= (silently giving a 2-token vocabulary);
        # pass the contents instead and check the size below.
        tok = CLIPTokenizerFast(vocab=vocab, merges=merges)
    elif os.path.isdir(path):
        vocab_json = os.path.join(path, "vocab.json")
        merges_txt = os.path.join(path, "merges.txt")
        if not (os.path.exists(vocab_json) and os.path.exists(merges_txt)):
            raise ValueError(f"{path} must contain vocab.json and merges.txt for a CLIP tokenizer.")
        with open(vocab_json, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_txt, encoding="utf-8") as f:
            # merges.txt: a '#version' header line, then "left right" pairs.
            merges = [tuple(ln.split()) for ln in f.read().split("\n")
                      if ln.strip() and not ln.startswith("#version")]
        tok = CLIPTokenizerFast(vocab=vocab, merges=merges)
    else:
        try:
            tok = CLIPTokenizerFast.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - many error types, one message
            raise ValueError(
                f"Cannot load a CLIP tokenizer from {path!r}: not a .gz BPE file, not a folder "
                "with vocab.json + merges.txt, and not a Hugging Face model in the local cache."
            ) from e
    if len(tok) < 3 or (path.endswith(".gz") and len(tok) != CLIP_VOCAB_SIZE):
        raise ValueError(f"CLIP tokenizer from {path!r} has {len(tok)} tokens (CLIP's has "
                         f"{CLIP_VOCAB_SIZE}); the vocabulary did not load correctly.")
    sot = tok.convert_tokens_to_ids("<|startoftext|>")
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    # open_clip pads with 0 (the '!' token); the causal text tower never looks past the EOT.
    return FixedLengthTokenizer(tok, context_length, sot, eot, pad_token_id=0, clean=_clip_clean)


def load_wordpiece_tokenizer(vocab_txt: str, context_length: int,
                             lowercase: bool = True) -> FixedLengthTokenizer:
    """BERT WordPiece tokenizer from a `vocab.txt` (one token a line, [PAD] [UNK] [CLS] [SEP]
    present). Rows are [CLS] ... [SEP] [PAD]...; `.eot_token_id` is the [SEP] id, `.pad_token_id`
    the [PAD] id; `.encode` also returns the attention mask."""
    from transformers import BertTokenizerFast  # noqa: PLC0415

    if not os.path.exists(vocab_txt):
        raise ValueError(f"WordPiece vocabulary {vocab_txt} does not exist.")
    with open(vocab_txt, encoding="utf-8") as f:
        tokens = [ln.rstrip("\n") for ln in f]
    vocab = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in vocab]
    if missing:
        raise ValueError(f"WordPiece vocabulary {vocab_txt} lacks the special tokens {missing}; "
                         "add one per line.")
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=lowercase)
    if len(tok) < len(vocab):
        raise ValueError(f"WordPiece tokenizer from {vocab_txt} has {len(tok)} tokens, "
                         f"expected {len(vocab)}; the vocabulary did not load.")
    return FixedLengthTokenizer(tok, context_length, vocab["[CLS]"], vocab["[SEP]"],
                                vocab["[PAD]"])
