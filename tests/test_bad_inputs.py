"""Every bad input gets one clear sentence naming the file, the record and the fix.

Data files are tiny COCO JSONs and PNGs written in tmp_path; most checks run at function level
(a ValueError from the project's readers); a few run train.py / eval.py in a subprocess to
check the exit code and that no traceback is printed. tests/test_errors.py covers a missing
image file, a box outside its image, an empty vocabulary, an unknown config key and a
checkpoint of another model; the table is in docs/bad_inputs.md.
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, smoke_config
from PIL import Image

from ovd_jax.data import synthetic, transforms
from ovd_jax.data.coco import load_coco_detection
from ovd_jax.data.pipeline import make_detection_loader
from ovd_jax.data.transforms import BadImageError, decode_image, detection_example
from ovd_jax.data.vocabulary import Vocabulary
from ovd_jax.evaluation.coco_eval import evaluate_coco
from ovd_jax.text.prompts import concept_prompts

H, W = 6, 8  # every test image


def _image(rng):
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _coco(tmp_path, rng, n=2):
    """A valid instances dict with n images of H x W (written as PNGs) and one box each."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(1, n + 1):
        Image.fromarray(_image(rng)).save(img_dir / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": H, "width": W})
        anns.append({"id": 10 + i, "image_id": i, "category_id": 1 + i % 2,
                     "bbox": [1.0, 1.0, 3.0, 2.0], "area": 6.0, "iscrowd": 0})
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    return {"images": images, "annotations": anns, "categories": cats}, str(img_dir)


def _load(tmp_path, data, img_dir, **kw):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return load_coco_detection(str(path), img_dir, **kw)


def _bad(tmp_path, rng, edit, match):
    """Edits a valid dataset with `edit(data)` and expects one ValueError naming the file."""
    data, img_dir = _coco(tmp_path, rng)
    _load(tmp_path, data, img_dir)  # the unedited set loads
    edit(data)
    with pytest.raises(ValueError, match=match) as info:
        _load(tmp_path, data, img_dir)
    message = str(info.value)
    assert "instances.json" in message and "\n" not in message
    return message


def _example(record, **kw):
    return detection_example(record, image_size=16, max_boxes=4, cat_id_to_index={1: 0, 2: 1},
                             flip=False, **kw)


# ----------------------------------------------------------------------------- images


def test_truncated_image(tmp_path, rng):
    data, img_dir = _coco(tmp_path, rng)
    path = os.path.join(img_dir, "1.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(BadImageError, match=r"1\.png.*corrupt.*on_bad_image"):
        decode_image(path)


def test_corrupt_image(tmp_path, rng):
    path = tmp_path / "noise.jpg"
    path.write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    with pytest.raises(BadImageError, match=r"noise\.jpg.*corrupt or not an image"):
        decode_image(str(path))


def test_missing_image_at_load_time(tmp_path, rng):
    """check_files=False defers the check; the loader then names the file."""
    data, img_dir = _coco(tmp_path, rng)
    os.remove(os.path.join(img_dir, "2.png"))
    ds = _load(tmp_path, data, img_dir, check_files=False)
    with pytest.raises(BadImageError, match=r"2\.png.*does not exist"):
        _example(ds.records[1])


def test_grayscale_rgba_and_palette_images_work(tmp_path, rng):
    rgb = _image(rng)
    gray = rgb[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_array_equal(decode_image(str(tmp_path / "g.png")),
                                  np.repeat(gray[..., None], 3, -1))
    rgba = np.concatenate([rgb, rng.integers(0, 256, (H, W, 1), dtype=np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_array_equal(decode_image(str(tmp_path / "a.png")), rgb)  # alpha dropped
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    assert decode_image(str(tmp_path / "p.png")).shape == (H, W, 3)


def test_16bit_image_works(tmp_path, rng):
    """16-bit greyscale is scaled by 255/65535 (PIL alone would clip it to an all-white image)."""
    deep = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    out = decode_image(str(tmp_path / "d.png"))
    expected = np.rint(deep.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, -1))


def test_exif_rotated_image_works(tmp_path, rng):
    """Orientation 6 ('rotate 90 clockwise to display') is applied; annotations refer to the
    displayed image, and a size given in the stored orientation is named as the cause."""
    stored = rng.integers(0, 256, (W, H, 3), dtype=np.uint8)  # stored 8 x 6, displayed 6 x 8
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.png"
    Image.fromarray(stored).save(path, exif=exif)
    np.testing.assert_array_equal(decode_image(str(path)), np.rot90(stored, k=-1))
    record = {"image_id": 1, "path": str(path), "height": H, "width": W,
              "boxes": np.array([[1, 1, 4, 3]], np.float32), "category_ids": np.array([1]),
              "iscrowd": np.array([False])}
    ex = _example(record)
    assert ex["orig_hw"].tolist() == [H, W] and ex["box_mask"].sum() == 1
    with pytest.raises(BadImageError, match="rot.png.*EXIF rotation.*displayed"):
        _example({**record, "height": W, "width": H})


def test_image_size_differs_from_annotation(tmp_path, rng):
    data, img_dir = _coco(tmp_path, rng)
    data["images"][0]["width"] = W + 5
    ds = _load(tmp_path, data, img_dir)
    with pytest.raises(BadImageError, match=r"1\.png.*decodes to 6x8.*annotation says 6x13"):
        _example(ds.records[0])


def test_on_bad_image_skip_logs_each_file_once(tmp_path, rng, caplog):
    data, img_dir = _coco(tmp_path, rng, n=4)
    with open(os.path.join(img_dir, "3.png"), "wb") as f:
        f.write(b"not a png")
    ds = _load(tmp_path, data, img_dir)
    kw = dict(batch_size=1, image_size=16, max_boxes=4, cat_id_to_index=ds.cat_id_to_index,
              seed=0, num_threads=1)
    with pytest.raises(BadImageError, match=r"3\.png"):
        list(make_detection_loader(ds.records, train=True, num_epochs=1, **kw))
    before_files, before_visits = len(transforms.SKIPPED_IMAGES), transforms.SKIPPED_IMAGES.visits
    with caplog.at_level(logging.WARNING, logger="ovd_jax.data.transforms"):
        batches = list(make_detection_loader(ds.records, train=True, num_epochs=2,
                                             on_bad_image="skip", **kw))
        evals = list(make_detection_loader(ds.records, train=False, on_bad_image="skip", **kw))
    seen = sorted(int(b["image_id"][0]) for b in batches)
    assert seen == [1, 1, 2, 2, 4, 4]  # two epochs without image 3
    assert [int(b["image_id"][0]) for b in evals] == [1, 2, -1, 4]  # padded, valid False
    assert len(transforms.SKIPPED_IMAGES) == before_files + 1
    assert transforms.SKIPPED_IMAGES.visits == before_visits + 3
    logged = [r for r in caplog.records if "3.png" in r.getMessage()]
    assert len(logged) == 1 and "skipping" in logged[0].getMessage()
    with pytest.raises(ValueError, match="on_bad_image='ignore'"):
        make_detection_loader(ds.records, train=True, on_bad_image="ignore", **kw)


# ----------------------------------------------------------------------------- annotations


def test_zero_area_box(tmp_path, rng):
    _bad(tmp_path, rng, lambda d: d["annotations"][0].update(bbox=[1, 1, 0, 2]),
         r"annotation id 11 \(image '1.png'\).*non-positive width/height")


def test_negative_box(tmp_path, rng):
    _bad(tmp_path, rng, lambda d: d["annotations"][1].update(bbox=[5, 1, -3, 2]),
         r"annotation id 12.*non-positive width/height")
    _bad(tmp_path, rng, lambda d: d["annotations"][1].update(bbox=[-2, 1, 3, 2]),
         r"annotation id 12.*outside its image")


def test_nan_box(tmp_path, rng):
    _bad(tmp_path, rng, lambda d: d["annotations"][0].update(bbox=[1, float("nan"), 3, 2]),
         r"annotation id 11.*NaN or infinite")


def test_box_not_four_numbers(tmp_path, rng):
    _bad(tmp_path, rng, lambda d: d["annotations"][0].update(bbox=[1, 1, 3]),
         r"annotation id 11 has bbox=\[1, 1, 3\]; expected 4 numbers")
    _bad(tmp_path, rng, lambda d: d["annotations"][0].update(bbox=["1", 1, 3, 2]),
         r"annotation id 11.*expected 4 numbers")


def test_annotation_names_unknown_image(tmp_path, rng):
    _bad(tmp_path, rng, lambda d: d["annotations"][0].update(image_id=99),
         r"annotation id 11 refers to image id 99, which is not in 'images'")


def test_annotation_names_unknown_category(tmp_path, rng):
    _bad(tmp_path, rng, lambda d: d["annotations"][0].update(category_id=7),
         r"annotation id 11 \(image id 1\) has category id 7, which is not in 'categories'")


def test_duplicate_ids(tmp_path, rng):
    _bad(tmp_path, rng, lambda d: d["images"][1].update(id=1), "image id 1 appears twice")
    _bad(tmp_path, rng, lambda d: d["annotations"][1].update(id=11),
         "annotation id 11 appears twice")
    _bad(tmp_path, rng, lambda d: d["categories"][1].update(id=1),
         r"duplicate category ids \[1\]")


def test_duplicate_or_empty_class_names(tmp_path, rng):
    _bad(tmp_path, rng, lambda d: d["categories"][1].update(name="cat"),
         r"several categories named \['cat'\]")
    _bad(tmp_path, rng, lambda d: d["categories"][1].update(name=" "),
         "category id 2 has name=' '; every category needs a non-empty string 'name'")
    with pytest.raises(ValueError, match=r"duplicate names \['cat'\]"):
        Vocabulary.from_names(["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="empty or non-string name"):
        Vocabulary.from_names(["cat", ""])


def test_image_without_size_or_file_name(tmp_path, rng):
    _bad(tmp_path, rng, lambda d: d["images"][0].update(height=0),
         r"image id 1 \('1.png'\) has height=0, width=8; both must be positive")
    _bad(tmp_path, rng, lambda d: d["images"][0].pop("file_name"),
         r"image id 1 has no usable file name.*add its 'file_name'")
    _bad(tmp_path, rng, lambda d: d["images"][0].pop("id"), r"images\[0\].*no integer 'id'")


def test_not_a_coco_file(tmp_path, rng):
    _bad(tmp_path, rng, lambda d: d.pop("annotations"), "has no 'annotations' list")
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken.json' is not valid JSON.*re-export"):
        load_coco_detection(str(path), str(tmp_path))
    with pytest.raises(ValueError, match=r"nowhere.json' does not exist"):
        load_coco_detection(str(tmp_path / "nowhere.json"), str(tmp_path))


def test_more_boxes_than_max_boxes(tmp_path, rng):
    data, img_dir = _coco(tmp_path, rng)
    data["annotations"] += [{"id": 20 + k, "image_id": 1, "category_id": 1,
                             "bbox": [0, 0, 2, 2]} for k in range(5)]
    ds = _load(tmp_path, data, img_dir)
    with pytest.raises(ValueError, match=r"1\.png' has 6 boxes but config.data.max_boxes is 4"):
        _example(ds.records[0])
    assert _example(ds.records[0], truncate=True)["box_mask"].all()


# ----------------------------------------------------------------------------- text


@pytest.fixture(scope="module")
def clip_tokenizer():
    from ovd_jax.text.tokenizers import load_clip_tokenizer

    return load_clip_tokenizer(context_length=16)


def test_unicode_prompts_work(clip_tokenizer):
    names = ["café", "消防车", "crème brûlée", "🐱 cat"]
    ids, mask = clip_tokenizer.encode(concept_prompts(names, ["a {}."]))
    for row, m, name in zip(ids, mask, names):
        body = row[m][1:-1]
        assert row[m][-1] == clip_tokenizer.eot_token_id
        text = clip_tokenizer.hf.decode(body.tolist()).replace(" ", "")
        assert text == f"a{name}.".replace(" ", "").lower()


def test_overlong_prompt_truncated_with_warning(clip_tokenizer):
    long_name = " ".join(["very"] * 40) + " long cat"
    with pytest.warns(UserWarning, match=r"1 of 1 text\(s\) are cut to their first 14 tokens"):
        ids, mask = clip_tokenizer.encode([long_name])
    assert mask.all() and ids[0, -1] == clip_tokenizer.eot_token_id


def test_template_without_slot():
    with pytest.raises(ValueError, match=r"template 'a photo\.' .* has no '\{\}' slot"):
        concept_prompts(["cat"], ["a {}.", "a photo."])


# ----------------------------------------------------------------------------- evaluation


def test_malformed_ground_truth(tmp_path, rng):
    data, _ = _coco(tmp_path, rng)
    dets = [{"image_id": 1, "category_id": 2, "bbox": [1, 1, 3, 2], "score": 0.9}]
    assert evaluate_coco(data, dets)["AP50"] > 0
    cases = [
        (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] = .* lacks \['bbox'\]"),
        (lambda d: d["annotations"][1].update(bbox=[1, 2]), r"annotations\[1\].*not 4 numbers"),
        (lambda d: d["annotations"][0].update(area="big"), r"'area' that is not a number"),
        (lambda d: d["images"][0].pop("id"), r"images\[0\] = .* has no integer 'id'"),
        (lambda d: d.update(categories={}), r"'categories' is a dict, not a list"),
        (lambda d: d["annotations"][0].update(bbox=[1, 1, float("nan"), 2]), "NaN"),
    ]
    for edit, match in cases:
        bad = json.loads(json.dumps(data))
        edit(bad)
        with pytest.raises(ValueError, match=match):
            evaluate_coco(bad, dets)


# ----------------------------------------------------------------------------- entry points


def _run(*args, timeout=180):
    env = {k: v for k, v in os.environ.items() if k != "OVD_TRACEBACK"}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _one_clear_error(proc, *needles):
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_unknown_config_variant_and_wrong_type(tmp_path):
    proc = _run("train.py", "--config=configs/demo.py:smoke,nosuch", f"--workdir={tmp_path}")
    assert proc.returncode == 2
    _one_clear_error(proc, "unknown config variant(s) ['nosuch']", "accepts")
    proc = _run("train.py", "--config=configs/demo.py:smoke", "--config.train.steps=ten",
                f"--workdir={tmp_path}")
    assert proc.returncode == 2
    _one_clear_error(proc, "--config.train.steps=ten", "type of the recipe's default")


def test_eval_metrics_only_bad_files(tmp_path, rng):
    data, _ = _coco(tmp_path, rng)
    del data["annotations"][0]["category_id"]  # a KeyError before
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(data))
    dets = tmp_path / "dets.json"
    good = '[{"image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 2], "score": 0.5}'
    dets.write_text(good + "]")
    out = tmp_path / "metrics.json"
    proc = _run("eval.py", f"--gt={gt}", f"--detections={dets}", f"--output={out}")
    _one_clear_error(proc, "ground truth annotations[0]", "lacks ['category_id']")
    data["annotations"][0]["category_id"] = 1
    gt.write_text(json.dumps(data))
    dets.write_text(good + ",")  # truncated
    proc = _run("eval.py", f"--gt={gt}", f"--detections={dets}", f"--output={out}")
    _one_clear_error(proc, "dets.json", "is not valid JSON", "re-export")
    assert not out.exists()  # nothing half-written


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data") / "syn")
    c = smoke_config(root)
    synthetic.generate(root, seed=c.data.synthetic_seed, num_train=c.data.synthetic_num_train,
                       num_val=c.data.synthetic_num_val, image_size=c.data.synthetic_image_size)
    return root


def test_train_py_bad_box_one_sentence_no_traceback(synthetic_root, tmp_path):
    """End to end: a box outside its image stops train.py with the file, the annotation id and
    the fix on one line, a non-zero exit code, no traceback and no checkpoint written."""
    root = str(tmp_path / "copy")
    shutil.copytree(synthetic_root, root)
    p = synthetic.dataset_paths(root)
    with open(p.train_instances) as f:
        data = json.load(f)
    data["annotations"][0]["bbox"][0] = 5000.0
    with open(p.train_instances, "w") as f:
        json.dump(data, f)
    workdir = tmp_path / "run"
    proc = _run("train.py", "--config=configs/demo.py:smoke", f"--workdir={workdir}",
                "--config.data.synthetic=False", f"--config.data.root={root}",
                f"--config.data.train_instances={p.train_instances}",
                f"--config.data.train_images={p.train_images}",
                f"--config.data.val_instances={p.val_instances}",
                f"--config.data.val_images={p.val_images}",
                f"--config.data.split_file={p.split_file}",
                f"--config.text.vocab_file={p.vocab_file}", "--progress=false")
    ann_id = data["annotations"][0]["id"]
    _one_clear_error(proc, "instances_train.json", f"annotation id {ann_id}", "outside",
                     "fix the annotation")
    assert proc.returncode == 1
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


def test_on_bad_image_is_read_from_the_config(tmp_path):
    """`config.data.on_bad_image` reaches the training loader a method builds."""
    from helpers import smoke_config

    from ovd_jax.methods.base import detection_train_loader
    from ovd_jax.training.experiment import build_experiment

    config = smoke_config(str(tmp_path / "syn"))
    exp = build_experiment(config)
    bad = exp.train_data.records[0]["path"]
    with open(bad, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(BadImageError, match=os.path.basename(bad)):
        for _ in detection_train_loader(exp, num_epochs=1):
            pass
    config.data.on_bad_image = "skip"
    ids = [int(i) for b in detection_train_loader(exp, num_epochs=1)
           for i, v in zip(b["image_id"], b["valid"]) if v]
    assert exp.train_data.records[0]["image_id"] not in ids and len(ids) > 0
