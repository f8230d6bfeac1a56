"""GLIP ATSS losses and inference scores against NumPy references written as plain loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ovd_jax.losses import glip as gl
from ovd_jax.ops import generate_anchors
from ovd_jax.training.sharding import make_mesh

SHAPES = [(8, 8), (4, 4), (2, 2)]
STRIDES = [8, 16, 32]
PER_LEVEL = tuple(h * w for h, w in SHAPES)
ANCHORS = generate_anchors(SHAPES, STRIDES, [[s * 4.0] for s in STRIDES], [1.0], 0.5)


# ----------------------------------------------------------------------------- references


def np_iou(a, b):
    """IoU of two x1y1x2y2 boxes (no +1), 0 for an empty union."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def np_assign(anchors, per_level, gt, valid, topk=9):
    """ATSS for one image: loops over boxes, levels and candidates (float64)."""
    anchors = anchors.astype(np.float64)
    ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    owner = np.full(len(anchors), -1)
    owner_iou = np.full(len(anchors), -np.inf)
    for g in range(len(gt)):
        if not valid[g]:
            continue
        box = gt[g].astype(np.float64)
        gc = (box[:2] + box[2:]) / 2
        cands, start = [], 0
        for n in per_level:
            dist = np.sqrt(((ctr[start:start + n] - gc) ** 2).sum(1))
            cands += [start + j for j in np.argsort(dist, kind="stable")[: min(topk, n)]]
            start += n
        ious = np.array([np_iou(box, anchors[j]) for j in cands])
        thr = ious.mean() + ious.std(ddof=1)
        for j, v in zip(cands, ious):
            margin = min(ctr[j, 0] - box[0], ctr[j, 1] - box[1], box[2] - ctr[j, 0],
                         box[3] - ctr[j, 1])
            if v >= thr and margin > 0.01 and v > owner_iou[j]:
                owner[j], owner_iou[j] = g, v
    return owner


def np_decode(d, a, w=(10.0, 10.0, 5.0, 5.0)):
    aw, ah = a[2] - a[0], a[3] - a[1]
    cx, cy = a[0] + aw / 2, a[1] + ah / 2
    clamp = np.log(1000.0 / 16)
    px, py = d[0] / w[0] * aw + cx, d[1] / w[1] * ah + cy
    pw, ph = np.exp(min(d[2] / w[2], clamp)) * aw, np.exp(min(d[3] / w[3], clamp)) * ah
    return np.array([px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2])


def np_giou_loss(p, t):
    """GLIP GIoULoss for one pair."""
    p = p.copy()
    p[2], p[3] = max(p[0], p[2]), max(p[1], p[3])
    iw, ih = min(p[2], t[2]) - max(p[0], t[0]), min(p[3], t[3]) - max(p[1], t[1])
    inter = iw * ih if (iw > 0 and ih > 0) else 0.0
    union = (p[2] - p[0]) * (p[3] - p[1]) + (t[2] - t[0]) * (t[3] - t[1]) - inter + 1e-7
    enc = (max(p[2], t[2]) - min(p[0], t[0])) * (max(p[3], t[3]) - min(p[1], t[1])) + 1e-7
    return 1 - (inter / union - (enc - union) / enc)


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_losses(logits, deltas, ctr_logits, gt, valid, pmap, tmask, alpha=0.25, gamma=2.0):
    """GLIP ATSSLossComputation (dot-product token loss) written per image and per anchor."""
    cls_sum = giou_sum = ctr_w_sum = bce_sum = 0.0
    npos = 0
    for i in range(len(logits)):
        owner = np_assign(ANCHORS, PER_LEVEL, gt[i], valid[i])
        for j in range(len(ANCHORS)):
            g = owner[j]
            target = (pmap[i, g] > 0).astype(np.float64) if g >= 0 else np.zeros(logits.shape[2])
            for k in range(logits.shape[2]):
                if not tmask[i, k]:
                    continue
                x, y = float(logits[i, j, k]), target[k]
                p = 1 / (1 + np.exp(-x))
                ce = -(y * log_sigmoid(x) + (1 - y) * log_sigmoid(-x))
                p_t = p * y + (1 - p) * (1 - y)
                cls_sum += (alpha * y + (1 - alpha) * (1 - y)) * ce * (1 - p_t) ** gamma
            if g < 0:
                continue
            npos += 1
            a = ANCHORS[j].astype(np.float64)
            box = gt[i, g].astype(np.float64)
            cx, cy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
            lft, top, rgt, bot = cx - box[0], cy - box[1], box[2] - cx, box[3] - cy
            c_t = np.sqrt(min(lft, rgt) / max(lft, rgt) * min(top, bot) / max(top, bot))
            giou_sum += c_t * np_giou_loss(np_decode(deltas[i, j].astype(np.float64), a), box)
            ctr_w_sum += c_t
            z = float(ctr_logits[i, j])
            bce_sum += -(c_t * log_sigmoid(z) + (1 - c_t) * log_sigmoid(-z))
    norm = max(npos, 1)
    box_loss = giou_sum / ctr_w_sum if ctr_w_sum > 0 else 0.0
    return {"cls": cls_sum / norm, "box": 2.0 * box_loss, "centerness": bce_sum / norm,
            "num_pos": npos}


# ----------------------------------------------------------------------------- inputs


def make_batch(rng, n=3, m=5, length=12):
    """Random batch: image 1 has padded boxes, the last image has none; padded tokens."""
    xy = rng.uniform(0, 48, (n, m, 2))
    wh = rng.uniform(10, 40, (n, m, 2))
    gt = np.concatenate([xy, np.minimum(xy + wh, 64)], -1).astype(np.float32)
    valid = np.ones((n, m), bool)
    valid[1, 3:] = False
    valid[-1] = False
    gt[~valid] = 0.0  # padded boxes are zeros, as the pipeline pads them
    ntok = rng.integers(5, length, n)
    tmask = np.arange(length)[None] < ntok[:, None]
    pmap = np.zeros((n, m, length), np.float32)
    for i in range(n):
        for g in range(m):
            if valid[i, g]:
                s = rng.integers(1, ntok[i] - 2)
                pmap[i, g, s: s + rng.integers(1, 3)] = rng.choice([1.0, 0.5])  # nonzero=positive
    a = len(ANCHORS)
    logits = (rng.normal(size=(n, a, length)) * 3).astype(np.float32)
    deltas = (rng.normal(size=(n, a, 4)) * 0.5).astype(np.float32)
    ctr = rng.normal(size=(n, a)).astype(np.float32)
    return logits, deltas, ctr, gt, valid, pmap, tmask


def run_loss(batch, **kw):
    logits, deltas, ctr, gt, valid, pmap, tmask = batch
    f = jax.jit(lambda *args: gl.glip_atss_loss(ANCHORS, PER_LEVEL, *args, **kw))
    return {k: float(v) for k, v in f(logits, deltas, ctr, gt, valid, pmap, tmask).items()}


# ----------------------------------------------------------------------------- tests


def test_atss_assignment_matches_loop(rng, seed):
    logits, deltas, ctr, gt, valid, pmap, tmask = make_batch(rng)
    matched, fg = jax.jit(lambda g, v: gl.glip_atss_assign(ANCHORS, PER_LEVEL, g, v))(gt, valid)
    for i in range(len(gt)):
        want = np_assign(ANCHORS, PER_LEVEL, gt[i], valid[i])
        np.testing.assert_array_equal(np.where(fg[i], matched[i], -1), want,
                                      err_msg=f"seed={seed} image {i}")
    assert fg[0].any() and not fg[-1].any(), seed


def test_loss_terms_match_numpy(rng, seed):
    batch = make_batch(rng)
    got = run_loss(batch)
    want = np_losses(*batch)
    assert want["num_pos"] > 0, seed
    assert got["num_pos"] == want["num_pos"], f"seed={seed}"
    for k in ("cls", "box", "centerness"):
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, err_msg=f"{k} seed={seed}")
    np.testing.assert_allclose(got["total"], got["cls"] + got["box"] + got["centerness"],
                               rtol=1e-6)
    # The weights scale their terms; alpha < 0 disables the alpha weighting like upstream.
    half = run_loss(batch, giou_weight=1.0, centerness_weight=0.5)
    np.testing.assert_allclose(half["box"], got["box"] / 2, rtol=1e-6)
    np.testing.assert_allclose(half["centerness"], got["centerness"] / 2, rtol=1e-6)


def test_padding_contributes_nothing(rng, seed):
    batch = make_batch(rng)
    logits, deltas, ctr, gt, valid, pmap, tmask = batch
    base = run_loss(batch)
    logits2 = np.where(tmask[:, None, :], logits, rng.normal(size=logits.shape) * 50)
    gt2 = np.where(valid[..., None], gt, rng.uniform(0, 64, gt.shape)).astype(np.float32)
    pmap2 = np.where(valid[..., None], pmap, 1.0).astype(np.float32)
    pmap2 = np.where(tmask[:, None, :], pmap2, 1.0).astype(np.float32)  # padded-token targets
    other = run_loss((logits2.astype(np.float32), deltas, ctr, gt2, valid, pmap2, tmask))
    for k in base:
        np.testing.assert_allclose(other[k], base[k], rtol=1e-6, err_msg=f"{k} seed={seed}")


def test_image_without_boxes_and_gradients(rng, seed):
    logits, deltas, ctr, gt, valid, pmap, tmask = make_batch(rng)
    empty = (logits, deltas, ctr, gt, np.zeros_like(valid), pmap, tmask)
    got = run_loss(empty)
    want = np_losses(*empty)
    assert got["num_pos"] == 0 and got["box"] == 0 and got["centerness"] == 0
    np.testing.assert_allclose(got["cls"], want["cls"], rtol=2e-5, err_msg=f"seed={seed}")

    def total(lg, d, c, v):
        return gl.glip_atss_loss(ANCHORS, PER_LEVEL, lg, d, c, gt, v, pmap, tmask)["total"]

    for v in (valid, np.zeros_like(valid)):
        grads = jax.jit(jax.grad(total, argnums=(0, 1, 2)))(logits, deltas, ctr, v)
        for g in grads:
            assert np.isfinite(np.asarray(g)).all(), f"seed={seed}"
        # Padded tokens get no gradient.
        assert not np.asarray(grads[0])[~np.broadcast_to(tmask[:, None], logits.shape)].any()


def test_sharded_batch_gives_the_global_loss(rng, seed):
    """Under jit with the batch sharded over 8 devices, sums and counts are global."""
    batch = make_batch(rng, n=8)
    ref = run_loss(batch)
    mesh = make_mesh((8, 1, 1))  # the training mesh (data, fsdp, model)
    spec = PartitionSpec(("data", "fsdp"))
    sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x in batch]
    f = jax.jit(lambda *a: gl.glip_atss_loss(ANCHORS, PER_LEVEL, *a))
    out = f(*sharded)
    jax.block_until_ready(out)
    for k in ref:
        np.testing.assert_allclose(float(out[k]), ref[k], rtol=1e-5, err_msg=f"{k} seed={seed}")


def test_glip_scores_mean_of_token_sigmoids(rng, seed):
    n, a, length, k = 2, 7, 10, 4
    logits = rng.normal(size=(n, a, length)).astype(np.float32) * 3
    ctr = rng.normal(size=(n, a)).astype(np.float32)
    tokens = [sorted(rng.choice(np.arange(1, length), rng.integers(1, 4), replace=False))
              for _ in range(k - 1)]
    cmap = np.zeros((k, length), np.float32)  # last class row: padding
    for c, toks in enumerate(tokens):
        cmap[c, toks] = 1.0 / len(toks)
    got = np.asarray(jax.jit(gl.glip_scores)(logits, ctr, cmap))
    assert got.shape == (n, a, k)
    sig = 1 / (1 + np.exp(-logits.astype(np.float64)))
    for i in range(n):
        for j in range(a):
            for c, toks in enumerate(tokens):
                mean = np.mean([sig[i, j, t] for t in toks])
                want = np.sqrt(mean / (1 + np.exp(-float(ctr[i, j]))))
                np.testing.assert_allclose(got[i, j, c], want, rtol=1e-5, err_msg=f"seed={seed}")
    assert not got[..., -1].any()
    per_image = np.asarray(gl.glip_scores(logits, ctr, np.stack([cmap, cmap])))
    np.testing.assert_allclose(per_image, got, rtol=1e-6)


def test_bad_anchor_levels(rng):
    logits, deltas, ctr, gt, valid, pmap, tmask = make_batch(rng)
    with pytest.raises(ValueError, match="num_anchors_per_level sums to"):
        gl.glip_atss_loss(ANCHORS, (10, 10), jnp.asarray(logits), deltas, ctr, gt, valid, pmap,
                          tmask)
