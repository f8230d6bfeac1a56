"""`configs/regionclip.py:coco_ovd,smoke` end to end, in bfloat16: train.py trains (joint RPN)
and evaluates, eval.py re-evaluates; then a second run takes the first as its frozen offline
RPN, and the train step keeps the frozen parameters fixed and the background logit at 0."""

import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, smoke_config

from ovd_jax.losses import regionclip as rc_losses
from ovd_jax.models.regionclip import RegionCLIPDetector
from ovd_jax.training import sharding as shd
from ovd_jax.training import train_step as ts
from ovd_jax.training.experiment import build_experiment
from ovd_jax.training.optimizer import matches


def _run(args, timeout=900):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def rpn_run(tmp_path_factory):
    """A bf16 coco_ovd smoke run through the CLI (joint RPN): (workdir, data root)."""
    root = tmp_path_factory.mktemp("rc_train")
    workdir, data = str(root / "run"), str(root / "data")
    _run(["train.py", "--config=configs/regionclip.py:coco_ovd,smoke", f"--workdir={workdir}",
          f"--config.data.root={data}", "--config.dtype=bfloat16", "--noprogress"])
    return workdir, data


def test_cli_train_and_eval_bf16(rpn_run, tmp_path):
    workdir, _ = rpn_run
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(workdir, "train_losses.json")) as f:
        assert np.all(np.isfinite(json.load(f)["losses"]))
    out = str(tmp_path / "eval")
    _run(["eval.py", f"--workdir={workdir}", f"--output_dir={out}", "--noprogress"])
    with open(os.path.join(out, "metrics.json")) as f:
        again = json.load(f)
    for k in ("AP", "AP50", "base_AP50", "novel_AP50"):
        assert abs(again[k] - metrics[k]) < 1e-9, (k, again[k], metrics[k])


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in
            flax.traverse_util.flatten_dict(jax.device_get(tree)).items()}


def test_offline_rpn_training_freezing_and_background(rpn_run):
    workdir, data = rpn_run
    config = smoke_config(data, "regionclip", "coco_ovd,smoke")
    config.dtype = "bfloat16"
    config.model.offline_rpn = workdir
    exp = build_experiment(config)
    mesh = shd.make_mesh(config.mesh.shape, config.mesh.axes)
    state, shardings, tx = ts.create_train_state(exp, mesh, jax.random.key(0))
    assert "rpn_head" not in state.params  # proposals come from the offline run
    before = _flat(state.params)
    constants = exp.method.train_constants(exp, state.variables())
    assert constants["concepts"].shape == (len(exp.train_classes), 64)  # frozen text: once
    assert "concept_tokens" not in constants and "rpn_head" in constants["offline_rpn"]["params"]
    step = ts.make_train_step(exp, tx, mesh, shardings, constants)
    loader = iter(exp.method.make_train_loader(exp))
    for _ in range(3):
        batch = next(loader)
        state, metrics = step(state, ts.device_batch(exp, batch, mesh), jax.random.key(1))
        metrics = jax.device_get(metrics)
        assert np.isfinite(metrics["loss"]) and metrics["num_proposals"] > 0, metrics
    after = _flat(state.params)

    frozen = exp.method.frozen_params(config) + ("text",)
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    for k in before:
        if any(matches(k, p) for p in frozen):
            assert k not in moved, f"frozen parameter {k} changed"
    assert "vision/layer1_0/conv1/kernel" not in moved and "vision/bn1/scale" not in moved
    assert "vision/layer2_0/conv1/kernel" in moved and "box_head/kernel" in moved

    # The background logit is a constant 0 after training (no parameter reaches it).
    variables = state.variables()
    queries = exp.method.eval_queries(exp, variables)
    res4 = exp.model.apply(variables, jnp.asarray(batch["image"]),
                           method=RegionCLIPDetector.backbone)
    emb, _ = exp.model.apply(variables, res4, jnp.asarray(batch["boxes"]),
                             method=RegionCLIPDetector.region_features)
    logits = np.asarray(rc_losses.region_logits(emb, queries["concepts"], 0.01))
    assert np.all(logits[..., 0] == 0.0) and np.all(np.isfinite(logits))


def test_roi_boxes_stay_float32_under_bf16():
    """bf16 has 4-px steps above 512: boxes rounded to it would pool identical features."""
    config = smoke_config("unused", "regionclip", "coco_ovd,smoke")
    config.dtype = "bfloat16"
    from ovd_jax.methods import regionclip as rc  # noqa: PLC0415

    model = rc.build_model(config, text_vocab_size=32, eot_token_id=None)
    variables = model.init(jax.random.key(0), *rc.init_args(config))
    res4 = jax.random.normal(jax.random.key(1), (1, 48, 48, 256), jnp.bfloat16)
    a = jnp.asarray([[[600.0, 600.0, 700.0, 700.0]]])
    emb_a, _ = model.apply(variables, res4, a, method=RegionCLIPDetector.region_features)
    emb_b, _ = model.apply(variables, res4, a + 1.0, method=RegionCLIPDetector.region_features)
    assert not np.allclose(np.asarray(emb_a), np.asarray(emb_b))
