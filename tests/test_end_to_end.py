"""The README's main path at smoke size: train.py trains, checkpoints and evaluates; eval.py
re-evaluates the checkpoint; both write metrics.json with the headline keys."""

import json
import os
import subprocess
import sys

from helpers import REPO

HEADLINE = ("AP", "AP50", "base_AP50", "novel_AP50")


def _run(args, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_train_then_eval_cli(tmp_path):
    workdir = str(tmp_path / "run")
    data = str(tmp_path / "data")
    proc = _run(["train.py", "--config=configs/demo.py:smoke", f"--workdir={workdir}",
                 f"--config.data.root={data}", "--noprogress"])
    assert "novel_AP50" in proc.stdout
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    for k in HEADLINE:
        assert 0.0 <= metrics[k] <= 1.0 or metrics[k] == -1.0, (k, metrics[k])
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert any(n.startswith("detections_") and n.endswith(".png") for n in os.listdir(workdir))
    with open(os.path.join(workdir, "detections.json")) as f:
        assert isinstance(json.load(f), list)

    out = str(tmp_path / "eval")
    _run(["eval.py", f"--workdir={workdir}", f"--output_dir={out}", "--noprogress"])
    with open(os.path.join(out, "metrics.json")) as f:
        again = json.load(f)
    # Same checkpoint, same data, deterministic inference: the same numbers.
    for k in HEADLINE:
        assert abs(again[k] - metrics[k]) < 1e-9, (k, again[k], metrics[k])

    # Metrics-only mode scores the detections file written by the model run.
    scored = str(tmp_path / "scored.json")
    gt = os.path.join(data, "annotations", "instances_val.json")
    _run(["eval.py", f"--gt={gt}", f"--detections={os.path.join(workdir, 'detections.json')}",
          "--metric=coco", f"--split_file={os.path.join(data, 'ovd_split.json')}",
          f"--output={scored}"])
    with open(scored) as f:
        assert abs(json.load(f)["AP"] - metrics["AP"]) < 1e-9
