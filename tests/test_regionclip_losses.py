"""RegionCLIP transfer-detector losses vs NumPy references on fresh random inputs.

Covers the region-concept logits (background column exactly 0), both classification reductions
(focal-scaled plain mean for COCO, weighted CE for LVIS; also against torch's
`cross_entropy(weight=...)` when torch is installed), concept-embedding ensembling, the RPN
losses and the box-regression loss, with padding masks and all-background batches.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from ovd_jax.losses import regionclip as rc_losses
from ovd_jax.methods import regionclip as rc


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_cls_loss(logits, targets, valid, gamma, bg_weight):
    """upstream FastRCNNOutputLayers: focal_loss (gamma given) or cross_entropy(weight=)."""
    logp = _log_softmax(logits.astype(np.float64))
    logp_t = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    ce = -logp_t
    w = np.where(targets == 0, bg_weight, 1.0)
    v = valid.reshape(-1)
    if gamma is None:
        den = (w.reshape(-1)[v]).sum()
        return 0.0 if den == 0 else (w * ce).reshape(-1)[v].sum() / den
    loss = (w * ce * (1.0 - np.exp(logp_t)) ** gamma).reshape(-1)[v]
    return loss.mean() if len(loss) else 0.0


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_region_logits_background_is_zero(rng):
    emb = _unit(rng.normal(size=(2, 7, 16))).astype(np.float32)
    concepts = _unit(rng.normal(size=(5, 16))).astype(np.float32)
    out = np.asarray(rc_losses.region_logits(jnp.asarray(emb), jnp.asarray(concepts), 0.01))
    assert out.shape == (2, 7, 6)
    assert np.all(out[..., 0] == 0.0)
    np.testing.assert_allclose(out[..., 1:], emb @ concepts.T / 0.01, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("gamma,bg_weight", [(0.5, 0.2), (None, 0.8), (None, 0.2), (2.0, 1.0)])
def test_classification_loss_matches_numpy(seed, rng, gamma, bg_weight):
    n, r, k = 3, 11, 6
    logits = rng.normal(0, 6, (n, r, k + 1)).astype(np.float32)
    logits[..., 0] = 0.0
    cases = {
        "mixed": (rng.integers(0, k + 1, (n, r)), rng.random((n, r)) < 0.8),
        "all_background": (np.zeros((n, r), int), rng.random((n, r)) < 0.8),
        # Weights summing below 1: the weighted mean must not be floored at 1.
        "two_background": (np.zeros((n, r), int), (np.arange(n)[:, None] < 2) & (np.arange(r) < 1)),
        "none_valid": (rng.integers(0, k + 1, (n, r)), np.zeros((n, r), bool)),
    }
    for name, (targets, valid) in cases.items():
        got = float(rc_losses.transfer_classification_loss(
            jnp.asarray(logits), jnp.asarray(targets, jnp.int32), jnp.asarray(valid), gamma=gamma,
            background_weight=bg_weight))
        want = np_cls_loss(logits, targets, valid, gamma, bg_weight)
        msg = (name, got, want, f"OVD_TEST_SEED={seed}")
        assert np.isclose(got, want, rtol=1e-5, atol=1e-6), msg


def test_weighted_ce_matches_torch(seed, rng):
    torch = pytest.importorskip("torch")
    n, k = 40, 9
    logits = rng.normal(0, 4, (n, k + 1)).astype(np.float32)
    targets = rng.integers(0, k + 1, n)
    targets[: n // 2] = 0
    got = float(rc_losses.transfer_classification_loss(
        jnp.asarray(logits), jnp.asarray(targets, jnp.int32), jnp.ones(n, bool), gamma=None,
        background_weight=0.8))
    # Upstream puts background last; the weight vector follows the class order.
    perm = np.r_[np.arange(1, k + 1), 0]
    t = torch.as_tensor(np.where(targets == 0, k, targets - 1))
    weight = torch.ones(k + 1)
    weight[-1] = 0.8
    want = torch.nn.functional.cross_entropy(torch.as_tensor(logits[:, perm]), t, weight=weight)
    assert np.isclose(got, float(want), rtol=1e-5), f"OVD_TEST_SEED={seed}"


def test_concept_embeddings_average_before_normalising(rng):
    k, t, d = 4, 3, 8
    feats = rng.normal(size=(k * t, d)).astype(np.float32)
    got = np.asarray(rc_losses.concept_embeddings(jnp.asarray(feats), t))
    want = _unit(feats.reshape(k, t, d).mean(1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Not the mean of normalised features (the other common ensembling).
    assert not np.allclose(got, _unit(_unit(feats).reshape(k, t, d).mean(1)), atol=1e-3)


def test_rpn_losses_match_numpy(seed, rng):
    n, a, b = 2, 50, 32
    obj = rng.normal(size=(n, a)).astype(np.float32)
    deltas = rng.normal(size=(n, a, 4)).astype(np.float32)
    targets = rng.normal(size=(n, a, 4)).astype(np.float32)
    fg = rng.random((n, a)) < 0.2
    bg = ~fg & (rng.random((n, a)) < 0.5)
    targets[~fg] = np.nan  # unmatched targets may be anything; they must not leak in
    fg[1] = False  # an all-background image
    cls, box = rc.rpn_losses(jnp.asarray(obj), jnp.asarray(deltas), jnp.asarray(fg),
                             jnp.asarray(bg), jnp.asarray(targets), b)
    y = fg.astype(np.float64)
    x = obj.astype(np.float64)
    bce = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
    want_cls = bce[fg | bg].sum() / (n * b)
    want_box = np.abs(deltas - np.nan_to_num(targets))[fg].sum() / (n * b)
    msg = f"OVD_TEST_SEED={seed}"
    assert np.isclose(float(cls), want_cls, rtol=1e-5), msg
    assert np.isclose(float(box), want_box, rtol=1e-5), msg


def test_box_regression_loss_matches_numpy(seed, rng):
    n, r = 3, 20
    pred = rng.normal(size=(n, r, 4)).astype(np.float32)
    tgt = rng.normal(size=(n, r, 4)).astype(np.float32)
    valid = rng.random((n, r)) < 0.7
    fg = valid & (rng.random((n, r)) < 0.3)
    tgt[~fg] = np.inf
    got = float(rc.box_regression_loss(jnp.asarray(pred), jnp.asarray(tgt), jnp.asarray(fg),
                                       jnp.asarray(valid)))
    want = np.abs(pred - tgt)[fg].sum() / max(valid.sum(), 1)
    assert np.isclose(got, want, rtol=1e-5), f"OVD_TEST_SEED={seed}"
    none = float(rc.box_regression_loss(jnp.asarray(pred), jnp.asarray(tgt),
                                        jnp.zeros((n, r), bool), jnp.asarray(valid)))
    assert none == 0.0  # all-background: no box loss, no NaN from the inf targets
