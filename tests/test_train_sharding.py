"""A train step on an 8-device mesh equals the same step on 1 device (loss and parameters)."""

import jax
import numpy as np
from helpers import assert_trees_allclose, one_train_step, smoke_config

from ovd_jax.training import sharding as shd
from ovd_jax.training import train_step as ts
from ovd_jax.training.experiment import build_experiment
from ovd_jax.training.loop import make_train_loader


def _one_step(exp, devices, batch):
    return one_train_step(exp, devices, batch)[:3]


def test_eight_devices_equal_one(tmp_path_factory):
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices (see tests/conftest.py)"
    config = smoke_config(str(tmp_path_factory.mktemp("data") / "syn"))
    exp = build_experiment(config)
    batch = next(iter(make_train_loader(exp)))
    p8, m8, state8 = _one_step(exp, jax.devices(), batch)
    p1, m1, _ = _one_step(exp, jax.devices()[:1], batch)
    # The 8-device step really is sharded: the image batch axis is split over 8 devices.
    mesh8 = shd.make_mesh((-1, 1, 1))
    assert len(ts.device_batch(exp, batch, mesh8)["image"].sharding.device_set) == 8
    assert len(jax.tree.leaves(state8.params)[0].sharding.device_set) == 8
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
    assert_trees_allclose(p8, p1, rtol=2e-4, atol=2e-6)
