"""Training faults: non-finite steps, hard kills, damaged checkpoints, changed configs.

The fast tests check the pieces (config comparison, checkpoint fallback, metrics de-duplication)
on tiny inputs; the `slow` ones train the smoke config for a few steps.
"""

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import REPO, smoke_config

from ovd_jax.training import checkpoint as ckpt
from ovd_jax.training import faults, loop
from ovd_jax.training.metric_writer import MetricWriter


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data") / "syn")


def _config(data_root, **train):
    config = smoke_config(data_root)
    config.train.eval_at_end = False
    for k, v in train.items():
        setattr(config.train, k, v)
    return config


def _params(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)["params"]


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _jsonl(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- fast: the pieces


def test_config_differences_name_the_keys_that_matter(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(32, 512))
    saved = {"model": {"rpn_channels": 32, "init_checkpoint": "a", "vision_overrides": {"w": 8}},
             "text": {"tokenizer": "wordpiece"}, "data": {"image_size": size, "root": "x"},
             "optim": {"learning_rate": 1e-3}, "train": {"steps": 4}}
    same = json.loads(json.dumps(saved))
    # Only start-up paths, data roots, optimiser and schedule changed: resumable.
    same["model"]["init_checkpoint"] = "b"
    same["data"]["root"] = "y"
    same["optim"]["learning_rate"] = 1.0
    same["train"]["steps"] = 8
    assert faults.config_differences(saved, same, ["cat"], ["cat"]) == []
    changed = json.loads(json.dumps(saved))
    changed["model"]["vision_overrides"]["w"] = 16
    changed["text"]["tokenizer"] = "clip_bpe"
    changed["data"]["image_size"] = size + 32
    changed["data"]["min_size"] = 48  # absent before
    diffs = faults.config_differences(saved, changed, ["cat", "dog"], ["cat", "cow"])
    text = "; ".join(diffs)
    assert len(diffs) == 5, diffs
    for part in ("model.vision_overrides.w: 8 -> 16", "text.tokenizer: 'wordpiece' -> 'clip_bpe'",
                 f"data.image_size: {size} -> {size + 32}", "data.min_size: (absent) -> 48",
                 "removed ['dog'], added ['cow']"):
        assert part in text, (part, text)
    with pytest.raises(ValueError, match="allow_config_change"):
        faults.check_resume_config({"config": saved, "train_classes": ["cat"]}, changed, ["cat"],
                                   where="ck/2", allow_change=False)
    assert len(faults.check_resume_config({"config": saved, "train_classes": ["cat"]}, changed,
                                          ["cat"], where="ck/2", allow_change=True)) == 4


def test_damaged_newest_checkpoint_is_named_and_previous_used(tmp_path, seed, caplog):
    rng = np.random.default_rng(seed)
    values = {s: rng.normal(size=(5,)).astype(np.float32) for s in (1, 2, 3)}
    meta = {"method": "m", "param_fingerprint": "f"}
    c = ckpt.Checkpointer(str(tmp_path), keep=5)
    for s, v in values.items():
        c.save(s, {"w": jnp.asarray(v)}, {"pos": s}, meta, force=True)
    c.close()
    # Step 3 loses its array data (a truncated copy), step 2 its meta file.
    state_dir = tmp_path / "3" / "state"
    for name in os.listdir(state_dir):
        if name == "d" or name.startswith("ocdbt") or name.startswith("manifest"):
            p = state_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for name in os.listdir(tmp_path / "2" / "meta"):
        (tmp_path / "2" / "meta" / name).unlink()

    c = ckpt.Checkpointer(str(tmp_path), keep=5)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((5,), jnp.float32, sharding=sharding)}
    with caplog.at_level(logging.WARNING):
        step, state, data_state, _ = c.restore_newest(abstract, meta)
    assert step == 1 and data_state == {"pos": 1}
    np.testing.assert_array_equal(np.asarray(state["w"]), values[1])
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warned) == 2
    assert str(tmp_path / "3") in warned[0] and "NOT_FOUND" in warned[0], warned[0]
    assert str(tmp_path / "2") in warned[1] and "Error" in warned[1], warned[1]
    # The damaged steps are kept aside, and their step numbers can be saved again.
    assert {"2.damaged", "3.damaged"} <= set(os.listdir(tmp_path))
    c.save(2, {"w": jnp.zeros(5)}, {}, meta, force=True)
    assert c.latest_step() == 2
    # A checkpoint of another model is refused, not skipped as damaged.
    with pytest.raises(ValueError, match="another model"):
        c.restore_newest(abstract, {"method": "m", "param_fingerprint": "g"})
    c.close()

    # Nothing restorable: one sentence naming every damaged step.
    only = tmp_path / "only"
    c = ckpt.Checkpointer(str(only), keep=5)
    c.save(1, {"w": jnp.zeros(5)}, {}, meta, force=True)
    for name in os.listdir(only / "1" / "meta"):
        (only / "1" / "meta" / name).unlink()
    with pytest.raises(ValueError, match=r"no checkpoint under .* restores: .*/1 \("):
        c.restore_newest(abstract, meta)
    c.close()


def test_metrics_after_the_restored_step_are_dropped(tmp_path):
    w = MetricWriter(str(tmp_path), resume_step=0)
    for step in range(1, 6):
        w.scalars(step, {"loss": float(step)})
        w.scalars(step, {"steps_per_sec": 1.0}, prefix="perf")
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "prefix": "tr')  # cut short by a hard kill
    # Restart from the checkpoint at step 3: steps 4.. are trained (and written) again.
    w = MetricWriter(str(tmp_path), resume_step=3)
    for step in range(4, 7):
        w.scalars(step, {"loss": 10.0 + step})
    w.scalars(6, {"AP": 0.5}, prefix="eval")
    w.close()
    records = _jsonl(tmp_path)
    keys = [(r["step"], r["prefix"]) for r in records]
    assert len(keys) == len(set(keys)), keys
    assert [r["loss"] for r in records if r["prefix"] == "train"] == [1, 2, 3, 14, 15, 16]
    # A finished run evaluated again replaces its eval line.
    w = MetricWriter(str(tmp_path), resume_step=6, rewrite_prefixes=("eval",))
    w.scalars(6, {"AP": 0.7}, prefix="eval")
    w.close()
    evals = [r["AP"] for r in _jsonl(tmp_path) if r["prefix"] == "eval"]
    assert evals == [0.7]
    # Each (re)start writes its own TensorBoard event file.
    assert len(os.listdir(tmp_path / "tensorboard")) == 3


# ---------------------------------------------------------------- slow: training runs


@pytest.mark.slow
def test_huge_learning_rate_stops_and_keeps_checkpoints_finite(data_root, tmp_path):
    config = _config(data_root, steps=4, checkpoint_every=1, log_every=1)
    config.optim.learning_rate = 1e9
    workdir = str(tmp_path / "run")
    with pytest.raises(FloatingPointError) as info:
        loop.train_and_evaluate(config, workdir, progress=False)
    message = str(info.value)
    assert isinstance(info.value, ValueError)  # train.py prints it as one `error:` line
    bad = int(message.split("step ")[1].split()[0])
    assert "training stopped: step" in message and "image ids [" in message, message
    assert "loss=nan" in message or "loss=inf" in message, message
    steps = _steps(workdir)
    assert steps and max(steps) < bad, (steps, message)  # nothing saved at or after it
    assert f"newest checkpoint (step {max(steps)})" in message
    for leaf in jax.tree.leaves(_params(workdir, max(steps))):
        assert np.isfinite(leaf).all()

    # Resuming with another model, tokenizer or input size is refused, listing the keys.
    changed = _config(data_root, steps=4, checkpoint_every=1, log_every=1)
    changed.model.rpn_channels = 16
    changed.text.templates = ("a {}.",)
    changed.data.image_size = 96
    with pytest.raises(ValueError, match="another model or data configuration") as info:
        loop.train_and_evaluate(changed, workdir, progress=False)
    for key in ("model.rpn_channels: 32 -> 16", "text.templates", "data.image_size: 64 -> 96"):
        assert key in str(info.value), str(info.value)
    assert "optim.learning_rate" not in str(info.value)


class _NaNAt:
    """Wraps a training loader so that batch number `at` (0-based) has NaN pixels; records the
    image ids of that batch."""

    def __init__(self, loader, at):
        self.loader, self.at, self.ids = loader, at, None

    def __iter__(self):
        outer, inner = self, iter(self.loader)

        class It:
            count = 0

            def __next__(self):
                batch = dict(next(inner))
                if It.count == outer.at:
                    batch["image"] = np.full_like(batch["image"], np.nan)
                    outer.ids = [int(i) for i in batch["image_id"]]
                It.count += 1
                return batch

            def get_state(self):
                return inner.get_state()

            def set_state(self, state):
                inner.set_state(state)

        return It()


@pytest.mark.slow
def test_skip_nonfinite_skips_counts_and_continues(data_root, tmp_path, monkeypatch, caplog):
    wrapped = {}
    original = loop.make_train_loader

    def loader(exp, *, num_epochs=None):
        wrapped["it"] = _NaNAt(original(exp, num_epochs=num_epochs), at=1)
        return wrapped["it"]

    monkeypatch.setattr(loop, "make_train_loader", loader)
    config = _config(data_root, steps=4, checkpoint_every=2, log_every=2, skip_nonfinite=1)
    workdir = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        loop.train_and_evaluate(config, workdir, progress=False)
    ids = wrapped["it"].ids
    warned = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert len(warned) == 1 and "step 2 is not finite" in warned[0], warned
    assert f"image ids {sorted(ids)}" in warned[0] or f"image ids {ids}" in warned[0], warned
    train = [r for r in _jsonl(workdir) if r["prefix"] == "train"]
    assert [(r["step"], r["nonfinite_skipped"]) for r in train] == [(2, 1), (4, 1)]
    # NaN pixels reach the gradients even where the loss stays finite (masked terms).
    assert "grad_norm=nan" in warned[0], warned
    with open(os.path.join(workdir, "train_losses.json")) as f:
        losses = json.load(f)["losses"]
    assert len(losses) == 4 and all(math.isfinite(x) for i, x in enumerate(losses) if i != 1)
    params = _params(workdir, 4)
    for leaf in jax.tree.leaves(params):
        assert np.isfinite(leaf).all()
    # The skip count is kept in the checkpoint: a resumed run with the same limit stops at the
    # next non-finite step instead of skipping it.
    meta = ckpt.Checkpointer(os.path.join(workdir, "checkpoints")).read_meta(4)
    assert meta["nonfinite_skipped"] == 1


@pytest.mark.slow
def test_hard_kill_then_restart_matches_uninterrupted_run(data_root, tmp_path):
    overrides = {"steps": 4, "checkpoint_every": 2, "log_every": 1}
    # Reference: the same run without interruption (checkpoints do not change the numbers:
    # tests/test_resume.py), saving only at the end.
    reference = str(tmp_path / "straight")
    loop.train_and_evaluate(_config(data_root, **dict(overrides, checkpoint_every=4)), reference,
                            progress=False)

    workdir = str(tmp_path / "killed")
    args = [sys.executable, "train.py", "--config=configs/demo.py:smoke", f"--workdir={workdir}",
            f"--config.data.root={data_root}", "--config.train.eval_at_end=False",
            "--noprogress", *(f"--config.train.{k}={v}" for k, v in overrides.items())]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    # Kill once step 3 is logged (after the checkpoint at 2, before the one at 4).
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and '"step": 3,' in open(metrics).read():
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _steps(workdir) == [2], _steps(workdir)
    assert max(r["step"] for r in _jsonl(workdir)) >= 3  # logged past the checkpoint

    restart = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert "resumed from" in restart.stdout
    a, b = _params(reference, 4), _params(workdir, 4)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    keys = [(r["step"], r["prefix"]) for r in _jsonl(workdir)]
    assert len(keys) == len(set(keys)) and max(keys)[0] == 4, keys
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["steps"] == 4
    assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 2
