"""RegionCLIP pretraining losses against plain NumPy written the way upstream computes them
(PretrainFastRCNN / MILCrossEntropy / F.kl_div / F.cross_entropy), on fresh random inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovd_jax.losses import regionclip_pretrain as L
from ovd_jax.training import sharding as shd

TAU = 0.01


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def _np_pseudo_labels(t_emb, concepts, valid, thr=0.1):
    """get_psuedo_concept_labels on the flattened pool, with the all-rejected fallback."""
    probs = _softmax(t_emb @ concepts.T / TAU)
    keep = valid & (probs.max(-1) > thr)
    if not keep.any():
        keep = valid.copy()
    return probs.argmax(-1), keep, probs


def _np_region_concept(s_emb, concepts, labels, keep):
    """Upstream's form: kept regions x target embeddings of all kept regions ([#kept, #kept],
    duplicates included), label matrix, -log of the summed positive softmax mass, mean."""
    idx = np.flatnonzero(keep)
    if len(idx) == 0:
        return 0.0
    target = concepts[labels[idx]]
    scores = s_emb[idx] @ target.T / TAU
    label_mtx = (labels[idx][:, None] == labels[idx][None, :]).astype(np.float64)
    probs = _softmax(scores)
    return float(np.mean(-np.log(np.sum(label_mtx * probs, axis=1))))


def _np_kl(s_emb, t_probs, concepts, keep):
    """F.kl_div(log softmax(student), teacher, reduction='batchmean') over the kept regions."""
    idx = np.flatnonzero(keep)
    if len(idx) == 0:
        return 0.0
    logits = s_emb[idx] @ concepts.T / TAU
    log_q = logits - logits.max(-1, keepdims=True)
    log_q = log_q - np.log(np.exp(log_q).sum(-1, keepdims=True))
    p = t_probs[idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - log_q), 0.0)
    return float(terms.sum() / len(idx))


def _np_image_text(img, txt, valid):
    idx = np.flatnonzero(valid)
    logits = img[idx] @ txt[idx].T / TAU

    def ce(lg):
        lg = lg - lg.max(-1, keepdims=True)
        return np.mean(np.log(np.exp(lg).sum(-1)) - np.diagonal(lg))

    return 0.5 * (ce(logits) + ce(logits.T))


def _inputs(rng, n=3, r=9, k=7, d=16):
    s_emb = _unit(rng, n, r, d)
    concepts = _unit(rng, k, d)
    # Teachers near some concepts (so that some, not all, regions pass the 0.1 threshold).
    near = concepts[rng.integers(0, k, (n, r))]
    t_emb = near * rng.uniform(0.0, 1.0, (n, r, 1)) + _unit(rng, n, r, d) * 0.3
    t_emb /= np.linalg.norm(t_emb, axis=-1, keepdims=True)
    valid = rng.random((n, r)) < 0.8
    return s_emb.astype(np.float32), t_emb.astype(np.float32), concepts.astype(np.float32), valid


def test_pseudo_labels_match_numpy(rng, seed):
    s_emb, t_emb, concepts, valid = _inputs(rng)
    labels, keep, probs = L.pseudo_labels(jnp.asarray(t_emb), jnp.asarray(concepts),
                                          jnp.asarray(valid))
    ref_l, ref_k, ref_p = _np_pseudo_labels(t_emb.reshape(-1, t_emb.shape[-1]).astype(np.float64),
                                            concepts.astype(np.float64), valid.reshape(-1))
    np.testing.assert_allclose(np.asarray(probs).reshape(ref_p.shape), ref_p, atol=2e-5,
                               err_msg=f"seed={seed}")
    np.testing.assert_array_equal(np.asarray(keep).reshape(-1), ref_k, err_msg=f"seed={seed}")
    np.testing.assert_array_equal(np.asarray(labels).reshape(-1)[ref_k], ref_l[ref_k])
    assert 0 < ref_k.sum() < valid.sum() or ref_k.sum() == valid.sum(), seed
    # Nothing passes the threshold: every valid region is kept (upstream's fallback).
    _, keep, _ = L.pseudo_labels(jnp.asarray(t_emb), jnp.asarray(concepts), jnp.asarray(valid),
                                 threshold=1.0)
    np.testing.assert_array_equal(np.asarray(keep), valid)


@pytest.mark.parametrize("case", ["random", "one_label", "single_kept", "none_kept"])
def test_region_concept_contrastive_matches_upstream_form(rng, seed, case):
    s_emb, _, concepts, _ = _inputs(rng)
    n, r = s_emb.shape[:2]
    labels = rng.integers(0, concepts.shape[0], (n, r))
    keep = rng.random((n, r)) < 0.6
    if case == "one_label":  # every kept region shares one concept: loss 0 (all positives)
        labels[:] = 2
    elif case == "single_kept":
        keep[:] = False
        keep[1, 3] = True
    elif case == "none_kept":
        keep[:] = False
    fn = jax.jit(L.region_concept_contrastive)
    got = float(fn(s_emb, concepts, labels, keep, TAU))
    want = _np_region_concept(s_emb.reshape(-1, s_emb.shape[-1]).astype(np.float64),
                              concepts.astype(np.float64), labels.reshape(-1), keep.reshape(-1))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"seed={seed} {case}")
    if case in ("one_label", "single_kept", "none_kept"):
        assert abs(got) < 1e-5, (seed, case, got)
    grads = jax.grad(lambda e: L.region_concept_contrastive(e, concepts, labels, keep, TAU))(
        jnp.asarray(s_emb))
    assert np.isfinite(np.asarray(grads)).all(), (seed, case)
    if case == "none_kept":
        assert not np.asarray(grads).any()


def test_distillation_kl_matches_numpy_and_vanishes_for_identical_models(rng, seed):
    s_emb, t_emb, concepts, valid = _inputs(rng)
    _, keep, t_probs = L.pseudo_labels(jnp.asarray(t_emb), jnp.asarray(concepts),
                                       jnp.asarray(valid))
    t_probs = np.asarray(t_probs, np.float64)
    t_probs[0, 0, :] = 0.0  # exact zeros (underflowed teacher probabilities) count 0 log 0 = 0
    t_probs[0, 0, 1] = 1.0
    keep = np.asarray(keep)
    got = float(jax.jit(L.distillation_kl)(s_emb, t_probs.astype(np.float32), concepts, keep))
    flat = s_emb.reshape(-1, s_emb.shape[-1]).astype(np.float64)
    want = _np_kl(flat, t_probs.reshape(flat.shape[0], -1), concepts.astype(np.float64),
                  keep.reshape(-1))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"seed={seed}")
    # Student == teacher: the student's own distribution as target gives KL 0 (and 0 gradient).
    _, keep_s, own = L.pseudo_labels(jnp.asarray(s_emb), jnp.asarray(concepts),
                                     jnp.asarray(valid))
    kl_fn = functools.partial(L.distillation_kl, teacher_probs=own, concept_emb=concepts,
                              keep=keep_s)
    assert abs(float(kl_fn(jnp.asarray(s_emb)))) < 1e-5, seed
    g = jax.grad(lambda e: kl_fn(e))(jnp.asarray(s_emb))
    assert float(jnp.abs(g).max()) < 1e-3, seed
    assert float(L.distillation_kl(s_emb, own, concepts, np.zeros_like(valid))) == 0.0


def test_image_text_contrastive_matches_numpy(rng, seed):
    b, d = 10, 16
    img, txt = _unit(rng, b, d).astype(np.float32), _unit(rng, b, d).astype(np.float32)
    txt[:4] = (img[:4] + 0.3 * txt[:4]) / np.linalg.norm(img[:4] + 0.3 * txt[:4], axis=-1,
                                                         keepdims=True)
    valid = rng.random(b) < 0.8
    valid[:2] = True
    got = float(jax.jit(L.image_text_contrastive)(img, txt, TAU, valid))
    want = _np_image_text(img.astype(np.float64), txt.astype(np.float64), valid)
    np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=f"seed={seed}")
    # Padding entries change nothing: the loss over the valid entries alone is the same.
    alone = float(L.image_text_contrastive(img[valid], txt[valid], TAU))
    np.testing.assert_allclose(got, alone, rtol=1e-5, err_msg=f"seed={seed}")


def test_image_text_contrastive_over_eight_devices_equals_one(rng, seed):
    """Negatives come from the whole mesh: the loss (and gradient) of a batch sharded over 8
    devices equals the single-device one."""
    assert jax.device_count() == 8
    b, d = 16, 8
    img, txt = _unit(rng, b, d).astype(np.float32), _unit(rng, b, d).astype(np.float32)
    valid = rng.random(b) < 0.9

    def loss_and_grad(devices, img, txt, valid):
        mesh = shd.make_mesh((-1, 1, 1), devices=devices)  # the training mesh (data, fsdp, model)
        args = [jax.device_put(x, shd.batch_sharding(mesh)) for x in (img, txt, valid)]
        fn = jax.jit(jax.value_and_grad(lambda i, t, v: L.image_text_contrastive(i, t, TAU, v)))
        out = fn(*args)
        jax.block_until_ready(out)
        return out, args[0]

    (l8, g8), sharded = loss_and_grad(jax.devices(), img, txt, valid)
    (l1, g1), _ = loss_and_grad(jax.devices()[:1], img, txt, valid)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(float(l8), float(l1), rtol=1e-6, err_msg=f"seed={seed}")
    np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-5, atol=1e-6)
    # Not a per-device loss: the mean of 8 per-shard losses differs.
    shards = [slice(2 * i, 2 * i + 2) for i in range(8)]
    per_shard = np.mean([float(L.image_text_contrastive(img[s], txt[s], TAU, valid[s]))
                         for s in shards])
    assert abs(per_shard - float(l1)) > 1e-3, seed
