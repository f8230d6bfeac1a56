"""eval.py's metrics-only mode: ground-truth JSON + results JSON -> metrics, no model needed.

    python eval.py --gt instances.json --detections results.json --metric coco|lvis \
        [--fixed_ap] [--split_file split.json] --output metrics.json
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping

from ovd_jax.evaluation._io import check_gt, load_json, no_gc
from ovd_jax.evaluation.coco_eval import evaluate_coco
from ovd_jax.evaluation.lvis_eval import evaluate_lvis
from ovd_jax.evaluation.ovd import load_ovd_split, ovd_split_metrics

_ORDER = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
    "AR1", "AR10", "AR100", "AR@300", "ARs", "ARm", "ARl", "ARs@300", "ARm@300", "ARl@300",
    "base_AP50", "novel_AP50", "all_AP50", "base_AP", "novel_AP", "all_AP",
)  # fmt: skip


def format_table(metrics: Mapping) -> str:
    """A readable two-column table of the scalar metrics (percent, 2 decimals; -1 shown as n/a).

    metrics: a dict as returned by ``run`` / the evaluators; non-scalar entries are summarised.
    """
    scalars = {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seconds"
    }
    keys = [k for k in _ORDER if k in scalars] + sorted(k for k in scalars if k not in _ORDER)
    width = max([len(k) for k in keys] + [6])
    lines = [f"{'metric':<{width}}  {'value':>7}", f"{'-' * width}  {'-' * 7}"]
    for k in keys:
        v = scalars[k]
        shown = "n/a" if v < 0 else f"{100.0 * v:7.2f}"
        lines.append(f"{k:<{width}}  {shown:>7}")
    per_cat = metrics.get("per_category")
    if isinstance(per_cat, Mapping):
        valid = sum(1 for v in per_cat.values() if v.get("AP", -1) >= 0)
        lines.append(f"({len(per_cat)} categories, {valid} with ground truth; AP in percent)")
    return "\n".join(lines)


def write_json_atomic(obj, path: str) -> None:
    """Writes JSON to a temporary file beside ``path`` then renames it (never half-written)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".metrics_", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@no_gc()
def run(
    gt_path: str,
    detections_path: str,
    metric: str,
    fixed_ap: bool,
    output_path: str | None,
    split_file: str | None = None,
) -> dict:
    """Loads, validates, evaluates, adds OVD split metrics, prints a table, writes JSON.

    Args:
      gt_path: COCO/LVIS instances JSON (a dict is accepted too).
      detections_path: COCO results JSON list (a list is accepted too).
      metric: "coco" or "lvis".
      fixed_ap: LVIS only: the fixed-AP protocol (10,000 detections per class, no image cap).
      output_path: where to write the metrics JSON (atomically); None to skip.
      split_file: optional {"base": [...], "novel": [...]} JSON; otherwise the GT's category
        "split" flags or LVIS frequencies are used when present.
    Returns:
      the metrics dict (scalars, "per_category", OVD split numbers when a split is available,
      "metric", "fixed_ap", "seconds").
    """
    metric = str(metric).lower()
    if metric not in ("coco", "lvis"):
        raise ValueError(f"--metric must be 'coco' or 'lvis', got {metric!r}.")
    if fixed_ap and metric != "lvis":
        raise ValueError("--fixed_ap is an LVIS protocol. Fix: use --metric lvis or drop it.")
    t0 = time.perf_counter()
    gt = check_gt(load_json(gt_path, "ground truth"))
    dets = load_json(detections_path, "detections")
    if metric == "coco":
        out = evaluate_coco(gt, dets)
    else:
        out = evaluate_lvis(gt, dets, fixed_ap=fixed_ap)
    try:
        base, novel = load_ovd_split(gt, split_file)
    except ValueError:
        if split_file is not None:
            raise
        base = novel = None
    if base is not None:
        out.update(ovd_split_metrics(out["per_category"], base, novel, key="AP50"))
        if metric == "lvis":
            out.update(ovd_split_metrics(out["per_category"], base, novel, key="AP"))
    out["metric"] = metric
    out["fixed_ap"] = bool(fixed_ap)
    out["seconds"] = time.perf_counter() - t0
    print(format_table(out))
    if output_path:
        serialisable = dict(out)
        serialisable["per_category"] = {str(k): v for k, v in out["per_category"].items()}
        write_json_atomic(serialisable, output_path)
    return out
