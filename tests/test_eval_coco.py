"""COCO evaluation vs pycocotools COCOeval (every reported number, <= 1e-9), validation errors,
OVD splits and the metrics-only entry point."""

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ovd_jax.evaluation import (
    evaluate_coco,
    load_ovd_split,
    ovd_split_metrics,
    run,
    validate_detections,
)
from ovd_jax.evaluation.gt_boxes_protocol import (
    gt_box_detections,
    gt_box_inputs,
    zero_shot_gt_box_metrics,
)
from ovd_jax.evaluation.random_sets import random_coco

KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
TOL = 1e-9


def _reference(gt, dets, cat_ids=None, max_dets=None):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        res = coco.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco, res, "bbox")
        if cat_ids is not None:
            ev.params.catIds = list(cat_ids)
        if max_dets is not None:
            ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _ref_per_category(ev):
    out = {}
    p = ev.eval["precision"][:, :, :, 0, -1]
    for k, c in enumerate(ev.params.catIds):
        v = p[:, :, k][p[:, :, k] > -1]
        v50 = p[0, :, k][p[0, :, k] > -1]
        out[c] = (np.mean(v) if v.size else -1.0, np.mean(v50) if v50.size else -1.0)
    return out


def _compare(gt, dets, msg, cat_ids=None, max_dets=(1, 10, 100)):
    ev = _reference(gt, dets, cat_ids, max_dets)
    ours = evaluate_coco(gt, dets, category_ids=cat_ids, max_dets=max_dets)
    keys = KEYS[:6] + [f"AR{m}" for m in max_dets] + KEYS[9:]
    for i, k in enumerate(keys):
        assert abs(ours[k] - ev.stats[i]) <= TOL, f"{msg}: {k} ours={ours[k]} ref={ev.stats[i]}"
    ref_pc = _ref_per_category(ev)
    assert set(ours["per_category"]) == set(ref_pc), msg
    for c, (ap, ap50) in ref_pc.items():
        got = ours["per_category"][c]
        assert abs(got["AP"] - ap) <= TOL and abs(got["AP50"] - ap50) <= TOL, f"{msg}: cat {c}"
    return ours, ev


def test_random_sets_match_pycocotools(rng, seed):
    """Many small random sets: crowd, empty images, categories without GT, ties, id 0."""
    for case in range(40):
        s = int(rng.integers(2**31))
        gt, dets = random_coco(
            s,
            num_images=int(rng.integers(1, 12)),
            num_categories=int(rng.integers(1, 9)),
            gt_per_image=float(rng.uniform(0, 9)),
            dets_per_image=int(rng.integers(1, 130)),
            tie_frac=float(rng.uniform(0, 0.9)),
        )
        _compare(gt, dets, f"seed={seed} case={case} set_seed={s}")


def test_coco_sized_categories_hundreds_of_dets(rng, seed):
    """80 COCO-style categories, 300 detections per image (the per-image cap of 100 bites)."""
    s = int(rng.integers(2**31))
    gt, dets = random_coco(s, num_images=12, num_categories=80, gt_per_image=12, dets_per_image=300)
    _compare(gt, dets, f"seed={seed} set_seed={s}")


def test_category_subset_and_custom_max_dets(rng, seed):
    s = int(rng.integers(2**31))
    gt, dets = random_coco(s, num_images=10, num_categories=10, dets_per_image=60)
    cats = sorted(c["id"] for c in gt["categories"])
    subset = sorted(rng.choice(cats, 4, replace=False).tolist())
    _compare(gt, dets, f"seed={seed} subset", cat_ids=subset)
    _compare(gt, dets, f"seed={seed} maxdets", max_dets=(1, 5, 20))


def test_no_gt_at_all_gives_minus_one(rng, seed):
    gt, dets = random_coco(int(rng.integers(2**31)), num_images=4, gt_per_image=0.0)
    ours, _ = _compare(gt, dets, f"seed={seed}")
    assert ours["AP"] == -1 and all(v["AP"] == -1 for v in ours["per_category"].values())


def test_paths_and_dicts_agree(tmp_path, rng):
    gt, dets = random_coco(int(rng.integers(2**31)), num_images=5)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    a = evaluate_coco(str(tmp_path / "gt.json"), str(tmp_path / "dt.json"))
    b = evaluate_coco(gt, dets)
    assert a == b


# --------------------------------------------------------------------------- validation


def _small():
    return random_coco(3, num_images=3, num_categories=3, dets_per_image=4)


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("image_id", 10**9, "image_id"),
        ("category_id", 10**9, "category_id"),
        ("score", float("nan"), "not finite"),
        ("score", float("inf"), "not finite"),
        ("score", "high", "score must be a number"),
        ("bbox", [1.0, 2.0, -3.0, 4.0], "negative width"),
        ("bbox", [1.0, 2.0, 3.0], "bbox must be 4 numbers"),
        ("bbox", [1.0, float("nan"), 3.0, 4.0], "NaN"),
    ],
)
def test_malformed_detection_names_the_entry(field, value, needle):
    gt, dets = _small()
    dets[5][field] = value
    for fn in (validate_detections, evaluate_coco):
        with pytest.raises(ValueError, match=needle) as exc:
            fn(gt, dets)
        assert "detections[5]" in str(exc.value) and "Fix" in str(exc.value)


def test_missing_key_and_not_a_list():
    gt, dets = _small()
    del dets[2]["score"]
    with pytest.raises(ValueError, match=r"detections\[2\].*lacks \['score'\]"):
        evaluate_coco(gt, dets)
    with pytest.raises(ValueError, match="must be a list"):
        evaluate_coco(gt, {"image_id": 1})
    with pytest.raises(ValueError, match="does not exist"):
        evaluate_coco("/nonexistent/instances.json", [])


# --------------------------------------------------------------------------- OVD splits


def test_ovd_split_equals_pycocotools_on_split_categories(rng, seed, tmp_path):
    """base/novel AP50 = pycocotools AP50 evaluated on the split's categories only."""
    gt, dets = random_coco(
        int(rng.integers(2**31)), num_images=10, num_categories=10, dets_per_image=50
    )
    cats = sorted(c["id"] for c in gt["categories"])
    novel = sorted(rng.choice(cats, 3, replace=False).tolist())
    base = [c for c in cats if c not in novel]
    names = {c["id"]: c["name"] for c in gt["categories"]}
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"base": [names[c] for c in base], "novel": novel}))
    assert load_ovd_split(gt, str(split)) == (base, novel)
    for c in gt["categories"]:
        c["split"] = "novel" if c["id"] in novel else "base"
    assert load_ovd_split(gt) == (base, novel)

    ours = ovd_split_metrics(evaluate_coco(gt, dets)["per_category"], base, novel)
    for name, ids in (("base", base), ("novel", novel), ("all", cats)):
        ref = _reference(gt, dets, cat_ids=ids).stats[1]
        assert abs(ours[f"{name}_AP50"] - ref) <= TOL, f"seed={seed} {name}"


def test_ovd_split_sources_and_errors(tmp_path):
    gt, _ = _small()
    with pytest.raises(ValueError, match="no OVD split available"):
        load_ovd_split(gt)
    for c, f in zip(gt["categories"], "rcf"):
        c["frequency"] = f
    base, novel = load_ovd_split(gt)
    assert novel == [gt["categories"][0]["id"]] and len(base) == 2
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"base": ["no such class"], "novel": []}))
    with pytest.raises(ValueError, match="no such class"):
        load_ovd_split(gt, str(bad))


def test_metrics_only_run_writes_json(tmp_path, rng, capsys):
    gt, dets = random_coco(int(rng.integers(2**31)), num_images=6, num_categories=5)
    for i, c in enumerate(gt["categories"]):
        c["split"] = "novel" if i % 3 == 0 else "base"
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    out = tmp_path / "m" / "metrics.json"
    m = run(str(tmp_path / "gt.json"), str(tmp_path / "dt.json"), "coco", False, str(out))
    printed = capsys.readouterr().out
    assert "AP50" in printed and "novel_AP50" in printed
    saved = json.loads(out.read_text())
    ref = evaluate_coco(gt, dets)
    assert saved["AP"] == ref["AP"] and saved["novel_AP50"] == m["novel_AP50"]
    assert list(tmp_path.joinpath("m").iterdir()) == [out]  # no temporary left behind
    with pytest.raises(ValueError, match="fixed_ap"):
        run(str(tmp_path / "gt.json"), str(tmp_path / "dt.json"), "coco", True, None)


# --------------------------------------------------------------------------- GT-box protocol


def test_zero_shot_gt_box_protocol(rng, seed):
    gt, _ = random_coco(int(rng.integers(2**31)), num_images=6, num_categories=6)
    for i, a in enumerate(gt["annotations"]):  # no id-0 GT (pycocotools never counts it as hit)
        a["id"] = i + 1
    boxes, img, cls, cat_ids = gt_box_inputs(gt)
    scores = rng.random((cls.shape[0], len(cat_ids)))
    m = zero_shot_gt_box_metrics(gt, img, cls, scores)
    assert abs(m["top1_accuracy"] - np.mean(scores.argmax(1) == cls)) < 1e-12, f"seed={seed}"
    dets = gt_box_detections(boxes, img, scores, cat_ids, top_k=5)
    assert len(dets) == cls.shape[0] * min(5, len(cat_ids))
    assert abs(m["AP"] - _reference(gt, dets).stats[0]) <= TOL, f"seed={seed}"
    onehot = np.eye(len(cat_ids))[cls] + 0.01 * rng.random(scores.shape)
    perfect = zero_shot_gt_box_metrics(gt, img, cls, onehot)
    assert perfect["top1_accuracy"] == 1.0 and perfect["AP50"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="num_gt"):
        zero_shot_gt_box_metrics(gt, img[:-1], cls, scores)
