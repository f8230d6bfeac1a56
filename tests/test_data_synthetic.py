"""The synthetic open-vocabulary set: determinism, the base/novel protocol, format validity."""

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from transformers import BertTokenizerFast

from ovd_jax.data import synthetic

SMALL = dict(num_train=16, num_val=16, image_size=96, max_objects=4)


def _tree_hash(root):
    digest = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                digest[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return digest


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # Module-scoped with a fixed seed (the per-test seed fixture cannot be module-scoped); the
    # determinism test below uses the fresh seed.
    return synthetic.generate(str(tmp_path_factory.mktemp("synth") / "ds"), seed=7,
                              num_train=40, num_val=40)


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_same_seed_gives_identical_files(tmp_path, seed):
    a = synthetic.generate(str(tmp_path / "a"), seed=seed, **SMALL)
    b = synthetic.generate(str(tmp_path / "b"), seed=seed, **SMALL)
    c = synthetic.generate(str(tmp_path / "c"), seed=seed + 1, **SMALL)
    ha, hb, hc = _tree_hash(a.root), _tree_hash(b.root), _tree_hash(c.root)
    # 16 train + 16 val + ceil(0.4 * 16) caption-only val + 4 * 16 image-text images, 10 files.
    assert len(ha) == 2 * 16 + 7 + 64 + 10, f"seed={seed}: unexpected file set {sorted(ha)}"
    assert ha == hb, f"seed={seed}: same seed produced different files"
    differing = [k for k in ha if ha[k] != hc.get(k)]
    assert any(k.endswith(".png") for k in differing), f"seed={seed}: seed does not matter"


def test_reuse_regenerate_and_refusal(tmp_path, seed):
    root = tmp_path / "ds"
    p = synthetic.generate(str(root), seed=seed, **SMALL)
    stamp = {k: os.stat(os.path.join(p.root, k)).st_mtime_ns for k in _tree_hash(p.root)}
    synthetic.generate(str(root), seed=seed, **SMALL)  # matching manifest: nothing rewritten
    assert stamp == {k: os.stat(os.path.join(p.root, k)).st_mtime_ns for k in stamp}
    # Different parameters: replaced atomically, no temp dirs left behind.
    p2 = synthetic.generate(str(root), seed=seed, **{**SMALL, "num_val": 5})
    assert len(os.listdir(p2.val_images)) == 5 + 2  # + ceil(0.4 * 5) caption-only images
    assert sorted(os.listdir(tmp_path)) == ["ds"], os.listdir(tmp_path)
    assert _load(os.path.join(p2.root, "manifest.json"))["params"]["num_val"] == 5
    # An incomplete dataset (an image deleted) is regenerated.
    os.remove(os.path.join(p2.val_images, sorted(os.listdir(p2.val_images))[0]))
    synthetic.generate(str(root), seed=seed, **{**SMALL, "num_val": 5})
    assert len(os.listdir(p2.val_images)) == 5 + 2
    # A foreign non-empty directory is never overwritten.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        synthetic.generate(str(foreign), seed=seed, **SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="num_train"):
        synthetic.generate(str(tmp_path / "x"), num_train=0)


def test_base_novel_protocol(dataset):
    split = _load(dataset.split_file)
    base, novel = split["base"], split["novel"]
    assert sorted(base + novel) == sorted(synthetic.category_names())
    assert split["caption_only"] == synthetic.caption_only_names()
    assert 4 <= len(novel) <= 5 and not set(base) & set(novel)
    base_words = [set(n.split()) for n in base]
    for name in novel:
        for word in name.split():
            holders = sum(word in bw for bw in base_words)
            assert holders >= 2, f"word {word!r} of novel {name!r} is in only {holders} base names"
    train, val = _load(dataset.train_instances), _load(dataset.val_instances)
    cats = {c["id"]: c for c in val["categories"] if c["split"] != "caption_only"}
    assert {c["id"] for c in train["categories"]} == set(cats)
    ids = sorted(cats)
    assert ids != list(range(ids[0], ids[0] + len(ids))), "category ids must have gaps"
    for c in cats.values():
        assert c["split"] == ("novel" if c["name"] in novel else "base")
        assert c["frequency"] == ("r" if c["split"] == "novel" else "f")
        assert c["def"] and c["synonyms"][0] == c["name"]
    train_names = {cats[a["category_id"]]["name"] for a in train["annotations"]}
    assert not train_names & set(novel), f"novel objects in train: {train_names & set(novel)}"
    assert train_names == set(base)
    val_names = [cats[a["category_id"]]["name"] for a in val["annotations"]
                 if a["category_id"] in cats]
    frac = np.mean([n in novel for n in val_names])
    assert frac >= 0.25, f"only {frac:.0%} novel instances in val"
    assert set(val_names) == set(base) | set(novel)
    # Counts in the category records are those of the file they are in.
    for data in (train, val):
        for c in data["categories"]:
            mine = [a for a in data["annotations"] if a["category_id"] == c["id"]]
            assert c["instance_count"] == len(mine)
            assert c["image_count"] == len({a["image_id"] for a in mine})


def test_pycocotools_reads_everything(dataset):
    for path in (dataset.train_instances, dataset.val_instances, dataset.train_grounding):
        coco = COCO(path)
        n_images = 40 + (16 if path == dataset.val_instances else 0)  # + caption-only val
        assert len(coco.getImgIds()) == n_images and len(coco.getAnnIds()) > 40
        for ann in coco.loadAnns(coco.getAnnIds()):
            img = coco.loadImgs(ann["image_id"])[0]
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
            assert ann["area"] == w * h and w >= 10 and h >= 10
    caps = COCO(dataset.val_captions)
    assert all(len(caps.getAnnIds(imgIds=i)) == 2 for i in caps.getImgIds())
    # Object sizes span COCO's small/medium/large-ish range at 128 px (areas 32^2 / 96^2).
    areas = [a["area"] for a in _load(dataset.val_instances)["annotations"]]
    assert min(areas) < 32**2 < max(areas), (min(areas), max(areas))


def test_grounding_spans_and_captions_name_the_objects(dataset):
    inst = COCO(dataset.train_instances)
    g = _load(dataset.train_grounding)
    names = {c["id"]: c["name"] for c in g["categories"]}
    caption_of = {im["id"]: im["caption"] for im in g["images"]}
    per_image = {}
    for a in g["annotations"]:
        (s, e), = a["tokens_positive"]
        assert caption_of[a["image_id"]][s:e] == names[a["category_id"]]
        per_image.setdefault(a["image_id"], []).append(a["category_id"])
    for iid, cids in per_image.items():
        det = [a["category_id"] for a in inst.loadAnns(inst.getAnnIds(imgIds=iid))]
        assert sorted(cids) == sorted(det), f"image {iid}: grounding != detection"
    for cap in _load(dataset.val_captions)["annotations"]:
        assert "background" in cap["caption"] or cap["caption"].startswith("a picture of")


def test_pixels_match_annotations(dataset):
    """The centre of every annotated box shows that category's colour (a property that breaks
    if boxes, categories or colours were mixed up)."""
    data = _load(dataset.val_instances)
    cats = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    ref = {c: np.asarray(v, np.float32) for c, v in synthetic._RGB.items()}
    right = total = 0
    for a in data["annotations"]:
        img = np.asarray(Image.open(os.path.join(dataset.val_images, files[a["image_id"]])))
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8
        x, y, w, h = a["bbox"]
        cx, cy = int(x + w / 2), int(y + h / 2)
        pix = np.median(img[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3), axis=0)
        nearest = min(ref, key=lambda c: np.abs(ref[c] - pix).sum())
        right += nearest == cats[a["category_id"]].split()[0]
        total += 1
    assert right / total >= 0.95, f"{right}/{total} box centres show their category's colour"


def test_vocab_covers_all_texts(dataset):
    tok = BertTokenizerFast(vocab=dataset.vocab_file)
    vocab = open(dataset.vocab_file).read().split("\n")
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(tok) == len([v for v in vocab if v]), "tokenizer did not read vocab.txt"
    texts = ["a photo of a red circle.", "there is a purple star in the image!"]
    for c in _load(dataset.val_instances)["categories"]:
        texts += [c["name"], c["def"], *c["synonyms"]]
    texts += [a["caption"] for a in _load(dataset.train_captions)["annotations"]]
    texts += ["an unseen word: zebra-crossing 42"]  # falls back to ##x pieces, still no [UNK]
    for t in texts:
        ids = tok(t)["input_ids"]
        assert tok.unk_token_id not in ids, f"[UNK] in {t!r}: {tok.convert_ids_to_tokens(ids)}"
    assert tok.tokenize("red circle") == ["red", "circle"]


def test_caption_only_concepts(dataset):
    """Caption-only words occur in no box label, no training image and no training/grounding
    text; only image-text captions teach them, and validation boxes them as caption_only."""
    split = _load(dataset.split_file)
    words = set(synthetic.CAPTION_ONLY_COLOURS + synthetic.CAPTION_ONLY_SHAPES)
    co = split["caption_only"]
    assert co and all(words & set(n.split()) for n in co)
    detection_words = {w for n in split["base"] + split["novel"] for w in n.split()}
    assert not words & detection_words
    train_texts = [json.dumps(_load(p)) for p in (dataset.train_instances, dataset.train_captions,
                                                  dataset.train_grounding)]
    for w in words:
        assert all(f" {w}" not in t and f'"{w}' not in t for t in train_texts), w
    # The image-text split: captions only (no boxes), and every caption-only word is in them.
    it = _load(dataset.imagetext_captions)
    assert len(it["images"]) == 4 * 40 and "categories" not in it
    assert all("bbox" not in a for a in it["annotations"])
    text = " ".join(a["caption"] for a in it["annotations"])
    for w in words:
        assert text.count(f" {w} ") >= 5, w
    # Validation: caption-only objects sit on their own images (ids from 200001), flagged.
    val = _load(dataset.val_instances)
    cats = {c["id"]: c for c in val["categories"]}
    co_ids = {c["id"] for c in cats.values() if c["split"] == "caption_only"}
    assert {cats[i]["name"] for i in co_ids} == set(co)
    assert all(cats[i]["frequency"] == "r" for i in co_ids)
    for a in val["annotations"]:
        assert (a["category_id"] in co_ids) == (a["image_id"] >= 200_001), a
    assert {a["category_id"] for a in val["annotations"] if a["category_id"] in co_ids} == co_ids
    assert len([im for im in val["images"] if im["id"] >= 200_001]) == 16  # ceil(0.4 * 40)
    # Every validation image is exhaustively annotated over all categories (LVIS negatives).
    for im in val["images"]:
        present = {a["category_id"] for a in val["annotations"] if a["image_id"] == im["id"]}
        assert set(im["neg_category_ids"]) == set(cats) - present


def test_caption_only_part_leaves_detection_files_unchanged(tmp_path, seed):
    """The detection part is the same bytes with or without the caption-only part."""
    a = synthetic.generate(str(tmp_path / "a"), seed=seed, **SMALL)
    b = synthetic.generate(str(tmp_path / "b"), seed=seed, **SMALL, num_imagetext=0,
                           num_val_caption_only=0)
    ha, hb = _tree_hash(a.root), _tree_hash(b.root)
    for k in hb:
        if k.startswith(("train", "val/")) or k.endswith(("_train.json", "captions_train.json")):
            assert ha[k] == hb[k], f"seed={seed}: {k} differs"
    # vocab.txt: the caption-only words come last, so the detection words keep their ids.
    va = open(a.vocab_file).read().split()
    assert va == open(b.vocab_file).read().split()
    assert va[-3:] == ["cross", "orange", "pink"] and va[-4] == "##9"
    # The first validation annotations and images are those of the detection-only set.
    ja, jb = _load(a.val_instances), _load(b.val_instances)
    assert ja["annotations"][: len(jb["annotations"])] == jb["annotations"]
    assert ja["categories"][:20] == jb["categories"][:20]
