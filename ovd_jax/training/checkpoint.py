"""Orbax checkpoints of the train state, the data-iterator state and the config.

Layout under `<workdir>/checkpoints/<step>/`: `state` (sharded arrays), `data` (the grain
iterator state, JSON), `meta` (method, a fingerprint of the parameter tree, the config). Orbax
writes each step into a temporary directory and renames it when complete, so a crash never
leaves a half-written checkpoint that a restart would pick up.
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


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

    def restore(self, step: int, abstract_state, expected_meta: dict):
        """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding).

        Raises ValueError when the checkpoint was written by another method or parameter tree.
        """
        meta = self.read_meta(step)
        for key in ("method", "param_fingerprint"):
            if meta.get(key) != expected_meta.get(key):
                raise ValueError(
                    f"checkpoint {os.path.join(self.directory, str(step))} was written by another "
                    f"model ({key}: checkpoint {meta.get(key)!r}, this config "
                    f"{expected_meta.get(key)!r}); use a fresh --workdir or the config it was "
                    "trained with."
                )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["data"] or {})

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")
