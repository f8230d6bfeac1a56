"""Bad input stops with one clear message naming the input (and nothing half-written)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, smoke_config

from ovd_jax.data import synthetic
from ovd_jax.text.prompts import concept_prompts
from ovd_jax.training.experiment import build_experiment
from ovd_jax.training.loop import train_and_evaluate


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data") / "syn")
    c = smoke_config(root)
    synthetic.generate(root, seed=c.data.synthetic_seed, num_train=c.data.synthetic_num_train,
                       num_val=c.data.synthetic_num_val,
                       image_size=c.data.synthetic_image_size)
    return root


def _copy_config(dataset, tmp_path):
    """A smoke config pointing at a private copy of the dataset (real-data mode)."""
    root = str(tmp_path / "copy")
    shutil.copytree(dataset, root)
    c = smoke_config(root)
    paths = synthetic._paths(root)
    c.data.synthetic = False
    c.data.train_instances, c.data.train_images = paths.train_instances, paths.train_images
    c.data.val_instances, c.data.val_images = paths.val_instances, paths.val_images
    c.data.split_file = paths.split_file
    c.text.vocab_file = paths.vocab_file
    return c, paths


def _edit_json(path, fn):
    with open(path) as f:
        data = json.load(f)
    fn(data)
    with open(path, "w") as f:
        json.dump(data, f)


def test_missing_image_file(dataset, tmp_path):
    c, paths = _copy_config(dataset, tmp_path)
    victim = sorted(os.listdir(paths.val_images))[0]
    os.remove(os.path.join(paths.val_images, victim))
    with pytest.raises(ValueError, match=victim):
        build_experiment(c)


def test_box_outside_its_image(dataset, tmp_path):
    c, paths = _copy_config(dataset, tmp_path)

    def push_out(d):
        ann = d["annotations"][0]
        ann["bbox"][0] = 1000.0

    _edit_json(paths.train_instances, push_out)
    with pytest.raises(ValueError, match="outside"):
        build_experiment(c)


def test_empty_vocabulary(dataset, tmp_path):
    c, paths = _copy_config(dataset, tmp_path)
    _edit_json(paths.val_instances, lambda d: d.update(categories=[], annotations=[]))
    with pytest.raises(ValueError, match="(?i)categor|vocabulary"):
        build_experiment(c)
    with pytest.raises(ValueError, match="vocabulary is empty"):
        concept_prompts([], ["a {}."])


def test_unknown_config_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--config=configs/demo.py:smoke",
         "--config.data.no_such_key=1", f"--workdir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown config key" in proc.stderr and "no_such_key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_checkpoint_of_another_model(dataset, tmp_path):
    c, _ = _copy_config(dataset, tmp_path)
    c.train.steps = 1
    c.train.eval_at_end = False
    workdir = str(tmp_path / "run")
    train_and_evaluate(c, workdir, progress=False)
    c.model.rpn_channels = 48  # a different parameter tree
    with pytest.raises(ValueError, match="another model"):
        train_and_evaluate(c, workdir, progress=False)
