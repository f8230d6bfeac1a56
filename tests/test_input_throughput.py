"""Input throughput: uint8 images normalised on the device, device prefetch, grain workers.

References: the float32 host pipeline (and a plain NumPy normalisation) for the uint8 path; an
uninterrupted iteration for resumption; `num_workers=0` for worker processes.
"""

import json
import pickle
import threading

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from helpers import one_train_step, smoke_config
from PIL import Image

from ovd_jax.data import CLIP_MEAN, CLIP_STD, load_coco_detection, make_detection_loader
from ovd_jax.data.device_image import normalize_batch, normalize_images, transfer_keys
from ovd_jax.data.pipeline import WorkerLock, loader_options
from ovd_jax.data.workers import _BatchElements
from ovd_jax.training import sharding as shd
from ovd_jax.training import train_step as ts
from ovd_jax.training.experiment import build_experiment
from ovd_jax.training.loop import make_train_loader
from ovd_jax.training.prefetch import DevicePrefetcher


@pytest.fixture(scope="module")
def rect(tmp_path_factory):
    """12 random non-square images with 1-3 boxes each; fixed content (module scope)."""
    root = tmp_path_factory.mktemp("rect")
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(12):
        h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
        for _ in range(int(rng.integers(1, 4))):
            x, y = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                         "bbox": [x, y, rng.uniform(1, w - x), rng.uniform(1, h - y)]})
    (root / "inst.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    return load_coco_detection(str(root / "inst.json"), str(root))


def _loader(ds, **kw):
    args = dict(batch_size=4, image_size=48, max_boxes=4, cat_id_to_index=ds.cat_id_to_index,
                train=True, seed=3, num_epochs=2, num_threads=2)
    return make_detection_loader(ds.records, **{**args, **kw})


def _assert_batches_equal(actual, expected, label):
    assert len(actual) == len(expected), label
    for i, (a, b) in enumerate(zip(actual, expected)):
        assert a.keys() == b.keys(), label
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{label}: batch {i} key {k}")


@pytest.mark.parametrize("train", [True, False])
def test_uint8_normalised_on_device_equals_float_pipeline(rect, train):
    kw = {} if train else {"num_epochs": None, "drop_remainder": False}
    floats = list(_loader(rect, train=train, **kw))
    uint8s = list(_loader(rect, train=train, image_transfer="uint8", **kw))
    assert len(floats) == len(uint8s) > 1
    mean, std = np.asarray(CLIP_MEAN), np.asarray(CLIP_STD)
    for f, u in zip(floats, uint8s):
        assert u["image"].dtype == np.uint8 and f["image"].dtype == np.float32
        for k in f:  # everything but the image is the float pipeline's
            if k != "image":
                np.testing.assert_array_equal(u[k], f[k], err_msg=k)
        hw = u["image_hw"]
        # Zero padding in the uint8 batch; on the device it must stay exactly 0 whatever the
        # padding holds, so fill it with 255 before normalising.
        garbage = u["image"].copy()
        for b, (h, w) in enumerate(hw):
            assert not u["image"][b, h:].any() and not u["image"][b, :, w:].any()
            garbage[b, h:], garbage[b, :, w:] = 255, 255
        on_device = np.asarray(jax.jit(normalize_images)(garbage, hw))
        # The float pipeline normalises the same resized uint8 pixels (PIL resizes in uint8,
        # as detectron2 feeds them), so the only difference is float32 arithmetic: a few ulp
        # of |(x - mean) / std| <= 2.2, far below the 0.5 / min(std) = 0.0074 a rounding of
        # float-resized pixels to uint8 would allow.
        np.testing.assert_allclose(on_device, f["image"], rtol=0, atol=1e-6)
        for b, (h, w) in enumerate(hw):
            assert not on_device[b, h:].any() and not on_device[b, :, w:].any()
            # Independent reference: plain float64 NumPy on the valid pixels.
            ref = (u["image"][b, :h, :w].astype(np.float64) - mean) / std
            np.testing.assert_allclose(on_device[b, :h, :w], ref, rtol=0, atol=1e-5)


def test_normalize_batch_dtype_keys_and_bad_values():
    images = np.full((2, 8, 8, 3), 200, np.uint8)
    hw = np.asarray([[8, 4], [0, 0]], np.int32)  # the second: an eval padding entry
    batch = {"image": images, "image_hw": hw, "det_image": images, "det_image_hw": hw,
             "boxes": np.zeros((2, 1, 4), np.float32)}
    out = normalize_batch(batch, keys=("image", "det_image", "boxes"), dtype=jax.numpy.bfloat16)
    assert set(out) == {"image", "det_image", "boxes"}
    assert out["image"].dtype == jax.numpy.bfloat16 and out["boxes"] is batch["boxes"]
    assert not np.asarray(out["image"][1], np.float32).any()
    assert not np.asarray(out["image"][0, :, 4:], np.float32).any()
    # Float images (the float32 pipeline) pass untouched.
    floats = {"image": np.ones((1, 4, 4, 3), np.float32), "image_hw": np.zeros((1, 2), np.int32)}
    assert normalize_batch(floats)["image"] is floats["image"]
    assert transfer_keys(("image", "det_image", "boxes"), "uint8") == (
        "image", "det_image", "boxes", "image_hw", "det_image_hw")
    assert transfer_keys(("image", "boxes"), "float32") == ("image", "boxes")
    with pytest.raises(ValueError,
                       match=r"config\.data\.image_transfer='fp16'.*'float32'.*'uint8'"):
        loader_options(ml_collections.ConfigDict({"image_transfer": "fp16"}))
    with pytest.raises(ValueError, match=r"config\.data\.num_workers"):
        loader_options(ml_collections.ConfigDict({"num_workers": -1}))


def test_regionclip_smoke_step_uint8_matches_float(tmp_path_factory):
    config = smoke_config(str(tmp_path_factory.mktemp("data") / "syn"))
    assert config.data.image_transfer == "float32"  # smoke/demo numbers: the host path
    # The default prefetch that tests/test_resume.py's exact-resume check runs with.
    assert config.data.device_prefetch == 2
    exp = build_experiment(config)
    float_batch = next(iter(make_train_loader(exp)))
    config.data.image_transfer = "uint8"
    uint8_batch = next(iter(make_train_loader(exp)))
    assert uint8_batch["image"].dtype == np.uint8
    _, m_u, _, dev = one_train_step(exp, jax.devices(), uint8_batch)
    assert dev["image"].dtype == np.uint8 and len(dev["image"].sharding.device_set) == 8
    # Reference: the float pipeline's batch through the method's loss (forward only, one
    # device) at the same initial parameters and step rng as the step's loss.
    mesh = shd.make_mesh((-1, 1, 1), devices=jax.devices()[:1])
    config.data.image_transfer = "float32"
    state, _, _ = ts.create_train_state(exp, mesh, jax.random.key(0))
    constants = exp.method.train_constants(exp, state.variables())
    keys = exp.method.device_keys(config)
    with mesh, nn.logical_axis_rules(shd.rules_tuple(config.sharding.rules)):
        loss_f, _ = jax.jit(lambda p, b, c: exp.method.train_loss(
            exp.model, p, state.model_state, b, c, jax.random.fold_in(jax.random.key(1), 0),
            config))(state.params, {k: float_batch[k] for k in keys}, constants)
    np.testing.assert_allclose(m_u["loss"], loss_f, rtol=1e-5, atol=1e-6)


def test_prefetch_carries_the_consumed_batch_state(rect):
    reference = list(_loader(rect))
    put_threads = []

    def put(batch):
        put_threads.append(threading.current_thread().name)
        return {"image": jax.device_put(batch["image"])}

    it = iter(_loader(rect))
    with DevicePrefetcher(it, put, 2) as batches:
        for i in range(3):
            host, device, state = next(batches)
            np.testing.assert_array_equal(np.asarray(device["image"]), reference[i]["image"])
    assert not batches.running  # the thread stopped on leaving the block
    assert set(put_threads) == {"device_prefetch"} and len(put_threads) >= 3
    # The state carried with batch 3, restored in a fresh iterator, gives batch 4 on (even
    # though the prefetcher had read further ahead).
    resumed = iter(_loader(rect))
    resumed.set_state(state)
    _assert_batches_equal([next(resumed) for _ in range(len(reference) - 3)], reference[3:],
                          "resumed after prefetch")
    # size 0: same items, no thread.
    sync = DevicePrefetcher(iter(_loader(rect)), lambda b: None, 0)
    assert not sync.running
    assert len([h for h, _, _ in sync]) == len(reference)


def test_prefetch_errors_surface_and_stop_the_thread():
    def source():
        yield {"x": 1}
        raise ValueError("image 'x.png' is corrupt (code 42)")

    class It:
        def __init__(self):
            self._g = source()

        def __next__(self):
            return next(self._g)

        def get_state(self):
            return {}

    batches = DevicePrefetcher(It(), lambda b: b, 2)
    assert next(batches)[0] == {"x": 1}
    with pytest.raises(ValueError, match=r"image 'x\.png' is corrupt \(code 42\)"):
        next(batches)
    batches.close()
    assert not batches.running

    def failing_put(batch):
        raise KeyError("no such key 'boxes'")

    with pytest.raises(KeyError, match="no such key 'boxes'"):
        with DevicePrefetcher(It(), failing_put, 2) as b:
            next(b)
    assert not b.running
    with pytest.raises(ValueError, match=r"config\.data\.device_prefetch"):
        DevicePrefetcher(It(), failing_put, -1)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_worker_batch_slices_round_robin_to_the_single_stream(drop_remainder):
    # Worker w of n reads whole batches w, w + n, ...; taking one batch from each worker in
    # turn (grain's interleave) must give the single-process batches 0, 1, 2, ... exactly,
    # including a partial last batch (evaluation) on whichever worker it falls.
    for length, batch, n in ((23, 4, 2), (24, 4, 3), (5, 8, 2), (40, 5, 4), (7, 1, 3)):
        stream = list(range(length))
        expected = [stream[i:i + batch] for i in range(0, length, batch)]
        expected = [b for b in expected if len(b) == batch or not drop_remainder]
        per_worker = []
        for w in range(n):
            items = list(_BatchElements(length, batch, w, n, drop_remainder))
            per_worker.append([items[i:i + batch] for i in range(0, len(items), batch)])
        merged = [per_worker[i % n][i // n] for i in range(len(expected))]
        assert merged == expected, (length, batch, n)
        assert sum(len(p) for p in per_worker) == len(expected), (length, batch, n)


def test_worker_processes_give_the_same_batches_and_resume(rect):
    reference = list(_loader(rect))
    _assert_batches_equal(list(_loader(rect, num_workers=2)), reference, "2 workers, train")
    # Resume with workers: the state after k batches continues at batch k + 1 (with 2
    # workers after an odd count, i.e. mid-way through the round-robin).
    for workers, k in ((1, 2), (2, 3)):
        it = iter(_loader(rect, num_workers=workers))
        _assert_batches_equal([next(it) for _ in range(k)], reference[:k], f"{workers} workers")
        state = it.get_state()
        it.close()
        resumed = iter(_loader(rect, num_workers=workers))
        resumed.set_state(state)
        _assert_batches_equal(list(resumed), reference[k:], f"{workers} workers, resumed")
        resumed.close()
    # What per-example hooks hold must pickle for the workers: the tokenizer lock does.
    lock = pickle.loads(pickle.dumps(WorkerLock()))
    with lock:
        pass
