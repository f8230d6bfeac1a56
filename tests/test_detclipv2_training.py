"""DetCLIPv2 joint training: for every data type the 8-device step equals the 1-device step
(loss and updated parameters), each type's step compiles once, the loader follows the schedule
with each type's batch size and resolution, and the smoke recipe trains and evaluates."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from helpers import assert_trees_allclose, smoke_config

from ovd_jax.training import sharding as shd
from ovd_jax.training import train_step as ts
from ovd_jax.training.experiment import build_experiment
from ovd_jax.training.loop import make_train_loader, train_and_evaluate


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    config = smoke_config(str(tmp_path_factory.mktemp("data") / "syn"), "detclipv2", "smoke")
    return build_experiment(config)


@pytest.fixture(scope="module")
def sgd_exp(exp):
    """The same experiment with plain SGD: Adam divides by sqrt(v), which blows the rounding
    noise of a near-zero gradient up to a full learning-rate step, so parameters compared
    after Adam steps differ by lr where the step itself agrees; SGD keeps the comparison
    well-conditioned."""
    config = exp.config.copy_and_resolve_references()
    with config.unlocked():
        config.optim.name = "sgd"
        config.optim.momentum = 0.0
        config.optim.learning_rate = 0.1
    return dataclasses.replace(exp, config=config)


def _batches(exp):
    """One batch of each data type, in schedule order."""
    it = iter(make_train_loader(exp))
    out = {}
    while len(out) < len(ts.data_types(exp)):
        b = next(it)
        out.setdefault(b["data_type"], b)
    return out


def test_loader_batches_per_type(exp):
    c = exp.config
    batches = _batches(exp)
    assert set(batches) == {"detection", "grounding", "image_text"}
    for kind, b in batches.items():
        size = c.image_text.image_size if kind == "image_text" else c.data.image_size
        assert b["image"].shape == (c.train.batch_sizes[kind], size, size, 3), kind
        k = c.image_text.concepts_per_caption if kind == "image_text" else c.data.max_concepts
        assert b["concept_ids"].shape == (b["image"].shape[0], k, c.text.context_length)
        assert b["concept_valid"].any(axis=1).all(), kind  # every example has a concept
        if kind != "image_text":
            # Every kept box has exactly one positive concept, and it is a valid slot.
            kept = b["box_mask"] & b["box_valid"]
            np.testing.assert_array_equal(b["box_concepts"].sum(-1)[kept], 1.0)
            assert not (b["box_concepts"] * ~b["concept_valid"][:, None, :]).any()


def _step(exp, devices, kind, batch, steps=1):
    mesh = shd.make_mesh((-1, 1, 1), devices=devices)
    state, shardings, tx = ts.create_train_state(exp, mesh, jax.random.key(0))
    step = ts.make_train_step(exp, tx, mesh, shardings, {}, kind)
    for _ in range(steps):
        state, metrics = step(state, ts.device_batch(exp, batch, mesh, kind), jax.random.key(1))
        jax.block_until_ready(state)
    return jax.device_get(state.params), jax.device_get(metrics), step


@pytest.mark.parametrize("kind", ["detection", "grounding", "image_text"])
def test_eight_devices_equal_one_and_compile_once(sgd_exp, kind):
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices (see tests/conftest.py)"
    exp = sgd_exp
    batch = _batches(exp)[kind]
    p8, m8, step8 = _step(exp, jax.devices(), kind, batch, steps=2)
    p1, m1, _ = _step(exp, jax.devices()[:1], kind, batch, steps=2)
    # Two steps with new parameters and step numbers reuse one executable.
    assert step8.jitted._cache_size() == 1
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-4, atol=1e-6)
    assert np.isfinite(m8["loss"]) and m8["loss"] > 0
    assert_trees_allclose(p8, p1, rtol=2e-4, atol=2e-6, label=kind)


def test_smoke_trains_every_type_and_evaluates(exp, tmp_path):
    metrics = train_and_evaluate(exp.config, str(tmp_path / "run"), progress=False)
    for key in ("base_AP50", "novel_AP50", "caption_only_AP50"):
        assert -1.0 <= metrics[key] <= 1.0, (key, metrics)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    keys = set().union(*[r.keys() for r in logged])
    assert {"detection/align", "grounding/align", "image_text/cts"} <= keys
