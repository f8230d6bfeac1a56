"""Resumption: N steps straight == N/2 steps, a restart from the checkpoint, N/2 more."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from helpers import smoke_config

from ovd_jax.training.loop import train_and_evaluate


def _losses(workdir):
    with open(os.path.join(workdir, "train_losses.json")) as f:
        return json.load(f)


def _final_params(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)["params"]


def test_resume_is_exact(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("data") / "syn")
    config = smoke_config(data)
    config.train.steps = 4
    config.train.checkpoint_every = 2
    config.train.eval_at_end = False
    straight = str(tmp_path_factory.mktemp("straight"))
    split = str(tmp_path_factory.mktemp("split"))

    train_and_evaluate(config, straight, progress=False)
    train_and_evaluate(config, split, max_steps=2, progress=False)
    first = _losses(split)
    train_and_evaluate(config, split, progress=False)  # restarts from step 2
    second = _losses(split)

    full = _losses(straight)
    assert full["start_step"] == 0 and len(full["losses"]) == 4
    assert first["start_step"] == 0 and second["start_step"] == 2
    np.testing.assert_array_equal(first["losses"] + second["losses"], full["losses"])
    a, b = _final_params(straight, 4), _final_params(split, 4)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
