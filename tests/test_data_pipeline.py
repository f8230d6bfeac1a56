"""The grain detection pipeline: shapes, normalisation, box mapping, determinism, resume, eval
padding and sharding."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ovd_jax.data import CLIP_MEAN, CLIP_STD, load_coco_detection, make_detection_loader, synthetic
from ovd_jax.data.transforms import decode_image


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    p = synthetic.generate(str(tmp_path_factory.mktemp("synth") / "ds"), seed=5,
                           num_train=16, num_val=11, num_imagetext=0, num_val_caption_only=0)
    return p, load_coco_detection(p.train_instances, p.train_images), load_coco_detection(
        p.val_instances, p.val_images)


def _rect_dataset(tmp_path, rng, n=6):
    """Random non-square images (one with a crowd box) -> DetectionDataset."""
    images, anns = [], []
    for i in range(n):
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        fn = f"r{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / fn)
        images.append({"id": 3 + i, "file_name": fn, "height": h, "width": w})
        for k in range(int(rng.integers(1, 4))):
            x, y = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            anns.append({"id": len(anns) + 1, "image_id": 3 + i, "category_id": [4, 9][k % 2],
                         "bbox": [x, y, rng.uniform(1, w - x), rng.uniform(1, h - y)],
                         "iscrowd": int(i == 0 and k == 0)})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 4, "name": "a"}, {"id": 9, "name": "b"}]}
    (tmp_path / "inst.json").write_text(json.dumps(data))
    return load_coco_detection(str(tmp_path / "inst.json"), str(tmp_path)), data


def _check_batch_against_records(batch, by_id, cat_id_to_index, size, seed):
    for b in range(len(batch["image_id"])):
        if not batch["valid"][b]:
            assert batch["image_id"][b] == -1 and not batch["box_mask"][b].any()
            assert (batch["image"][b] == 0).all()
            continue
        rec = by_id[int(batch["image_id"][b])]
        H, W = rec["height"], rec["width"]
        scale = float(batch["scale"][b])
        assert batch["orig_hw"][b].tolist() == [H, W]
        assert np.isclose(scale, size / max(H, W))
        h, w = batch["image_hw"][b].tolist()
        assert (h, w) == (round(H * scale), round(W * scale)) and max(h, w) == size
        # Padding is exactly 0 after normalisation.
        assert (batch["image"][b, h:] == 0).all() and (batch["image"][b, :, w:] == 0).all()
        # Boxes map back to the annotations (non-crowd, in order) via scale and flip.
        keep = ~rec["iscrowd"]
        n = int(keep.sum())
        assert batch["box_mask"][b].sum() == n and batch["box_mask"][b, :n].all()
        got = batch["boxes"][b, :n] / scale
        if batch["flipped"][b]:
            got = np.stack([W - got[:, 2], got[:, 1], W - got[:, 0], got[:, 3]], axis=1)
        np.testing.assert_allclose(got, rec["boxes"][keep], atol=1e-4, err_msg=f"seed={seed}")
        want_labels = [cat_id_to_index[c] for c in rec["category_ids"][keep].tolist()]
        assert batch["labels"][b, :n].tolist() == want_labels
        assert (batch["labels"][b, n:] == -1).all() and (batch["boxes"][b, n:] == 0).all()


def test_batches_map_back_to_annotations(tmp_path, rng, seed):
    ds, _ = _rect_dataset(tmp_path, rng)
    by_id = {r["image_id"]: r for r in ds.records}
    loader = make_detection_loader(ds.records, batch_size=3, image_size=64, max_boxes=4,
                                   cat_id_to_index=ds.cat_id_to_index, train=True, seed=seed,
                                   num_epochs=3)
    batches = list(loader)
    assert len(batches) == 6
    b0 = batches[0]
    shapes = {k: (v.shape, v.dtype.name) for k, v in b0.items()}
    assert shapes["image"] == ((3, 64, 64, 3), "float32")
    assert shapes["boxes"] == ((3, 4, 4), "float32") and shapes["labels"] == ((3, 4), "int32")
    assert shapes["box_mask"] == ((3, 4), "bool") and shapes["image_id"] == ((3,), "int32")
    assert shapes["scale"] == ((3,), "float32") and shapes["image_hw"] == ((3, 2), "int32")
    assert shapes["orig_hw"] == ((3, 2), "int32")
    flips = np.concatenate([b["flipped"] for b in batches])
    assert flips.any() and not flips.all(), f"seed={seed}: flips {flips}"
    for batch in batches:
        _check_batch_against_records(batch, by_id, ds.cat_id_to_index, 64, seed)
    # Every epoch visits every image once, each epoch in a different order.
    ids = np.concatenate([b["image_id"] for b in batches]).reshape(3, 6)
    assert all(sorted(e) == sorted(by_id) for e in ids.tolist())
    assert len({tuple(e) for e in ids.tolist()}) > 1, f"seed={seed}: epochs not reshuffled"


def test_pixels_are_normalised_resized_and_flipped(synth, seed):
    p, train, _ = synth
    by_id = {r["image_id"]: r for r in train.records}
    it = iter(make_detection_loader(train.records, batch_size=4, image_size=128, max_boxes=4,
                                    cat_id_to_index=train.cat_id_to_index, train=True,
                                    seed=seed))
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    np.testing.assert_allclose(mean / 255, [0.48145466, 0.4578275, 0.40821073], rtol=1e-6)
    for _ in range(2):
        batch = next(it)
        for b, iid in enumerate(batch["image_id"].tolist()):
            raw = np.asarray(Image.open(by_id[iid]["path"]).convert("RGB"), np.float32)
            if batch["flipped"][b]:
                raw = raw[:, ::-1]
            np.testing.assert_allclose(batch["image"][b], (raw - mean) / std, atol=1e-5,
                                       err_msg=f"seed={seed}")
    # Downscaling: compare with torchvision's antialiased bilinear resize of the same image.
    import torch
    import torchvision.transforms.v2.functional as TF

    ev = next(iter(make_detection_loader(train.records[:1], batch_size=1, image_size=64,
                                         max_boxes=4, cat_id_to_index=train.cat_id_to_index,
                                         train=False, seed=0)))
    raw = torch.from_numpy(decode_image(train.records[0]["path"]).copy()).permute(2, 0, 1)
    ref = TF.resize(raw, [64, 64], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    ours = ev["image"][0] * std + mean
    err = np.abs(ours - ref.permute(1, 2, 0).numpy().astype(np.float32))
    assert err.mean() < 1.5 and err.max() <= 8, (err.mean(), err.max())


def test_same_seed_same_batches_and_resume(synth, seed):
    _, train, _ = synth
    kw = dict(batch_size=4, image_size=48, max_boxes=4, cat_id_to_index=train.cat_id_to_index,
              train=True)
    a = iter(make_detection_loader(train.records, seed=seed, **kw))
    b = iter(make_detection_loader(train.records, seed=seed, **kw))
    c = iter(make_detection_loader(train.records, seed=seed + 1, **kw))
    first_a = [next(a) for _ in range(3)]
    first_b = [next(b) for _ in range(3)]
    first_c = [next(c) for _ in range(3)]
    for x, y in zip(first_a, first_b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"seed={seed} key={k}")
    assert any((x["image_id"] != y["image_id"]).any() for x, y in zip(first_a, first_c))
    # Resume: state after 3 batches, fresh loader, set_state -> identical continuation
    # (5 more batches cross the 16-image epoch boundary).
    state = a.get_state()
    expected = [next(a) for _ in range(5)]
    fresh = iter(make_detection_loader(train.records, seed=seed, **kw))
    fresh.set_state(state)
    for x, y in zip(expected, [next(fresh) for _ in range(5)]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"seed={seed} key={k}")


def test_eval_every_image_once_with_padding_and_shards(synth, seed):
    _, _, val = synth
    by_id = {r["image_id"]: r for r in val.records}
    kw = dict(batch_size=4, image_size=96, max_boxes=4, cat_id_to_index=val.cat_id_to_index,
              train=False, seed=seed)
    batches = list(make_detection_loader(val.records, **kw))
    assert len(batches) == 3  # 11 images -> 4 + 4 + 3 (+1 padding entry)
    ids = np.concatenate([b["image_id"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert ids[valid].tolist() == [r["image_id"] for r in val.records]  # record order, once
    assert ids[~valid].tolist() == [-1]
    assert not np.concatenate([b["flipped"] for b in batches]).any()
    for batch in batches:
        _check_batch_against_records(batch, by_id, val.cat_id_to_index, 96, seed)
    # Resume in eval mode too.
    it = iter(make_detection_loader(val.records, **kw))
    next(it)
    state = it.get_state()
    fresh = iter(make_detection_loader(val.records, **kw))
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["image_id"], batches[1]["image_id"])
    # Three shards: equal batch counts, every image exactly once overall.
    shards = [list(make_detection_loader(val.records, shard_index=i, shard_count=3, **kw))
              for i in range(3)]
    assert {len(s) for s in shards} == {1}
    all_ids = np.concatenate([b["image_id"][b["valid"]] for s in shards for b in s])
    assert sorted(all_ids.tolist()) == sorted(by_id)


def test_train_shards_are_disjoint_and_equal(synth, seed):
    _, train, _ = synth
    kw = dict(batch_size=2, image_size=32, max_boxes=4, cat_id_to_index=train.cat_id_to_index,
              train=True, seed=seed, num_epochs=1)
    shards = [list(make_detection_loader(train.records, shard_index=i, shard_count=3, **kw))
              for i in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]  # 16 // 3 = 5 per shard -> 2 full batches
    ids = [np.concatenate([b["image_id"] for b in s]).tolist() for s in shards]
    flat = sum(ids, [])
    assert len(set(flat)) == len(flat), f"seed={seed}: shards overlap: {ids}"


def test_box_limits_and_bad_inputs(tmp_path, rng, synth):
    ds, data = _rect_dataset(tmp_path, rng)
    heavy = dict(ds.records[1])
    heavy["boxes"] = np.tile(np.asarray([[1, 1, 5, 5]], np.float32), (6, 1))
    heavy["category_ids"] = np.full(6, 4, np.int64)
    heavy["iscrowd"] = np.zeros(6, bool)
    kw = dict(batch_size=1, image_size=32, max_boxes=4, cat_id_to_index=ds.cat_id_to_index,
              train=False, seed=0)
    with pytest.raises(ValueError, match=r"has 6 boxes but config\.data\.max_boxes is 4"):
        list(make_detection_loader([heavy], **kw))
    batch = next(iter(make_detection_loader([heavy], truncate=True, **kw)))
    assert batch["box_mask"].all()
    with pytest.raises(ValueError, match="not in the loader's cat_id_to_index"):
        list(make_detection_loader(ds.records, **{**kw, "cat_id_to_index": {4: 0}}))
    corrupt = dict(ds.records[1], path=str(tmp_path / "broken.png"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ValueError, match=r"broken\.png.* corrupt"):
        list(make_detection_loader([corrupt], **kw))
    wrong_size = dict(ds.records[1], height=ds.records[1]["height"] + 3)
    with pytest.raises(ValueError, match="decodes to"):
        list(make_detection_loader([wrong_size], **kw))
    with pytest.raises(ValueError, match="no records"):
        make_detection_loader([], **kw)
    with pytest.raises(ValueError, match="shard_index"):
        make_detection_loader(ds.records, **{**kw, "shard_index": 2, "shard_count": 2})
    with pytest.raises(ValueError, match="no full batch"):
        make_detection_loader(ds.records, **{**kw, "train": True, "num_epochs": 1,
                                             "batch_size": 7})
    missing = dict(ds.records[1], path=os.path.join(str(tmp_path), "nope.png"))
    with pytest.raises(ValueError, match=r"nope\.png.* does not exist"):
        list(make_detection_loader([missing], **kw))
