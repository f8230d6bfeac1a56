"""The training loop: data, sharded state, checkpoint/resume, logging, evaluation at the end.

`train_and_evaluate(config, workdir)` is what `train.py` calls. It resumes automatically from
the newest checkpoint in `<workdir>/checkpoints` that restores completely (parameters, optimizer,
step, data-iterator state; a damaged newer one is reported and set aside), refusing one trained
with a different model, text side, input size or vocabulary unless
`config.train.allow_config_change`. On SIGTERM it saves a checkpoint and returns cleanly. A step
whose loss or gradients are not finite is never applied; the run stops naming it (or skips up to
`config.train.skip_nonfinite` of them), and no checkpoint is written past a step it stopped at.
Side files (config.json, train_losses.json, metrics.jsonl) survive a hard kill: JSON files are
replaced atomically, metrics after the restored step are dropped on restart.
A background thread places the next `config.data.device_prefetch` batches on the mesh while the
step runs (`prefetch.DevicePrefetcher`); checkpoints store the data-iterator state of the last
batch consumed, not of those read ahead.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import jax
from absl import logging
from tqdm import tqdm

from ovd_jax.data.pipeline import close_iterator
from ovd_jax.data.unified import DATA_TYPE_KEY
from ovd_jax.evaluation.metrics_only import write_json_atomic
from ovd_jax.training import checkpoint as ckpt
from ovd_jax.training import evaluate as evaluation
from ovd_jax.training import faults
from ovd_jax.training import prefetch as prefetch_lib
from ovd_jax.training import sharding as shd
from ovd_jax.training import train_step as ts
from ovd_jax.training.experiment import build_experiment
from ovd_jax.training.metric_writer import MetricWriter


class _StopFlag:
    """Set by SIGTERM (preemption); the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.stop = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM,):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners)
                pass
        return self

    def _handle(self, signum, frame):
        logging.warning("signal %d: saving a checkpoint and stopping", signum)
        self.stop = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_train_loader(exp, *, num_epochs=None):
    """The method's training input pipeline (per-process batches)."""
    return exp.method.make_train_loader(exp, num_epochs=num_epochs)


def checkpoint_meta(exp, state) -> dict:
    return {
        "method": exp.config.method,
        "param_fingerprint": ckpt.param_fingerprint(state.params),
        "train_classes": list(exp.train_classes),
        "config": json.loads(exp.config.to_json_best_effort()),
    }


def _abstract(state, shardings):
    """ShapeDtypeStructs of `state` carrying `shardings` (what orbax restores onto)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                        shardings)


def _restore(exp, checkpointer, state, state_shardings, meta):
    """The newest restorable checkpoint, checked against this run's config.

    Returns (state, data-iterator state or {}, the checkpoint's meta or {}, its step or None).
    """
    allow = bool(exp.config.train.get("allow_config_change", False))

    def check(where, saved):
        faults.check_resume_config(saved, meta["config"], meta["train_classes"], where=where,
                                   allow_change=allow)

    found = checkpointer.restore_newest(_abstract(state, state_shardings), meta, check)
    if found is None:
        return state, {}, {}, None
    step, state, data_state, saved = found
    if jax.process_index() == 0:
        print(f"resumed from {checkpointer.step_dir(step)}")
    return state, data_state, saved, step


@contextlib.contextmanager
def _closing(iterator):
    """Closes the data iterator (its grain worker processes with config.data.num_workers) when
    training ends, also when it ends with an exception."""
    try:
        yield iterator
    finally:
        close_iterator(iterator)


def _write_json(obj, path: str) -> None:
    """Process 0 writes `obj` to `path` atomically (a hard kill leaves the old or new file)."""
    if jax.process_index() == 0:
        write_json_atomic(obj, path)


def _fetch(pending: list) -> list:
    """(step, host metrics, image ids) of the pending (step, device metrics, ids) entries."""
    host = jax.device_get([m for _, m, _ in pending])
    return [(step, m, ids) for (step, _, ids), m in zip(pending, host)]


def restore_for_eval(exp, mesh, checkpoint_path: str):
    """Variables of the newest checkpoint under `checkpoint_path` (a workdir, its
    `checkpoints/` folder, or one step's folder) placed on `mesh`; returns (variables, step)."""
    path = os.path.abspath(checkpoint_path)
    step = None
    if os.path.basename(path).isdigit():
        step, path = int(os.path.basename(path)), os.path.dirname(path)
    elif os.path.isdir(ckpt.checkpoint_dir(path)):
        path = ckpt.checkpoint_dir(path)
    if not os.path.isdir(path):
        raise ValueError(f"no checkpoint directory at {checkpoint_path}; pass --workdir of a "
                         "training run or --checkpoint=<workdir>/checkpoints/<step>.")
    checkpointer = ckpt.Checkpointer(path, keep=1000)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"{path} holds no finished checkpoint; train first or fix --checkpoint.")
    state, state_shardings, _ = ts.create_train_state(exp, mesh, jax.random.key(0))
    meta = {"method": exp.config.method, "param_fingerprint": ckpt.param_fingerprint(state.params)}
    state, _ = checkpointer.restore(step, _abstract(state, state_shardings), meta)
    checkpointer.close()
    return state.variables(), step


def train_and_evaluate(config, workdir: str, *, max_steps: int | None = None,
                       progress: bool = True) -> dict:
    """Trains `config` in `workdir` (resuming if possible), then evaluates.

    `max_steps` stops early after that many total steps (the schedule still follows
    `config.train.steps`); used to test resumption. Returns the final metrics ({} when the
    evaluation is skipped or the run was stopped by a signal). Raises faults.NonFiniteError
    (a FloatingPointError and ValueError) when more than `config.train.skip_nonfinite` steps had
    a NaN/Inf loss or gradient.
    """
    os.makedirs(workdir, exist_ok=True)
    exp = build_experiment(config)
    mesh = shd.make_mesh(config.mesh.shape, config.mesh.axes)
    dp = shd.data_parallel_size(mesh)
    kinds = ts.data_types(exp)  # (None,) unless the method trains on several data types
    for kind in kinds:
        if ts.global_batch_size(exp, kind) % dp:
            name = "config.train.batch_size" if kind is None else \
                f"the {kind} batch size (config.train.batch_sizes.{kind})"
            raise ValueError(
                f"{name}={ts.global_batch_size(exp, kind)} must be a multiple of the "
                f"data-parallel mesh size {dp} (config.mesh.shape={tuple(config.mesh.shape)})."
            )
    root_key = jax.random.key(config.seed)
    state, state_shardings, tx = ts.create_train_state(exp, mesh, jax.random.fold_in(root_key, 0))
    constants = exp.method.train_constants(exp, state.variables())
    # One compiled step per data type (each has its own batch shapes); a batch names its type.
    step_fns = {kind: ts.make_train_step(exp, tx, mesh, state_shardings, constants, kind)
                for kind in kinds}
    loader = make_train_loader(exp)
    iterator = iter(loader)

    checkpointer = ckpt.Checkpointer(ckpt.checkpoint_dir(workdir), config.train.keep_checkpoints)
    meta = checkpoint_meta(exp, state)
    state, data_state, saved_meta, newest = _restore(exp, checkpointer, state, state_shardings,
                                                     meta)
    if data_state:
        iterator.set_state(data_state)
    # Skips used before a restart count towards the limit (kept in the checkpoint meta).
    guard = faults.NonFiniteGuard(int(config.train.get("skip_nonfinite", 0)),
                                  int(saved_meta.get("nonfinite_skipped", 0)))
    _write_json(json.loads(config.to_json_best_effort()), os.path.join(workdir, "config.json"))
    if jax.process_index() == 0:
        overview = shd.overview(state.params, state_shardings.params)
        logging.info("parameters:\n%s", overview)
        if progress:
            print(overview.splitlines()[0])

    total = int(config.train.steps) if max_steps is None else min(max_steps, config.train.steps)
    start = int(jax.device_get(state.step))
    will_eval = bool(config.train.eval_at_end) and max_steps is None
    writer = MetricWriter(workdir, resume_step=start,
                          rewrite_prefixes=("eval",) if will_eval else ())
    step_key = jax.random.fold_in(root_key, 1)
    stopped = False
    history = []
    logged = {}  # newest metrics of every data type, written together
    # Metrics stay on the devices until a log/checkpoint step fetches them all at once (no host
    # sync per step); every fetched step is checked for a non-finite loss/gradient before any
    # checkpoint is written. The image ids stay on the host for the report.
    pending = []
    log_every = int(config.train.log_every)

    def put(batch):  # runs in the prefetch thread: host batch -> (data type, device arrays)
        kind = batch.get(DATA_TYPE_KEY) if kinds != (None,) else None
        if kind not in step_fns:
            raise ValueError(f"the training loader gave a batch of data type {kind!r}; "
                             f"config.method={config.method!r} trains {kinds}.")
        return kind, ts.device_batch(exp, batch, mesh, kind)

    t0 = time.time()
    # Exits in reverse order: the prefetch thread stops before the iterator's workers close.
    with _closing(iterator), \
            prefetch_lib.DevicePrefetcher(iterator, put, int(config.data.get("device_prefetch", 2))
                                          ) as batches, \
            _StopFlag() as flag, tqdm(total=total, initial=start, desc="train", unit="step",
                                      disable=not progress or jax.process_index() != 0) as bar:
        for step in range(start, total):
            # data_state: the iterator's state right after this batch (not after the batches
            # already read ahead), which is what a checkpoint after this step must store.
            batch, (kind, device_arrays), data_state = next(batches)
            state, metrics = step_fns[kind](state, device_arrays, step_key)
            done = step + 1
            pending.append((done, metrics, batch.get("image_id")))
            if jax.default_backend() == "cpu":
                # The CPU backend can deadlock in all-reduces of back-to-back sharded steps;
                # accelerators run ahead of the host.
                jax.block_until_ready(metrics)
            bar.update(1)
            save = flag.stop or done % config.train.checkpoint_every == 0 or done == total
            if save or done % log_every == 0:
                records, pending = _fetch(pending), []
                guard.check(records, newest)  # raises before any checkpoint past a bad step
                for _, m, _ in records:
                    logged.update(m)
                    history.append(float(m["loss"]))
                logged.pop("nonfinite", None)
                logged["nonfinite_skipped"] = guard.skipped
                bar.set_postfix(loss=f"{history[-1]:.3f}")
            if done % log_every == 0 or done == total:
                writer.scalars(done, logged)
                writer.scalars(done, {"steps_per_sec": (done - start) / (time.time() - t0)},
                               prefix="perf")
            if save:
                meta["nonfinite_skipped"] = guard.skipped
                checkpointer.save(done, state, data_state, meta, force=True)
                newest = done
            if flag.stop:
                stopped = True
                break
    checkpointer.close()
    _write_json({"start_step": start, "losses": history},
                os.path.join(workdir, "train_losses.json"))

    metrics = {}
    if will_eval and not stopped:
        variables = state.variables()
        metrics = evaluation.evaluate(exp, variables, mesh, workdir, progress=progress)
        writer.scalars(total, {k: v for k, v in metrics.items() if isinstance(v, float)},
                       prefix="eval")
        if jax.process_index() == 0:
            print(evaluation.format_headline(metrics))
    writer.close()
    return metrics
