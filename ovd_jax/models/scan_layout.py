"""Parameter layouts of a layer stack: per-layer modules <-> one scanned module.

Unscanned towers hold layer i under `<name>_<i>` (CLIP `resblocks_<i>`, BERT `layer_<i>`), the
layout every importer in `ovd_jax.convert` writes. With `scan_layers=True` the same layers live
under `<name>` with every leaf stacked along a new leading axis of length `layers`.

`stack_layers` / `unstack_layers` convert one way or the other wherever the pattern occurs in a
(nested dict) variable tree; `match_layer_layout` converts a loaded tree to the layout of the
model it is loaded into, the one call a checkpoint loader needs.
"""

from __future__ import annotations

import re

import flax.linen as nn
import numpy as np

# The scanned stacks of this codebase: CLIP Transformer and BERT encoder.
SCANNED_NAMES = ("resblocks", "layer")


def _layer_keys(tree: dict, name: str) -> list[str]:
    """The keys `<name>_<i>` of `tree` in layer order; ValueError if the indices have gaps."""
    pattern = re.compile(rf"{re.escape(name)}_(\d+)")
    found = sorted((int(m.group(1)), k) for k in tree if (m := pattern.fullmatch(str(k))))
    if [i for i, _ in found] != list(range(len(found))):
        raise ValueError(f"layer keys {[k for _, k in found]} are not {name}_0..{name}_"
                         f"{len(found) - 1}; the parameter tree is incomplete.")
    return [k for _, k in found]


def _stack(trees: list):
    if isinstance(trees[0], dict):
        return {k: _stack([t[k] for t in trees]) for k in trees[0]}
    return np.stack([np.asarray(t) for t in trees])


def _unstack(tree, index: int):
    if isinstance(tree, dict):
        return {k: _unstack(v, index) for k, v in tree.items()}
    return np.asarray(tree)[index]


def _num_layers(tree) -> int:
    while isinstance(tree, dict):
        tree = next(iter(tree.values()))
    return int(np.shape(tree)[0])


def _stack_node(tree: dict, name: str) -> dict:
    keys = _layer_keys(tree, name)
    if not keys:
        return tree
    out = {k: v for k, v in tree.items() if k not in keys}
    out[name] = _stack([tree[k] for k in keys])
    return out


def _unstack_node(tree: dict, name: str) -> dict:
    if not isinstance(tree.get(name), dict):
        return tree
    out = {k: v for k, v in tree.items() if k != name}
    stacked = tree[name]
    for i in range(_num_layers(stacked)):
        out[f"{name}_{i}"] = _unstack(stacked, i)
    return out


def _walk(tree, fn):
    if not isinstance(tree, dict):
        return tree
    tree = fn(tree)
    return {k: _walk(v, fn) for k, v in tree.items()}


def stack_layers(tree: dict, name: str = "resblocks") -> dict:
    """Per-layer -> scanned: every dict holding `<name>_0..<name>_{n-1}` gets them replaced by
    one `<name>` subtree whose leaves are the n layer leaves stacked on axis 0 (numpy arrays).
    Other keys are kept as they are. Boxed leaves (logical-axis metadata) are unboxed."""
    return _walk(nn.meta.unbox(tree), lambda t: _stack_node(t, name))


def unstack_layers(tree: dict, name: str = "resblocks") -> dict:
    """Scanned -> per-layer, the inverse of `stack_layers`: every `<name>` subtree is split
    along its leaves' leading axis into `<name>_<i>` subtrees (boxed leaves are unboxed)."""
    return _walk(nn.meta.unbox(tree), lambda t: _unstack_node(t, name))


def match_layer_layout(tree, reference, names=SCANNED_NAMES):
    """`tree` (e.g. loaded checkpoint params) converted to the layer layout of `reference` (the
    model's own variables, any leaf type): where `reference` has a scanned `<name>` and `tree`
    the per-layer `<name>_<i>`, they are stacked; in the opposite case unstacked. Leaves of
    subtrees that already agree are returned as they are (no copy)."""
    if not isinstance(tree, dict) or not isinstance(reference, dict):
        return tree
    for name in names:
        if name in reference and name not in tree and f"{name}_0" in tree:
            tree = _stack_node(tree, name)
        elif f"{name}_0" in reference and f"{name}_0" not in tree and name in tree:
            tree = _unstack_node(tree, name)
    return {k: match_layer_layout(v, reference[k], names) if k in reference else v
            for k, v in tree.items()}
