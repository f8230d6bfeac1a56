"""RegionCLIP's data side: detectron2 shortest-edge resizing on the static canvas, the built-in
COCO 48/17 split and LVIS rare-class removal through `build_experiment`, repeat-factor
sampling, LVIS image paths, and the 81 prompt templates."""

import json
import logging
import os

import numpy as np
import pytest
from helpers import smoke_config
from PIL import Image

from ovd_jax.data import lvis, synthetic
from ovd_jax.data.coco import load_coco_detection
from ovd_jax.data.pipeline import make_detection_loader, resize_options
from ovd_jax.data.transforms import resize_shortest_edge
from ovd_jax.data.vocabulary import COCO_OVD_BASE, COCO_OVD_NOVEL
from ovd_jax.text.prompts import CLIP_IMAGENET_TEMPLATES, concept_prompts, prompt_name
from ovd_jax.training.experiment import build_experiment

# COCO 2017's 80 category names in id order (the 15 outside the OVD split included).
COCO80 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


def d2_output_shape(h, w, short, max_size):
    """detectron2 ResizeShortestEdge.get_output_shape, as written there."""
    scale = short * 1.0 / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def test_shortest_edge_resize_matches_detectron2(seed, rng):
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(40, 1600, 2))
        short = int(rng.choice((640, 672, 704, 736, 768, 800)))
        out, scale = resize_shortest_edge(np.zeros((h, w, 3), np.uint8), short, 1333)
        assert out.shape[:2] == d2_output_shape(h, w, short, 1333), (h, w, short, seed)
        assert abs(h * scale - out.shape[0]) <= 0.5 and abs(w * scale - out.shape[1]) <= 0.5


def test_loader_multiscale_boxes_map_back_exactly(tmp_path, seed):
    paths = synthetic.generate(str(tmp_path / "d"), seed=seed % 1000, num_train=12, num_val=4,
                               image_size=64)
    ds = load_coco_detection(paths.train_instances, paths.train_images)
    kw = dict(batch_size=4, image_size=96, max_boxes=8, cat_id_to_index=ds.cat_id_to_index,
              seed=seed)
    by_id = {r["image_id"]: r for r in ds.records}
    train = next(iter(make_detection_loader(ds.records, train=True, min_size=(40, 56),
                                            max_size=90, **kw)))
    evaluation = next(iter(make_detection_loader(ds.records, train=False, min_size=72,
                                                 max_size=90, **kw)))
    for batch, sizes in ((train, (40, 56)), (evaluation, (72,))):
        assert batch["image"].shape == (4, 96, 96, 3)
        for i in range(4):
            rec = by_id[int(batch["image_id"][i])]
            h, w = rec["height"], rec["width"]
            s = float(batch["scale"][i])
            assert tuple(batch["image_hw"][i]) in {d2_output_shape(h, w, z, 90) for z in sizes}
            # What the evaluator does with predictions: divide by the scale (undo the flip).
            back = batch["boxes"][i][batch["box_mask"][i]] / s
            if batch["flipped"][i]:
                back[:, [0, 2]] = w - back[:, [2, 0]]
            np.testing.assert_allclose(back, rec["boxes"], rtol=1e-6, atol=1e-4)
    with pytest.raises(ValueError, match="max_size"):
        next(iter(make_detection_loader(ds.records, train=False, min_size=72, max_size=120,
                                        **kw)))


def test_resize_options_from_config():
    c = smoke_config("unused", "regionclip", "coco_ovd")
    assert resize_options(c.data, train=True) == {
        "min_size": (640, 672, 704, 736, 768, 800), "max_size": 1333}
    assert resize_options(c.data, train=False) == {"min_size": 800, "max_size": 1333}
    assert resize_options(smoke_config("unused", "demo", "").data, train=True) == {}


def _write_dataset(root, name, images, categories, lvis_fields=False):
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    anns, ims = [], []
    for iid, objs in images.items():
        fname = f"{name}_{iid}.png"
        Image.new("RGB", (48, 40), (iid * 20 % 255, 90, 30)).save(os.path.join(root, "img", fname))
        ims.append({"id": iid, "file_name": fname, "height": 40, "width": 48})
        for k, cid in enumerate(objs):
            anns.append({"id": iid * 100 + k, "image_id": iid, "category_id": cid,
                         "bbox": [2.0 + k, 3.0, 20.0, 18.0], "area": 360.0, "iscrowd": 0})
    cats = [dict(c) for c in categories]
    if lvis_fields:
        for c in cats:
            c.setdefault("synonyms", [c["name"]])
            c.setdefault("def", c["name"])
    path = os.path.join(root, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"images": ims, "annotations": anns, "categories": cats}, f)
    return path


def _real_data_config(tmp_path, arg, train_json, val_json):
    c = smoke_config(str(tmp_path / "unused"), "regionclip", arg)
    c.data.synthetic = False
    c.data.train_instances, c.data.val_instances = train_json, val_json
    c.data.train_images = c.data.val_images = str(tmp_path / "img")
    c.text.tokenizer, c.text.context_length = "clip", 16
    return c


def test_coco_ovd_split_is_built_in(tmp_path, caplog):
    names = list(COCO80)
    assert len(names) == 80 and len(set(names)) == 80
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    cid = {n: i + 1 for i, n in enumerate(names)}
    train = _write_dataset(str(tmp_path), "train", {
        1: [cid["person"], cid["dog"]],        # base + novel: the novel box is removed
        2: [cid["dog"]],                       # novel only: the image leaves training
        3: [cid["car"], cid["hot dog"]],       # base + a class outside the 65
    }, cats)
    val = _write_dataset(str(tmp_path), "val", {
        1: [cid["dog"], cid["person"]], 2: [cid["hot dog"]], 3: [cid["cat"]]}, cats)
    c = _real_data_config(tmp_path, "coco_ovd,smoke", train, val)
    c.data.split = "coco_48_17"  # smoke clears it; the real recipe has it
    assert smoke_config("unused", "regionclip", "coco_ovd").data.split == "coco_48_17"
    with caplog.at_level(logging.WARNING):
        exp = build_experiment(c)
    vocab = exp.eval_vocab
    assert len(vocab) == 65 and len(vocab.base_indices) == 48 and len(vocab.novel_indices) == 17
    assert set(vocab.base_names) == set(COCO_OVD_BASE) and set(vocab.novel_names) == set(
        COCO_OVD_NOVEL)
    assert set(exp.train_classes) == set(COCO_OVD_BASE)
    # Evaluation ground truth: the 65 classes only, images without them dropped.
    assert len(exp.val_data.gt["categories"]) == 65
    assert sorted(r["image_id"] for r in exp.val_data.records) == [1, 3]
    assert all(a["category_id"] != cid["hot dog"] for a in exp.val_data.gt["annotations"])
    # Training: novel / outside annotations removed, with a warning naming the novel class.
    kept = {r["image_id"]: sorted(r["category_ids"].tolist()) for r in exp.train_data.records}
    assert kept == {1: [cid["person"]], 2: [], 3: [cid["car"]]}
    assert any("novel classes" in r.message and "dog" in r.message for r in caplog.records)
    assert [r["image_id"] for r in exp.method.training_records(exp)] == [1, 3]
    c.data.drop_non_base_annotations = False
    with pytest.raises(ValueError, match="drop_non_base_annotations"):
        build_experiment(c)


def test_lvis_rare_annotations_removed_with_count(tmp_path, caplog):
    freq = {1: "f", 2: "c", 3: "r", 4: "r"}
    cats = [{"id": i, "name": f"thing_{i}", "frequency": f} for i, f in freq.items()]
    train = _write_dataset(str(tmp_path), "train", {1: [1, 3, 3], 2: [2, 4], 3: [1]}, cats, True)
    val = _write_dataset(str(tmp_path), "val", {1: [1, 3]}, cats, True)
    c = _real_data_config(tmp_path, "lvis,smoke", train, val)
    c.data.kind = "lvis"
    with caplog.at_level(logging.WARNING):
        exp = build_experiment(c)
    assert exp.train_classes == ["thing_1", "thing_2"]
    assert exp.eval_vocab.novel_names == ["thing_3", "thing_4"]
    assert any("removed 3 training annotations" in r.message for r in caplog.records)
    assert all(set(r["category_ids"].tolist()) <= {1, 2} for r in exp.train_data.records)


def test_repeat_factors_match_reference(seed, rng):
    n, k, t = 60, 12, 0.05
    records = [{"category_ids": rng.choice(k, rng.integers(0, 4), replace=True)} for _ in range(n)]
    got = lvis.repeat_factors(records, t)
    present = [set(r["category_ids"].tolist()) for r in records]
    freq = {c: sum(c in p for p in present) / n for c in range(k)}
    want = [max([max(1.0, np.sqrt(t / freq[c])) for c in p], default=1.0) for p in present]
    np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=f"OVD_TEST_SEED={seed}")
    counts = np.stack([np.bincount(lvis.repeat_factor_indices(got, s), minlength=n)
                       for s in range(400)])
    assert np.all(counts >= np.floor(got)) and np.all(counts <= np.ceil(got))
    np.testing.assert_allclose(counts.mean(0), got, atol=0.12)
    view = lvis.RepeatedRecords(records, np.asarray([3, 3, 0]))
    assert len(view) == 3 and view[1] is records[3] and view[2] is records[0]


def test_lvis_file_name_uses_the_split_folder(tmp_path):
    img = {"id": 1, "coco_url": "http://images.cocodataset.org/train2017/000000000009.jpg"}
    assert lvis.lvis_file_name(img, str(tmp_path)) == "000000000009.jpg"
    os.makedirs(tmp_path / "coco" / "train2017")
    assert lvis.lvis_file_name(img, str(tmp_path / "coco")) == os.path.join(
        "train2017", "000000000009.jpg")


def test_81_templates_and_prompt_names():
    open_clip_meta = pytest.importorskip("open_clip.zero_shot_metadata")
    ref = [t("{}") for t in open_clip_meta.OPENAI_IMAGENET_TEMPLATES]
    assert len(CLIP_IMAGENET_TEMPLATES) == 81 and len(set(CLIP_IMAGENET_TEMPLATES)) == 81
    assert set(CLIP_IMAGENET_TEMPLATES) == set(ref) | {"{}."}
    assert smoke_config("unused", "regionclip", "lvis").text.templates == CLIP_IMAGENET_TEMPLATES
    assert prompt_name("bow_(weapon)") == "bow weapon"
    assert prompt_name("salad_plate,") == "salad plate"
    assert concept_prompts(["teddy_bear"], ["a {}."]) == ["a teddy bear."]
