"""Device mesh, logical-axis rules and the shardings of parameters and batches.

Parameters carry logical axis names (ovd_jax/models/layers.py); `config.sharding.rules` maps them
to the mesh axes ('data', 'fsdp', 'model'). Batches are split along their leading axis over
('data', 'fsdp').
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")


def make_mesh(shape: Sequence[int], axes: Sequence[str] = ("data", "fsdp", "model"),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a mesh of `shape` over `devices` (default: all); one -1 entry takes the rest.

    Axis types are Auto: Explicit axes break linen's logical constraints.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != len(axes):
        raise ValueError(f"config.mesh.shape {tuple(shape)} needs one size per axis {tuple(axes)}")
    if shape.count(-1) > 1:
        raise ValueError(f"config.mesh.shape {tuple(shape)} may contain at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(
                f"config.mesh.shape {tuple(shape)} does not divide the {len(devices)} devices"
            )
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"config.mesh.shape {tuple(shape)} has {int(np.prod(shape))} devices but "
            f"{len(devices)} are available; set --config.mesh.shape to match (use -1 for 'rest')."
        )
    if devices == list(jax.devices()):
        kwargs = {}
        axis_type = getattr(jax.sharding, "AxisType", None)
        if axis_type is not None:
            kwargs["axis_types"] = (axis_type.Auto,) * len(axes)
        return jax.make_mesh(tuple(shape), tuple(axes), **kwargs)
    return Mesh(np.asarray(devices).reshape(shape), tuple(axes))


def rules_tuple(rules) -> tuple[tuple[str, object], ...]:
    """Normalises config rules (lists from JSON/ConfigDict) into linen's tuple-of-pairs form."""
    out = []
    for name, target in rules:
        if isinstance(target, list):
            target = tuple(target)
        out.append((name, target))
    return tuple(out)


def tree_shardings(abstract_tree, mesh: Mesh, rules) -> object:
    """NamedShardings for a (boxed, LogicallyPartitioned) abstract variable tree.

    Leaves without logical names are replicated.
    """
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules_tuple(rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data-parallel axes; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Turns this process's numpy batch into global arrays split along the batch axis.

    Single process: a plain device_put. Multi-process: each process contributes its slice
    (`jax.make_array_from_process_local_data`).
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )
