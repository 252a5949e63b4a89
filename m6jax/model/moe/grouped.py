"""Grouped expert matmuls with static shapes (MegaBlocks' idea): the dropless path on CPU.

Choices are sorted by expert and each expert's rows are padded up to a block size from a
static menu (`block_sizes`: multiples of 16 up to 64 rows, then eight sizes per octave),
so an expert of n rows (n <= the largest size) is one block and one matmul per weight,
padded by at most an eighth (n > 64) or 15 rows. An expert with more rows than the
largest size takes several full blocks plus one sized block. Each size is one loop whose
trip count is the number of blocks in use, so the compute follows the routing while
every shape stays static. `jax.lax.ragged_dot` computes the same thing; on XLA:CPU it
costs ~E times the FLOPs (BENCHMARKS.md), which is why this exists.

Why these shapes (measured on XLA:CPU, BENCHMARKS.md "MoE at paper scale"): a block per
expert keeps the matmuls large, slices each expert's weight once per pass instead of once
per 32-row block, and writes each expert's weight gradient once. The backward passes are
written by hand (`jax.custom_vjp`): autodiff of a loop that indexes the weight by a traced
expert would add a full [E, D, M] zero-padded gradient per block. `expert_mlp` fuses both
matmuls and the activation per block, so the [rows, M] activation and its derivative are
computed on the rows in use only.

Shapes: N choices, E experts, D model width, M hidden width, R rows of the padded buffer.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

_STEP = 16  # rows: the finest block size


def block_sizes(num_choices: int, num_experts: int) -> tuple[int, ...]:
    """The static menu of block sizes: 16, 32, 48, 64, then eight per octave up to about
    twice an expert's mean share of the choices (64 to 1024 rows). Eight per octave
    measured faster than four (less padding; BENCHMARKS.md), for ~1 s more compile."""
    share = max(1, 2 * num_choices // num_experts)
    top = int(min(1024, max(64, 1 << (share - 1).bit_length())))
    sizes = {16, 32, 48, 64}
    s = 64
    while s < top:
        sizes.update(s + s * k // 8 for k in range(8))
        s *= 2
    sizes.add(top)
    # No block longer than the choices: its static slice would run past the buffer's
    # end (one local expert, or a small exchange buffer under expert parallelism).
    return tuple(sorted(s for s in sizes if s <= max(_STEP, num_choices)))


def _tail(rows: int, sizes) -> int:
    """Rows the layout gives an expert with `rows` choices (host-side, for the bound)."""
    q, r = divmod(rows, sizes[-1])
    return q * sizes[-1] + (next(s for s in sizes if s >= r) if r else 0)


def buffer_rows(num_choices: int, num_experts: int, sizes) -> int:
    """Static rows of the padded buffer: enough whatever the routing."""
    excess = max(_tail(r, sizes) - r for r in range(1, sizes[-1] + 1))
    return num_choices + num_experts * excess


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["row", "slot_choice", "block_start", "block_expert", "used"],
                   meta_fields=["sizes"])
@dataclasses.dataclass(frozen=True)
class Layout:
    row: jax.Array            # i32 [N]: each choice's row in the padded buffer (R: none)
    slot_choice: jax.Array    # i32 [R]: the choice in each buffer row; N for a padding row
    block_start: tuple        # per size: i32 [blocks] first row of each block
    block_expert: tuple       # per size: i32 [blocks] the expert of each block
    used: tuple               # per size: i32 [] blocks in use (the loop's trip count)
    sizes: tuple[int, ...]    # the block sizes, static; the largest comes last


def layout(expert, num_experts: int, sizes, live=None) -> Layout:
    """expert: i32 [N], each choice's expert -> where each choice goes in the buffer.

    live: optional bool [N]; a choice that is not live (an empty slot of an exchange
    buffer) gets no row: its `row` is R, one past the buffer (read it with mode="fill").
    """
    n, e, top = expert.shape[0], num_experts, sizes[-1]
    r = buffer_rows(n, e, sizes)
    if live is not None:  # dead choices sort last, as a virtual expert E with no rows
        expert = jnp.where(live, expert, e)
    counts = jnp.bincount(expert, length=e + 1)[:e]                     # [E]
    full, rest = counts // top, counts % top
    menu = jnp.asarray(sizes, jnp.int32)
    size_of_rest = jnp.searchsorted(menu, rest)                        # index into sizes
    padded = full * top + jnp.where(rest > 0, menu[jnp.minimum(size_of_rest, len(sizes) - 1)], 0)
    start = jnp.cumsum(padded) - padded                                 # [E] first row
    order = jnp.argsort(expert, stable=True)
    first = jnp.cumsum(counts) - counts
    e_sorted = expert[order]
    e_safe = jnp.minimum(e_sorted, e - 1)
    row_sorted = jnp.where(e_sorted < e, start[e_safe] + jnp.arange(n) - first[e_safe], r)
    row = jnp.zeros((n,), jnp.int32).at[order].set(row_sorted.astype(jnp.int32))
    slot_choice = jnp.full((r,), n, jnp.int32).at[row].set(jnp.arange(n, dtype=jnp.int32),
                                                          mode="drop")
    starts, experts, used = [], [], []
    for i in range(len(sizes)):  # the sized block of each expert whose rest needs size i
        has = (rest > 0) & (size_of_rest == i)
        pick = jnp.argsort(~has, stable=True)                            # those experts first
        starts.append((start + full * top)[pick].astype(jnp.int32))
        experts.append(pick.astype(jnp.int32))
        used.append(jnp.sum(has).astype(jnp.int32))
    # Full blocks of the largest size (experts with more rows than it) come last.
    t = jnp.arange(-(-n // top))
    ends = jnp.cumsum(full)
    owner = jnp.minimum(jnp.searchsorted(ends, t, side="right"), e - 1)
    starts.append((start[owner] + (t - ends[owner] + full[owner]) * top).astype(jnp.int32))
    experts.append(owner.astype(jnp.int32))
    used.append(ends[-1].astype(jnp.int32))
    return Layout(row, slot_choice, tuple(starts), tuple(experts), tuple(used),
                  tuple(sizes) + (top,))


def gather_rows(rows, lay: Layout):
    """rows [N, D] -> buffer [R, D]: padding rows (index N) read an appended zero row."""
    pad = jnp.concatenate([rows, jnp.zeros((1, rows.shape[1]), rows.dtype)], axis=0)
    return jnp.take(pad, lay.slot_choice, axis=0)


def scatter_rows(y, lay: Layout):
    """buffer [R, D] -> each choice's row [N, D] (0 for a choice without a row)."""
    return jnp.take(y, lay.row, axis=0, mode="fill", fill_value=0)


_NN = (((1,), (0,)), ((), ()))   # x @ w
_NT = (((1,), (1,)), ((), ()))   # dy @ w^T: no transposed copy of the weight
_TN = (((0,), (0,)), ((), ()))   # x^T @ dy: the weight gradient


def _each_block(lay: Layout, body, carry):
    """carry = body(size, start, expert, carry, first) over every block in use, size by
    size: the sized blocks (at most one per expert, `first` True) before the full ones."""
    n_sized = len(lay.sizes) - 1
    for k, (size, start, expert, used) in enumerate(
            zip(lay.sizes, lay.block_start, lay.block_expert, lay.used)):
        carry = jax.lax.fori_loop(
            0, used, lambda i, c, size=size, start=start, expert=expert, first=k < n_sized:
            body(size, start[i], expert[i], c, first), carry)
    return carry


def _weight(w, e):
    return jax.lax.dynamic_index_in_dim(w, e, 0, keepdims=False)


def _add_to(dw, e, part, first: bool):
    """dw[e] += part; the first block of an expert (the sized ones) sets it."""
    if not first:
        part = _weight(dw, e) + part
    return jax.lax.dynamic_update_index_in_dim(dw, part.astype(dw.dtype), e, 0)


def _matmul(x, w, lay, dims):
    out = w.shape[1] if dims is _NT else w.shape[2]

    def body(size, start, e, y, first):
        xb = jax.lax.dynamic_slice_in_dim(x, start, size, 0)
        yb = jax.lax.dot_general(xb, _weight(w, e), dims)
        return jax.lax.dynamic_update_slice_in_dim(y, yb.astype(y.dtype), start, 0)
    return _each_block(lay, body, jnp.zeros((x.shape[0], out), x.dtype))


def _weight_grad(x, dy, w, lay):
    def body(size, start, e, dw, first):
        xb = jax.lax.dynamic_slice_in_dim(x, start, size, 0)
        gb = jax.lax.dynamic_slice_in_dim(dy, start, size, 0)
        return _add_to(dw, e, jax.lax.dot_general(xb, gb, _TN, preferred_element_type=jnp.float32),
                       first)
    return _each_block(lay, body, jnp.zeros(w.shape, jnp.float32)).astype(w.dtype)


@jax.custom_vjp
def gmm(x, w, lay: Layout):
    """x [R, D] (the padded buffer), w [E, D, M] -> [R, M]: each block times its
    expert's weight; rows outside the blocks in use are 0."""
    return _matmul(x, w, lay, _NN)


def _gmm_fwd(x, w, lay):
    return _matmul(x, w, lay, _NN), (x, w, lay)


def _gmm_bwd(res, dy):
    x, w, lay = res
    return _matmul(dy, w, lay, _NT), _weight_grad(x, dy, w, lay), None


gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _mlp_fwd(x, wi, wo, lay, activation):
    def body(size, start, e, c, first):
        y, h = c
        hb = jax.lax.dot_general(jax.lax.dynamic_slice_in_dim(x, start, size, 0),
                                 _weight(wi, e), _NN)
        yb = jax.lax.dot_general(activation(hb), _weight(wo, e), _NN)
        return (jax.lax.dynamic_update_slice_in_dim(y, yb.astype(y.dtype), start, 0),
                jax.lax.dynamic_update_slice_in_dim(h, hb.astype(h.dtype), start, 0))
    r = x.shape[0]
    return _each_block(lay, body, (jnp.zeros((r, wo.shape[2]), x.dtype),
                                   jnp.zeros((r, wi.shape[2]), x.dtype)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def expert_mlp(x, wi, wo, lay: Layout, activation):
    """x [R, D] (the padded buffer) -> activation(x @ wi[e]) @ wo[e] for each block's
    expert e, [R, D]; wi [E, D, M], wo [E, M, D]; `activation` elementwise, no RNG."""
    return _mlp_fwd(x, wi, wo, lay, activation)[0]


def _expert_mlp_fwd(x, wi, wo, lay, activation):
    y, h = _mlp_fwd(x, wi, wo, lay, activation)
    return y, (x, h, wi, wo, lay)


def _expert_mlp_bwd(activation, res, dy):
    x, h, wi, wo, lay = res

    def body(size, start, e, c, first):
        dx, dwi, dwo = c
        xb, hb, gb = (jax.lax.dynamic_slice_in_dim(a, start, size, 0) for a in (x, h, dy))
        ab, act_vjp = jax.vjp(activation, hb)
        dhb, = act_vjp(jax.lax.dot_general(gb, _weight(wo, e), _NT))
        dxb = jax.lax.dot_general(dhb, _weight(wi, e), _NT)
        return (jax.lax.dynamic_update_slice_in_dim(dx, dxb.astype(dx.dtype), start, 0),
                _add_to(dwi, e, jax.lax.dot_general(xb, dhb, _TN, preferred_element_type=jnp.float32), first),
                _add_to(dwo, e, jax.lax.dot_general(ab, gb, _TN, preferred_element_type=jnp.float32), first))
    dx, dwi, dwo = _each_block(lay, body, (jnp.zeros(x.shape, x.dtype),
                                           jnp.zeros(wi.shape, jnp.float32),
                                           jnp.zeros(wo.shape, jnp.float32)))
    return dx, dwi.astype(wi.dtype), dwo.astype(wo.dtype), None


expert_mlp.defvjp(_expert_mlp_fwd, _expert_mlp_bwd)
