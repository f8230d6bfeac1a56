"""DetCLIPv2 word-region alignment: set similarity and the text->image contrastive loss against
plain NumPy, their invariances, proposal selection, and global negatives under sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovd_jax.losses import detclipv2 as L
from ovd_jax.training import sharding as shd


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(rng, b=5, m=4, p=6, d=8):
    concepts = _unit(rng.normal(size=(b, m, d))).astype(np.float32)
    regions = _unit(rng.normal(size=(b, p, d))).astype(np.float32)
    cvalid = rng.random((b, m)) < 0.7
    cvalid[:, 0] = True  # every caption keeps a concept (the last one drops all below)
    rvalid = rng.random((b, p)) < 0.7
    rvalid[:, 0] = True
    return concepts, cvalid, regions, rvalid


def _np_set_similarity(concepts, cvalid, regions, rvalid, aggregation="max", tau_t=0.1):
    b = concepts.shape[0]
    out = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            vals = []
            if not rvalid[j].any():
                continue  # no proposal: the column is masked by the caller
            for t in np.flatnonzero(cvalid[i]):
                s = np.array([float(np.dot(concepts[i, t].astype(np.float64), regions[j, k]))
                              for k in np.flatnonzero(rvalid[j])])
                if aggregation == "max":
                    vals.append(s.max())
                else:
                    w = np.exp((s - s.max()) / tau_t)
                    vals.append(float(np.sum(w / w.sum() * s)))
            out[i, j] = np.mean(vals) if vals else 0.0
    return out


def _np_contrastive(sim, tau, text_valid, image_valid):
    losses = []
    for i in range(sim.shape[0]):
        if not (text_valid[i] and image_valid[i]):
            continue
        logits = sim[i, image_valid] / tau
        own = sim[i, i] / tau
        mx = logits.max()
        losses.append(mx + np.log(np.sum(np.exp(logits - mx))) - own)
    return float(np.mean(losses)) if losses else 0.0


@pytest.mark.parametrize("aggregation", ["max", "softmax"])
def test_set_similarity_matches_numpy(seed, aggregation):
    rng = np.random.default_rng(seed)
    c, cv, r, rv = _inputs(rng)
    got = L.set_similarity(jnp.asarray(c), jnp.asarray(cv), jnp.asarray(r), jnp.asarray(rv),
                           aggregation=aggregation, tau_t=0.2)
    want = _np_set_similarity(c, cv, r, rv, aggregation, 0.2)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6,
                               err_msg=f"seed={seed}")


def test_set_similarity_invariant_to_permutations(seed):
    rng = np.random.default_rng(seed)
    c, cv, r, rv = _inputs(rng)
    base = np.asarray(L.set_similarity(c, cv, r, rv))
    for aggregation in ("max", "softmax"):
        base = np.asarray(L.set_similarity(c, cv, r, rv, aggregation=aggregation))
        pc = rng.permutation(c.shape[1])
        pr = rng.permutation(r.shape[1])
        perm = np.asarray(L.set_similarity(c[:, pc], cv[:, pc], r[:, pr], rv[:, pr],
                                           aggregation=aggregation))
        np.testing.assert_allclose(perm, base, rtol=1e-5, atol=1e-6,
                                   err_msg=f"seed={seed} {aggregation}")
    # Padding is inert: garbage in padded concept / region slots changes nothing.
    c2 = np.where(cv[..., None], c, 5.0).astype(np.float32)
    r2 = np.where(rv[..., None], r, -7.0).astype(np.float32)
    np.testing.assert_allclose(np.asarray(L.set_similarity(c2, cv, r2, rv)),
                               np.asarray(L.set_similarity(c, cv, r, rv)), rtol=1e-6, atol=1e-7)


def test_softmax_weighted_tends_to_max(seed):
    rng = np.random.default_rng(seed)
    c, cv, r, rv = _inputs(rng)
    hard = np.asarray(L.set_similarity(c, cv, r, rv, aggregation="max"))
    gaps = []
    for tau in (1.0, 0.1, 0.01, 1e-4):
        soft = np.asarray(L.set_similarity(c, cv, r, rv, aggregation="softmax", tau_t=tau))
        assert np.all(soft <= hard + 1e-6)  # a weighted mean never exceeds the max
        gaps.append(float(np.max(hard - soft)))
    assert gaps == sorted(gaps, reverse=True), gaps
    assert gaps[-1] < 1e-4, (seed, gaps)


def test_contrastive_matches_numpy_with_padding(seed):
    rng = np.random.default_rng(seed)
    c, cv, r, rv = _inputs(rng, b=6)
    cv[2] = False  # a caption with no concept left
    rv[4] = False  # an image with no proposal: neither a row nor a negative
    sim = L.set_similarity(c, cv, r, rv)
    text_valid, image_valid = cv.any(-1), rv.any(-1)
    got = L.text_to_image_contrastive(sim, 0.07, jnp.asarray(text_valid), jnp.asarray(image_valid))
    want = _np_contrastive(_np_set_similarity(c, cv, r, rv), 0.07, text_valid, image_valid)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, err_msg=f"seed={seed}")


def _np_nms_topk(boxes, scores, pre, thr, k):
    order = np.argsort(-scores, kind="stable")[:pre]
    keep = []
    for i in order:
        ok = True
        for j in keep:
            x1, y1 = np.maximum(boxes[i, :2], boxes[j, :2])
            x2, y2 = np.minimum(boxes[i, 2:], boxes[j, 2:])
            inter = max(x2 - x1, 0) * max(y2 - y1, 0)
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            if inter / (area(boxes[i]) + area(boxes[j]) - inter) > thr:
                ok = False
                break
        if ok:
            keep.append(int(i))
        if len(keep) == k:
            break
    return keep


def test_proposals_are_max_similarity_then_nms(seed):
    rng = np.random.default_rng(seed)
    n, a, d, c = 2, 40, 8, 7
    emb = _unit(rng.normal(size=(n, a, d))).astype(np.float32)
    concepts = _unit(rng.normal(size=(c, d))).astype(np.float32)
    cvalid = rng.random(c) < 0.6
    cvalid[0] = True
    xy = rng.uniform(0, 60, size=(n, a, 2))
    wh = rng.uniform(4, 30, size=(n, a, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    obj = np.asarray(L.proposal_objectness(emb, concepts, cvalid))
    want = np.max(np.einsum("nad,cd->nac", emb, concepts)[..., cvalid], axis=-1)
    np.testing.assert_allclose(obj, want, rtol=1e-5, atol=1e-6)
    idx, valid = L.select_proposals(boxes, obj, num_proposals=5, nms_threshold=0.5,
                                    pre_nms_topk=20)
    for i in range(n):
        ref = _np_nms_topk(boxes[i], obj[i], 20, 0.5, 5)
        assert list(np.asarray(idx[i])[np.asarray(valid[i])]) == ref, (seed, i)


def _image_text_case(rng, b=8, a=30, m=3, d=8):
    emb = _unit(rng.normal(size=(b, a, d))).astype(np.float32)
    xy = rng.uniform(0, 50, size=(b, a, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 30, size=(b, a, 2))], -1).astype(np.float32)
    concepts = _unit(rng.normal(size=(b, m, d))).astype(np.float32)
    cvalid = rng.random((b, m)) < 0.7
    cvalid[:, 0] = True
    ivalid = np.ones(b, bool)
    return emb, boxes, concepts, cvalid, ivalid


_KW = dict(num_proposals=4, nms_threshold=0.5, pre_nms_topk=12, aggregation="max", tau_t=0.1,
           temperature=0.05)


def test_loss_sharded_over_eight_devices_equals_one_device(seed):
    assert jax.device_count() == 8
    rng = np.random.default_rng(seed)
    args = _image_text_case(rng)
    fn = jax.jit(lambda *x: L.image_text_loss(*x, **_KW)["cts"])
    one = float(fn(*[jax.device_put(x, jax.devices()[0]) for x in args]))
    mesh = shd.make_mesh((-1, 1, 1))
    sharded = [jax.device_put(x, shd.batch_sharding(mesh)) for x in args]
    assert len(sharded[0].sharding.device_set) == 8
    eight = float(fn(*sharded))
    np.testing.assert_allclose(eight, one, rtol=1e-5, err_msg=f"seed={seed}")
    # A per-device loss (one image per device: no negatives at all) would be 0: the 8-device
    # value is the global-batch loss, not an average of local ones.
    local = np.mean([float(L.image_text_loss(*[x[k:k + 1] for x in args], **_KW)["cts"])
                     for k in range(8)])
    assert local == 0.0 and eight > 0.1, (local, eight)


def test_image_text_loss_gradient_reaches_regions_and_concepts(seed):
    rng = np.random.default_rng(seed)
    emb, boxes, concepts, cvalid, ivalid = _image_text_case(rng, b=4)

    def f(e, c):
        return L.image_text_loss(e, boxes, c, cvalid, ivalid, **_KW)["cts"]

    ge, gc = jax.grad(f, argnums=(0, 1))(emb, concepts)
    assert np.abs(np.asarray(ge)).sum() > 0 and np.abs(np.asarray(gc)).sum() > 0
    assert np.all(np.asarray(gc)[~cvalid] == 0)  # padded concepts get no gradient


def test_concept_atss_loss_ignores_padding_concepts(seed):
    rng = np.random.default_rng(seed)
    n, k, g = 2, 5, 3
    anchors = np.stack(np.meshgrid(np.arange(4) * 16 + 8.0, np.arange(4) * 16 + 8.0), -1)
    anchors = anchors.reshape(-1, 2)
    anchors = np.concatenate([anchors - 16, anchors + 16], -1).astype(np.float32)
    a = anchors.shape[0]
    logits = rng.normal(size=(n, a, k)).astype(np.float32)
    deltas = rng.normal(size=(n, a, 4)).astype(np.float32) * 0.1
    ctr = rng.normal(size=(n, a)).astype(np.float32)
    xy = rng.uniform(0, 30, size=(n, g, 2))
    gt = np.concatenate([xy, xy + rng.uniform(10, 30, size=(n, g, 2))], -1).astype(np.float32)
    gvalid = np.ones((n, g), bool)
    cvalid = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)
    box_concepts = np.zeros((n, g, k), np.float32)
    box_concepts[:, np.arange(g), [0, 1, 0]] = 1.0
    kw = dict(topk=3)
    base = L.concept_atss_loss(anchors, [a], logits, deltas, ctr, gt, gvalid, box_concepts,
                               cvalid, **kw)
    garbage = np.where(cvalid[:, None, :], logits, 50.0).astype(np.float32)
    again = L.concept_atss_loss(anchors, [a], garbage, deltas, ctr, gt, gvalid, box_concepts,
                                cvalid, **kw)
    for key in ("align", "reg", "center"):
        np.testing.assert_allclose(float(again[key]), float(base[key]), rtol=1e-6)
    assert float(base["num_pos"]) > 0
