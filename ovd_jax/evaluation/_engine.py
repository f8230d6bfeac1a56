"""Vectorised box-AP engine shared by the COCO and LVIS evaluators.

It reproduces, number for number, the per-image greedy matching and the precision/recall
accumulation of pycocotools' ``COCOeval`` (bbox) and lvis-api's ``LVISEval`` (bbox), without a
per-image Python loop:

* detections are sorted once by (category, image, -score, input order) with stable sorts, which
  is the order both references produce with their ``mergesort`` argsorts;
* IoUs are computed only for (detection, ground truth) pairs of the same (image, category), in
  chunks of a bounded number of pairs (memory bounded for LVIS-sized inputs); pairs below the
  lowest IoU threshold can never match and are dropped;
* the greedy matching is sequential only along the score rank inside an (image, category) group:
  one step per rank, vectorised over every group and every (IoU threshold, area range) pair;
* precision/recall curves come from segmented cumulative sums, with the reference's right-to-left
  precision envelope evaluated at the 101 recall thresholds by ``maximum.reduceat``.

Everything is float64 with the same operation order as the references, so results are
bit-identical to them (the tests compare at 1e-9).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# The references build these with np.linspace exactly like this; reuse the same expressions so
# every threshold is the same float.
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RNGS = np.array(
    [[0**2, 1e5**2], [0**2, 32**2], [32**2, 96**2], [96**2, 1e5**2]], dtype=np.float64
)
AREA_LBLS = ("all", "small", "medium", "large")

# Pairs whose IoU is computed at once; bounds the working memory to a few hundred MB.
_PAIR_CHUNK = 4_000_000


@dataclasses.dataclass
class GtArrays:
    """Ground-truth boxes, one row per annotation, in annotation-file order.

    img, cat: int64 [G] dense indices (image rank among sorted image ids, category rank among
    sorted category ids). box: float64 [G, 4] (x, y, w, h). area: float64 [G] (the annotation's
    ``area`` field). ignore: bool [G] (ignored at every area range). crowd: bool [G] (crowd IoU
    and may be matched repeatedly). id_nonzero: bool [G] (the references record a match by the GT
    id, so a GT with id 0 counts as unmatched; reproduced).
    """

    img: np.ndarray
    cat: np.ndarray
    box: np.ndarray
    area: np.ndarray
    ignore: np.ndarray
    crowd: np.ndarray
    id_nonzero: np.ndarray


@dataclasses.dataclass
class DtArrays:
    """Detections, one row per detection, in result-file order (ties are broken by this order).

    img, cat: int64 [D] dense indices as in ``GtArrays``. box: float64 [D, 4] (x, y, w, h).
    score: float64 [D]. extra_ignore: bool [D]; an unmatched detection flagged here is ignored
    (LVIS: category in the image's ``not_exhaustive_category_ids``). rank: optional int64 [D],
    ``score_rank(score)`` when the caller has it already (saves a sort).
    """

    img: np.ndarray
    cat: np.ndarray
    box: np.ndarray
    score: np.ndarray
    extra_ignore: np.ndarray
    rank: np.ndarray | None = None


def score_rank(score: np.ndarray) -> np.ndarray:
    """Dense rank of each score, 0 for the highest; equal scores share a rank. int64 [N].

    Composite integer keys built from it sort in one stable argsort what a multi-key lexsort
    would (a few times faster on millions of detections).
    """
    n = score.shape[0]
    order = np.argsort(-score, kind="stable")
    s = score[order]
    step = np.empty(n, np.int64)
    if n:
        step[0] = 0
        np.not_equal(s[1:], s[:-1], out=step[1:])
    rank = np.empty(n, np.int64)
    rank[order] = np.cumsum(step)
    return rank


def _group_rank(keys_sorted: np.ndarray) -> np.ndarray:
    """Position of every element inside its run of equal keys (keys already sorted)."""
    n = keys_sorted.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    start = np.empty(n, bool)
    start[0] = True
    np.not_equal(keys_sorted[1:], keys_sorted[:-1], out=start[1:])
    idx = np.arange(n, dtype=np.int64)
    return idx - np.maximum.accumulate(np.where(start, idx, 0))


def _bbox_iou(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU of paired xywh boxes, the same float operations as pycocotools' ``bbIou``.

    Crowd GTs use the detection's area as the union. Returns float64 [P] (0 when disjoint).
    """
    dx, dy, dw, dh = d[:, 0], d[:, 1], d[:, 2], d[:, 3]
    gx, gy, gw, gh = g[:, 0], g[:, 1], g[:, 2], g[:, 3]
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    inter = w * h
    da = dw * dh
    union = np.where(crowd, da, da + gw * gh - inter)
    ok = (w > 0) & (h > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, inter / np.where(ok, union, 1.0), 0.0)


def _candidate_pairs(dt_box, dt_gt_lo, dt_gt_cnt, gt_box, gt_crowd, min_iou):
    """All same-group (detection, GT) pairs with IoU >= min_iou, in (detection, GT) order.

    dt_gt_lo/dt_gt_cnt: for each (sorted) detection, the first index and the number of GTs of its
    group in the sorted GT arrays. Returns (det index, gt index, iou) arrays.
    """
    n = dt_box.shape[0]
    cum = np.cumsum(dt_gt_cnt)
    out_d, out_g, out_iou = [], [], []
    lo = 0
    while lo < n:
        base = cum[lo - 1] if lo > 0 else 0
        hi = int(np.searchsorted(cum, base + _PAIR_CHUNK, side="right"))
        hi = max(hi, lo + 1)
        cnt = dt_gt_cnt[lo:hi]
        total = int(cnt.sum())
        if total:
            pd = np.repeat(np.arange(lo, hi, dtype=np.int64), cnt)
            first = np.cumsum(cnt) - cnt
            pg = dt_gt_lo[pd] + (np.arange(total, dtype=np.int64) - np.repeat(first, cnt))
            iou = _bbox_iou(dt_box[pd], gt_box[pg], gt_crowd[pg])
            keep = iou >= min_iou
            out_d.append(pd[keep])
            out_g.append(pg[keep])
            out_iou.append(iou[keep])
        lo = hi
    if not out_d:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    return np.concatenate(out_d), np.concatenate(out_g), np.concatenate(out_iou)


def _greedy_match(pd, pg, piou, det_rank, n_det, gt_ig, gt_crowd, gt_id_nonzero, thrs):
    """The references' greedy matching, for every (IoU threshold, area range) at once.

    Per detection (in score order inside its group), among GTs not yet taken (crowd GTs stay
    available) with IoU >= threshold: the best IoU among non-ignored GTs, else the best among
    ignored ones; equal IoUs go to the later GT in file order (the references' ``<`` test).

    Returns two uint64 [n_det] bit masks over combos c = t * A + a: "matched to a GT with a
    non-zero id" and "matched to an ignored GT".
    """
    t_n, a_n = thrs.shape[0], gt_ig.shape[1]
    ta = t_n * a_n
    m_nz = np.zeros(n_det, np.uint64)
    m_ig = np.zeros(n_det, np.uint64)
    if pd.shape[0] == 0:
        return m_nz, m_ig
    prank = det_rank[pd]
    order = np.argsort(prank, kind="stable")  # (rank, detection, gt) order
    pd, pg, piou, prank = pd[order], pg[order], piou[order], prank[order]
    taken = np.zeros((gt_ig.shape[0], ta), bool)
    thr_eff = np.minimum(thrs, 1 - 1e-10)
    weights = np.left_shift(np.uint64(1), np.arange(ta, dtype=np.uint64))
    combo_area = np.tile(np.arange(a_n), t_n)
    ranks, rank_lo = np.unique(prank, return_index=True)
    rank_hi = np.r_[rank_lo[1:], prank.shape[0]]
    for lo, hi in zip(rank_lo.tolist(), rank_hi.tolist()):
        d, g, iou = pd[lo:hi], pg[lo:hi], piou[lo:hi]
        p = hi - lo
        newd = np.empty(p, bool)
        newd[0] = True
        np.not_equal(d[1:], d[:-1], out=newd[1:])
        starts = np.flatnonzero(newd)
        ok_t = iou[:, None] >= thr_eff[None, :]  # [p, T]
        nonig = ~gt_ig[g]  # [p, A]
        free = ~taken[g] | gt_crowd[g][:, None]  # [p, TA]
        valid = (ok_t[:, :, None] & free.reshape(p, t_n, a_n)).reshape(p, ta)
        nonig_ta = np.broadcast_to(nonig[:, None, :], (p, t_n, a_n)).reshape(p, ta)
        # A detection with a single candidate GT takes it wherever it is valid; only those with
        # several candidates need the segmented best-of reductions.
        lens = np.diff(np.r_[starts, p])
        last = np.where(valid[starts], starts[:, None], -1)  # [n_dets_here, TA]
        multi = lens > 1
        if multi.any():
            idx = np.flatnonzero(np.repeat(multi, lens))
            m_lens = lens[multi]
            m_starts = np.cumsum(m_lens) - m_lens
            m_seg = np.repeat(np.arange(m_lens.shape[0]), m_lens)
            v, ni = valid[idx], nonig_ta[idx]
            has_nonig = np.logical_or.reduceat(v & ni, m_starts, axis=0)
            cand = v & (ni | ~has_nonig[m_seg])
            key = np.where(cand, iou[idx][:, None], -1.0)
            best = np.maximum.reduceat(key, m_starts, axis=0)
            chosen = cand & (key == best[m_seg])
            # Equal IoUs: the later GT in file order wins (the references' `<` test).
            last[multi] = np.maximum.reduceat(np.where(chosen, idx[:, None], -1), m_starts, axis=0)
        has = last >= 0
        gsel = g[np.where(has, last, 0)]
        rows, cols = np.nonzero(has)
        taken[gsel[rows, cols], cols] = True
        dets = d[starts]
        nz = has & gt_id_nonzero[gsel]
        ig = has & gt_ig[gsel, combo_area[None, :]]
        m_nz[dets] = (nz.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
        m_ig[dets] = (ig.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    return m_nz, m_ig


def evaluate(
    gt: GtArrays,
    dt: DtArrays,
    *,
    num_images: int,
    num_cats: int,
    max_dets: tuple[int | None, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """Matches and accumulates; the equivalent of the references' evaluate() + accumulate().

    max_dets: per-(image, category) detection caps, ascending; ``None`` means no cap (LVIS). The
    last one is applied before matching, as pycocotools does.
    Returns (precision float64 [T, R, K, A, M], recall float64 [T, K, A, M]) with -1 where the
    reference has -1 (no non-ignored GT for that category and area range).
    """
    t_n, r_n, a_n, m_n = IOU_THRS.shape[0], REC_THRS.shape[0], AREA_RNGS.shape[0], len(max_dets)
    k_n = num_cats
    precision = -np.ones((t_n, r_n, k_n, a_n, m_n))
    recall = -np.ones((t_n, k_n, a_n, m_n))

    # Ground truth sorted by (category, image, file order).
    gorder = np.argsort(gt.cat * num_images + gt.img, kind="stable")
    g_key = gt.cat[gorder] * num_images + gt.img[gorder]
    g_box = gt.box[gorder]
    g_area = gt.area[gorder]
    g_crowd = gt.crowd[gorder]
    g_out = (g_area[:, None] < AREA_RNGS[None, :, 0]) | (g_area[:, None] > AREA_RNGS[None, :, 1])
    g_ig = gt.ignore[gorder][:, None] | g_out  # [G, A]
    g_id_nz = gt.id_nonzero[gorder]
    g_cat = gt.cat[gorder]
    npig = np.zeros((k_n, a_n), np.int64)
    for a in range(a_n):
        npig[:, a] = np.bincount(g_cat[~g_ig[:, a]], minlength=k_n)

    # Detections sorted by (category, image, -score, file order): the references' tie order.
    s_rank = score_rank(dt.score) if dt.rank is None else dt.rank
    n_rank = int(s_rank.max()) + 1 if s_rank.size else 1
    group = dt.cat * num_images + dt.img
    dorder = np.argsort(group * n_rank + s_rank, kind="stable")
    d_key = group[dorder]
    d_rank = _group_rank(d_key)
    cap = max_dets[-1]
    if cap is not None:
        keep = d_rank < cap
        dorder, d_key, d_rank = dorder[keep], d_key[keep], d_rank[keep]
    n_det = dorder.shape[0]
    d_box = dt.box[dorder]
    d_cat = dt.cat[dorder]
    d_img = dt.img[dorder]
    d_srank = s_rank[dorder]
    d_area = d_box[:, 2] * d_box[:, 3]  # the references' w * h
    d_out = (d_area[:, None] < AREA_RNGS[None, :, 0]) | (d_area[:, None] > AREA_RNGS[None, :, 1])
    d_out |= dt.extra_ignore[dorder][:, None]

    gt_lo = np.searchsorted(g_key, d_key, side="left")
    gt_cnt = np.searchsorted(g_key, d_key, side="right") - gt_lo
    pd, pg, piou = _candidate_pairs(
        d_box, gt_lo, gt_cnt, g_box, g_crowd, float(min(IOU_THRS.min(), 1 - 1e-10))
    )
    del gt_lo, gt_cnt
    m_nz, m_ig = _greedy_match(pd, pg, piou, d_rank, n_det, g_ig, g_crowd, g_id_nz, IOU_THRS)
    del pd, pg, piou

    # Accumulation order: (category, -score, image, file order).
    acc = np.argsort((d_cat * n_rank + d_srank) * num_images + d_img, kind="stable")
    for mi, cap_m in enumerate(max_dets):
        sub = acc if cap_m is None else acc[d_rank[acc] < cap_m]
        _accumulate(d_cat[sub], d_out[sub], m_nz[sub], m_ig[sub], npig, mi, precision, recall)
    return precision, recall


def _accumulate(cat_s, out_s, nz_bits, ig_bits, npig, mi, precision, recall) -> None:
    """Precision/recall of one max-dets setting, written into precision[..., mi] / recall.

    cat_s: int64 [N] category of each detection in accumulation order (category, -score, image,
    input order); out_s: bool [N, A] unmatched-detection ignore flag per area range; nz_bits /
    ig_bits: the match bit masks of ``_greedy_match``; npig: int64 [K, A] non-ignored GT counts.

    The references' curve has one entry per detection, but it only moves at true positives:
    recall steps there, and precision only falls between them. So the first detection reaching a
    recall threshold is a true positive, and the right-to-left precision envelope there is the
    max over the later true positives. Only detections matched in some setting (few) are visited
    per (IoU, area); the rest contribute to the false-positive count through one cumulative sum
    per area range.
    """
    t_n, r_n = IOU_THRS.shape[0], REC_THRS.shape[0]
    k_n, a_n = npig.shape
    eps = np.spacing(1)
    cats = np.arange(k_n)
    m_idx = np.flatnonzero((nz_bits | ig_bits) != 0)  # ever matched, ascending position
    cat_m = cat_s[m_idx]
    m_lo = np.searchsorted(cat_m, cats)
    seg_lo = np.searchsorted(cat_s, cats)
    nzm, igm = nz_bits[m_idx], ig_bits[m_idx]
    one = np.uint64(1)
    for a in range(a_n):
        has_gt = npig[:, a] > 0
        npig_f = np.maximum(npig[:, a], 1).astype(np.float64)
        valid0 = ~out_s[:, a]  # validity of an unmatched detection
        cv0 = np.cumsum(valid0, dtype=np.int64)
        v_base = np.r_[0, cv0][seg_lo]  # valid count before each category
        cv0_m = cv0[m_idx] - v_base[cat_m]
        valid0_m = valid0[m_idx].astype(np.int64)
        out_m = out_s[m_idx, a]
        for t in range(t_n):
            c = np.uint64(t * a_n + a)
            nz = ((nzm >> c) & one).astype(bool)
            mig = ((igm >> c) & one).astype(bool)
            valid_m = ~(mig | (~nz & out_m))
            tp_m = nz & valid_m
            # Valid count up to each matched detection inside its category, corrected for the
            # matched detections whose validity differs from the unmatched default.
            delta = np.cumsum(valid_m.astype(np.int64) - valid0_m)
            d_base = np.r_[0, delta][m_lo]
            vc = cv0_m + delta - d_base[cat_m]
            tp_i = np.flatnonzero(tp_m)
            cat_t = cat_m[tp_i]
            t_lo = np.searchsorted(cat_t, cats)
            n_tp = np.bincount(cat_t, minlength=k_n)
            tp_cum = np.arange(1, tp_i.shape[0] + 1, dtype=np.int64) - t_lo[cat_t]
            tp_f = tp_cum.astype(np.float64)  # the references' tp_sum at these detections
            fp_f = (vc[tp_i] - tp_cum).astype(np.float64)
            pr = tp_f / (fp_f + tp_f + eps)
            rc = tp_f / npig_f[cat_t]

            prec_k = np.zeros((k_n, r_n))
            with_tp = np.flatnonzero(n_tp > 0)
            if with_tp.size:
                # Per category and recall threshold: how many true positives have rc below it
                # (the index of the first one reaching it).
                cnt = np.searchsorted(REC_THRS, rc, side="right")
                hist = np.bincount(cat_t * (r_n + 1) + cnt, minlength=k_n * (r_n + 1))
                inds = np.cumsum(hist.reshape(k_n, r_n + 1), axis=1)[with_tp, :r_n]
                ntp = n_tp[with_tp][:, None]
                q = t_lo[with_tp][:, None] + np.minimum(inds, ntp - 1)
                # Max of pr over [q_i, q_i+1); a category's last interval ends where the next
                # category with true positives starts, i.e. at its own end.
                v = np.maximum.reduceat(pr, q.ravel()).reshape(-1, r_n)
                env = np.maximum.accumulate(v[:, ::-1], axis=1)[:, ::-1]
                prec_k[with_tp] = np.where(inds < ntp, env, 0.0)
            precision[t, :, has_gt, a, mi] = prec_k[has_gt]
            recall[t, has_gt, a, mi] = n_tp[has_gt].astype(np.float64) / npig_f[has_gt]


def summarize(
    precision: np.ndarray,
    recall: np.ndarray,
    *,
    ap: bool,
    iou_thr: float | None = None,
    area: str = "all",
    m_index: int = -1,
    cat_index: np.ndarray | None = None,
) -> float:
    """The references' ``_summarize``: mean over the entries > -1, or -1 when there are none.

    precision: [T, R, K, A, M]; recall: [T, K, A, M]. cat_index restricts the categories.
    """
    a = AREA_LBLS.index(area)
    if ap:
        s = precision
        if iou_thr is not None:
            s = s[np.where(iou_thr == IOU_THRS)[0]]
        s = s[:, :, :, a, m_index]
        if cat_index is not None:
            s = s[:, :, cat_index]
    else:
        s = recall
        if iou_thr is not None:
            s = s[np.where(iou_thr == IOU_THRS)[0]]
        s = s[:, :, a, m_index]
        if cat_index is not None:
            s = s[:, cat_index]
    sel = s[s > -1]
    return -1.0 if sel.size == 0 else float(np.mean(sel))


def per_category(precision: np.ndarray, m_index: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Per-category AP (IoU .50:.95) and AP50, area 'all', at max_dets[m_index]; -1 without GT.

    Returns two float64 [K] arrays.
    """
    p = precision[:, :, :, 0, m_index]  # [T, R, K]
    valid = p > -1
    cnt = valid.sum(axis=(0, 1))
    tot = np.where(valid, p, 0.0).sum(axis=(0, 1))
    ap = np.where(cnt > 0, tot / np.maximum(cnt, 1), -1.0)
    p50 = p[0]
    v50 = p50 > -1
    c50 = v50.sum(axis=0)
    ap50 = np.where(c50 > 0, np.where(v50, p50, 0.0).sum(axis=0) / np.maximum(c50, 1), -1.0)
    return ap, ap50
