"""Block-padded grouped matmul (MegaBlocks' idea) with static shapes: the dropless path.

Choices sorted by expert, each expert's rows padded up to a multiple of `block` rows, so
every block of the sorted buffer belongs to one expert. The buffer has a static size
(`max_blocks` = ceil(N / block) + E blocks: enough whatever the routing), but the loops
below run only over the blocks in use, so compute is N rows plus at most E - 1 padding
blocks' worth, never E * N. `jax.lax.ragged_dot` computes the same thing; on XLA:CPU it
costs ~E times the FLOPs (BENCHMARKS.md), which is why this exists.

The backward pass is written by hand (`jax.custom_vjp`): autodiff of a loop that indexes
the weight by a traced expert would add a full [E, D, M] zero-padded gradient per block.

Shapes: N choices, E experts, D in width, M out width, R = max_blocks * block rows.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Layout(NamedTuple):
    row: jax.Array           # i32 [N]: each choice's row in the sorted, padded buffer
    slot_choice: jax.Array   # i32 [R]: the choice in each buffer row; N for a padding row
    block_expert: jax.Array  # i32 [max_blocks]: the expert every block belongs to
    used_blocks: jax.Array   # i32 []: blocks holding at least one choice (the loop bound)


def max_blocks(num_choices: int, num_experts: int, block: int) -> int:
    return -(-num_choices // block) + num_experts


def layout(expert, num_experts: int, block: int, live=None) -> Layout:
    """expert: i32 [N], each choice's expert -> where each choice goes in the buffer.

    live: optional bool [N]; a choice that is not live (an empty slot of an exchange
    buffer) gets no row: its `row` is R, one past the buffer (read it with mode="fill").
    """
    n = expert.shape[0]
    nb = max_blocks(n, num_experts, block)
    if live is not None:  # dead choices sort last, as a virtual expert E with no blocks
        expert = jnp.where(live, expert, num_experts)
    sizes = jnp.bincount(expert, length=num_experts + 1)[:num_experts]  # [E]
    padded = -(-sizes // block) * block
    start = jnp.cumsum(padded) - padded                                  # [E] first row
    order = jnp.argsort(expert, stable=True)                             # choices by expert
    first = jnp.cumsum(sizes) - sizes
    e_sorted = expert[order]
    e_safe = jnp.minimum(e_sorted, num_experts - 1)
    row_sorted = jnp.where(e_sorted < num_experts,
                           start[e_safe] + jnp.arange(n) - first[e_safe], nb * block)
    row = jnp.zeros((n,), jnp.int32).at[order].set(row_sorted.astype(jnp.int32))
    slot_choice = jnp.full((nb * block,), n, jnp.int32).at[row].set(
        jnp.arange(n, dtype=jnp.int32), mode="drop")
    ends = jnp.cumsum(padded)
    block_expert = jnp.searchsorted(ends, jnp.arange(nb) * block, side="right")
    return Layout(row, slot_choice, jnp.minimum(block_expert, num_experts - 1).astype(jnp.int32),
                  (jnp.sum(padded) // block).astype(jnp.int32))


def _blocks(x, w, block_expert, used, block: int, transpose_w: bool = False):
    """y[b] = x[b] @ w[block_expert[b]] (or its transpose) for the used blocks; unused
    blocks stay 0. `transpose_w` contracts w's last axis: the backward's dy @ w^T
    without a transposed copy of every expert's weight (one full weight pass)."""
    contract = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))

    def body(b, y):
        xb = jax.lax.dynamic_slice_in_dim(x, b * block, block, 0)
        wb = jax.lax.dynamic_index_in_dim(w, block_expert[b], 0, keepdims=False)
        yb = jax.lax.dot_general(xb, wb, contract)
        return jax.lax.dynamic_update_slice_in_dim(y, yb.astype(y.dtype), b * block, 0)
    out = w.shape[1] if transpose_w else w.shape[2]
    return jax.lax.fori_loop(0, used, body, jnp.zeros((x.shape[0], out), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gmm(x, w, block_expert, used, block: int):
    """x [R, D] (sorted, block-padded rows), w [E, D, M] -> [R, M]: each block times its
    expert's weight; rows of unused blocks are 0."""
    return _blocks(x, w, block_expert, used, block)


def _gmm_fwd(x, w, block_expert, used, block):
    return _blocks(x, w, block_expert, used, block), (x, w, block_expert, used)


def _gmm_bwd(block, res, dy):
    x, w, block_expert, used = res
    dx = _blocks(dy, w, block_expert, used, block, transpose_w=True)

    def body(b, dw):
        xb = jax.lax.dynamic_slice_in_dim(x, b * block, block, 0)
        gb = jax.lax.dynamic_slice_in_dim(dy, b * block, block, 0)
        e = block_expert[b]
        acc = jax.lax.dynamic_index_in_dim(dw, e, 0, keepdims=False)
        part = jax.lax.dot_general(xb, gb, (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_index_in_dim(dw, acc + part, e, 0)

    dw = jax.lax.fori_loop(0, used, body, jnp.zeros(w.shape, jnp.float32))
    return dx, dw.astype(w.dtype), None, None


gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gather_rows(rows, slot_choice):
    """rows [N, D] -> buffer [R, D]: padding rows (index N) read an appended zero row."""
    pad = jnp.concatenate([rows, jnp.zeros((1, rows.shape[1]), rows.dtype)], axis=0)
    return jnp.take(pad, slot_choice, axis=0)
