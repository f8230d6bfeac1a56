"""RoIAlign and the per-image ops keep the batch local under data parallelism (compiled HLO).

The data-parallel train step of `configs/demo.py:smoke` is lowered and compiled through the
code path train.py uses; its collectives may only be all-reduces of parameter gradients and of
scalar/tiny loss statistics (and the scalar loop conditions of vmapped while loops). An
all-gather, all-to-all or collective permute, or an all-reduce of a non-parameter tensor
(e.g. the scatter-add gradient of a batch-flattened RoIAlign table), fails the test.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import smoke_config

from ovd_jax.ops.roi_align import multilevel_roi_align, roi_align
from ovd_jax.ops.topk import top_k
from ovd_jax.training import sharding as shd
from ovd_jax.training import train_step as ts
from ovd_jax.training.experiment import build_experiment
from ovd_jax.training.loop import make_train_loader

_MOVES = re.compile(r"\b(all-gather|all-to-all|collective-permute|reduce-scatter|"
                    r"ragged-all-to-all)(-start)?\(")
_ALL_REDUCE = re.compile(r"=\s*(\(.*?\)|\S+)\s+all-reduce(?:-start)?\((.*?)\), channel_id")
_SHAPE = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TINY = 16  # loss statistics (per-level sums, counts) are at most this many elements


def _collectives(text: str):
    """Data-moving collective lines, and (shape, producing op name) of every all-reduced value,
    in compiled HLO text."""
    lines = text.splitlines()
    moves = [line.strip()[:200] for line in lines if _MOVES.search(line)]
    producers = {}
    for line in lines:
        m = re.match(r"\s*(?:ROOT )?(%[\w.\-]+) = ", line)
        if m:
            name = _OP_NAME.search(line)
            producers[m[1]] = name[1] if name else ""
    reduced = []
    for line in lines:
        m = _ALL_REDUCE.search(line)
        if not m:
            continue
        shapes = [tuple(int(d) for d in s.split(",") if d) for s in _SHAPE.findall(m[1])]
        operands = [o.strip() for o in m[2].split(",")]
        reduced += [(s, producers.get(o, "")) for s, o in zip(shapes, operands)]
    return moves, reduced


def _split8():
    """Leading axis over 8 devices, on the repo's (Auto-typed) training mesh."""
    return shd.batch_sharding(shd.make_mesh((8, 1, 1)))


def test_roi_align_sharded_has_no_collectives(seed):
    rng = np.random.default_rng(seed)
    split = _split8()
    feats = [rng.normal(size=(8, s, s + 1, 4)).astype(np.float32) for s in (16, 8)]
    xy = rng.uniform(0, 60, (8, 5, 2))
    wh = rng.uniform(4, 60, (8, 5, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)

    def loss(fs, b):
        one = roi_align(fs[0], b, 3, 1 / 4, 2)
        multi = multilevel_roi_align(fs, b, 3, (4, 8), 2, canonical_box_size=32,
                                     canonical_level=3)
        return jnp.sum(one ** 2) + jnp.sum(jnp.sin(multi)), (one, multi)

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True),
                 in_shardings=(split, split), out_shardings=((None, (split, split)), split))
    sharded = (jax.device_put(feats, split), jax.device_put(boxes, split))
    moves, reduced = _collectives(fn.lower(*sharded).compile().as_text())
    assert not moves, moves
    assert all(np.prod(s) <= 1 for s, _ in reduced), reduced  # only the scalar loss sum
    # Same values as one device (the per-image tables index the right images).
    (l8, (o8, m8)), g8 = fn(*sharded)
    (l1, (o1, m1)), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True))(feats, boxes)
    np.testing.assert_allclose(o8, o1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m8, m1, rtol=1e-6, atol=1e-6)
    for a, b in zip(g8, g1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Per image equals the image alone (no cross-image rows).
    np.testing.assert_allclose(o1[3:4], roi_align(feats[0][3:4], boxes[3:4], 3, 1 / 4, 2),
                               rtol=1e-6, atol=1e-6)


def test_top_k_matches_lax_and_stays_local(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-4, 4, (8, 40)).astype(np.float32)  # many ties
    x[0, 2] = np.nan
    x[1, :3] = -np.inf
    for k in (0, 1, 7, 40):
        v, i = top_k(jnp.asarray(x), k)
        rv, ri = jax.lax.top_k(x, k)
        np.testing.assert_array_equal(i, ri)
        np.testing.assert_array_equal(v, rv)
    xi = rng.integers(-2**31, 2**31 - 1, (3, 50), dtype=np.int64).astype(np.int32)
    np.testing.assert_array_equal(top_k(jnp.asarray(xi), 9)[1], jax.lax.top_k(xi, 9)[1])
    split = _split8()
    text = jax.jit(lambda a: top_k(a, 5)).lower(jax.device_put(x, split)).compile().as_text()
    assert not _collectives(text)[0]


@pytest.mark.parametrize("accum", [1, 2])
def test_data_parallel_step_keeps_the_batch_local(tmp_path_factory, accum):
    """Also with gradient accumulation: the strided micro-batch split keeps every row on its
    device (a contiguous split would move half of each device's images)."""
    config = smoke_config(str(tmp_path_factory.mktemp("data") / "syn"))
    config.train.grad_accum_steps = accum
    config.train.batch_size = 8 * accum
    exp = build_experiment(config)
    mesh = shd.make_mesh((-1, 1, 1))
    assert shd.data_parallel_size(mesh) == 8
    state, shardings, tx = ts.create_train_state(exp, mesh, jax.random.key(0))
    constants = exp.method.train_constants(exp, state.variables())
    step = ts.make_train_step(exp, tx, mesh, shardings, constants)
    batch = ts.device_batch(exp, next(iter(make_train_loader(exp))), mesh)
    with mesh, nn.logical_axis_rules(shd.rules_tuple(config.sharding.rules)):
        lowered = step.jitted.lower(state, batch, jax.device_put(constants, shd.replicated(mesh)),
                                    jax.random.key(1))
    moves, reduced = _collectives(lowered.compile().as_text())
    assert not moves, "batch data moves between devices:\n" + "\n".join(moves)
    # Allowed all-reduces: parameter gradients (any layout: bitcasts and transposes keep the
    # element count), tiny loss statistics, and the cotangents of replicated activations such
    # as the class-text embeddings, which come out of a dot_general. A non-scalar produced by
    # a gather, scatter, sort or while loop is per-image data that left its device (scalar
    # booleans are the shared trip condition of a vmapped while loop such as NMS).
    sizes = {int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)}
    if accum > 1:
        # The micro-batch scan is a while loop around the whole forward and backward pass: judge
        # each op by its name inside it. (Its parameter gradients are all-reduced once per
        # micro-batch; docs/scaling.md.)
        reduced = [(s, re.sub(r"^jit\(step\)/while/body/(closed_call/)?", "jit(step)/", op))
                   for s, op in reduced]
    bad = [(s, op) for s, op in reduced
           if (s and re.search(r"gather|scatter|sort|top_k|while|roi", op, re.I))
           or not (int(np.prod(s)) in sizes or int(np.prod(s)) <= _TINY
                   or op.endswith("dot_general"))]
    assert not bad, f"all-reduces of per-image data: {bad}"
    # The parameter gradients are reduced (the test would pass vacuously otherwise).
    assert sum(int(np.prod(s)) in sizes and np.prod(s) > _TINY for s, _ in reduced) > 10
