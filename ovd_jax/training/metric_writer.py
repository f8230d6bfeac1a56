"""TensorBoard scalars (via tensorboardX: no TensorFlow needed) and a JSONL log of the same."""

from __future__ import annotations

import json
import os

import jax
import numpy as np


class MetricWriter:
    """Writes scalars to `<workdir>/tensorboard` and `<workdir>/metrics.jsonl` (process 0 only)."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter  # noqa: PLC0415  (optional heavy import)

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

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
