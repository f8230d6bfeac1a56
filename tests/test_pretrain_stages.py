"""Region-text pretraining (config.method = "regionclip_pretrain") end to end at smoke size:
a teacher workdir feeds the student (initialised from it) and its proposals; the step is the
same on 8 devices as on 1; a transfer run starts from the pretraining workdir with its text
tower frozen; eval's GT-box protocol runs on the student."""

import json
import os

import flax
import jax
import numpy as np
import pytest
from helpers import one_train_step, smoke_config

from ovd_jax.training import checkpoint as ckpt
from ovd_jax.training import sharding as shd
from ovd_jax.training import train_step as ts
from ovd_jax.training.experiment import build_experiment
from ovd_jax.training.loop import checkpoint_meta, make_train_loader
from ovd_jax.training.optimizer import make_optimizer
from ovd_jax.training.pretrained import load_pretrained


def _save_workdir(exp, workdir: str, key: int) -> dict:
    """A training workdir holding one checkpoint of a freshly initialised state (what
    train.py writes: checkpoints/<step>/ + config.json); returns its variables (numpy)."""
    mesh = shd.make_mesh((-1, 1, 1), devices=jax.devices()[:1])
    state, _, _ = ts.create_train_state(exp, mesh, jax.random.key(key))
    saver = ckpt.Checkpointer(ckpt.checkpoint_dir(workdir))
    saver.save(1, state, {}, checkpoint_meta(exp, state), force=True)
    saver.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(exp.config.to_json_best_effort())
    return jax.device_get(state.variables())


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    data = str(root / "syn")
    teacher_dir = str(root / "teacher")
    t_exp = build_experiment(smoke_config(data, arg="teacher,smoke"))
    teacher = _save_workdir(t_exp, teacher_dir, key=3)
    config = smoke_config(data, arg="pretrain,smoke")
    config.model.teacher = teacher_dir
    return {"data": data, "teacher_dir": teacher_dir, "teacher": teacher,
            "exp": build_experiment(config), "root": root}


def test_student_starts_from_teacher_and_constants_hold_it(stages):
    exp, teacher = stages["exp"], stages["teacher"]
    assert exp.config.model.init_checkpoint == stages["teacher_dir"]
    mesh = shd.make_mesh((-1, 1, 1), devices=jax.devices()[:1])
    state, _, _ = ts.create_train_state(exp, mesh, jax.random.key(0))
    student = jax.device_get(state.variables())
    assert "rpn_head" not in student["params"] and "logit_scale" not in student["params"]
    for tower in ("vision", "text"):
        for col in ("params", "batch_stats"):
            if tower not in teacher.get(col, {}):
                continue
            flat_s = flax.traverse_util.flatten_dict(student[col][tower])
            for k, v in flax.traverse_util.flatten_dict(teacher[col][tower]).items():
                np.testing.assert_array_equal(flat_s[k], v, err_msg=f"{col}/{tower}/{k}")
    consts = exp.method.train_constants(exp, state.variables())
    assert "rpn_head" in consts["teacher"]["params"] and consts["anchors"].shape[-1] == 4
    # The concept pool: the image-text captions' noun phrases, one embedding each.
    k, d = consts["concepts"].shape
    assert k >= 10 and d == 64
    np.testing.assert_allclose(np.linalg.norm(np.asarray(consts["concepts"]), axis=-1), 1.0,
                               rtol=1e-5)


def test_pretrain_step_eight_devices_equals_one(stages):
    exp = stages["exp"]
    batch = next(iter(make_train_loader(exp)))
    assert set(exp.method.device_keys(exp.config)) <= set(batch)

    def one_step(devices):
        params, metrics, _, dev_batch = one_train_step(exp, devices, batch)
        return params, metrics, dev_batch

    p8, m8, b8 = one_step(jax.devices())
    p1, m1, _ = one_step(jax.devices()[:1])
    assert len(b8["image"].sharding.device_set) == 8
    for k in ("loss", "loss_region_concept", "loss_distillation", "loss_image_text",
              "kept_regions"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert m1["loss_region_concept"] > 0 and m1["loss_image_text"] > 0
    for path, a in jax.tree_util.tree_leaves_with_path(p8):
        b = p1
        for key in path:
            b = b[key.key]
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
    # The text tower is frozen (upstream freezes the student's language encoder): a second
    # optimizer update (the first has learning rate 0) moves the image tower only.
    params = jax.device_get(p1)
    tx = make_optimizer(exp.config, params)
    grads = jax.tree.map(np.ones_like, params)
    _, opt = tx.update(grads, tx.init(params), params)
    updates, _ = tx.update(grads, opt, params)
    assert all(not np.asarray(u).any() for u in jax.tree.leaves(updates["text"]))
    assert all(np.asarray(u).any() for u in jax.tree.leaves(updates["vision"]))


def test_losses_switch_off_and_weight(stages):
    exp = stages["exp"]
    batch = next(iter(make_train_loader(exp)))
    mesh = shd.make_mesh((-1, 1, 1), devices=jax.devices()[:1])
    state, _, _ = ts.create_train_state(exp, mesh, jax.random.key(0))
    consts = exp.method.train_constants(exp, state.variables())
    b = {k: batch[k] for k in exp.method.device_keys(exp.config)}

    def run(**settings):
        c = exp.config.copy_and_resolve_references()
        c.pretrain.update(settings)
        return exp.method.train_loss(exp.model, state.params, state.model_state, b, consts,
                                     jax.random.key(5), c)

    loss, m = run()
    total = m["loss_region_concept"] + m["loss_distillation"] + m["loss_image_text"]
    np.testing.assert_allclose(loss, total, rtol=1e-6)
    loss, m = run(use_distillation=False, image_text_weight=0.5)
    assert "loss_distillation" not in m
    np.testing.assert_allclose(loss, m["loss_region_concept"] + 0.5 * m["loss_image_text"],
                               rtol=1e-6)


def test_transfer_from_pretraining_workdir_freezes_text(stages):
    pre_dir = str(stages["root"] / "pretrain")
    student = _save_workdir(stages["exp"], pre_dir, key=0)
    assert load_pretrained(pre_dir).kind == "workdir"
    config = smoke_config(stages["data"])  # the transfer detector
    config.text.context_length = 24  # the pretrained text tower's
    config.model.init_checkpoint = pre_dir
    exp = build_experiment(config)
    assert exp.config.text.trainable is False
    mesh = shd.make_mesh((-1, 1, 1), devices=jax.devices()[:1])
    state, shardings, tx = ts.create_train_state(exp, mesh, jax.random.key(9))
    for tower in ("vision", "text"):
        for a, b in zip(jax.tree.leaves(jax.device_get(state.params[tower])),
                        jax.tree.leaves(student["params"][tower])):
            np.testing.assert_array_equal(a, b)
    constants = exp.method.train_constants(exp, state.variables())
    step = ts.make_train_step(exp, tx, mesh, shardings, constants)
    it = iter(make_train_loader(exp))
    new = state
    for _ in range(2):  # the first step has learning rate 0 (warmup from 0)
        new, _ = step(new, ts.device_batch(exp, next(it), mesh), jax.random.key(1))
        jax.block_until_ready(new)
    new = jax.device_get(new.params)
    for a, b in zip(jax.tree.leaves(new["text"]), jax.tree.leaves(student["params"]["text"])):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(new["vision"]), jax.tree.leaves(student["params"]["vision"])))
    # A checkpoint of another architecture is refused with the mismatching keys.
    config.text.context_length = 8
    bad = build_experiment(config)
    with pytest.raises(ValueError, match="positional_embedding"):
        ts.create_train_state(bad, mesh, jax.random.key(0))


def test_cli_chain_and_gt_box_eval(stages, tmp_path):
    """train.py runs the pretraining stage from the teacher workdir and eval.py's GT-box
    protocol scores the student; metrics.json carries caption_only_AP50."""
    import subprocess
    import sys

    from helpers import REPO

    work = str(tmp_path / "pre")
    cmd = [sys.executable, "train.py", "--config=configs/demo.py:pretrain,smoke",
           f"--workdir={work}", f"--config.data.root={stages['data']}",
           f"--config.model.teacher={stages['teacher_dir']}", "--noprogress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(work, "metrics.json")) as f:
        metrics = json.load(f)
    assert "caption_only_AP50" in metrics and "novel_AP50" in metrics
    proc = subprocess.run([sys.executable, "eval.py", f"--workdir={work}", "--protocol=gt_boxes",
                           "--noprogress"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "top1_accuracy" in proc.stdout
