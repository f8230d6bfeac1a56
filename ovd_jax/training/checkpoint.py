"""Orbax checkpoints of the train state, the data-iterator state and the config.

Layout under `<workdir>/checkpoints/<step>/`: `state` (sharded arrays), `data` (the grain
iterator state, JSON), `meta` (method, a fingerprint of the parameter tree, the config). Orbax
writes each step into a temporary directory and renames it when complete, so a crash never
leaves a half-written checkpoint that a restart would pick up. A finished step that was damaged
later (files deleted or truncated) is reported by `restore_newest`, moved aside to
`<step>.damaged`, and the previous step is used.
"""

from __future__ import annotations

import hashlib
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


def param_fingerprint(params) -> str:
    """A short hash of the parameter tree's paths, shapes and dtypes (not the values)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    desc = ";".join(
        f"{jax.tree_util.keystr(p)}:{tuple(x.shape)}:{np.dtype(x.dtype).name}" for p, x in leaves
    )
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


class Checkpointer:
    """Saves/restores (state, data-iterator state) with orbax; keeps the newest `keep` steps."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        # Synchronous saves: a step directory is complete when save() returns (and on SIGTERM).
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict | None, meta: dict, *, force=False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta),
        )
        saved = self.manager.save(step, args=args, force=force)
        return bool(saved)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def _check_model(self, step: int, meta: dict, expected_meta: dict) -> None:
        for key in ("method", "param_fingerprint"):
            if meta.get(key) != expected_meta.get(key):
                raise ValueError(
                    f"checkpoint {self.step_dir(step)} was written by another "
                    f"model ({key}: checkpoint {meta.get(key)!r}, this config "
                    f"{expected_meta.get(key)!r}); use a fresh --workdir or the config it was "
                    "trained with."
                )

    def _restore_arrays(self, step: int, abstract_state):
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["data"] or {})

    def restore(self, step: int, abstract_state, expected_meta: dict):
        """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding).

        Raises ValueError when the checkpoint was written by another method or parameter tree.
        """
        self._check_model(step, self.read_meta(step), expected_meta)
        return self._restore_arrays(step, abstract_state)

    def restore_newest(self, abstract_state, expected_meta: dict, check_meta=None):
        """The newest step that restores completely: (step, state, data_state, meta), or None
        when there is no checkpoint.

        A step whose files are missing or unreadable is logged as a warning naming its directory
        and the error, renamed to `<step>.damaged` (so later saves of that step number work),
        and the next older one is tried. `check_meta(step_dir, meta)` may refuse (raise) a
        readable step, as does a different method / parameter tree; those errors propagate.
        Raises ValueError when steps exist but none of them restores.
        """
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.read_meta(step)
            except Exception as e:  # noqa: BLE001  (any unreadable file means a damaged step)
                damaged.append(self._set_aside(step, e))
                continue
            if check_meta is not None:
                check_meta(self.step_dir(step), meta)
            self._check_model(step, meta, expected_meta)
            try:
                state, data_state = self._restore_arrays(step, abstract_state)
            except Exception as e:  # noqa: BLE001
                damaged.append(self._set_aside(step, e))
                continue
            return step, state, data_state, meta
        if damaged:
            raise ValueError(
                f"no checkpoint under {self.directory} restores: {'; '.join(damaged)}; restore "
                "the files or move the checkpoints folder away to start from scratch."
            )
        return None

    def _set_aside(self, step: int, error: Exception) -> str:
        """Warns about a damaged step, renames it out of orbax's sight; returns a summary."""
        path = self.step_dir(step)
        # tensorstore appends its whole JSON spec to the first line; the reason comes before it.
        reason = (str(error).splitlines() or [""])[0].split(" [tensorstore_spec")[0]
        message = f"{type(error).__name__}: {reason[:300]}"
        aside = f"{path}.damaged"
        if os.path.exists(aside):
            aside = f"{aside}.{int(time.time())}"
        logging.warning("checkpoint %s is damaged (%s); moved to %s, trying the previous step",
                        path, message, aside)
        if jax.process_index() == 0:
            os.replace(path, aside)
        if jax.process_count() > 1:  # every process sees the rename before listing steps again
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices(f"set aside damaged checkpoint {step}")
        self.manager.reload()
        return f"{path} ({message})"

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")
