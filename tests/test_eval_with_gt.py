"""Evaluation path: ground truth fed back as detections scores AP 1.0; a perturbed copy less."""

import numpy as np
from helpers import smoke_config

from ovd_jax.training.evaluate import compute_metrics
from ovd_jax.training.experiment import build_experiment


def _gt_as_detections(gt):
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
         "score": 1.0}
        for a in gt["annotations"]
    ]


def test_ground_truth_scores_one_and_perturbed_less(tmp_path_factory, rng, seed):
    config = smoke_config(str(tmp_path_factory.mktemp("data") / "syn"))
    config.data.synthetic_num_val = 24
    exp = build_experiment(config, with_train=False)
    dets = _gt_as_detections(exp.val_data.gt)
    metrics = compute_metrics(exp, dets)
    for key in ("AP", "AP50", "base_AP50", "novel_AP50"):
        assert metrics[key] == 1.0, (key, metrics[key], seed)

    perturbed = []
    for d in dets:
        x, y, w, h = d["bbox"]
        jitter = rng.uniform(-0.35, 0.35, size=4) * np.array([w, h, w, h])
        perturbed.append(dict(d, bbox=[x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0),
                                       max(h + jitter[3], 1.0)],
                              score=float(rng.uniform())))
    worse = compute_metrics(exp, perturbed)
    assert worse["AP"] < 1.0, (worse["AP"], seed)
    assert worse["AP50"] <= 1.0
    # Swapping every detection's class to another category must destroy AP.
    cat_ids = sorted(c["id"] for c in exp.val_data.gt["categories"])
    wrong = [dict(d, category_id=cat_ids[(cat_ids.index(d["category_id"]) + 1) % len(cat_ids)])
             for d in dets]
    assert compute_metrics(exp, wrong)["AP"] < 0.05, seed
