"""Rematerialisation (gradient checkpointing) policies named by config strings.

A tower's `remat_policy` says which intermediate values of each block the backward pass keeps
and which it recomputes; the block is wrapped in `nn.remat` with the matching
`jax.checkpoint_policies` entry:

  "none"             no remat (everything the backward pass needs is stored);
  "full"             save only the block inputs, recompute the whole block;
  "nothing_saveable" the same as "full", under jax's name;
  "dots"             keep every matmul/conv output, recompute the cheap elementwise ops;
  "dots_no_batch"    keep matmul outputs without batch dimensions (projections, MLPs), recompute
                     the batched attention products and elementwise ops.
"""

from __future__ import annotations

import flax.linen as nn
import jax

_POLICIES = {
    "full": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_POLICIES = ("none", *_POLICIES)


def resolve_remat_policy(remat: bool, remat_policy: str) -> str:
    """The effective policy name: `remat_policy` unless it is "none", then "full" when the
    older boolean `remat` is set. Raises ValueError for an unknown name."""
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={remat_policy!r} is unknown; choose one of "
                         f"{REMAT_POLICIES}.")
    if remat_policy == "none" and remat:
        return "full"
    return remat_policy


def checkpoint_policy(name: str):
    """The `jax.checkpoint_policies` function of a policy name (None for "full")."""
    if name not in _POLICIES:
        raise ValueError(f"remat_policy={name!r} has no checkpoint policy; choose one of "
                         f"{tuple(_POLICIES)}.")
    return _POLICIES[name]


def remat_module(module_cls, remat: bool, remat_policy: str, static_argnums=()):
    """`module_cls` itself (policy "none") or `nn.remat(module_cls, policy=...)`.

    `static_argnums` follows `nn.remat`'s convention (`self` is argument 0).
    """
    name = resolve_remat_policy(remat, remat_policy)
    if name == "none":
        return module_cls
    return nn.remat(module_cls, policy=checkpoint_policy(name), static_argnums=static_argnums)
