"""COCO/LVIS readers and the vocabulary: contents vs pycocotools / lvis-api, and every
validation error on a tiny broken annotation file."""

import copy
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from ovd_jax.data import (
    Vocabulary,
    load_coco_detection,
    load_lvis_detection,
    synthetic,
)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthetic.generate(str(tmp_path_factory.mktemp("synth") / "ds"), seed=3,
                              num_train=12, num_val=12)


def _tiny(tmp_path, rng, n_images=3):
    """A small valid COCO file with random rectangular images (and a crowd box)."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    images, anns = [], []
    cats = [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 90, "name": "zebra"}]
    for i in range(n_images):
        h, w = int(rng.integers(30, 80)), int(rng.integers(30, 80))
        fn = f"im{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img_dir / fn)
        images.append({"id": 10 + 7 * i, "file_name": fn, "height": h, "width": w})
        for _ in range(int(rng.integers(0, 4))):
            x, y = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            bw, bh = rng.uniform(1, w - x), rng.uniform(1, h - y)
            anns.append({"id": len(anns) + 1, "image_id": 10 + 7 * i,
                         "category_id": int(rng.choice([5, 2, 90])), "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": int(rng.random() < 0.2)})
    return {"images": images, "annotations": anns, "categories": cats}, str(img_dir)


def _write(tmp_path, data, name="instances.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_coco_reader_matches_pycocotools(tmp_path, rng, seed):
    data, img_dir = _tiny(tmp_path, rng, n_images=5)
    path = _write(tmp_path, data)
    ds = load_coco_detection(path, img_dir)
    ref = COCO(path)
    assert ds.cat_ids == sorted(ref.getCatIds()) == [2, 5, 90]
    assert ds.class_names == ["dog", "cat", "zebra"]
    assert ds.cat_id_to_index == {2: 0, 5: 1, 90: 2}
    assert [r["image_id"] for r in ds.records] == [im["id"] for im in data["images"]]
    for rec in ds.records:
        anns = ref.loadAnns(ref.getAnnIds(imgIds=rec["image_id"]))
        img = ref.loadImgs(rec["image_id"])[0]
        assert rec["path"] == os.path.join(img_dir, img["file_name"])
        assert (rec["height"], rec["width"]) == (img["height"], img["width"])
        want = np.asarray([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                            a["bbox"][1] + a["bbox"][3]] for a in anns], np.float32).reshape(-1, 4)
        np.testing.assert_allclose(rec["boxes"], want, rtol=0, atol=1e-4, err_msg=f"seed={seed}")
        assert rec["boxes"].dtype == np.float32 and rec["category_ids"].dtype == np.int64
        assert rec["category_ids"].tolist() == [a["category_id"] for a in anns]
        assert rec["iscrowd"].tolist() == [bool(a["iscrowd"]) for a in anns]
    assert ds.gt is not None and len(ds) == 5


def test_synthetic_through_coco_reader(synth):
    ds = load_coco_detection(synth.val_instances, synth.val_images)
    # 12 detection images + ceil(0.4 * 12) caption-only ones; 20 + 15 caption-only classes.
    assert len(ds.records) == 12 + 5 and len(ds.class_names) == 35
    assert ds.class_names == synthetic.category_names() + synthetic.caption_only_names()
    assert all(r["boxes"].shape[0] >= 1 for r in ds.records)


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("no_file", r"instances file .*missing\.json.* does not exist"),
        ("missing_image", r"image file .*im1\.jpg.* does not exist"),
        ("outside", r"annotation id 1 box .* outside its image 'im0\.jpg' of size width="),
        ("negative_x", r"annotation id 1 box .* outside"),
        ("zero_width", r"annotation id 1 .*non-positive width/height"),
        ("unknown_category", r"annotation id 1 .*category id 77, which is not in 'categories'"),
        ("unknown_image", r"annotation id 1 refers to image id 999"),
        ("no_categories", r"empty 'categories'.*config\.data\.class_names"),
        ("bad_image_size", r"image id 10 .*height=0"),
        ("duplicate_image", r"image id 10 appears twice"),
        ("not_json", r"not valid JSON"),
    ],
)
def test_coco_reader_validation(tmp_path, rng, breakage, expected):
    data, img_dir = _tiny(tmp_path, rng, n_images=2)
    im0 = data["images"][0]
    good_ann = {"id": 1, "image_id": im0["id"], "category_id": 5, "bbox": [1.0, 1.0, 5.0, 5.0],
                "area": 25.0, "iscrowd": 0}
    data["annotations"] = [good_ann] + [dict(a, id=a["id"] + 100) for a in data["annotations"]]
    bad = copy.deepcopy(data)
    path = None
    if breakage == "no_file":
        path = str(tmp_path / "missing.json")
    elif breakage == "missing_image":
        os.remove(os.path.join(img_dir, "im1.jpg"))
    elif breakage == "outside":
        bad["annotations"][0]["bbox"] = [im0["width"] - 3.0, 1.0, 5.0, 5.0]
    elif breakage == "negative_x":
        bad["annotations"][0]["bbox"] = [-2.0, 1.0, 5.0, 5.0]
    elif breakage == "zero_width":
        bad["annotations"][0]["bbox"] = [1.0, 1.0, 0.0, 5.0]
    elif breakage == "unknown_category":
        bad["annotations"][0]["category_id"] = 77
    elif breakage == "unknown_image":
        bad["annotations"][0]["image_id"] = 999
    elif breakage == "no_categories":
        bad["categories"] = []
    elif breakage == "bad_image_size":
        bad["images"][0]["height"] = 0
    elif breakage == "duplicate_image":
        bad["images"][1]["id"] = bad["images"][0]["id"]
    if path is None:
        path = _write(tmp_path, bad)
    if breakage == "not_json":
        (tmp_path / "instances.json").write_text("{not json")
    with pytest.raises(ValueError, match=expected):
        load_coco_detection(path, img_dir)
    # The unbroken file loads (so each case fails for its own reason only).
    if breakage not in ("missing_image",):
        load_coco_detection(_write(tmp_path, data, "good.json"), img_dir)


def test_box_overhang_within_one_pixel_is_clipped(tmp_path, rng):
    data, img_dir = _tiny(tmp_path, rng, n_images=1)
    im = data["images"][0]
    data["annotations"] = [{"id": 1, "image_id": im["id"], "category_id": 2,
                            "bbox": [2.0, 3.0, im["width"] - 1.5, im["height"] - 2.5],
                            "area": 1.0, "iscrowd": 0}]
    rec = load_coco_detection(_write(tmp_path, data), img_dir).records[0]
    np.testing.assert_allclose(rec["boxes"][0], [2, 3, im["width"], im["height"]])


def test_lvis_reader(tmp_path, rng, synth):
    data, img_dir = _tiny(tmp_path, rng, n_images=3)
    for im in data["images"]:
        im["coco_url"] = f"http://images.cocodataset.org/val2017/{im.pop('file_name')}"
        im["neg_category_ids"] = [90]
        im["not_exhaustive_category_ids"] = [2]
    for c in data["categories"]:
        c.update(frequency="r", synonyms=[c["name"]], def_="x", image_count=1, instance_count=1)
    path = _write(tmp_path, data)
    ds = load_lvis_detection(path, img_dir)
    assert [os.path.basename(r["path"]) for r in ds.records] == ["im0.jpg", "im1.jpg", "im2.jpg"]
    assert all(r["neg_category_ids"].tolist() == [90] for r in ds.records)
    assert all(r["not_exhaustive_category_ids"].tolist() == [2] for r in ds.records)
    assert ds.categories[0]["frequency"] == "r"
    del data["images"][0]["coco_url"]
    with pytest.raises(ValueError, match="neither 'file_name' nor 'coco_url'"):
        load_lvis_detection(_write(tmp_path, data, "bad.json"), img_dir)
    # Our synthetic val file is also a valid LVIS file for the official lvis-api.
    if not hasattr(np, "float"):
        np.float = float  # lvis 0.5.3 uses the removed alias
    from lvis import LVIS

    lv = LVIS(synth.val_instances)
    ours = load_lvis_detection(synth.val_instances, synth.val_images)
    assert sorted(lv.get_img_ids()) == sorted(r["image_id"] for r in ours.records)
    for r in ours.records:
        anns = lv.load_anns(lv.get_ann_ids(img_ids=[r["image_id"]]))
        assert sorted(a["category_id"] for a in anns) == sorted(r["category_ids"].tolist())
        present = set(r["category_ids"].tolist())
        assert set(r["neg_category_ids"].tolist()) == set(ours.cat_ids) - present


def test_vocabulary(tmp_path, synth):
    ds = load_coco_detection(synth.val_instances, synth.val_images)
    v = Vocabulary.from_categories(ds.categories, split_file=synth.split_file)
    split = json.loads(open(synth.split_file).read())
    assert v.novel_names == [n for n in ds.class_names if n in split["novel"]]
    assert set(v.base_names) == set(split["base"]) and len(v) == 35
    assert v.caption_only_names == split["caption_only"]
    assert list(v.cat_ids) == ds.cat_ids
    assert [ds.cat_id_to_index[ds.cat_ids[i]] for i in v.novel_indices] == list(v.novel_indices)
    # Without a split file the categories' "split" field gives the same partition.
    assert Vocabulary.from_categories(ds.categories) == v
    v2 = Vocabulary.from_categories(ds.categories, class_names=[f"c{i}" for i in range(35)])
    assert v2.class_names[3] == "c3" and v2.novel_indices == v.novel_indices
    rare = [{k: c[k] for k in ("id", "name", "frequency")} for c in ds.categories]
    assert Vocabulary.from_categories(rare, rare_as_novel=True).novel_indices == tuple(
        sorted(v.novel_indices + v.caption_only_indices))  # both have LVIS frequency "r"
    assert Vocabulary.from_categories(rare).novel_indices == ()
    with pytest.raises(ValueError, match="config.data.class_names"):
        Vocabulary.from_names([])
    with pytest.raises(ValueError, match="config.data.class_names"):
        Vocabulary.from_categories([])
    with pytest.raises(ValueError, match="config.data.class_names has 2 names"):
        Vocabulary.from_categories(ds.categories, class_names=["a", "b"])
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary.from_names(["a", "a"])
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"base": split["base"] + ["pink hexagon"], "novel": split["novel"]}))
    with pytest.raises(ValueError, match="pink hexagon"):
        Vocabulary.from_categories(ds.categories, split_file=str(bad))
    bad.write_text(json.dumps({"base": split["base"][1:], "novel": split["novel"]}))
    with pytest.raises(ValueError, match="exactly once"):
        Vocabulary.from_categories(ds.categories, split_file=str(bad))
    assert Vocabulary.from_names(["x", "y", "z"], novel=["y"]).base_indices == (0, 2)
