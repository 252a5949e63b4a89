"""Device mesh from the config and the one table mapping logical axes onto mesh axes.

Model code names only logical axes (`embed`, `heads`, `mlp`, `batch`, ...); this file is
the single place where they meet the mesh axes `data`, `fsdp`, `tensor`, `expert` and
`stage` (pipeline: the stacked layers' unit axis, see m6jax/pipeline.py).
All mesh axes are `AxisType.Auto`: GSPMD propagates shardings from the parameter and
activation annotations (see docs/design.md, "Design").
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert", "stage")
# The device mesh's axis order, slowest-varying first: pipeline stages, whose traffic is
# one microbatch's activations per iteration, span hosts before data parallelism does.
_DEVICE_ORDER = ("stage", "data", "fsdp", "tensor", "expert")

# Logical axis -> mesh axes. Parameters shard over `fsdp` on their embed dimension
# (ZeRO-3) and over `tensor` on heads / mlp columns / vocab (Megatron); activations
# shard their batch over every axis that is not model-parallel for them.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("layers", "stage"),   # the stacked units: stage s holds its contiguous chunk
    ("stage", "stage"),    # pipeline activations [stages, microbatch, ...]
    ("norm", None),
    ("patch", None),
)


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """Sizes of (data, fsdp, tensor, expert, stage); one of them may be -1 (the rest).
    A config without `stage` (written before pipelines) has stage 1."""
    sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
    free = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
    for a, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise ValueError(f"mesh.{a}={s} must be a positive size or -1")
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {', '.join('mesh.' + a for a in free)}")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"the fixed mesh axes multiply to {fixed}, which does not divide the "
                f"{num_devices} devices; change mesh.* so that mesh.{free[0]}=-1 can take the rest")
        sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        shape = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
        raise ValueError(f"{shape} multiply to {fixed} but there are {num_devices} devices; "
                         "set one axis to -1 to take the remaining devices")
    return tuple(sizes)


def run_layout(saved_mesh, num_devices: int) -> dict[str, int]:
    """The mesh a restored run is used on: its model-parallel axes (fsdp, tensor, expert)
    as saved, `data=-1` taking the rest of this host's devices, so a model that needed
    FSDP or tensor/expert parallelism to train is decoded or fine-tuned sharded the same
    way. Where those axes do not fit `num_devices`, ValueError naming them."""
    layout = {a: int(saved_mesh.get(a, 1)) for a in MESH_AXES}
    if -1 in (layout["fsdp"], layout["tensor"], layout["expert"]):
        layout["data"] = 1  # the run let a model axis take the remaining devices
    else:
        layout["data"] = -1
    try:
        resolve_mesh_shape(layout, num_devices)
    except ValueError as e:
        raise ValueError(f"the run's mesh (fsdp={layout['fsdp']}, tensor={layout['tensor']}, "
                         f"expert={layout['expert']}) does not fit {num_devices} devices: {e}; "
                         "give the same axes explicitly with --config.mesh.*") from None
    return layout


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (stage, data, fsdp, tensor, expert) mesh over `devices` (default: all devices)."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = dict(zip(MESH_AXES, resolve_mesh_shape(mesh_cfg, len(devices))))
    return jax.make_mesh(tuple(sizes[a] for a in _DEVICE_ORDER), _DEVICE_ORDER,
                         axis_types=(AxisType.Auto,) * len(_DEVICE_ORDER), devices=devices)


def rules_for(mesh) -> tuple[tuple[str, Any], ...]:
    """The rules table for `mesh`: without pipeline stages the `stage` entries replicate,
    so a stage=1 run's shardings (and their specs) are exactly those of a mesh without it."""
    if mesh.shape.get("stage", 1) > 1:
        return LOGICAL_AXIS_RULES
    return tuple((name, None if axes == "stage" else axes) for name, axes in LOGICAL_AXIS_RULES)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    """NamedSharding for one array annotated with logical axis names."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules_for(mesh))
    return NamedSharding(mesh, spec)


def tree_shardings(mesh: Mesh, abstract_boxed_tree) -> Any:
    """Shardings for a pytree whose leaves carry flax logical-partitioning boxes."""
    specs = nn.get_partition_spec(abstract_boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules_for(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of every batch array: leading dim over the batch axes, rest replicated."""
    return logical_sharding(mesh, ("batch",))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch dimension is split on this mesh."""
    spec = batch_sharding(mesh).spec[0]
    axes = spec if isinstance(spec, tuple) else (spec,)
    return math.prod(mesh.shape[a] for a in axes if a is not None)


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host-local numpy arrays (this process's rows) -> global batch-sharded jax.Arrays."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def shard_full_batch(mesh: Mesh, full_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Arrays that every process holds whole (eval sets) -> batch-sharded jax.Arrays."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx])
            for k, v in full_batch.items()}


def per_device_bytes(tree, memory_kind: str | None = None) -> int:
    """Largest number of bytes any one device holds of a pytree of jax.Arrays (only the
    arrays in `memory_kind`, e.g. "device" or "pinned_host", if given)."""
    per_dev: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        if memory_kind is not None and leaf.sharding.memory_kind != memory_kind:
            continue
        for shard in leaf.addressable_shards:
            per_dev[shard.device] = per_dev.get(shard.device, 0) + shard.data.nbytes
    return max(per_dev.values()) if per_dev else 0
