"""Sharding that holds at any mesh: (data, fsdp, model) meshes on 8 devices give the data-parallel
step (loss and updated parameters), parameters really are split over `fsdp` / `model`, and the
optimizer state is sharded like its parameters."""

import os

import jax
import numpy as np
import optax
import pytest
from helpers import assert_trees_allclose, smoke_config
from jax.sharding import NamedSharding, PartitionSpec

from ovd_jax.training import sharding as shd
from ovd_jax.training import train_step as ts
from ovd_jax.training.experiment import build_experiment
from ovd_jax.training.loop import make_train_loader

MESHES = ((4, 2, 1), (2, 2, 2), (1, 8, 1))
# Small enough that the smoke models' kernels are split (production default: 16k elements).
MIN_SHARD = 64


def test_fit_spec_skips_axes_that_do_not_divide():
    mesh = shd.make_mesh((2, 4, 1))
    p = PartitionSpec
    assert shd.fit_spec((3, 3, 3, 64), p(None, None, "fsdp", "model"), mesh) == p(None, None,
                                                                                   None, "model")
    assert shd.fit_spec((6, 8), p(("data", "fsdp"), "fsdp"), mesh) == p("data", "fsdp")
    assert shd.fit_spec((16, 8), p(("data", "fsdp")), mesh) == p(("data", "fsdp"))
    assert shd.fit_spec((64,), p("fsdp"), mesh, min_size=65) == p()
    assert shd.fit_spec((64,), p("fsdp"), mesh, min_size=64) == p("fsdp")
    assert shd.fit_spec((5,), None, mesh) == p()


def _step(exp, mesh_shape, batch):
    mesh = shd.make_mesh(mesh_shape)
    state, shardings, tx = ts.create_train_state(exp, mesh, jax.random.key(0))
    _check_opt_shardings(tx, state, shardings)
    constants = exp.method.train_constants(exp, state.variables())
    kind = ts.data_types(exp)[0]
    step = ts.make_train_step(exp, tx, mesh, shardings, constants, kind)
    new_state, metrics = step(state, ts.device_batch(exp, batch, mesh, kind), jax.random.key(1))
    # The step keeps the state's shardings (donated in, same layout out).
    jax.tree.map(lambda x, s: _same(x.sharding, s, x.ndim), new_state.params, shardings.params)
    specs = [s.spec for s in jax.tree.leaves(shardings.params)]
    return jax.device_get(new_state.params), float(metrics["loss"]), specs


def _same(a, b, ndim):
    assert a.is_equivalent_to(b, ndim), (a, b)


def _check_opt_shardings(tx, state, shardings):
    """Every parameter-shaped optimizer leaf has its parameter's sharding (placed and declared)."""
    checked = []

    def placed(leaf, param):
        _same(leaf.sharding, param.sharding, leaf.ndim)
        checked.append(leaf.shape == param.shape)
        return leaf

    def declared(sharding, param_sharding):
        assert sharding == param_sharding, (sharding, param_sharding)
        return sharding

    optax.tree_map_params(tx, placed, state.opt_state, state.params)
    optax.tree_map_params(tx, declared, shardings.opt_state, shardings.params,
                          is_leaf=lambda x: isinstance(x, NamedSharding))
    assert checked and all(checked)


def _compare(config, tmp_path):
    config.sharding.min_shard_size = MIN_SHARD
    exp = build_experiment(config)  # the mesh is an argument of the state and the step
    kind = ts.data_types(exp)[0]
    loader = iter(make_train_loader(exp))
    batch = next(loader)
    while kind is not None and batch.get("data_type") != kind:
        batch = next(loader)
    ref, ref_loss, _ = _step(exp, (8, 1, 1), batch)
    for mesh_shape in MESHES:
        params, loss, specs = _step(exp, mesh_shape, batch)
        used = {a for s in specs for e in s for a in ((e,) if isinstance(e, str) else e or ())}
        # The mesh's non-data axes really split parameters.
        for axis, size in zip(("fsdp", "model"), mesh_shape[1:]):
            assert size == 1 or axis in used, (mesh_shape, axis)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=str(mesh_shape))
        assert_trees_allclose(params, ref, rtol=1e-5, atol=2e-6, label=str(mesh_shape))


def test_meshes_match_data_parallel_regionclip(tmp_path_factory):
    _compare(smoke_config(str(tmp_path_factory.mktemp("data") / "syn")), tmp_path_factory)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("OVD_SLOW_MESH"),
                    reason="GLIP/DetCLIPv2 meshes compile ~8 steps (minutes); OVD_SLOW_MESH=1")
@pytest.mark.parametrize("variant", ["smoke,glip", "smoke,detclipv2"])
def test_meshes_match_data_parallel_other_methods(tmp_path_factory, variant):
    config = smoke_config(str(tmp_path_factory.mktemp("data") / "syn"), "demo", variant)
    _compare(config, tmp_path_factory)
