"""Expert parallelism: the one place model code names a mesh axis (`expert`).

Expert inputs [G, E, C, D] leave the router sharded by group over the batch axes
(`data`, `fsdp`, `expert`). `to_experts` re-shards them by expert over the `expert`
axis with an explicit `all_to_all` inside `jax.shard_map`, so each device then holds all
groups' tokens for its own experts, next to those experts' weights; `from_experts` is
the inverse. Numerically both are the identity: only the placement changes, so a mesh
without an expert axis (or no mesh at all: init, eval_shape) skips the shard_map.
"""
from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from m6jax import sharding

EXPERT_AXIS = "expert"


def _batch_axes() -> tuple[str, ...]:
    spec = nn.logical_to_mesh_axes(("batch",), sharding.LOGICAL_AXIS_RULES)[0]
    if spec is None:
        return ()
    return tuple(spec) if isinstance(spec, tuple) else (spec,)


def _expert_mesh():
    """The context mesh if it has an expert axis of size > 1, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(EXPERT_AXIS, 1) == 1:
        return None
    return mesh


def _specs():
    batch = _batch_axes()
    rest = tuple(a for a in batch if a != EXPERT_AXIS)
    by_group = P(batch or None, None, None, None)
    by_expert = P(rest or None, EXPERT_AXIS, None, None)
    return by_group, by_expert


def to_experts(x_gecd):
    """[G, E, C, D] sharded by group -> the same array sharded by expert (all-to-all)."""
    mesh = _expert_mesh()
    if mesh is None:
        return x_gecd
    by_group, by_expert = _specs()
    # Each device splits its groups' slots by expert and sends block j to expert shard
    # j; what arrives is concatenated along groups. `expert` is the minor batch axis in
    # the rules table, so the concatenation restores global group order (and were it
    # not, from_experts applies the inverse permutation anyway).
    f = jax.shard_map(lambda x: jax.lax.all_to_all(x, EXPERT_AXIS, 1, 0, tiled=True),
                      mesh=mesh, in_specs=by_group, out_specs=by_expert)
    return f(x_gecd)


def from_experts(y_gecd):
    """Inverse of `to_experts`: expert outputs go back to their groups' devices."""
    mesh = _expert_mesh()
    if mesh is None:
        return y_gecd
    by_group, by_expert = _specs()
    f = jax.shard_map(lambda y: jax.lax.all_to_all(y, EXPERT_AXIS, 0, 1, tiled=True),
                      mesh=mesh, in_specs=by_expert, out_specs=by_group)
    return f(y_gecd)
