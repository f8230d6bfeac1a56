"""IoU matcher, balanced sampling and ATSS against plain NumPy loop references."""

import jax
import jax.numpy as jnp
import numpy as np

from ovd_jax.ops import atss_assign, box_iou, generate_anchors, iou_matcher, sample_balanced


def np_matcher(iou, valid, thresholds, labels, low_quality):
    """detectron2 Matcher written as loops over anchors and gts."""
    g, a = iou.shape
    matched = np.zeros(a, np.int64)
    out = np.full(a, labels[0], np.int64)
    gts = [i for i in range(g) if valid[i]]
    if not gts:
        return matched, out
    bounds = [-np.inf] + list(thresholds) + [np.inf]
    for j in range(a):
        best, arg = -np.inf, 0
        for i in gts:
            if iou[i, j] > best:
                best, arg = iou[i, j], i
        matched[j] = arg
        for lab, lo, hi in zip(labels, bounds[:-1], bounds[1:]):
            if lo <= best < hi:
                out[j] = lab
    if low_quality:
        for i in gts:
            m = max(iou[i])
            for j in range(a):
                if iou[i, j] == m:
                    out[j] = 1
    return matched, out


def test_iou_matcher_equals_loop(rng, seed):
    anchors = generate_anchors([(6, 7)], [16], [[24.0, 48.0]], [0.5, 1.0, 2.0], 0.5)
    for case in range(4):
        g = 5
        xy = rng.uniform(0, 100, (g, 2))
        gt = np.concatenate([xy, xy + rng.uniform(2, 60, (g, 2))], 1).astype(np.float32)
        valid = rng.random(g) < 0.7
        if case == 0:
            valid[:] = False
        iou = np.asarray(box_iou(gt, anchors))
        lq = case != 1
        m, lab = jax.jit(iou_matcher, static_argnums=(2, 3, 4))(
            iou, valid, (0.3, 0.7), (0, -1, 1), lq
        )
        rm, rl = np_matcher(iou, valid, (0.3, 0.7), (0, -1, 1), lq)
        np.testing.assert_array_equal(np.asarray(lab), rl, err_msg=f"seed={seed} case={case}")
        np.testing.assert_array_equal(np.asarray(m), rm, err_msg=f"seed={seed} case={case}")
        if valid.any() and lq:
            assert (rl == 1).any() and (rl == 0).any()


def test_sample_balanced_counts_and_uniformity(rng, seed):
    a = 200
    labels = rng.choice([-1, 0, 1], size=a, p=[0.2, 0.7, 0.1]).astype(np.int32)
    labels[:3] = 1
    num_samples, frac = 32, 0.5
    n_fg, n_bg = int((labels == 1).sum()), int((labels == 0).sum())
    f = jax.jit(jax.vmap(lambda k: sample_balanced(k, jnp.asarray(labels), num_samples, frac)))
    keys = jax.random.split(jax.random.key(seed), 400)
    fg, bg = (np.asarray(v) for v in f(keys))
    exp_fg = min(n_fg, int(num_samples * frac))
    exp_bg = min(n_bg, num_samples - exp_fg)
    assert np.all(fg.sum(1) == exp_fg) and np.all(bg.sum(1) == exp_bg), f"seed={seed}"
    assert np.all(labels[np.nonzero(fg)[1]] == 1) and np.all(labels[np.nonzero(bg)[1]] == 0)
    # Every foreground is equally likely: per-anchor frequency close to exp_fg / n_fg.
    freq = fg.mean(0)[labels == 1]
    p = exp_fg / n_fg
    assert np.abs(freq - p).max() < 5 * np.sqrt(p * (1 - p) / 400) + 1e-9, f"seed={seed}"
    # Few foregrounds: background fills the rest.
    few = np.zeros(a, np.int32)
    few[:2] = 1
    fg1, bg1 = sample_balanced(jax.random.key(seed), jnp.asarray(few), num_samples, frac)
    assert int(fg1.sum()) == 2 and int(bg1.sum()) == num_samples - 2


def np_atss(anchors, num_per_level, gt, valid, topk):
    """GLIP ATSS target assignment written as loops (float64)."""
    a = len(anchors)
    iou = np.asarray(box_iou(gt, anchors)).astype(np.float64)  # [G, A]; box_iou tested vs tv
    acx = (anchors[:, 0] + anchors[:, 2]) / 2.0
    acy = (anchors[:, 1] + anchors[:, 3]) / 2.0
    best = np.full(a, -np.inf)
    out = np.full(a, -1)
    for gi in range(len(gt)):
        if not valid[gi]:
            continue
        gcx, gcy = (gt[gi, 0] + gt[gi, 2]) / 2.0, (gt[gi, 1] + gt[gi, 3]) / 2.0
        cands = []
        start = 0
        for n in num_per_level:
            d = [np.hypot(acx[j] - gcx, acy[j] - gcy) for j in range(start, start + n)]
            cands += [start + int(j) for j in np.argsort(d, kind="stable")[: min(topk, n)]]
            start += n
        ci = np.array([iou[gi, j] for j in cands])
        thr = ci.mean() + ci.std(ddof=1)
        for j, v in zip(cands, ci):
            inside = min(acx[j] - gt[gi, 0], acy[j] - gt[gi, 1], gt[gi, 2] - acx[j],
                         gt[gi, 3] - acy[j]) > 0.01
            if v >= thr and inside and v > best[j]:
                best[j], out[j] = v, gi
    return out


def test_atss_equals_loop(rng, seed):
    shapes = [(8, 10), (4, 5), (2, 3)]
    strides = [8, 16, 32]
    anchors = generate_anchors(shapes, strides, [[32.0], [64.0], [128.0]], [1.0], 0.5)
    per_level = [h * w for h, w in shapes]
    f = jax.jit(lambda g, v: atss_assign(anchors, per_level, g, v, topk=4))
    total_pos = 0
    for case in range(3):
        g = 6
        xy = rng.uniform(-10, 70, (g, 2))
        gt = np.concatenate([xy, xy + rng.uniform(4, 60, (g, 2))], 1).astype(np.float32)
        valid = rng.random(g) < 0.8
        if case == 0:
            valid[:] = False
        got = np.asarray(f(gt, valid))
        ref = np_atss(anchors, per_level, gt, valid, 4)
        np.testing.assert_array_equal(got, ref, err_msg=f"seed={seed} case={case}")
        total_pos += int((ref >= 0).sum())
    assert total_pos > 0
