"""Device mesh, logical-axis rules and the shardings of parameters and batches.

Parameters carry logical axis names (ovd_jax/models/layers.py); `config.sharding.rules` maps them
to the mesh axes ('data', 'fsdp', 'model'). Batches are split along their leading axis over
('data', 'fsdp').

The rules hold at any mesh shape: a mesh axis is skipped on a dimension it does not divide (a
3-channel stem kernel stays whole when `fsdp` is 2), and tensors smaller than
`config.sharding.min_shard_size` elements are replicated (splitting a bias or a norm scale costs
more in collectives than it saves in memory).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
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


# Below this many elements a tensor is replicated (config.sharding.min_shard_size overrides).
DEFAULT_MIN_SHARD_SIZE = 1 << 14


def min_shard_size(config) -> int:
    """`config.sharding.min_shard_size` (elements), or the default when the config has none."""
    return int(config.sharding.get("min_shard_size", DEFAULT_MIN_SHARD_SIZE))


def fit_spec(shape: Sequence[int], spec: PartitionSpec | None, mesh: Mesh,
             min_size: int = 0) -> PartitionSpec:
    """`spec` made valid for an array of `shape` on `mesh`.

    Each dimension keeps, in order, the mesh axes whose running product divides it (so ('data',
    'fsdp') on a dimension of 6 with data=2, fsdp=4 keeps 'data'); arrays with fewer than
    `min_size` elements are replicated. Returns a PartitionSpec with one entry per dimension.
    """
    if spec is None or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    out = []
    for dim, axes in zip(shape, entries):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        kept, size = [], 1
        for a in axes:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def tree_shardings(abstract_tree, mesh: Mesh, rules, min_size: int = 0) -> object:
    """NamedShardings (an unboxed tree) for a boxed (LogicallyPartitioned) abstract variable
    tree, each leaf's spec fitted to its shape (`fit_spec`). Leaves without logical names are
    replicated."""
    rules = rules_tuple(rules)

    def leaf(x):
        if isinstance(x, nn.LogicallyPartitioned):
            spec, shape = nn.logical_to_mesh_axes(x.names, rules), x.value.shape
        elif isinstance(x, nn.Partitioned):
            spec, shape = x.get_partition_spec(), x.value.shape
        else:
            spec, shape = PartitionSpec(), x.shape
        return NamedSharding(mesh, fit_spec(shape, spec, mesh, min_size))

    return jax.tree.map(leaf, abstract_tree,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def like_params(tx, abstract_opt_state, param_shardings, mesh: Mesh) -> object:
    """Shardings of an optimizer state: every parameter-shaped leaf (moments, traces) takes its
    parameter's sharding; the rest (step counts, scalars) is replicated."""
    # Frozen parameters (optax.masked / multi_transform) leave MaskedNode placeholders in the
    # state: they stay placeholders.
    def masked(x):
        return isinstance(x, optax.MaskedNode)

    return optax.tree_map_params(
        tx, lambda p, s: p if masked(p) else s, abstract_opt_state, param_shardings,
        transform_non_params=lambda _: replicated(mesh), is_leaf=masked,
    )


def overview(params, shardings, *, large: int = 1 << 20) -> str:
    """Start-up summary: `clu.parameter_overview` table, parameter count, bytes in total and on
    the fullest device, and the sharding of every tensor of at least `large` bytes."""
    from clu import parameter_overview

    table = parameter_overview.get_parameter_overview(params, include_stats=False,
                                                      max_lines=200)
    total = count = 0
    per_device: dict = {}
    rows = []
    flat = jax.tree_util.tree_leaves_with_path(params)
    for (path, x), sh in zip(flat, jax.tree.leaves(shardings)):
        nbytes = int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        count += int(np.prod(x.shape, dtype=np.int64))
        total += nbytes
        shard = int(np.prod(sh.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize
        for d in sh.device_set:
            per_device[d] = per_device.get(d, 0) + shard
        if nbytes >= large:
            rows.append(f"  {jax.tree_util.keystr(path)} {tuple(x.shape)} {sh.spec}")
    most = max(per_device.values(), default=0)
    head = (f"{count:,} parameters, {total / 2**20:.1f} MiB; {most / 2**20:.1f} MiB on the "
            f"fullest device")
    return "\n".join([head, table, f"tensors >= {large} bytes:"] + rows)


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


def to_local(tree, mesh: Mesh) -> object:
    """This process's rows (numpy) of batch-sharded global arrays: the inverse of `shard_batch`,
    in the same order as the process's local batch. Single process: the whole arrays."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
    from jax.experimental import multihost_utils

    local = multihost_utils.global_array_to_host_local_array(tree, mesh, PartitionSpec(BATCH_AXES))
    return jax.tree.map(np.asarray, local)


def gather_objects(obj) -> list:
    """Every process's JSON-serialisable `obj`, in process order (a collective: call it on all
    processes). Single process: `[obj]`."""
    if jax.process_count() == 1:
        return [obj]
    import json

    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
    padded = np.zeros((int(np.max(sizes)),), np.uint8)
    padded[: data.size] = data
    everything = multihost_utils.process_allgather(padded)  # [processes, longest]
    return [json.loads(bytes(row[: int(n)]).decode())
            for row, n in zip(np.asarray(everything), np.asarray(sizes).reshape(-1))]
