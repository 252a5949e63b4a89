"""Expert parallelism: the one place model code names a mesh axis (`expert`).

Expert inputs [G, E, C, D] leave the router sharded by group over the batch axes
(`data`, `fsdp`, `expert`). `to_experts` re-shards them by expert over the `expert`
axis with an explicit `all_to_all` inside `jax.shard_map`, so each device then holds all
groups' tokens for its own experts, next to those experts' weights; `from_experts` is
the inverse. Numerically both are the identity: only the placement changes, so a mesh
without an expert axis (or no mesh at all: init, eval_shape) skips the shard_map.

The dropless paths have no [G, E, C, D] buffer: `dropless` sends each choice's row to
the device of its expert with a padded all-to-all, runs the grouped matmuls on what
arrived with the local experts' weights, and sends the outputs back. Expert weights stay
sharded by expert: left to GSPMD, the sort-based paths gathered every expert onto every
device. The all-to-all's blocks have a static size: room for all of a device's N
choices per peer (`model.moe.peer_capacity_factor=0`, exact for any routing) makes its
send buffer n x N rows on an expert axis of n, traffic and memory growing with n; a
factor f reserves ceil(f N / n) rows per peer (about f x N in all, whatever n) and a
choice past its peer block's end is dropped like an over-capacity one.
`jax.lax.ragged_all_to_all` would send only what is routed, but XLA:CPU cannot run it
(jax 0.10.2: "ragged-all-to-all is not supported by XLA:CPU"), and its receive buffer
needs the same static bound.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from m6jax import sharding
from m6jax.model.moe import dispatch as dsp

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


def _group_mesh(groups: int):
    """The expert mesh if `groups` split evenly over the batch axes, else None: a call
    with fewer groups than batch shards (a decoding batch of a few captions) is left to
    GSPMD, which computes the same einsum with the expert-sharded weights."""
    mesh = _expert_mesh()
    if mesh is None or groups % math.prod(mesh.shape[a] for a in _batch_axes()):
        return None
    return mesh


def to_experts(x_gecd):
    """[G, E, C, D] sharded by group -> the same array sharded by expert (all-to-all)."""
    mesh = _group_mesh(x_gecd.shape[0])
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
    mesh = _group_mesh(y_gecd.shape[0])
    if mesh is None:
        return y_gecd
    by_group, by_expert = _specs()
    f = jax.shard_map(lambda y: jax.lax.all_to_all(y, EXPERT_AXIS, 0, 1, tiled=True),
                      mesh=mesh, in_specs=by_expert, out_specs=by_group)
    return f(y_gecd)


def dropless(x, routing, wi, wo, activation, impl: str, fused: bool = True,
             peer_capacity_factor: float = 0.0):
    """x [G, S, D] -> (y [G, S, D], sent bool [G, S, K]): every choice through its expert
    (`impl`: blocked or one of dispatch.RAGGED); with an expert mesh tokens travel, weights do not.
    `sent` is False only for a choice that overflowed its peer block
    (`peer_rows`; with peer_capacity_factor 0 nothing does: exact dropless).
    fused: `activation` has no RNG, so the blocked path may fuse it (dispatch.py)."""
    mesh = _expert_mesh()
    if mesh is None:
        def local(x, e, c, wi, wo):
            r = dsp.Routing(e, c, None, None, None)  # the paths read only these two
            if impl in dsp.RAGGED:
                return dsp.dropless_ragged(x, r, wi, wo, activation, impl)
            return dsp.dropless_blocked(x, r, wi, wo, activation, fused)
        y = _per_device(local, (x, routing.expert_index, routing.combine_weight), (wi, wo))
        return y, jnp.ones(routing.expert_index.shape, bool)
    batch = _batch_axes() or None
    tok, w = P(batch, None, None), P(EXPERT_AXIS, None, None)
    f = jax.shard_map(lambda *a: _dropless_local(*a, activation=activation, impl=impl,
                                                 fused=fused, factor=peer_capacity_factor),
                      mesh=mesh, in_specs=(tok, tok, tok, w, w), out_specs=(tok, tok),
                      check_vma=False)  # the grouped-matmul loops start from unvarying zeros
    return f(x, routing.expert_index, routing.combine_weight, wi, wo)


def peer_rows(choices: int, peers: int, factor: float) -> int:
    """Rows a device reserves for each expert peer in the dropless exchange: all its
    `choices` (factor 0: any routing fits, so the send buffer is peers x choices rows),
    else ceil(factor * choices / peers), so the buffer is about factor x choices rows
    whatever the expert axis."""
    if not factor:
        return choices
    return max(1, min(choices, math.ceil(factor * choices / peers)))


def capacity_grouped(x, routing, kept, wi, wo, activation, fused: bool = True):
    """x [G, S, D] -> [G, S, D]: the capacity path's kept choices through the grouped
    matmuls (dispatch.capacity_grouped), each device on its own groups (`_per_device`).
    mesh.expert > 1 is refused by the config check."""
    local = lambda x, e, c, kept, wi, wo: dsp.capacity_grouped(x, e, c, kept, wi, wo,
                                                               activation, fused)
    return _per_device(local, (x, routing.expert_index, routing.combine_weight, kept), (wi, wo))


def _per_device(fn, tokens, weights):
    """fn(*tokens, *weights) with every device on its own groups: a shard_map over the
    mesh's batch axes (tokens [G, ...] split by group, weights whole). Left to GSPMD, a
    sort by expert all-gathers every device's expert indices and runs on all tokens."""
    mesh = jax.sharding.get_abstract_mesh()
    batch = tuple(a for a in _batch_axes() if not mesh.empty and mesh.shape.get(a, 1) > 1)
    if not batch:
        return fn(*tokens, *weights)
    tok = P(batch, *(None,) * (tokens[0].ndim - 1))
    specs = tuple(P(batch, *(None,) * (t.ndim - 1)) for t in tokens) + (P(),) * len(weights)
    f = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=tok,
                      check_vma=False)  # the grouped-matmul loops start from unvarying zeros
    return f(*tokens, *weights)


def _dropless_local(x, expert_index, combine_weight, wi, wo, activation, impl, fused, factor):
    """One device: its groups' tokens x [g, S, D], its experts' weights wi [E/n, D, M].
    Each peer gets a block of `peer_rows` rows; the choices past a block's end (in
    (token, choice) order) are not sent and add 0 (the residual carries the token),
    reported as not `sent`."""
    n = jax.lax.axis_size(EXPERT_AXIS)
    g, s, d = x.shape
    k, e_local = expert_index.shape[-1], wi.shape[0]
    rows = jnp.repeat(x.reshape(g * s, d), k, axis=0) if k > 1 else x.reshape(g * s, d)
    expert = expert_index.reshape(-1)                                    # [N]
    dest = expert // e_local                                             # [N] expert shard
    # Position of each choice in its destination's block of the send buffer.
    onehot = jax.nn.one_hot(dest, n, dtype=jnp.int32)                    # [N, n]
    pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)
    nc = expert.shape[0]
    cap = peer_rows(nc, n, factor)
    sent = pos < cap
    flat = jnp.where(sent, dest * cap + pos, n * cap)                    # [N]; n*cap: not sent
    send = jnp.zeros((n * cap, d), x.dtype).at[flat].set(rows, mode="drop")
    send_e = jnp.full((n * cap,), -1, jnp.int32).at[flat].set(expert % e_local, mode="drop")
    exchange = lambda a: jax.lax.all_to_all(a.reshape(n, cap, *a.shape[1:]), EXPERT_AXIS, 0, 0,
                                            tiled=True).reshape(a.shape)
    recv, recv_e = exchange(send), exchange(send_e)                      # [n * cap, ...]
    live = recv_e >= 0
    y = dsp.expert_mlp_rows(recv, jnp.maximum(recv_e, 0), live, wi, wo, activation, impl,
                            fused, live_rows=min(nc, n * cap))
    y = jnp.where(sent[:, None], exchange(y)[jnp.minimum(flat, n * cap - 1)], 0)
    y = y.reshape(g, s, k, d)                                            # back at the source
    out = jnp.einsum("gskd,gsk->gsd", y, combine_weight.astype(y.dtype))
    return out, sent.reshape(g, s, k)
