"""Gradient accumulation (`config.train.grad_accum_steps`): the averaged loss, metrics and
gradients of strided micro-batches, against a NumPy least-squares reference on fresh random
inputs, and the accumulated RegionCLIP step sharded over 8 devices against 1 device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import one_train_step, smoke_config

from ovd_jax.training import train_step as ts
from ovd_jax.training.experiment import build_experiment
from ovd_jax.training.loop import make_train_loader


def _loss(params, batch, rng):
    """Mean squared error of a linear model plus a random scalar drawn from `rng` (so the test
    sees which key each micro-batch used); metrics: the loss and an integer count."""
    err = batch["x"] @ params["w"] - batch["y"]
    noise = jax.random.uniform(rng)
    loss = jnp.mean(err ** 2) + noise
    return loss, {"loss": loss, "count": jnp.sum(batch["y"] > 0).astype(jnp.int32)}


def _numpy_grad(w, x, y):
    return 2.0 * x.T @ (x @ w - y) / len(x)


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_accumulated_gradients_match_numpy(seed, rng, accum):
    n, d = 8, 3
    w = rng.normal(size=(d,)).astype(np.float32)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.normal(size=(n,)).astype(np.float32)
    key = jax.random.key(seed)
    (loss, metrics), grads = jax.jit(
        lambda p, b, r: ts.accumulated_value_and_grad(_loss, p, b, r, accum)
    )({"w": jnp.asarray(w)}, {"x": jnp.asarray(x), "y": jnp.asarray(y)}, key)
    # Micro-batch i holds rows i, i + accum, i + 2 accum, ... and draws fold_in(key, i).
    rows = [np.arange(i, n, accum) for i in range(accum)]
    if accum == 1:
        noises = [float(jax.random.uniform(key))]
    else:
        noises = [float(jax.random.uniform(jax.random.fold_in(key, i))) for i in range(accum)]
    want_loss = np.mean([np.mean((x[r] @ w - y[r]) ** 2) + z for r, z in zip(rows, noises)])
    want_grad = np.mean([_numpy_grad(w, x[r], y[r]) for r in rows], axis=0)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), want_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads["w"]), want_grad, rtol=1e-4, atol=1e-6)
    # Equal-sized micro-batches of a per-example mean: the full-batch gradient.
    np.testing.assert_allclose(np.asarray(grads["w"]), _numpy_grad(w, x, y), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(float(metrics["count"]), np.sum(y > 0) / accum, rtol=1e-6)


def test_batch_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match="grad_accum_steps"):
        ts.micro_batches({"x": jnp.zeros((6, 2))}, 4)


def test_accumulated_step_sharded_equals_one_device(tmp_path_factory):
    """RegionCLIP smoke, batch 16 in 2 micro-batches: the step on 8 devices (1 image per device
    per micro-batch) equals the step on 1 device; and the config check names the setting when
    the per-device batch does not divide."""
    config = smoke_config(str(tmp_path_factory.mktemp("data") / "syn"))
    config.train.batch_size = 16
    config.train.grad_accum_steps = 2
    exp = build_experiment(config)
    batch = next(iter(make_train_loader(exp)))
    p1, m1, _, _ = one_train_step(exp, jax.devices()[:1], batch)
    p8, m8, _, _ = one_train_step(exp, jax.devices(), batch)
    assert np.isfinite(m1["loss"]) and m1["nonfinite"] == 0
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    config.train.grad_accum_steps = 4  # 16 / 8 devices = 2 per device: 4 does not divide
    with pytest.raises(ValueError, match="grad_accum_steps=4"):
        one_train_step(build_experiment(config), jax.devices(), batch)
