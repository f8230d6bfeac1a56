"""Shared test utilities: smoke configs on a per-session synthetic dataset."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def smoke_config(data_root: str, recipe: str = "demo", arg: str = "smoke"):
    """The `smoke` variant of a recipe with its synthetic data under `data_root`."""
    import importlib

    module = importlib.import_module(f"configs.{recipe}")
    config = module.get_config(arg)
    config.data.root = data_root
    return config


def one_train_step(exp, devices, batch):
    """One training step of `exp` on a data-parallel mesh over `devices`, from the state
    initialised with key 0 and step rng key 1. Returns (params, metrics) on the host, the new
    state and the device batch."""
    import jax

    from ovd_jax.training import sharding as shd
    from ovd_jax.training import train_step as ts

    mesh = shd.make_mesh((-1, 1, 1), devices=devices)
    state, shardings, tx = ts.create_train_state(exp, mesh, jax.random.key(0))
    constants = exp.method.train_constants(exp, state.variables())
    step = ts.make_train_step(exp, tx, mesh, shardings, constants)
    dev_batch = ts.device_batch(exp, batch, mesh)
    new_state, metrics = step(state, dev_batch, jax.random.key(1))
    jax.block_until_ready(new_state)
    return jax.device_get(new_state.params), jax.device_get(metrics), new_state, dev_batch


def assert_trees_allclose(actual, expected, *, rtol, atol, label: str = ""):
    """Every leaf of `actual` close to the leaf at the same path of `expected` (nested dicts);
    a failure names `label` and the leaf's path."""
    import jax
    import numpy as np

    for path, a in jax.tree_util.tree_leaves_with_path(actual):
        b = expected
        for k in path:
            b = b[k.key]
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol,
                                   err_msg=f"{label} {jax.tree_util.keystr(path)}".strip())
