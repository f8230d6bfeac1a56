"""The TFDS array_record source, on a tiny COCO-like TFDS dataset built here without TensorFlow."""

import io
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools.coco import COCO

from ovd_jax.data import CLIP_MEAN, CLIP_STD, make_detection_loader
from ovd_jax.data.tfds_source import load_tfds_detection

NAMES = ["cat", "dog", "zebra"]
_EXAMPLES: dict[str, list[dict]] = {}  # split -> examples, set by the test before building


class OvdTinyCocoTest(tfds.core.GeneratorBasedBuilder):
    """The feature layout of TFDS `coco/2017` (image, image/id, objects/{bbox,label,is_crowd})."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "image/filename": tfds.features.Text(),
                "image/id": np.int64,
                "objects": tfds.features.Sequence({
                    "area": np.int64,
                    "bbox": tfds.features.BBoxFeature(),
                    "id": np.int64,
                    "is_crowd": np.bool_,
                    "label": tfds.features.ClassLabel(names=NAMES),
                }),
            }),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in _EXAMPLES}

    def _generate_examples(self, split):
        for ex in _EXAMPLES[split]:
            buf = io.BytesIO()
            Image.fromarray(ex["pixels"]).save(buf, format="PNG")  # bytes, not ndarrays
            yield ex["id"], {
                "image": buf.getvalue(),
                "image/filename": f"{ex['id']}.png",
                "image/id": ex["id"],
                "objects": {
                    "area": [1] * len(ex["labels"]),
                    "bbox": [tfds.features.BBox(*b) for b in ex["bbox"]],
                    "id": list(range(len(ex["labels"]))),
                    "is_crowd": ex["crowd"],
                    "label": ex["labels"],
                },
            }


def _make_examples(rng, n, first_id):
    out = []
    for i in range(n):
        h, w = (32, int(rng.integers(12, 33))) if i % 2 else (int(rng.integers(12, 33)), 32)
        k = int(rng.integers(0, 4))
        y1, x1 = rng.uniform(0, 0.5, k), rng.uniform(0, 0.5, k)
        y2, x2 = y1 + rng.uniform(0.05, 0.5, k), x1 + rng.uniform(0.05, 0.5, k)
        out.append({
            "id": first_id + 3 * i,
            "pixels": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
            "bbox": np.stack([y1, x1, y2, x2], 1).astype(np.float32).tolist(),
            "labels": rng.integers(0, 3, k).tolist(),
            "crowd": (rng.random(k) < 0.2).tolist(),
        })
    return out


def test_tfds_source_end_to_end(tmp_path, rng, seed):
    _EXAMPLES.clear()
    _EXAMPLES["train"] = _make_examples(rng, 6, 1000)
    _EXAMPLES["validation"] = _make_examples(rng, 5, 5000)
    data_dir = str(tmp_path / "tfds")
    OvdTinyCocoTest(data_dir=data_dir, file_format="array_record").download_and_prepare()

    ds = load_tfds_detection("ovd_tiny_coco_test", split="validation", data_dir=data_dir,
                             with_gt=True)
    assert ds.class_names == NAMES and ds.cat_id_to_index == {0: 0, 1: 1, 2: 2}
    assert len(ds.records) == 5
    expected = {ex["id"]: ex for ex in _EXAMPLES["validation"]}
    for rec in ds.records:
        ex = expected[rec["image_id"]]
        h, w = ex["pixels"].shape[:2]
        assert (rec["height"], rec["width"]) == (h, w) and isinstance(rec["image"], bytes)
        b = np.asarray(ex["bbox"], np.float32).reshape(-1, 4)
        want = np.stack([b[:, 1] * w, b[:, 0] * h, b[:, 3] * w, b[:, 2] * h], 1)
        np.testing.assert_allclose(rec["boxes"], want, atol=1e-4, err_msg=f"seed={seed}")
        assert rec["category_ids"].tolist() == ex["labels"]
        assert rec["iscrowd"].tolist() == ex["crowd"]

    # The gt dict is valid COCO (pycocotools reads it) and matches the records.
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(ds.gt))
    coco = COCO(str(gt_path))
    assert sorted(coco.getImgIds()) == sorted(expected)
    assert len(coco.getAnnIds()) == sum(len(ex["labels"]) for ex in expected.values())

    # Through the grain pipeline: long side 32 -> no resize, so pixels compare exactly.
    batches = list(make_detection_loader(ds.records, batch_size=2, image_size=32, max_boxes=3,
                                         cat_id_to_index=ds.cat_id_to_index, train=False,
                                         seed=0))
    assert len(batches) == 3
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    seen = []
    for batch in batches:
        for k in np.flatnonzero(batch["valid"]):
            ex = expected[int(batch["image_id"][k])]
            h, w = ex["pixels"].shape[:2]
            assert batch["image_hw"][k].tolist() == [h, w] and batch["scale"][k] == 1.0
            np.testing.assert_allclose(batch["image"][k, :h, :w], (ex["pixels"] - mean) / std,
                                       atol=1e-5, err_msg=f"seed={seed}")
            n_real = sum(not c for c in ex["crowd"])
            assert batch["box_mask"][k].sum() == n_real
            seen.append(int(batch["image_id"][k]))
    assert sorted(seen) == sorted(expected)

    # Train mode over the lazy records works too (shuffle + flip + repeat).
    train = load_tfds_detection("ovd_tiny_coco_test", split="train", data_dir=data_dir)
    it = iter(make_detection_loader(train.records, batch_size=3, image_size=32, max_boxes=3,
                                    cat_id_to_index=train.cat_id_to_index, train=True, seed=seed))
    ids = np.concatenate([next(it)["image_id"] for _ in range(2)])
    assert sorted(ids.tolist()) == sorted(ex["id"] for ex in _EXAMPLES["train"])

    with pytest.raises(ValueError, match="Prepare it first"):
        load_tfds_detection("ovd_tiny_coco_test", split="test", data_dir=data_dir)
    with pytest.raises(ValueError, match="Prepare it first"):
        load_tfds_detection("no_such_dataset_xyz", split="train", data_dir=data_dir)
