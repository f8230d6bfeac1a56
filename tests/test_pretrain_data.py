"""The image-text data path of region-text pretraining: concept pools (file, fallback parser,
a spaCy-style parser), the TFDS array_record caption source through the grain loader, and
config.data.kind="tfds" for detection through build_experiment and the training loop."""

import io
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import smoke_config
from PIL import Image

from ovd_jax.data import captions as cap
from ovd_jax.data import image_text
from ovd_jax.data.pipeline import make_caption_loader
from ovd_jax.data.tfds_source import load_tfds_captions

NAMES = ["red circle", "blue star", "green square"]


def test_concept_file(tmp_path):
    path = tmp_path / "concepts.txt"
    path.write_text("# LVIS-style pool\nred circle\n\n  blue star  \n")
    assert cap.load_concept_file(str(path)) == ["red circle", "blue star"]
    path.write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="more than once"):
        cap.load_concept_file(str(path))
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no concept"):
        cap.load_concept_file(str(path))
    with pytest.raises(ValueError, match="does not exist"):
        cap.load_concept_file(str(tmp_path / "missing.txt"))


def test_fallback_noun_phrases_and_pool(rng):
    assert cap.fallback_noun_phrases(
        "a red circle, a pink cross and a blue star on a dark grey background") == [
        "red circle", "pink cross", "blue star", "dark grey background"]
    assert cap.fallback_noun_phrases("A picture of two dogs next to the sofa.") == [
        "dogs", "sofa"]
    # A random corpus: counts and order follow the phrase frequencies.
    words = ["red", "blue", "green"]
    shapes = ["circle", "star"]
    counts = {}
    texts = []
    for _ in range(40):
        n = int(rng.integers(1, 4))
        phrases = [f"{words[rng.integers(3)]} {shapes[rng.integers(2)]}" for _ in range(n)]
        for p in phrases:
            counts[p] = counts.get(p, 0) + 1
        texts.append("a photo of " + " and ".join(f"a {p}" for p in phrases) + ".")
    pool = cap.concept_pool_from_captions(texts, min_count=2)
    want = sorted((p for p, c in counts.items() if c >= 2), key=lambda p: (-counts[p], p))
    assert pool == want
    assert cap.concept_pool_from_captions(texts, max_concepts=2) == want[:2]
    with pytest.raises(ValueError, match="min_concept_count"):
        cap.concept_pool_from_captions(texts, min_count=10_000)
    with pytest.raises(ValueError, match="concept_parser"):
        cap.load_parser("nltk")


class _Tok:
    def __init__(self, text, pos):
        self.text, self.pos_ = text, pos


class _Doc:
    def __init__(self, chunks):
        self.noun_chunks = chunks


class _FakeNlp:
    """The spaCy interface `noun_phrases` uses: nlp.pipe(texts) -> docs with noun_chunks."""

    def pipe(self, texts):
        for t in texts:
            words = t.rstrip(".").split(" and ")
            yield _Doc([[_Tok(w.split()[0], "DET"), *[_Tok(x, "ADJ") for x in w.split()[1:]]]
                        for w in words])


def test_parser_path_uses_noun_chunks_without_determiners():
    got = cap.noun_phrases(["the Red circle and a blue star."], parser=_FakeNlp())
    assert got == [["red circle", "blue star"]]


class OvdTinyCaptionsTest(tfds.core.GeneratorBasedBuilder):
    """A CC3M-like TFDS dataset: an encoded image and one caption per example."""

    VERSION = tfds.core.Version("1.0.0")
    EXAMPLES: list = []

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (pixels, text) in enumerate(self.EXAMPLES):
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            yield i, {"image": buf.getvalue(), "caption": text}


def test_tfds_caption_source_through_the_loader(tmp_path, rng, seed):
    examples = []
    for i in range(6):
        h, w = int(rng.integers(16, 33)), int(rng.integers(16, 33))
        examples.append((rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                         f"a {NAMES[i % 3]} on image {i}"))
    OvdTinyCaptionsTest.EXAMPLES = examples
    data_dir = str(tmp_path / "tfds")
    OvdTinyCaptionsTest(data_dir=data_dir, file_format="array_record").download_and_prepare()
    records = load_tfds_captions("ovd_tiny_captions_test", split="train", data_dir=data_dir)
    assert len(records) == 6
    by_id = {}
    for i, rec in enumerate(records):  # TFDS orders examples by key hash: match by caption
        pixels, text = examples[int(rec["captions"][0].split()[-1])]
        assert rec["image_id"] == i and rec["captions"] == [text]
        assert (rec["height"], rec["width"]) == pixels.shape[:2]
        by_id[i] = (pixels, text)
    with pytest.raises(ValueError, match="no feature 'text'"):
        load_tfds_captions("ovd_tiny_captions_test", split="train", data_dir=data_dir,
                           caption_key="text")

    def tokenize(text):
        last = int(text.split()[-1]) if text else -1  # "" is the padding entries' caption
        return {"caption_tokens": np.asarray([len(text), last], np.int32)}

    batches = list(make_caption_loader(records, batch_size=4, image_size=32, tokenize=tokenize,
                                       train=False, seed=seed))
    seen = []
    for b in batches:
        for k in np.flatnonzero(b["valid"]):
            pixels, text = by_id[int(b["image_id"][k])]
            h, w = pixels.shape[:2]
            assert b["caption_tokens"][k].tolist() == [len(text), int(text.split()[-1])]
            assert b["image_hw"][k].tolist() == [round(h * 32 / max(h, w)),
                                                 round(w * 32 / max(h, w))]
            seen.append(int(b["image_id"][k]))
    assert sorted(seen) == list(range(6))

    # Through the config: image_text.source = "tfds" and a concept pool from its captions.
    config = smoke_config(str(tmp_path / "syn"), arg="pretrain,smoke")
    it = config.image_text
    it.source, it.tfds_name, it.tfds_data_dir = "tfds", "ovd_tiny_captions_test", data_dir
    it.min_concept_count = 2
    recs = image_text.image_text_records(config)
    assert image_text.concept_pool(config, recs) == sorted(NAMES)


def test_synthetic_image_text_records_and_concepts(tmp_path):
    from ovd_jax.training.experiment import resolve_data_paths

    config = smoke_config(str(tmp_path / "syn"), arg="pretrain,smoke")
    resolve_data_paths(config)
    recs = image_text.image_text_records(config)
    assert len(recs) == 4 * config.data.synthetic_num_train
    assert all(len(r["captions"]) == 3 and os.path.isfile(r["path"]) for r in recs)
    pool = image_text.concept_pool(config, recs)
    assert "grey background" in pool and any("cross" in p for p in pool)
    path = tmp_path / "pool.txt"
    path.write_text("pink cross\norange star\n")
    config.image_text.concepts_file = str(path)
    assert image_text.concept_pool(config, recs) == ["pink cross", "orange star"]
    config.image_text.source = "coco_captions"
    with pytest.raises(ValueError, match="captions_json"):
        image_text.image_text_records(config)


class OvdTinyDetTest(tfds.core.GeneratorBasedBuilder):
    """TFDS coco/2017's feature layout with synthetic images (train + validation)."""

    VERSION = tfds.core.Version("1.0.0")
    EXAMPLES: dict = {}

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "image/id": np.int64,
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(),
                "is_crowd": np.bool_,
                "label": tfds.features.ClassLabel(names=NAMES),
            }),
        }))

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s) for s in self.EXAMPLES}

    def _generate_examples(self, split):
        for ex in self.EXAMPLES[split]:
            buf = io.BytesIO()
            Image.fromarray(ex["pixels"]).save(buf, format="PNG")
            yield ex["id"], {"image": buf.getvalue(), "image/id": ex["id"], "objects": {
                "bbox": [tfds.features.BBox(*b) for b in ex["bbox"]],
                "is_crowd": [False] * len(ex["labels"]), "label": ex["labels"]}}


def test_tfds_detection_trains_and_evaluates(tmp_path, rng):
    """config.data.kind = "tfds": build_experiment reads both splits lazily and the training
    loop trains, evaluates (COCO metrics from the TFDS ground truth) and draws images."""
    from ovd_jax.training.loop import train_and_evaluate

    def examples(n, first):
        out = []
        for i in range(n):
            y1, x1 = rng.uniform(0, 0.4, 2)
            out.append({"id": first + i, "pixels": rng.integers(0, 255, (64, 64, 3), np.uint8),
                        "bbox": [[y1, x1, y1 + 0.5, x1 + 0.5]], "labels": [i % 3]})
        return out

    OvdTinyDetTest.EXAMPLES = {"train": examples(8, 1), "validation": examples(4, 100)}
    data_dir = str(tmp_path / "tfds")
    OvdTinyDetTest(data_dir=data_dir, file_format="array_record").download_and_prepare()
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"base": NAMES[:2], "novel": NAMES[2:]}))
    config = smoke_config(str(tmp_path / "unused"))
    d = config.data
    d.synthetic, d.kind, d.tfds_name, d.tfds_data_dir = False, "tfds", "ovd_tiny_det_test", data_dir
    d.split_file = str(split)
    d.drop_non_base_annotations = True
    config.text.vocab_file = _vocab(tmp_path)
    config.train.steps = 2
    config.train.batch_size = 8
    config.eval.batch_size = 8
    work = str(tmp_path / "run")
    metrics = train_and_evaluate(config, work, progress=False)
    assert {"AP50", "base_AP50", "novel_AP50"} <= set(metrics)
    # Images drawn from the records' encoded bytes (TFDS records have no path).
    assert any(n.startswith("detections_") and n.endswith(".png") for n in os.listdir(work))


def _vocab(tmp_path) -> str:
    words = sorted({w for n in NAMES for w in n.split()} | {"a", "photo", "of"})
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, ".",
                               *chars, *[f"##{c}" for c in chars]]) + "\n")
    return str(path)
