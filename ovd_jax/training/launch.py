"""What the entry points share: runtime set-up and the two model-mode jobs (train, evaluate)."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import flags, logging

from ovd_jax.training import evaluate as evaluation
from ovd_jax.training import loop
from ovd_jax.training import sharding as shd
from ovd_jax.training.experiment import build_experiment


def setup_runtime(*, distributed: bool = False, coordinator_address: str | None = None,
                  num_processes: int | None = None, process_id: int | None = None) -> None:
    """Persistent compilation cache (repeated runs compile once) and multi-process start-up.

    Any of `coordinator_address` ("host:port" of process 0), `num_processes`, `process_id`
    (jax.distributed.initialize's arguments), or `distributed=True`, starts the multi-process
    runtime; what is not given is detected from the environment (TPU pods, SLURM, Open MPI, or
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). None of them: one process.
    On CPU the processes' collectives go through gloo.
    """
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR",
                           os.path.expanduser("~/.cache/ovd_jax/jax_cache"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    explicit = (coordinator_address, num_processes, process_id)
    if distributed or any(v is not None for v in explicit):
        if num_processes is not None and not (process_id is None or
                                              0 <= process_id < num_processes):
            raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                             f"{num_processes}).")
        # CPU devices of several processes talk over gloo (set before the backend starts; GPUs
        # and TPUs ignore it).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    if jax.process_index() != 0:
        logging.set_verbosity(logging.ERROR)  # one process logs
    logging.info("process %d/%d, %d devices (%d local): %s", jax.process_index(),
                 jax.process_count(), jax.device_count(), jax.local_device_count(),
                 jax.devices()[:8])


def setup_runtime_from_flags() -> None:
    """`setup_runtime` with the values of the flags `cli.define_runtime_flags` defined."""
    f = flags.FLAGS
    setup_runtime(distributed=f.distributed, coordinator_address=f.coordinator_address,
                  num_processes=f.num_processes, process_id=f.process_id)


def train(config, workdir: str, *, progress: bool = True) -> dict:
    return loop.train_and_evaluate(config, workdir, progress=progress)


def load_config_for_eval(config, workdir: str | None):
    """The config flag if given, else the `config.json` a training run wrote in `workdir`."""
    if config is not None:
        return config
    path = os.path.join(workdir or "", "config.json")
    if not workdir or not os.path.isfile(path):
        raise ValueError("eval.py needs --config, or a --workdir holding the config.json that "
                         "train.py writes.")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def evaluate_model(config, *, workdir: str | None, checkpoint: str | None,
                   output_dir: str | None, protocol: str = "detection",
                   progress: bool = True) -> dict:
    """Restores a checkpoint, runs the detector on the validation set, writes and returns
    metrics (`<output_dir>/metrics.json`, `detections.json`, annotated images)."""
    config = load_config_for_eval(config, workdir)
    source = checkpoint or workdir
    if not source:
        raise ValueError("eval.py needs --workdir (newest checkpoint) or --checkpoint.")
    exp = build_experiment(config, with_train=False)
    mesh = shd.make_mesh(config.mesh.shape, config.mesh.axes)
    variables, step = loop.restore_for_eval(exp, mesh, source)
    out = output_dir or os.path.join(workdir or os.path.dirname(os.path.abspath(source)),
                                     f"eval_{step}")
    if protocol == "gt_boxes":
        metrics = evaluation.evaluate_gt_boxes(exp, variables, mesh, out, progress=progress)
        name = "metrics_gt_boxes.json"
        headline = {k: metrics[k] for k in ("top1_accuracy", "top5_accuracy", "AP", "AP50")}
        table = "\n".join(f"{k:>15}: {v:.4f}" for k, v in headline.items())
    elif protocol == "detection":
        metrics = evaluation.evaluate(exp, variables, mesh, out, progress=progress)
        name, table = "metrics.json", evaluation.format_headline(metrics)
    else:
        raise ValueError(f"--protocol={protocol!r}: use 'detection' or 'gt_boxes'.")
    metrics["checkpoint_step"] = step
    if jax.process_index() == 0:
        print(table)
        print(f"wrote {os.path.join(out, name)}")
    return metrics
