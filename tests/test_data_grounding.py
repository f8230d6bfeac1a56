"""Grounding readers (MDETR flattened JSON, ODVG jsonl) on small files and on the synthetic set."""

import json

import numpy as np
import pytest
from PIL import Image

from ovd_jax.data import captions, synthetic
from ovd_jax.data.grounding import aligned_tokens_positive, load_grounding, load_odvg
from ovd_jax.text import grounding as gr
from ovd_jax.text.tokenizers import load_wordpiece_tokenizer


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthetic.generate(str(tmp_path_factory.mktemp("synth") / "ds"), seed=5,
                              num_train=8, num_val=4)


def _write_images(folder, sizes):
    folder.mkdir(exist_ok=True)
    for name, (w, h) in sizes.items():
        Image.new("RGB", (w, h)).save(folder / name)


def _mdetr(rng):
    """A two-image-caption MDETR-style file (Flickr30k Entities layout)."""
    cap0 = "A man with a red hat throws a ball to a dog ."
    cap1 = "Two dogs play in the snow ."
    boxes = rng.uniform(1, 30, (4, 4)).round(1).tolist()
    anns = [
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": boxes[0], "iscrowd": 0,
         "tokens_positive": [[0, 5]]},
        {"id": 12, "image_id": 1, "category_id": 1, "bbox": boxes[1], "iscrowd": 0,
         "tokens_positive": [[11, 20]]},
        {"id": 13, "image_id": 1, "category_id": 1, "bbox": boxes[2], "iscrowd": 0,
         "tokens_positive": [[38, 43], [0, 5]]},
        {"id": 14, "image_id": 2, "category_id": 1, "bbox": boxes[3], "iscrowd": 0,
         "tokens_positive": [[0, 8]]},
    ]
    images = [
        {"id": 1, "file_name": "a.jpg", "height": 64, "width": 80, "caption": cap0,
         "dataset_name": "flickr", "tokens_negative": [[0, 46]], "sentence_id": 0},
        {"id": 2, "file_name": "a.jpg", "height": 64, "width": 80, "caption": cap1,
         "dataset_name": "flickr", "tokens_negative": [[0, 27]], "sentence_id": 1},
    ]
    return {"images": images, "annotations": anns,
            "categories": [{"supercategory": "object", "id": 1, "name": "object"}]}


def test_mdetr_reader(tmp_path, rng, seed):
    data = _mdetr(rng)
    _write_images(tmp_path / "img", {"a.jpg": (80, 64)})
    path = tmp_path / "flickr.json"
    path.write_text(json.dumps(data))
    ds = load_grounding(str(path), str(tmp_path / "img"))
    assert captions.load_grounding is load_grounding  # the old import path still works
    assert [r["image_id"] for r in ds.records] == [1, 2] and ds.class_names == ["object"]
    r0 = ds.records[0]
    assert r0["caption"] == data["images"][0]["caption"]
    assert r0["tokens_positive"] == [[[0, 5]], [[11, 20]], [[38, 43], [0, 5]]]
    x, y, w, h = data["annotations"][2]["bbox"]
    np.testing.assert_allclose(r0["boxes"][2], [x, y, x + w, y + h], rtol=1e-6,
                               err_msg=f"seed={seed}")
    assert [r0["caption"][s:e] for s, e in r0["tokens_positive"][1]] == ["a red hat"]
    bad = _mdetr(rng)
    bad["annotations"][3]["tokens_positive"] = [[20, 99]]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"annotation id 14 has tokens_positive=\[\[20, 99\]\]"):
        load_grounding(str(path), str(tmp_path / "img"))
    bad = _mdetr(rng)
    del bad["images"][1]["caption"]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="image id 2 has no 'caption'"):
        load_grounding(str(path), str(tmp_path / "img"))


def _odvg_lines(rng):
    od = [
        {"filename": "a.jpg", "height": 64, "width": 80,
         "detection": {"instances": [
             {"bbox": [2.0, 3.0, 40.0, 50.0], "label": 0, "category": "person"},
             {"bbox": [10.5, 5.0, 70.0, 60.0], "label": 2, "category": "teddy bear"}]}},
        {"filename": "a.jpg", "height": 64, "width": 80, "detection": {"instances": []}},
    ]
    caption = "a dog chases two cats near a red car"
    vg = [
        {"filename": "a.jpg", "height": 64, "width": 80, "grounding": {
            "caption": caption,
            "regions": [
                {"bbox": [1, 1, 20, 20], "phrase": "a dog", "tokens_positive": [[0, 5]]},
                {"bbox": [[30, 2, 50, 30], [52, 2, 79, 30]], "phrase": "two cats"},
                {"bbox": [5, 30, 60, 63], "phrase": "a red car"}]}},
    ]
    return od, vg


def _jsonl(path, lines):
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_odvg_reader_od_and_vg(tmp_path, rng, seed):
    od, vg = _odvg_lines(rng)
    _write_images(tmp_path / "img", {"a.jpg": (80, 64)})
    lmap = {"0": "person", "1": "dog", "2": "teddy bear"}
    (tmp_path / "map.json").write_text(json.dumps(lmap))
    ds = load_odvg(_jsonl(tmp_path / "od.jsonl", od), str(tmp_path / "img"),
                   label_map=str(tmp_path / "map.json"))
    assert ds.class_names == ["person", "dog", "teddy bear"] and ds.cat_ids == [0, 1, 2]
    r0, r1 = ds.records
    np.testing.assert_allclose(r0["boxes"], [[2, 3, 40, 50], [10.5, 5, 70, 60]])
    assert r0["category_ids"].tolist() == [0, 2] and len(r1["boxes"]) == 0
    assert r0["caption"] is None and r0["tokens_positive"] is None

    ds = load_odvg(_jsonl(tmp_path / "vg.jsonl", vg), str(tmp_path / "img"))
    (rec,) = ds.records
    cap = vg[0]["grounding"]["caption"]
    assert rec["caption"] == cap and ds.class_names == ["object"]
    assert len(rec["boxes"]) == 4  # the two-box region gives two boxes
    np.testing.assert_allclose(rec["boxes"][2], [52, 2, 79, 30])
    assert [[cap[s:e] for s, e in sp] for sp in rec["tokens_positive"]] == [
        ["a dog"], ["two cats"], ["two cats"], ["a red car"]]
    assert rec["phrases"] == ["a dog", "two cats", "two cats", "a red car"]

    # Bad inputs: label missing from the map, kind mismatch, a phrase not in its caption.
    od[0]["detection"]["instances"][1]["label"] = 7
    with pytest.raises(ValueError, match="line 1 instance 1 has label 7"):
        load_odvg(_jsonl(tmp_path / "od.jsonl", od), str(tmp_path / "img"), label_map=lmap)
    with pytest.raises(ValueError, match="pass label_map= if it is an `od`"):
        load_odvg(_jsonl(tmp_path / "od.jsonl", od), str(tmp_path / "img"))
    vg[0]["grounding"]["regions"][2]["phrase"] = "a blue car"
    with pytest.raises(ValueError, match="phrase 'a blue car' does not occur"):
        load_odvg(_jsonl(tmp_path / "vg.jsonl", vg), str(tmp_path / "img"))
    (tmp_path / "broken.jsonl").write_text('{"filename": "a.jpg"\n')
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        load_odvg(str(tmp_path / "broken.jsonl"), str(tmp_path / "img"))


def test_synthetic_grounding_set_to_targets(synth, seed):
    ds = load_grounding(synth.train_grounding, synth.train_images)
    names = {c["id"]: c["name"] for c in ds.categories}
    tok = load_wordpiece_tokenizer(synth.vocab_file, 48)
    assert len(ds.records) > 0
    for rec in ds.records:
        per_box = aligned_tokens_positive(rec, max_boxes=8)
        out = gr.grounding_targets(rec["caption"], per_box, tok, 48, 8)
        n = len(rec["boxes"])
        assert out["box_valid"].tolist() == [True] * n + [False] * (8 - n), seed
        for m, cid in enumerate(rec["category_ids"].tolist()):
            ids = out["token_ids"][out["box_positive_map"][m] > 0]
            assert tok.hf.decode(ids.tolist()) == names[cid]
    rec = dict(ds.records[0])
    rec["iscrowd"] = np.ones_like(rec["iscrowd"])
    assert aligned_tokens_positive(rec, 3) == [None] * 3  # crowd boxes are not targets
    with pytest.raises(ValueError, match="max_boxes is 0"):
        aligned_tokens_positive(ds.records[0], 0)
