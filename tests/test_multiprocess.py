"""Multi-process training and evaluation through jax.distributed equal one process.

Two subprocesses on this machine (4 CPU devices each, gloo collectives over loopback) run
train.py's CLI on `configs/demo.py:smoke` with --coordinator_address/--num_processes/--process_id;
their losses, final parameters and every process's evaluation metrics must equal one process with
8 devices. The data pipeline's per-process blocks concatenate to the single-process batches.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from helpers import REPO, smoke_config

from ovd_jax.data.pipeline import make_detection_loader
from ovd_jax.training.experiment import build_experiment
from ovd_jax.training.loop import train_and_evaluate

STEPS = 2

# Runs train.py's main (flags, runtime set-up, training, evaluation) and keeps what
# launch.train returns on every process: only process 0 writes the run's files.
_DRIVER = """
import json, sys
sys.argv = ["train.py"] + sys.argv[1:]
sys.path.insert(0, {repo!r})
import jax
from absl import app
import train
from ovd_jax.training import launch
run = launch.train
def keep(config, workdir, **kw):
    metrics = run(config, workdir, **kw)
    with open(f"{{workdir}}/metrics_process{{jax.process_index()}}.json", "w") as f:
        json.dump({{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}, f)
    return metrics
launch.train = keep
app.run(train.main, flags_parser=train.cli.parse_flags)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _overrides(data_root):
    return [f"--config.data.root={data_root}", f"--config.train.steps={STEPS}",
            f"--config.train.checkpoint_every={STEPS}", "--config.train.log_every=1",
            "--config.eval.num_visualizations=0"]


def test_process_blocks_concatenate_to_global_batches(tmp_path_factory):
    exp = build_experiment(smoke_config(str(tmp_path_factory.mktemp("data") / "syn")))
    kw = dict(image_size=64, max_boxes=4, cat_id_to_index=exp.train_data.cat_id_to_index,
              train=True, seed=3, num_epochs=2)
    records = exp.train_data.records

    def batches(loader, n=3):
        it = iter(loader)
        return [next(it) for _ in range(n)]

    one = batches(make_detection_loader(records, batch_size=8, **kw))
    parts = [batches(make_detection_loader(records, batch_size=4, shard_index=i, shard_count=2,
                                           **kw)) for i in range(2)]
    for k, whole in enumerate(one):
        for key in ("image", "boxes", "labels", "image_id"):
            joined = np.concatenate([parts[0][k][key], parts[1][k][key]])
            np.testing.assert_array_equal(joined, whole[key], err_msg=f"batch {k} {key}")


def test_two_processes_equal_one(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("data") / "syn")
    config = smoke_config(data)
    config.train.steps = STEPS
    config.train.checkpoint_every = STEPS
    config.train.log_every = 1
    config.eval.num_visualizations = 0

    multi = str(tmp_path_factory.mktemp("multi"))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DRIVER.format(repo=REPO),
             "--config=configs/demo.py:smoke", f"--workdir={multi}", "--progress=false",
             f"--coordinator_address=localhost:{port}", "--num_processes=2",
             f"--process_id={i}", *_overrides(data)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    # The reference runs meanwhile in this process (8 devices, one process).
    single = str(tmp_path_factory.mktemp("single"))
    ref_metrics = train_and_evaluate(config, single, progress=False)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]

    def losses(workdir):
        with open(os.path.join(workdir, "train_losses.json")) as f:
            return json.load(f)["losses"]

    np.testing.assert_allclose(losses(multi), losses(single), rtol=1e-5)
    ckpt = ocp.StandardCheckpointer()
    b_state = ckpt.restore(os.path.join(single, "checkpoints", str(STEPS), "state"))
    # The two-process checkpoint names devices of both processes: restore it onto this
    # process's first device, with the single-process state's structure as the target.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one)
        if hasattr(x, "shape") else x, b_state)
    a = ckpt.restore(os.path.join(multi, "checkpoints", str(STEPS), "state"), target)["params"]
    b = b_state["params"]
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        name = jax.tree_util.keystr(path)
        if "k_proj" in name and "bias" in name:
            # Softmax is invariant to a key bias, so its true gradient is exactly 0: what it
            # gets is float round-off, which depends on how the batch is laid out over
            # devices, and Adam scales that noise to learning-rate-sized steps.
            continue
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=name)
    assert ref_metrics["AP50"] >= 0
    for i in range(2):
        with open(os.path.join(multi, f"metrics_process{i}.json")) as f:
            got = json.load(f)
        for key, value in got.items():
            np.testing.assert_allclose(value, ref_metrics[key], rtol=1e-4, atol=1e-6,
                                       err_msg=f"process {i} {key}")
        assert {"AP", "AP50"} <= set(got)
