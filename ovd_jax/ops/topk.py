"""`top_k` along the last axis as a stable sort, so batch-sharded inputs stay on their device.

`jax.lax.top_k` lowers to XLA's TopK, which the SPMD partitioner does not split along batch
dimensions: under data parallelism a per-image top-k (RPN proposals, NMS candidates, sampling)
all-gathers the whole batch to every device. A sort over the last axis partitions along every
other axis, so each device ranks only its own images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k(x, k: int):
    """The `k` largest entries of `x` [..., n] along the last axis, as `jax.lax.top_k`.

    Returns (values [..., k] in x's dtype, indices [..., k] int32), descending; equal values keep
    their index order (lower index first), like `jax.lax.top_k`. Float or integer `x`; NaNs
    (which callers mask) rank first, as in `jax.lax.top_k`.
    """
    n = x.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"top_k: k={k} must be in [0, {n}] (the last axis of x {x.shape}).")
    idx = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    if jnp.issubdtype(x.dtype, jnp.floating):
        # NaN -> -inf key ranks it first; -x orders the rest descending.
        key = jnp.where(jnp.isnan(x), -jnp.inf, -x)
    else:
        key = ~x  # bitwise not reverses integer order without overflow
    _, vals, order = jax.lax.sort((key, x, idx), dimension=x.ndim - 1, num_keys=1,
                                  is_stable=True)
    return vals[..., :k], order[..., :k]
