"""LVIS evaluation vs lvis-api LVISEval (every reported number, <= 1e-9), incl. fixed AP."""

import copy
import logging
from collections import defaultdict

import numpy as np
import pytest

np.float = float  # lvis 0.5.3 uses the alias removed in NumPy 2
from lvis import LVIS, LVISEval, LVISResults  # noqa: E402

from ovd_jax.evaluation import evaluate_lvis, load_ovd_split, ovd_split_metrics  # noqa: E402
from ovd_jax.evaluation.random_sets import random_coco  # noqa: E402

TOL = 1e-9
logging.getLogger("lvis").setLevel(logging.ERROR)


def _cap_per_category(dets, k):
    """The fixed-AP protocol's result filter (Dave et al.), written out independently."""
    by_cat = defaultdict(list)
    for d in dets:
        by_cat[d["category_id"]].append(d)
    out = []
    for anns in by_cat.values():
        out.extend(sorted(anns, key=lambda d: d["score"], reverse=True)[:k])
    return out


def _reference(gt, dets, *, max_dets=300, fixed_k=None):
    lvis_gt = LVIS.__new__(LVIS)
    lvis_gt.logger = logging.getLogger("lvis")
    lvis_gt.dataset = copy.deepcopy(gt)
    lvis_gt._create_index()
    dets = copy.deepcopy(dets)
    if fixed_k is not None:
        res = LVISResults(lvis_gt, _cap_per_category(dets, fixed_k), max_dets=-1)
    else:
        res = LVISResults(lvis_gt, dets, max_dets=max_dets)
    ev = LVISEval(lvis_gt, res, "bbox")
    ev.run()
    return ev


def _compare(gt, dets, msg, *, max_dets=300, fixed_k=None):
    ev = _reference(gt, dets, max_dets=max_dets, fixed_k=fixed_k)
    if fixed_k is not None:
        ours = evaluate_lvis(gt, dets, fixed_ap=True, max_dets_per_class=fixed_k)
    else:
        ours = evaluate_lvis(gt, dets, max_dets=max_dets)
    for key, ref in ev.results.items():
        mine = ours[key if fixed_k is not None else key.replace("@300", f"@{max_dets}")]
        assert abs(mine - ref) <= TOL, f"{msg}: {key} ours={mine} ref={ref}"
    p = ev.eval["precision"][:, :, :, 0]
    for k, c in enumerate(ev.params.cat_ids):
        v = p[:, :, k][p[:, :, k] > -1]
        v50 = p[0, :, k][p[0, :, k] > -1]
        got = ours["per_category"][c]
        assert abs(got["AP"] - (np.mean(v) if v.size else -1)) <= TOL, f"{msg}: cat {c}"
        assert abs(got["AP50"] - (np.mean(v50) if v50.size else -1)) <= TOL, f"{msg}: cat {c}"
    return ours, ev


def _random_lvis(rng, **kw):
    s = int(rng.integers(2**31))
    args = dict(
        num_images=int(rng.integers(1, 12)),
        num_categories=int(rng.integers(1, 25)),
        gt_per_image=float(rng.uniform(0, 9)),
        dets_per_image=int(rng.integers(1, 120)),
        tie_frac=float(rng.uniform(0, 0.9)),
    )
    args.update(kw)
    return s, *random_coco(s, lvis=True, **args)


def test_random_sets_match_lvis_api(rng, seed):
    """Federated negatives, not-exhaustive categories, ignore flags, zero-area GT/dets, ties."""
    for case in range(30):
        max_dets = int(rng.choice([300, 40, 10]))
        s, gt, dets = _random_lvis(rng)
        _compare(gt, dets, f"seed={seed} case={case} set_seed={s}", max_dets=max_dets)


def test_fixed_ap_matches_capped_lvis_api(rng, seed):
    for case in range(8):
        k = int(rng.integers(3, 150))
        s, gt, dets = _random_lvis(rng, dets_per_image=int(rng.integers(50, 400)))
        _compare(gt, dets, f"seed={seed} case={case} set_seed={s} k={k}", fixed_k=k)


def test_lvis_sized_vocabulary(rng, seed):
    """1,203 categories with r/c/f frequencies, 300 detections per image."""
    s, gt, dets = _random_lvis(
        rng, num_images=6, num_categories=1203, gt_per_image=15, dets_per_image=400
    )
    ours, ev = _compare(gt, dets, f"seed={seed} set_seed={s}")
    base, novel = load_ovd_split(gt)
    split = ovd_split_metrics(ours["per_category"], base, novel, key="AP")
    assert abs(split["novel_AP"] - ev.results["APr"]) <= TOL, f"seed={seed}"


def test_missing_frequency_is_a_clear_error(rng):
    _, gt, dets = _random_lvis(rng, num_categories=3)
    del gt["categories"][0]["frequency"]
    with pytest.raises(ValueError, match="frequency"):
        evaluate_lvis(gt, dets)


def test_unknown_category_is_a_clear_error(rng):
    _, gt, dets = _random_lvis(rng, num_images=3, dets_per_image=5)
    dets[3]["category_id"] = -7
    with pytest.raises(ValueError, match=r"detections\[3\].*category_id -7"):
        evaluate_lvis(gt, dets)
