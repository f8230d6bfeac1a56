"""RegionCLIP target assignment, proposal selection and detection selection vs NumPy.

The references below are written from detectron2's definitions (Matcher, subsample_labels,
Box2BoxTransform, find_top_rpn_proposals, fast_rcnn_inference_single_image), plain NumPy loops.
Sampling is random, so sampled sets are checked by their defining properties (subset of the
eligible entries, exact counts) and every per-entry target is compared exactly.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ovd_jax.methods import regionclip as rc
from ovd_jax.models.rpn import select_proposals
from ovd_jax.ops import anchors as anchor_ops

CLAMP = np.log(1000.0 / 16)


def np_iou(a, b):
    out = np.zeros((len(a), len(b)), np.float64)
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            w = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            h = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = w * h
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def np_match(iou, thresholds, labels, low_quality):
    """detectron2 Matcher on [G, A]: (matched gt [A], label [A])."""
    g, a = iou.shape
    if g == 0:
        return np.zeros(a, int), np.full(a, labels[0])
    matched = iou.argmax(0)
    vals = iou.max(0)
    lab = np.empty(a, int)
    bounds = [-np.inf, *thresholds, np.inf]
    for k in range(len(labels)):
        lab[(vals >= bounds[k]) & (vals < bounds[k + 1])] = labels[k]
    if low_quality:
        for row in iou:
            lab[row == row.max()] = 1
    return matched, lab


def np_encode(ref, tgt, w=(1.0, 1.0, 1.0, 1.0)):
    rw, rh = ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
    rx, ry = ref[:, 0] + 0.5 * rw, ref[:, 1] + 0.5 * rh
    tw, th = tgt[:, 2] - tgt[:, 0], tgt[:, 3] - tgt[:, 1]
    tx, ty = tgt[:, 0] + 0.5 * tw, tgt[:, 1] + 0.5 * th
    return np.stack([w[0] * (tx - rx) / rw, w[1] * (ty - ry) / rh,
                     w[2] * np.log(tw / rw), w[3] * np.log(th / rh)], 1)


def np_decode(deltas, ref, w=(1.0, 1.0, 1.0, 1.0)):
    rw, rh = ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
    rx, ry = ref[:, 0] + 0.5 * rw, ref[:, 1] + 0.5 * rh
    dx, dy = deltas[:, 0] / w[0], deltas[:, 1] / w[1]
    dw = np.minimum(deltas[:, 2] / w[2], CLAMP)
    dh = np.minimum(deltas[:, 3] / w[3], CLAMP)
    cx, cy = dx * rw + rx, dy * rh + ry
    ww, hh = np.exp(dw) * rw, np.exp(dh) * rh
    return np.stack([cx - 0.5 * ww, cy - 0.5 * hh, cx + 0.5 * ww, cy + 0.5 * hh], 1)


def np_nms(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    iou = np_iou(boxes, boxes)
    for i in order:
        if all(iou[i, j] <= thr for j in keep):
            keep.append(i)
    return keep


def _model_cfg(**kw):
    m = ml_collections.ConfigDict(dict(
        rpn_iou_thresholds=(0.3, 0.7), rpn_batch_size_per_image=64, rpn_positive_fraction=0.5,
        roi_iou_threshold=0.5, roi_batch_size_per_image=24, roi_positive_fraction=0.25,
        box_reg_weights=(10.0, 10.0, 5.0, 5.0)))
    m.update(kw)
    return m


def _random_boxes(rng, n, size):
    xy = rng.uniform(0, size * 0.7, (n, 2))
    wh = rng.uniform(size * 0.05, size * 0.4, (n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, size)], 1).astype(np.float32)


def test_rpn_targets_match_numpy(seed, rng):
    m = _model_cfg()
    anchors = anchor_ops.generate_anchors([(6, 6)], [16], [(16, 32, 64)], (0.5, 1.0, 2.0))
    for num_valid in (3, 0):  # an image with boxes, and one with none (all background)
        gt = _random_boxes(rng, 5, 96)
        valid = np.arange(5) < num_valid
        fg, bg, deltas = rc._rpn_targets(jax.random.key(seed), jnp.asarray(anchors),
                                         jnp.asarray(gt), jnp.asarray(valid), m)
        fg, bg, deltas = map(np.asarray, (fg, bg, deltas))
        iou = np_iou(gt[valid], anchors)
        matched, labels = np_match(iou, (0.3, 0.7), (0, -1, 1), True)
        pos, neg = labels == 1, labels == 0
        msg = f"OVD_TEST_SEED={seed}, valid={num_valid}"
        assert not (fg & ~pos).any() and not (bg & ~neg).any(), msg
        n_fg = min(pos.sum(), int(64 * 0.5))
        assert fg.sum() == n_fg and bg.sum() == min(neg.sum(), 64 - n_fg), msg
        if num_valid:
            ref = np_encode(anchors[fg].astype(np.float64), gt[valid][matched[fg]])
            np.testing.assert_allclose(deltas[fg], ref, rtol=1e-4, atol=1e-5, err_msg=msg)


def test_roi_targets_match_numpy(seed, rng):
    m = _model_cfg()
    for num_gt in (4, 0):
        gt = _random_boxes(rng, 6, 128)
        gt_valid = np.arange(6) < num_gt
        labels_in = rng.integers(0, 7, 6).astype(np.int32)
        # Proposals: jittered copies of gt boxes (foregrounds) and random boxes; some padding.
        near = gt[rng.integers(0, 6, 10)] + rng.normal(0, 3, (10, 4)).astype(np.float32)
        props = np.concatenate([near, _random_boxes(rng, 30, 128)]).astype(np.float32)
        prop_valid = rng.random(40) < 0.8
        out = rc._roi_targets(jax.random.key(seed), jnp.asarray(props), jnp.asarray(prop_valid),
                              jnp.asarray(gt), jnp.asarray(labels_in), jnp.asarray(gt_valid), m)
        boxes, valid, fg, cls_t, box_t = map(np.asarray, out)
        msg = f"OVD_TEST_SEED={seed}, gt={num_gt}"
        cand = np.concatenate([props, gt])
        cand_valid = np.concatenate([prop_valid, gt_valid])
        iou = np_iou(gt[gt_valid], cand)
        matched, lab = np_match(iou, (0.5,), (0, 1), False)
        lab = np.where(cand_valid, lab, -1)
        # Which candidate each sampled RoI is (candidates are distinct random floats).
        idx = [int(np.flatnonzero((cand == b).all(1) & cand_valid)[0]) for b in boxes[valid]]
        assert len(set(idx)) == len(idx), msg
        idx = np.asarray(idx, int)
        n_pos, n_neg = (lab == 1).sum(), (lab == 0).sum()
        n_fg = min(n_pos, int(24 * 0.25))
        assert fg[valid].sum() == n_fg and valid.sum() == n_fg + min(n_neg, 24 - n_fg), msg
        assert not fg[~valid].any() and valid[: valid.sum()].all(), msg  # sampled ones first
        np.testing.assert_array_equal(lab[idx] == 1, fg[valid], err_msg=msg)
        gt_ids = np.flatnonzero(gt_valid)
        want_cls = np.where(lab[idx] == 1, labels_in[gt_ids[matched[idx]]] + 1 if num_gt else 0, 0)
        np.testing.assert_array_equal(cls_t[valid], want_cls, err_msg=msg)
        sel = fg & valid
        if sel.any():
            ref = np_encode(boxes[sel].astype(np.float64), gt[gt_ids[matched[idx[fg[valid]]]]],
                            (10.0, 10.0, 5.0, 5.0))
            np.testing.assert_allclose(box_t[sel], ref, rtol=1e-4, atol=1e-4, err_msg=msg)


def test_proposal_selection_matches_numpy(seed, rng):
    anchors = anchor_ops.generate_anchors([(8, 8)], [16], [(16, 32, 64)], (0.5, 1.0, 2.0))
    a = len(anchors)
    logits = rng.normal(size=a).astype(np.float32)
    deltas = rng.normal(0, 0.3, (a, 4)).astype(np.float32)
    deltas[:5, 2] = -12.0  # a few boxes collapse to zero width: dropped as empty
    hw = np.asarray([100, 120], np.int32)
    pre, post, thr = 150, 40, 0.6
    boxes, out_logits, valid = map(np.asarray, select_proposals(
        jnp.asarray(anchors), jnp.asarray(logits), jnp.asarray(deltas), jnp.asarray(hw),
        pre_nms_topk=pre, post_nms_topk=post, nms_threshold=thr))
    # detectron2 order: top-k logits, decode, clip, drop empty, NMS, keep post_nms_topk.
    top = np.argsort(-logits, kind="stable")[:pre]
    dec = np_decode(deltas[top].astype(np.float64), anchors[top].astype(np.float64))
    dec[:, [0, 2]] = dec[:, [0, 2]].clip(0, hw[1])
    dec[:, [1, 3]] = dec[:, [1, 3]].clip(0, hw[0])
    ok = ((dec[:, 2] - dec[:, 0]) > 0) & ((dec[:, 3] - dec[:, 1]) > 0)
    keep = np_nms(dec[ok], logits[top][ok], thr)[:post]
    msg = f"OVD_TEST_SEED={seed}"
    assert valid.sum() == len(keep) and valid[: len(keep)].all(), msg
    np.testing.assert_allclose(boxes[: len(keep)], dec[ok][keep], rtol=1e-4, atol=1e-3, err_msg=msg)
    np.testing.assert_allclose(out_logits[: len(keep)], logits[top][ok][keep], err_msg=msg)
    assert np.all(out_logits[len(keep):] == -np.inf), msg


def test_detection_selection_matches_numpy(seed, rng):
    """Per-class NMS over every (proposal, class) pair above the threshold, then the top D."""
    p, k, d = 30, 5, 12
    boxes = _random_boxes(rng, p, 100)
    probs = rng.dirichlet(np.ones(k + 1), p)[:, 1:].astype(np.float32)
    valid = rng.random(p) < 0.9
    e = ml_collections.ConfigDict(dict(score_threshold=0.05, nms_threshold=0.5,
                                       max_detections=d, pre_nms_topk=0))
    out = rc.per_class_nms(jnp.asarray(boxes), jnp.asarray(probs), jnp.asarray(valid), e)
    out = {key: np.asarray(v) for key, v in out.items()}
    ref = []
    for c in range(k):
        cand = np.flatnonzero(valid & (probs[:, c] > 0.05))
        for i in np_nms(boxes[cand], probs[cand, c], 0.5):
            ref.append((probs[cand[i], c], c, cand[i]))
    ref.sort(key=lambda t: -t[0])
    ref = ref[:d]
    n = out["valid"].sum()
    msg = f"OVD_TEST_SEED={seed}"
    assert n == len(ref), msg
    np.testing.assert_allclose(out["scores"][:n], [r[0] for r in ref], err_msg=msg)
    np.testing.assert_array_equal(out["classes"][:n], [r[1] for r in ref], err_msg=msg)
    np.testing.assert_allclose(out["boxes"][:n], boxes[[r[2] for r in ref]], err_msg=msg)
