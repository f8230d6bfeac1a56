"""GLIP trains and evaluates through the shared loop at smoke size, and one train step on an
8-device mesh equals the same step on 1 device."""

import json
import os

import jax
import numpy as np
from helpers import assert_trees_allclose, one_train_step, smoke_config

from ovd_jax.methods import glip as glip_method
from ovd_jax.training import sharding as shd
from ovd_jax.training import train_step as ts
from ovd_jax.training.experiment import build_experiment
from ovd_jax.training.loop import make_train_loader, restore_for_eval, train_and_evaluate

HEADLINE = ("AP", "AP50", "base_AP50", "novel_AP50")


def _config(tmp_path_factory):
    return smoke_config(str(tmp_path_factory.mktemp("data") / "syn"), "glip", "glip_t,smoke")


def test_smoke_trains_and_evaluates(tmp_path_factory):
    config = _config(tmp_path_factory)
    workdir = str(tmp_path_factory.mktemp("run"))
    metrics = train_and_evaluate(config, workdir, progress=False)
    with open(os.path.join(workdir, "metrics.json")) as f:
        written = json.load(f)
    for k in HEADLINE:
        assert 0.0 <= metrics[k] <= 1.0 or metrics[k] == -1.0, (k, metrics[k])
        assert written[k] == metrics[k]
    if "grounding_recall@1" in written:  # the synthetic set ships a grounding validation file
        assert 0.0 <= written["grounding_recall@1"] <= 1.0
    with open(os.path.join(workdir, "train_losses.json")) as f:
        losses = json.load(f)["losses"]
    assert len(losses) == config.train.steps and np.all(np.isfinite(losses))
    with open(os.path.join(workdir, "detections.json")) as f:
        dets = json.load(f)
    with open(config.data.val_instances) as f:
        cat_ids = {c["id"] for c in json.load(f)["categories"]}
    assert {d["category_id"] for d in dets} <= cat_ids

    # Free-text grounding with the trained checkpoint: one box per noun phrase, inside the image.
    exp = build_experiment(config, with_train=False)
    variables, _ = restore_for_eval(exp, shd.make_mesh((-1, 1, 1)), workdir)
    rec = exp.val_data.records[0]
    caption = "a red circle and a blue star on a grey background"
    found = glip_method.ground_caption(exp, variables, rec["path"], caption)
    assert [f["text"] for f in found] == ["red circle", "blue star", "grey background"]
    for f in found:
        x1, y1, x2, y2 = f["box"]
        assert -1e-3 <= x1 <= x2 <= rec["width"] + 1e-3
        assert -1e-3 <= y1 <= y2 <= rec["height"] + 1e-3
        assert 0.0 <= f["score"] <= 1.0


def _one_step(exp, devices, batch):
    return one_train_step(exp, devices, batch)[:3]


def test_eight_devices_equal_one(tmp_path_factory):
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices (see tests/conftest.py)"
    exp = build_experiment(_config(tmp_path_factory))
    batch = next(iter(make_train_loader(exp)))
    assert batch["token_ids"].shape == (8, exp.config.text.context_length)
    assert batch["box_positive_map"].shape == (8, exp.config.data.max_boxes,
                                               exp.config.text.context_length)
    p8, m8, state8 = _one_step(exp, jax.devices(), batch)
    p1, m1, _ = _one_step(exp, jax.devices()[:1], batch)
    mesh8 = shd.make_mesh((-1, 1, 1))
    assert len(ts.device_batch(exp, batch, mesh8)["token_ids"].sharding.device_set) == 8
    assert float(m1["num_pos_per_image"]) > 0
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
    assert_trees_allclose(p8, p1, rtol=2e-4, atol=2e-6)
