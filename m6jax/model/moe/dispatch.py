"""Shared dispatch: routing instructions -> tokens grouped per expert -> outputs back.

Capacity path: every expert takes at most C tokens per group; a token's choices are
served in priority order (all first choices of the group before any second choice,
then token order) and a choice that finds its expert full is dropped: it contributes
zero, so the residual connection carries the token unchanged. Two interchangeable ways
to build the [G, E, C, D] expert inputs and to combine [G, E, C, D] outputs:
  einsum  one-hot dispatch / combine tensors [G, S, E, C] and matmuls (GShard, t5x);
          costs O(S * E * C * D) per group, i.e. grows with S^2.
  gather  slot -> token indices and gathers (scatter-adds in the backward); O(S * D).
Dropless path: choices sorted by expert, one grouped matmul (`jax.lax.ragged_dot`).

Shapes: G groups, S tokens per group, D model width, E experts, K choices, C capacity.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from m6jax.model.moe.routers import Routing


def expert_capacity(tokens_per_group: int, k: int, num_experts: int, factor: float) -> int:
    """C = ceil(S * K * factor / E), at least 1: the slots per expert and group."""
    return max(1, math.ceil(tokens_per_group * k * factor / num_experts))


class Slots(NamedTuple):
    position: jax.Array  # i32 [G, S, K]: slot of each choice inside its expert
    kept: jax.Array      # bool [G, S, K]: the choice fits within capacity


def assign_slots(routing: Routing, num_experts: int, capacity: int, valid=None) -> Slots:
    """Position of each choice in its expert's queue, choice-major then token order.

    valid: optional bool [G, S]; padding tokens (False) take no slot and are not kept.
    """
    idx = routing.expert_index                                           # [G, S, K]
    g, s, k = idx.shape
    valid = jnp.ones((g, s), bool) if valid is None else valid
    order = jnp.swapaxes(idx, 1, 2).reshape(g, k * s)                    # [G, K*S]
    onehot = jax.nn.one_hot(order, num_experts, dtype=jnp.int32)         # [G, K*S, E]
    onehot = onehot * jnp.tile(valid, (1, k)).astype(jnp.int32)[..., None]
    pos = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)    # [G, K*S]
    pos = jnp.swapaxes(pos.reshape(g, k, s), 1, 2)                       # [G, S, K]
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


def dropless(x, routing: Routing, wi, wo, activation):
    """Every choice computed, none dropped: sort choices by expert, grouped matmuls.

    x [G, S, D]; wi [E, D, M]; wo [E, M, D]; returns [G, S, D]. Equals the capacity
    path whenever that path drops nothing.
    """
    g, s, d = x.shape
    k = routing.expert_index.shape[-1]
    e = wi.shape[0]
    expert = routing.expert_index.reshape(-1)                           # [G*S*K]
    order = jnp.argsort(expert, stable=True)
    rows = jnp.repeat(x.reshape(g * s, d), k, axis=0)[order]            # [N, D] by expert
    sizes = jnp.bincount(expert, length=e).astype(jnp.int32)
    h = activation(jax.lax.ragged_dot(rows, wi.astype(x.dtype), sizes))
    y = jax.lax.ragged_dot(h, wo.astype(x.dtype), sizes)                 # [N, D]
    y = jnp.zeros_like(y).at[order].set(y).reshape(g, s, k, d)
    return jnp.einsum("gskd,gsk->gsd", y, routing.combine_weight.astype(y.dtype))
