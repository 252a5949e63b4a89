"""Shared dispatch: routing instructions -> tokens grouped per expert -> outputs back.

Capacity path: every expert takes at most C tokens per group; a token's choices are
served in priority order (all first choices of the group before any second choice,
then token order) and a choice that finds its expert full is dropped: it contributes
zero, so the residual connection carries the token unchanged. Two interchangeable ways
to build the [G, E, C, D] expert inputs and to combine [G, E, C, D] outputs:
  einsum  one-hot dispatch / combine tensors [G, S, E, C] and matmuls (GShard, t5x);
          costs O(S * E * C * D) per group, i.e. grows with S^2.
  gather  slot -> token indices and gathers (scatter-adds in the backward); O(S * D).
A third, `grouped`, keeps the same slots (so the same choices drop) but builds no
[G, E, C, D] buffer: the kept choices go through the dropless path's grouped matmuls, so
empty slots cost nothing (the fast capacity path on CPU, BENCHMARKS.md).
Dropless paths: choices sorted by expert, then grouped matmuls: `blocked` (block-padded
rows, grouped.py; the fast one on CPU), `ragged_dot` (`jax.lax.ragged_dot`) or
`megablox` (the same sorted rows through megablox's Pallas `gmm`, TPU) or `mgpu` (jax's
Mosaic GPU ragged dot, Hopper; mgpu.py); which one a backend runs: m6jax/kernels.py.

Shapes: G groups, S tokens per group, D model width, E experts, K choices, C capacity.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from m6jax.model.moe import grouped, mgpu
from m6jax.model.moe.routers import Routing


PRIORITIES = ("order", "score")
RAGGED = ("ragged_dot", "megablox", "mgpu")  # dropless impls over sorted rows + group sizes
_GMM_TILE = 128  # megablox rows per tile (and the widest k, n tiles)


def expert_capacity(tokens_per_group: int, k: int, num_experts: int, factor: float) -> int:
    """C = ceil(S * K * factor / E), at least 1: the slots per expert and group."""
    return max(1, math.ceil(tokens_per_group * k * factor / num_experts))


def uniform_drop_fraction(tokens_per_group: int, k: int, num_experts: int,
                          capacity: int) -> float:
    """Expected share of choices dropped if routing were perfectly uniform: each expert
    then receives X ~ Binomial(S, K / E) of a group's S tokens (top-k picks K distinct
    experts; prototype routing one of E / K per prototype) and drops max(0, X - C)."""
    n, p = tokens_per_group, min(1.0, k / num_experts)
    if capacity >= n:
        return 0.0
    # E[max(0, X - C)] = E[X] - C + sum_{j < C} (C - j) P(X = j)
    below = 0.0
    for j in range(capacity):
        log_pmf = (math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
                   + j * math.log(p) + (n - j) * math.log1p(-p) if p < 1 else
                   (0.0 if j == n else -math.inf))
        below += (capacity - j) * math.exp(log_pmf)
    excess = n * p - capacity + below
    return max(0.0, num_experts * excess / (tokens_per_group * k))


class Slots(NamedTuple):
    position: jax.Array  # i32 [G, S, K]: slot of each choice inside its expert
    kept: jax.Array      # bool [G, S, K]: the choice fits within capacity


def assign_slots(routing: Routing, num_experts: int, capacity: int, valid=None,
                 priority: str = "order") -> Slots:
    """Position of each choice in its expert's queue: first choices before second ones,
    and within one choice rank by token order (`order`) or by descending router
    probability (`score`: batch-prioritized routing, Riquelme et al. 2021), ties in
    token order.

    valid: optional bool [G, S]; padding tokens (False) take no slot and are not kept.
    """
    idx = routing.expert_index                                           # [G, S, K]
    g, s, k = idx.shape
    valid = jnp.ones((g, s), bool) if valid is None else valid
    queue = jnp.swapaxes(idx, 1, 2)                                      # [G, K, S]
    live = jnp.broadcast_to(valid[:, None, :], queue.shape)
    if priority == "score":
        score = jnp.swapaxes(jnp.take_along_axis(routing.probs, idx, axis=-1), 1, 2)
        perm = jnp.argsort(-score, axis=-1, stable=True)                 # [G, K, S]
        queue = jnp.take_along_axis(queue, perm, axis=-1)
        live = jnp.take_along_axis(live, perm, axis=-1)
    elif priority != "order":
        raise ValueError(f"model.moe.priority={priority!r} is not one of {', '.join(PRIORITIES)}")
    onehot = jax.nn.one_hot(queue.reshape(g, k * s), num_experts, dtype=jnp.int32)
    onehot = onehot * live.reshape(g, k * s, 1).astype(jnp.int32)        # [G, K*S, E]
    pos = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1).reshape(g, k, s)
    if priority == "score":  # back from queue order to token order
        pos = jnp.zeros_like(pos).at[
            jnp.arange(g)[:, None, None], jnp.arange(k)[None, :, None], perm].set(pos)
    pos = jnp.swapaxes(pos, 1, 2)                                        # [G, S, K]
    return Slots(pos.astype(jnp.int32), (pos < capacity) & valid[..., None])


def dispatch_einsum(x, routing: Routing, slots: Slots, num_experts: int, capacity: int):
    """x [G, S, D] -> expert inputs [G, E, C, D] and the combine tensor [G, S, E, C]."""
    e1 = jax.nn.one_hot(routing.expert_index, num_experts, dtype=x.dtype)  # [G, S, K, E]
    c1 = jax.nn.one_hot(jnp.where(slots.kept, slots.position, capacity), capacity,
                        dtype=x.dtype)                                    # [G, S, K, C]
    dispatch = jnp.einsum("gske,gskc->gsec", e1, c1)                      # [G, S, E, C]
    combine = jnp.einsum("gske,gskc,gsk->gsec", e1, c1, routing.combine_weight.astype(x.dtype))
    return jnp.einsum("gsec,gsd->gecd", dispatch, x), combine


def combine_einsum(y_gecd, combine_gsec):
    """Expert outputs [G, E, C, D] -> token outputs [G, S, D]."""
    return jnp.einsum("gecd,gsec->gsd", y_gecd, combine_gsec)


def _flat_slot(routing: Routing, slots: Slots, num_experts: int, capacity: int):
    """Index of each choice in the flattened [E*C] slots; E*C (one past) when dropped."""
    flat = routing.expert_index * capacity + slots.position
    return jnp.where(slots.kept, flat, num_experts * capacity)            # [G, S, K]


def dispatch_gather(x, routing: Routing, slots: Slots, num_experts: int, capacity: int):
    """x [G, S, D] -> expert inputs [G, E, C, D] and the flat slot index [G, S, K]."""
    g, s, d = x.shape
    flat = _flat_slot(routing, slots, num_experts, capacity)
    token = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :, None], flat.shape)
    # slot -> token; empty slots point at an appended zero row (index S).
    slot_token = jnp.full((g, num_experts * capacity), s, jnp.int32)
    slot_token = jax.vmap(lambda st, f, t: st.at[f.reshape(-1)].set(t.reshape(-1), mode="drop"))(
        slot_token, flat, token)
    x_pad = jnp.concatenate([x, jnp.zeros((g, 1, d), x.dtype)], axis=1)  # [G, S+1, D]
    xe = jnp.take_along_axis(x_pad, slot_token[..., None], axis=1)       # [G, E*C, D]
    return xe.reshape(g, num_experts, capacity, d), flat


def combine_gather(y_gecd, flat, combine_weight):
    """Expert outputs [G, E, C, D] -> [G, S, D]: sum over choices of weight * slot row."""
    g, e, c, d = y_gecd.shape
    y = jnp.concatenate([y_gecd.reshape(g, e * c, d), jnp.zeros((g, 1, d), y_gecd.dtype)], 1)
    s, k = flat.shape[1:]
    picked = jnp.take_along_axis(y, flat.reshape(g, s * k, 1), axis=1).reshape(g, s, k, d)
    return jnp.einsum("gskd,gsk->gsd", picked, combine_weight.astype(y.dtype))


def _choice_rows(x, k):
    g, s, d = x.shape
    rows = x.reshape(g * s, d)
    return rows if k == 1 else jnp.repeat(rows, k, axis=0)             # [G*S*K, D]


def _combine_rows(y_nd, combine_weight):
    """Each choice's output row [G*S*K, D] -> [G, S, D], weighted by combine_weight."""
    g, s, k = combine_weight.shape
    y = y_nd.reshape(g, s, k, -1)
    return jnp.einsum("gskd,gsk->gsd", y, combine_weight.astype(y.dtype))


def dropless_ragged(x, routing: Routing, wi, wo, activation, impl: str = "ragged_dot"):
    """Every choice computed, none dropped: sort choices by expert, then a ragged
    grouped matmul (`impl`: one of RAGGED).

    x [G, S, D]; wi [E, D, M]; wo [E, M, D]; returns [G, S, D]. Equals the capacity
    path whenever that path drops nothing.
    """
    k, e = routing.expert_index.shape[-1], wi.shape[0]
    expert = routing.expert_index.reshape(-1)                           # [G*S*K]
    order = jnp.argsort(expert, stable=True)
    rows = _choice_rows(x, k)[order]                                     # [N, D] by expert
    sizes = jnp.bincount(expert, length=e).astype(jnp.int32)
    matmul = _ragged_matmul(impl)
    h = activation(matmul(rows, wi.astype(x.dtype), sizes))
    y = matmul(h, wo.astype(x.dtype), sizes)                             # [N, D]
    return _combine_rows(jnp.zeros_like(y).at[order].set(y), routing.combine_weight)


def _ragged_matmul(impl: str):
    """rows [N, K] sorted by group, w [E, K, M], sizes [E] -> [N, M] by `impl`."""
    return {"ragged_dot": jax.lax.ragged_dot, "megablox": _megablox, "mgpu": mgpu.gmm}[impl]


def _megablox(rows, w, sizes):
    """rows [N, K] sorted by group, w [E, K, M], sizes [E] -> [N, M] by megablox's gmm
    (its own VJP: gmm for the rows, tgmm for the weights). Rows are padded to its 128-row
    tile (the padding belongs to no group and is cut off); off TPU it runs in interpret
    mode (the CPU tests)."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm
    from m6jax import kernels
    n, kdim = rows.shape
    extra = -n % _GMM_TILE
    lhs = jnp.pad(rows, ((0, extra), (0, 0))) if extra else rows
    tiling = (_GMM_TILE, min(_GMM_TILE, kdim), min(_GMM_TILE, w.shape[-1]))
    out = gmm(lhs, w, sizes, rows.dtype, tiling, None, None, False,
              kernels.interpret("megablox"))
    return out[:n]


def _grouped_mlp(rows, expert, wi, wo, activation, fused: bool, live=None, live_rows: int = 0):
    """rows [N, D] each for expert[N] -> [N, D] through the block-padded grouped matmuls
    (grouped.py); a dead row (live False) gets 0. `fused` runs both matmuls and the
    activation per block; an activation with dropout (RNG) runs as two matmul passes.
    live_rows: the expected live rows, which sizes the blocks (default N)."""
    sizes = grouped.block_sizes(live_rows or rows.shape[0], wi.shape[0])
    lay = grouped.layout(expert, wi.shape[0], sizes, live)
    xs = grouped.gather_rows(rows, lay)                                  # [R, D]
    if fused:
        y = grouped.expert_mlp(xs, wi, wo, lay, activation)
    else:
        y = grouped.gmm(activation(grouped.gmm(xs, wi, lay)), wo, lay)
    return grouped.scatter_rows(y, lay)


def dropless_blocked(x, routing: Routing, wi, wo, activation, fused: bool = True):
    """Every choice computed, none dropped: choices sorted by expert into block-padded
    rows, a block per expert (grouped.py). Same contract as `dropless_ragged`."""
    k = routing.expert_index.shape[-1]
    y = _grouped_mlp(_choice_rows(x, k), routing.expert_index.reshape(-1),
                     wi.astype(x.dtype), wo.astype(x.dtype), activation, fused)
    return _combine_rows(y, routing.combine_weight)


def capacity_grouped(x, expert_index, combine_weight, kept, wi, wo, activation,
                     fused: bool = True):
    """x [G, S, D] -> [G, S, D]: the capacity path's kept choices (kept [G, S, K], from
    `assign_slots`) through the grouped matmuls; a dropped choice contributes 0, as in
    `combine_gather`."""
    k = expert_index.shape[-1]
    y = _grouped_mlp(_choice_rows(x, k), expert_index.reshape(-1), wi, wo, activation, fused,
                     live=kept.reshape(-1))
    return _combine_rows(y, combine_weight)


def expert_mlp_rows(rows, expert, live, wi, wo, activation, impl: str, fused: bool = True,
                    live_rows: int = 0):
    """rows [N, D] each for expert[N] of wi's E (live False: an empty row, output 0)
    -> [N, D]: the dropless expert MLP over a flat set of rows (expert parallelism's
    received buffer, of which about `live_rows` are live)."""
    e = wi.shape[0]
    if impl in RAGGED:
        key = jnp.where(live, expert, e)
        order = jnp.argsort(key, stable=True)
        sizes = jnp.bincount(key, length=e + 1)[:e].astype(jnp.int32)
        matmul = _ragged_matmul(impl)
        h = activation(matmul(rows[order], wi, sizes))
        y = matmul(h, wo, sizes)
        y = jnp.where(jnp.arange(y.shape[0])[:, None] < jnp.sum(sizes), y, 0)
        return jnp.zeros_like(y).at[order].set(y)
    return _grouped_mlp(rows, expert, wi, wo, activation, fused, live, live_rows)
