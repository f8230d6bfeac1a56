"""The training state: one pytree that the pure train step maps to its successor."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """`step` int32 scalar; `params` trainable tree; `model_state` non-trainable collections
    (e.g. frozen batch-norm statistics); `opt_state` the optax state."""

    step: jnp.ndarray
    params: Any
    model_state: Any
    opt_state: Any

    def variables(self) -> dict:
        return {"params": self.params, **self.model_state}
