"""TensorBoard scalars (via tensorboardX: no TensorFlow needed) and a JSONL log of the same."""

from __future__ import annotations

import json
import os

import jax
import numpy as np


class MetricWriter:
    """Writes scalars to `<workdir>/tensorboard` and `<workdir>/metrics.jsonl` (process 0 only).

    `resume_step`: the step a (re)started run continues from (0 for a fresh one). Lines of
    metrics.jsonl after it (written by a run killed before its next checkpoint, about to be
    written again) are dropped first, as are lines at `resume_step` with a prefix in
    `rewrite_prefixes` (e.g. "eval" when a finished run is evaluated again); so every
    (step, prefix) appears once. TensorBoard gets a new event file whose `purge_step` hides the
    older files' events after `resume_step`.
    """

    def __init__(self, workdir: str, resume_step: int | None = None,
                 rewrite_prefixes: tuple[str, ...] = ()):
        self.enabled = jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter  # noqa: PLC0415  (optional heavy import)

            path = os.path.join(workdir, "metrics.jsonl")
            if resume_step is not None:
                _drop_lines(path, lambda r: r["step"] > resume_step or (
                    r["step"] == resume_step and r.get("prefix") in rewrite_prefixes))
            # Event file names hold the second they were created: the pid keeps a restart within
            # the same second from reusing (and truncating) the previous file.
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge,
                                     filename_suffix=f".{os.getpid()}.{resume_step or 0}")
            self._jsonl = open(path, "a", encoding="utf-8")

    def scalars(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(np.asarray(v)) for k, v in values.items() if np.ndim(v) == 0}
        for k, v in clean.items():
            self._tb.add_scalar(f"{prefix}/{k}", v, step)
        self._jsonl.write(json.dumps({"step": int(step), "prefix": prefix, **clean}) + "\n")
        self._jsonl.flush()

    def image(self, step: int, tag: str, image_hwc_uint8: np.ndarray) -> None:
        if self.enabled:
            self._tb.add_image(tag, image_hwc_uint8, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def _drop_lines(path: str, drop) -> None:
    """Rewrites the JSONL file `path` (atomically) without the records where `drop(record)`,
    and without unreadable lines (a line cut short by a hard kill)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
            if not drop(record):
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if len(kept) == len(lines):
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
