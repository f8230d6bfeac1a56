"""DetCLIPv2 unified examples: detection / grounding / image-text concepts and box targets,
definition enrichment from the synthetic set, concept encoding, and the data-type schedule."""

import json

import numpy as np
import pytest

from ovd_jax.data import synthetic, unified
from ovd_jax.text import tokenizers

CLASSES = [f"class {i}" for i in range(12)]


def test_detection_concepts_targets_and_negatives(seed):
    rng = np.random.default_rng(seed)
    labels = np.array([3, 7, 3, 1, -1, -1])
    mask = labels >= 0
    texts, targets, ok = unified.detection_concepts(labels, mask, CLASSES, rng, max_concepts=8,
                                                    num_negatives=4)
    assert len(texts) == 3 + 4 and len(set(texts)) == len(texts)
    positives = {CLASSES[i] for i in (1, 3, 7)}
    assert positives <= set(texts)
    np.testing.assert_array_equal(ok, mask)
    for g in range(len(labels)):
        hit = np.flatnonzero(targets[g])
        if mask[g]:  # exactly one positive concept: the box's own class
            assert len(hit) == 1 and texts[hit[0]] == CLASSES[labels[g]], (seed, g)
        else:
            assert len(hit) == 0
    assert targets.shape == (6, 8) and not targets[:, len(texts):].any()


def test_detection_concepts_drop_boxes_of_classes_that_do_not_fit(seed):
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1, 2, 3, 4])
    texts, targets, ok = unified.detection_concepts(labels, labels >= 0, CLASSES, rng,
                                                    max_concepts=3, num_negatives=5)
    assert len(texts) == 3 and ok.sum() == 3
    assert {CLASSES[i] for i in labels[ok]} == set(texts)
    assert np.all(targets[~ok] == 0) and np.all(targets[ok].sum(1) == 1)


def test_grounding_concepts_phrases_and_negatives(seed):
    rng = np.random.default_rng(seed)
    caption = "a Red circle and a blue star near a red circle"
    spans = [[[2, 12]], [[19, 28]], [[36, 46]], None]
    pool = ["blue star", "green square", "purple triangle", "red circle", "yellow star"]
    texts, targets, ok = unified.grounding_concepts(caption, spans, np.array([1, 1, 1, 0], bool),
                                                    rng, pool, max_concepts=5, num_negatives=3)
    # Two distinct phrases (the red circle is named twice) + 3 negatives never in the caption.
    assert sorted(texts[:0] + [t for t in texts if t in ("red circle", "blue star")]) == \
        ["blue star", "red circle"]
    negatives = [t for t in texts if t not in ("red circle", "blue star")]
    assert len(negatives) == 3 and not any(n in caption.lower() for n in negatives)
    np.testing.assert_array_equal(ok, [True, True, True, False])
    assert texts[int(np.argmax(targets[0]))] == "red circle"
    assert texts[int(np.argmax(targets[1]))] == "blue star"
    assert texts[int(np.argmax(targets[2]))] == "red circle"


def test_image_text_concepts_are_noun_phrases():
    caption = "a red circle, an orange cross and a red circle on a dark grey background"
    assert unified.image_text_concepts(caption, max_concepts=8) == [
        "red circle", "orange cross", "dark grey background"]
    assert unified.image_text_concepts(caption, max_concepts=2) == ["red circle", "orange cross"]
    with_caption = unified.image_text_concepts(caption, max_concepts=8, include_caption=True)
    assert with_caption[0] == caption and len(with_caption) == 4
    assert unified.image_text_concepts("", max_concepts=8) == []


def test_synthetic_definitions_enrich_concepts_and_encode(tmp_path):
    paths = synthetic.generate(str(tmp_path / "syn"), num_train=2, num_val=1, image_size=32,
                               num_imagetext=1, num_val_caption_only=1)
    with open(paths.train_instances) as f:
        cats = json.load(f)["categories"]
    names = [c["name"] for c in cats]
    texts = unified.concept_texts(names, [c["def"] for c in cats], True)
    assert texts[0] == f"{names[0]}, {cats[0]['def']}"
    assert unified.concept_texts(names, None, True) == names
    tok = tokenizers.load_wordpiece_tokenizer(paths.vocab_file, 16)
    enc = unified.encode_concepts(tok, texts[:3], 5)
    assert enc["concept_ids"].shape == (5, 16) and enc["concept_mask"].shape == (5, 16)
    np.testing.assert_array_equal(enc["concept_valid"], [1, 1, 1, 0, 0])
    assert not enc["concept_mask"][3:].any() and enc["concept_mask"][:3, 0].all()
    ids, _ = tok.encode(texts[:1])
    np.testing.assert_array_equal(enc["concept_ids"][0], ids[0])
    with pytest.raises(ValueError, match="max_concepts"):
        unified.encode_concepts(tok, texts[:6], 5)


class _Counter:
    """A tiny resumable loader: batches {"x": [i]} for i = 0, 1, 2, ..."""

    def __init__(self, start):
        self.start = start

    def __iter__(self):
        outer = self

        class It:
            i = outer.start

            def __next__(self):
                self.i += 1
                return {"x": np.array([self.i])}

            def get_state(self):
                return {"i": self.i}

            def set_state(self, s):
                self.i = s["i"]

        return It()


def test_mixed_loader_follows_schedule_and_resumes():
    loader = unified.MixedLoader({"a": _Counter(0), "b": _Counter(100)}, ("a", "b", "b"))
    it = iter(loader)
    got = [next(it) for _ in range(4)]
    assert [g[unified.DATA_TYPE_KEY] for g in got] == ["a", "b", "b", "a"]
    assert [int(g["x"][0]) for g in got] == [1, 101, 102, 2]
    state = json.loads(json.dumps(it.get_state()))  # checkpointed as JSON
    rest = [next(it) for _ in range(3)]
    again = iter(loader)
    again.set_state(state)
    assert [(g[unified.DATA_TYPE_KEY], int(g["x"][0])) for g in (next(again) for _ in range(3))] \
        == [(g[unified.DATA_TYPE_KEY], int(g["x"][0])) for g in rest]
    with pytest.raises(ValueError, match="no loader"):
        unified.MixedLoader({"a": _Counter(0)}, ("a", "c"))
