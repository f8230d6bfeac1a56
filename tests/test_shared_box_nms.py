"""Per-class NMS on class-agnostic boxes (`ops.nms.shared_box_nms`), the path RegionCLIP's
evaluation takes without a pre-NMS cut: the same kept (box, class) list, in the same order, as
`batched_nms` on the flattened P * K candidates, and the same kept set as torchvision's
`batched_nms`; RegionCLIP's `per_class_nms` with `pre_nms_topk = 0` returns it."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torchvision

from ovd_jax.methods.regionclip import per_class_nms
from ovd_jax.ops.nms import batched_nms, shared_box_nms


def _boxes(rng, p, size=64.0):
    xy = rng.uniform(0, size * 0.7, (p, 2))
    wh = rng.uniform(4, size * 0.4, (p, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _flat_reference(boxes, scores, cand, thr, m):
    p, k = scores.shape
    idx, ok = batched_nms(jnp.repeat(boxes, k, axis=0), jnp.where(cand, scores, -jnp.inf)
                          .reshape(-1), jnp.tile(jnp.arange(k), p), thr, m,
                          valid=cand.reshape(-1))
    return np.asarray(idx) // k, np.asarray(idx) % k, np.asarray(ok)


@pytest.mark.parametrize("p,k,m", [(30, 5, 20), (60, 9, 100), (7, 3, 40)])
def test_equals_flattened_batched_nms(rng, seed, p, k, m):
    boxes = jnp.asarray(_boxes(rng, p))
    scores = jnp.asarray(rng.uniform(0, 1, (p, k)).astype(np.float32))
    cand = jnp.asarray(rng.uniform(0, 1, (p, k)) > 0.3)
    got = jax.jit(shared_box_nms, static_argnums=(3, 4))(boxes, scores, cand, 0.5, m)
    want = _flat_reference(boxes, scores, cand, 0.5, m)
    ok = np.asarray(got[2])
    np.testing.assert_array_equal(ok, want[2], err_msg=f"OVD_TEST_SEED={seed}")
    np.testing.assert_array_equal(np.asarray(got[0])[ok], want[0][ok])
    np.testing.assert_array_equal(np.asarray(got[1])[ok], want[1][ok])
    assert not np.any(np.asarray(got[0])[~ok]) and not np.any(np.asarray(got[1])[~ok])


def test_same_kept_set_as_torchvision(rng, seed):
    p, k = 80, 6
    boxes = _boxes(rng, p)
    scores = rng.uniform(0, 1, (p, k)).astype(np.float32)
    cand = rng.uniform(0, 1, (p, k)) > 0.25
    bi, ci, ok = shared_box_nms(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(cand),
                                0.6, p * k)
    got = {(int(b), int(c)) for b, c, v in zip(bi, ci, ok) if v}
    pi, ki = np.nonzero(cand)
    keep = torchvision.ops.batched_nms(torch.tensor(boxes[pi]), torch.tensor(scores[pi, ki]),
                              torch.tensor(ki), 0.6).numpy()
    assert got == {(int(pi[i]), int(ki[i])) for i in keep}, f"OVD_TEST_SEED={seed}"


def test_no_candidate_and_vmap(rng):
    boxes = jnp.asarray(np.stack([_boxes(rng, 10), _boxes(rng, 10)]))
    scores = jnp.asarray(rng.uniform(0, 1, (2, 10, 4)).astype(np.float32))
    cand = jnp.zeros((2, 10, 4), bool).at[1, 3, 2].set(True)
    bi, ci, ok = jax.vmap(lambda b, s, c: shared_box_nms(b, s, c, 0.5, 5))(boxes, scores, cand)
    assert not np.any(np.asarray(ok[0]))
    assert np.asarray(ok[1]).tolist() == [True, False, False, False, False]
    assert (int(bi[1, 0]), int(ci[1, 0])) == (3, 2)


def test_regionclip_per_class_nms_without_cut_uses_it(rng, seed):
    """RegionCLIP's eval with pre_nms_topk = 0 (upstream) equals the flattened path."""
    p, k = 40, 8
    boxes = jnp.asarray(_boxes(rng, p))
    probs = jax.nn.softmax(jnp.asarray(rng.normal(0, 2, (p, k + 1)).astype(np.float32)))[:, 1:]
    valid = jnp.asarray(rng.uniform(0, 1, p) > 0.2)
    e = ml_collections.ConfigDict(dict(pre_nms_topk=0, score_threshold=0.05,
                                       nms_threshold=0.5, max_detections=30))
    out = per_class_nms(boxes, probs, valid, e)
    bi, ci, ok = _flat_reference(boxes, probs, valid[:, None] & (probs > 0.05), 0.5, 30)
    np.testing.assert_array_equal(np.asarray(out["valid"]), ok, err_msg=f"OVD_TEST_SEED={seed}")
    np.testing.assert_array_equal(np.asarray(out["classes"])[ok], ci[ok])
    np.testing.assert_allclose(np.asarray(out["boxes"])[ok], np.asarray(boxes)[bi[ok]])
    np.testing.assert_allclose(np.asarray(out["scores"])[ok], np.asarray(probs)[bi[ok], ci[ok]])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="scores and candidate"):
        shared_box_nms(jnp.zeros((4, 4)), jnp.zeros((3, 2)), jnp.zeros((3, 2), bool), 0.5, 2)
