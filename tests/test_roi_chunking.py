"""RegionCLIP's RoI head run in chunks of proposals at inference (`config.eval.rois_per_chunk`).

Chunking must give every RoI the embedding and box deltas it gets when all RoIs run at once
(any chunk size, including ones that do not divide the proposal count), the whole detector's
detections must not change, the compiled program's temporaries must shrink with the chunk (the
reason the option exists), and the data-parallel program must keep each image's RoIs on its
own device (no all-gather in the compiled HLO).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import smoke_config
from test_roi_align_hlo import _collectives

from ovd_jax import methods
from ovd_jax.methods import regionclip
from ovd_jax.models.regionclip import RegionCLIPDetector
from ovd_jax.training import sharding as shd
from ovd_jax.training.experiment import build_experiment


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    config = smoke_config(str(tmp_path_factory.mktemp("chunk") / "syn"), "demo", "smoke")
    return build_experiment(config, with_train=False)


@pytest.fixture(scope="module")
def variables(exp):
    method = methods.get(exp.config.method)
    return jax.jit(exp.model.init)(jax.random.key(3), *method.init_args(exp.config))


def _inputs(rng, exp, variables, n, r):
    s = exp.config.data.image_size
    images = rng.normal(size=(n, s, s, 3)).astype(np.float32)
    res4 = jax.jit(lambda v, x: exp.model.apply(v, x, method=RegionCLIPDetector.backbone))(
        variables, images)
    xy = rng.uniform(0, s * 0.8, (n, r, 2))
    wh = rng.uniform(1, s * 0.6, (n, r, 2))
    return images, res4, np.concatenate([xy, xy + wh], -1).astype(np.float32)


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 40])
def test_chunked_region_features_equal_all_at_once(exp, variables, rng, chunk):
    _, res4, boxes = _inputs(rng, exp, variables, n=3, r=13)
    run = jax.jit(lambda v, f, b, c: regionclip.region_features(exp.model, v, f, b, c),
                  static_argnums=3)
    ref_emb, ref_deltas = run(variables, res4, boxes, 0)
    emb, deltas = run(variables, res4, boxes, chunk)
    assert emb.shape == ref_emb.shape and deltas.shape == ref_deltas.shape
    np.testing.assert_allclose(emb, ref_emb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(deltas, ref_deltas, rtol=1e-5, atol=1e-6)
    # Not vacuous: each RoI's embedding is its own (boxes differ, so do their embeddings).
    assert np.abs(np.asarray(ref_emb)[:, 1:] - np.asarray(ref_emb)[:, :-1]).max() > 1e-3


def test_chunked_predict_gives_the_same_detections(exp, variables, rng):
    config = exp.config
    images, _, _ = _inputs(rng, exp, variables, n=2, r=1)
    hw = np.full((2, 2), config.data.image_size, np.int32)
    queries = exp.method.eval_queries(exp, variables)
    outs = {}
    for chunk in (0, 7):
        with config.unlocked():
            config.eval.rois_per_chunk = chunk
        outs[chunk] = jax.device_get(jax.jit(
            lambda v, im, s, q: exp.method.predict(exp.model, v, im, s, q, config))(
                variables, images, hw, queries))
    with config.unlocked():
        config.eval.rois_per_chunk = 0
    ref, out = outs[0], outs[7]
    assert ref["valid"].any()
    np.testing.assert_array_equal(out["valid"], ref["valid"])
    v = ref["valid"]
    np.testing.assert_array_equal(out["classes"][v], ref["classes"][v])
    np.testing.assert_allclose(out["boxes"][v], ref["boxes"][v], atol=1e-4)
    np.testing.assert_allclose(out["scores"][v], ref["scores"][v], atol=1e-5)


def test_chunking_bounds_the_compiled_temporaries(exp, variables):
    s = exp.config.data.image_size // 16
    c4 = exp.model.vision.width * 16
    res4 = jax.ShapeDtypeStruct((2, s, s, c4), jnp.float32)
    boxes = jax.ShapeDtypeStruct((2, 256, 4), jnp.float32)

    def temp_bytes(chunk):
        fn = jax.jit(lambda v, f, b: regionclip.region_features(exp.model, v, f, b, chunk))
        return fn.lower(variables, res4, boxes).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(0), temp_bytes(16)
    assert chunked * 4 < whole, (chunked, whole)


def test_chunked_head_keeps_images_on_their_devices(exp, variables, rng):
    mesh = shd.make_mesh((8, 1, 1))
    split = shd.batch_sharding(mesh)
    _, res4, boxes = _inputs(rng, exp, variables, n=8, r=12)
    fn = jax.jit(lambda v, f, b: regionclip.region_features(exp.model, v, f, b, 5),
                 in_shardings=(None, split, split), out_shardings=(split, split))
    compiled = fn.lower(variables, jax.device_put(res4, split),
                        jax.device_put(boxes, split)).compile()
    moves, reduced = _collectives(compiled.as_text())
    assert not moves, moves
    assert not reduced, reduced
