"""Fuzz: randomly damaged COCO instances and detections files either load or raise the project's
ValueError with a message; never an unrelated exception (KeyError, TypeError, IndexError...).

Each case applies 1-3 seeded mutations to a small valid file: delete a key, replace a value by a
value of another type (None, strings, NaN, huge numbers, lists, dicts, booleans), drop or
duplicate a list element, or damage the JSON text itself (truncate, flip a byte). Failures list
the case number and the mutations so a case can be replayed.
"""

import json
import math

import numpy as np

from ovd_jax.data.coco import load_coco_detection
from ovd_jax.evaluation.coco_eval import evaluate_coco
from ovd_jax.evaluation.validate import validate_detections

CASES = 100  # per file kind; ~200 in all

JUNK = (None, "", "x", "1", -1, 0, 1, 2.5, -1e9, 1e308, float("nan"), float("inf"), True, False,
        [], [1, 2], [1, 2, 3, 4], {}, {"id": 1}, 10**30, [None] * 4, ["a", "b", "c", "d"])


def _instances():
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 40 + i, "width": 50 + i}
              for i in range(1, 5)]
    cats = [{"id": c, "name": n, "supercategory": "thing"}
            for c, n in ((1, "cat"), (3, "dog"), (7, "car"))]
    anns = [{"id": 100 + k, "image_id": 1 + k % 4, "category_id": (1, 3, 7)[k % 3],
             "bbox": [1.0 + k, 2.0, 10.0, 5.0 + k], "area": 50.0 + 10 * k, "iscrowd": int(k == 5)}
            for k in range(8)]
    return {"info": {"year": 2026}, "images": images, "annotations": anns, "categories": cats}


def _detections():
    return [{"image_id": 1 + k % 4, "category_id": (1, 3, 7)[k % 3],
             "bbox": [1.0 + k, 2.0, 9.0, 6.0], "score": 0.9 - 0.05 * k} for k in range(10)]


def _containers(node, path=()):
    """Every (path, dict-or-list) in the tree."""
    out = []
    if isinstance(node, dict | list):
        out.append((path, node))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            out += _containers(v, (*path, k))
    return out


def _mutate_tree(tree, rng) -> str:
    """One in-place structural mutation; returns its description."""
    path, node = _containers(tree)[int(rng.integers(len(_containers(tree))))]
    if not node:
        return f"{path}: empty, untouched"
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    key = keys[int(rng.integers(len(keys)))]
    op = int(rng.integers(4))
    if op == 0:
        del node[key]
        return f"del {path + (key,)}"
    if op == 1 or isinstance(node, dict):
        value = JUNK[int(rng.integers(len(JUNK)))]
        node[key] = json.loads(json.dumps(value))  # a fresh copy
        return f"{path + (key,)} = {value!r}"
    if op == 2:
        node.append(json.loads(json.dumps(node[key])))
        return f"duplicate {path + (key,)}"
    node[key] = json.loads(json.dumps(node[int(rng.integers(len(node)))]))
    return f"copy over {path + (key,)}"


def _mutated_text(make, rng) -> tuple[str, list[str]]:
    tree = make()
    notes = [_mutate_tree(tree, rng) for _ in range(int(rng.integers(1, 4)))]
    text = json.dumps(tree)
    if rng.random() < 0.15:  # damage the text itself
        if rng.random() < 0.5:
            cut = int(rng.integers(len(text)))
            text, note = text[:cut], f"truncate at {cut}"
        else:
            i = int(rng.integers(len(text)))
            text, note = text[:i] + chr(int(rng.integers(32, 127))) + text[i + 1:], f"byte {i}"
        notes.append(note)
    return text, notes


def _check(fn, case, notes, failures):
    try:
        fn()
    except ValueError as e:
        if not str(e).strip():
            failures.append(f"case {case} {notes}: ValueError without a message")
    except Exception as e:  # noqa: BLE001 - this is what the fuzz test looks for
        failures.append(f"case {case} {notes}: {type(e).__name__}: {e}")


def _finite_records(ds):
    for rec in ds.records:
        boxes = rec["boxes"]
        assert np.isfinite(boxes).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes[:, 2] <= rec["width"] + 1e-3).all() and (boxes[:, 3] <= rec["height"]).all()


def test_fuzz_instances_file(tmp_path):
    rng = np.random.default_rng(1234)
    path = tmp_path / "instances.json"
    failures, loaded = [], 0
    for case in range(CASES):
        text, notes = _mutated_text(_instances, rng)
        path.write_text(text)

        def load():
            nonlocal loaded
            _finite_records(load_coco_detection(str(path), str(tmp_path), check_files=False))
            loaded += 1

        _check(load, case, notes, failures)
        # The same file as an evaluator's ground truth (eval.py's metrics-only mode).
        _check(lambda: evaluate_coco(str(path), _detections()), case, notes, failures)
    assert not failures, "\n".join(failures[:20])
    assert 0 < loaded < CASES  # some mutations are harmless, most are caught


def test_fuzz_detections_file(tmp_path):
    rng = np.random.default_rng(4321)
    gt = _instances()
    path = tmp_path / "detections.json"
    failures = []
    for case in range(CASES):
        text, notes = _mutated_text(_detections, rng)
        path.write_text(text)
        if _parses(text):
            _check(lambda t=text: validate_detections(gt, json.loads(t)), case, notes, failures)
        _check(lambda: _metrics_ok(evaluate_coco(gt, str(path))), case, notes, failures)
    assert not failures, "\n".join(failures[:20])


def _parses(text) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _metrics_ok(metrics):
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
