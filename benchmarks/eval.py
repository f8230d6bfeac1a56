"""Seconds for ovd_jax.evaluation vs pycocotools, faster-coco-eval and lvis-api, same run.

Each tool runs in its own fresh Python process and is timed from process start to metrics
(interpreter start, imports, JSON loading and evaluation included: "whole process"). The
synthetic sets are generated deterministically (ovd_jax.evaluation.random_sets) and cached as
JSON files:

  COCO-val-sized: 5,000 images, 80 categories, ~33k GT boxes, 100 detections per image (500k).
  LVIS-style:     5,000 images (default) or 20,000 (--full), 1,203 categories with r/c/f
                  frequencies and federated negatives, 300 detections per image.

    python benchmarks/eval.py [--full] [--skip coco|lvis] [--repeats 5]
                              [--out benchmarks/results_eval_cpu.md]

Every tool is run `--repeats` times, ours and the peers alternating within a repeat, so a change
of machine load hits all of them alike. Prints a table of seconds (median and min-max over the
repeats) and speed-up ratios (reference / ours: median and range of the per-repeat ratios), and
the largest difference between our metrics and the reference's (pycocotools for COCO, lvis-api
for LVIS).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import _bench

ROOT = _bench.ROOT

_CHILD = {
    "ours_coco": """
from ovd_jax.evaluation import evaluate_coco
m = evaluate_coco(GT, DT)
res = {k: v for k, v in m.items() if k != "per_category"}
""",
    "pycocotools": """
import contextlib, io
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(GT); dt = gt.loadRes(DT)
    e = COCOeval(gt, dt, "bbox"); e.evaluate(); e.accumulate(); e.summarize()
keys = ["AP","AP50","AP75","APs","APm","APl","AR1","AR10","AR100","ARs","ARm","ARl"]
res = dict(zip(keys, map(float, e.stats)))
""",
    "faster_coco_eval": """
import contextlib, io
from faster_coco_eval import COCO, COCOeval_faster
with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(GT); dt = gt.loadRes(DT)
    e = COCOeval_faster(gt, dt, "bbox"); e.evaluate(); e.accumulate(); e.summarize()
keys = ["AP","AP50","AP75","APs","APm","APl","AR1","AR10","AR100","ARs","ARm","ARl"]
res = dict(zip(keys, map(float, e.stats[:12])))
""",
    "ours_lvis": """
from ovd_jax.evaluation import evaluate_lvis
m = evaluate_lvis(GT, DT)
res = {k: v for k, v in m.items() if k != "per_category"}
""",
    "lvis_api": """
import logging
import numpy as np
np.float = float
logging.disable(logging.WARNING)
from lvis import LVISEval
e = LVISEval(GT, DT, "bbox"); e.run()
res = {k: float(v) for k, v in e.results.items()}
""",
    "faster_coco_eval_lvis": """
import contextlib, io
from faster_coco_eval import COCO, COCOeval_faster
with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(GT); dt = gt.loadRes(DT)
    e = COCOeval_faster(gt, dt, "bbox", lvis_style=True); e.params.maxDets = [300]
    e.evaluate(); e.accumulate(); e.summarize()
res = {"AP": float(e.stats[0])}
""",
}


def _make_sets(cache: str, lvis_images: int) -> dict:
    """Writes the synthetic sets (once) and returns {name: (gt_path, dt_path, description)}."""
    from ovd_jax.evaluation.random_sets import random_coco

    specs = {
        "coco": dict(num_images=5000, num_categories=80, gt_per_image=7.3, dets_per_image=100),
        "lvis": dict(
            num_images=lvis_images,
            num_categories=1203,
            gt_per_image=12,
            dets_per_image=300,
            lvis=True,
        ),
    }
    out = {}
    for name, kw in specs.items():
        tag = f"{name}_{kw['num_images']}"
        gt_path = os.path.join(cache, f"{tag}_gt.json")
        dt_path = os.path.join(cache, f"{tag}_dt.json")
        if not (os.path.exists(gt_path) and os.path.exists(dt_path)):
            t = time.perf_counter()
            gt, dets = random_coco(0, **kw)
            os.makedirs(cache, exist_ok=True)
            for path, obj in ((gt_path, gt), (dt_path, dets)):
                with open(path + ".tmp", "w") as f:
                    json.dump(obj, f)
                os.replace(path + ".tmp", path)
            del gt, dets
            print(f"generated {tag} in {time.perf_counter() - t:.0f} s", flush=True)
        with open(gt_path) as f:
            gt = json.load(f)
        n_det = os.path.getsize(dt_path)
        desc = (
            f"{len(gt['images']):,} images, {len(gt['categories']):,} categories, "
            f"{len(gt['annotations']):,} GT boxes, {kw['dets_per_image']} detections/image "
            f"({len(gt['images']) * kw['dets_per_image']:,}; {n_det / 1e6:.0f} MB JSON)"
        )
        out[name] = (gt_path, dt_path, desc)
    return out


def _run_child(tool: str, gt_path: str, dt_path: str) -> tuple[float, dict]:
    code = (
        f"import json, sys\nsys.path.insert(0, {ROOT!r})\nGT, DT = {gt_path!r}, {dt_path!r}\n"
        + _CHILD[tool]
        + "\nprint('RESULT ' + json.dumps(res))\n"
    )
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return wall, json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", action="store_true", help="LVIS-val-sized set: 20,000 images")
    ap.add_argument("--lvis_images", type=int, default=None, help="override the LVIS image count")
    ap.add_argument("--skip", choices=["coco", "lvis"], action="append", default=[])
    ap.add_argument("--cache", default=os.path.join("/tmp", "ovd_jax_eval_bench"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results_eval_cpu.md"))
    _bench.add_repeat_args(ap)
    args = ap.parse_args()
    _bench.check_repeats(args.repeats)
    load_before = _bench.load_average()
    lvis_images = args.lvis_images or (20000 if args.full else 5000)
    sets = _make_sets(args.cache, lvis_images)

    plan = {
        "coco": ("ours_coco", ["pycocotools", "faster_coco_eval"]),
        "lvis": ("ours_lvis", ["lvis_api", "faster_coco_eval_lvis"]),
    }
    rows = []
    for name, (ours_tool, peers) in plan.items():
        if name in args.skip:
            continue
        gt_path, dt_path, desc = sets[name]
        print(f"\n[{name}] {desc}", flush=True)
        times = {tool: [] for tool in (ours_tool, *peers)}
        diffs = {}
        for rep in range(args.repeats):
            t_ours, m_ours = _run_child(ours_tool, gt_path, dt_path)
            times[ours_tool].append(t_ours)
            print(f"  repeat {rep + 1}/{args.repeats} ours: {t_ours:.1f} s", flush=True)
            for peer in peers:
                t_peer, m_peer = _run_child(peer, gt_path, dt_path)
                times[peer].append(t_peer)
                exact = peer in ("pycocotools", "lvis_api")
                diff = max(abs(m_ours[k] - v) for k, v in m_peer.items()) if exact else None
                if diff is not None:
                    diffs[peer] = max(diff, diffs.get(peer, 0.0))
                note = f", max |ours - {peer}| = {diff:.1e}" if exact else ""
                print(f"  repeat {rep + 1}/{args.repeats} {peer}: {t_peer:.1f} s  ratio "
                      f"{t_peer / t_ours:.1f}x{note}", flush=True)
        for peer in peers:
            rows.append((name, peer, times[peer], times[ours_tool], diffs.get(peer)))

    lines = [
        "# Evaluation speed (CPU)",
        "",
        f"`{_bench.command_line()}`",
        "",
        f"{_bench.machine(load_before)}. Whole process per tool (fresh interpreter, imports, "
        f"JSON loading, evaluation), same files; median (min-max) over {args.repeats} repeats.",
        "",
        "| set | tool | seconds | ours (s) | speed-up | max abs diff vs ours |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, peer, t_peer, t_ours, diff in rows:
        d = "not compared" if diff is None else f"{diff:.1e}"
        ratios = [a / b for a, b in zip(t_peer, t_ours)]
        lines.append(
            f"| {name} | {peer} | {_bench.median_range(t_peer, '{:.1f}')} | "
            f"{_bench.median_range(t_ours, '{:.1f}')} | "
            f"{_bench.median_range(ratios, '{:.1f}')}x | {d} |"
        )
    lines += ["", "Sets:"] + [f"- {n}: {sets[n][2]}" for n in plan if n not in args.skip]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if rows:
        with open(args.out + ".tmp", "w") as f:
            f.write(text)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
