"""Block-sparse flash attention for CUDA: Pallas kernels (Triton lowering), forward and
backward, over the static pattern of m6jax/model/sparse.py and the mask as vectors.

The tile is the pattern's block (query block = key block = `block_size`). Per query
block i the static pattern gives its kept key blocks as a table (`_tables`: global
query rows keep every block); the forward and the dq kernel walk a row of it with a
dynamic-length loop, the dk/dv kernel walks the transposed table (per key block, the
query blocks that keep it). Inside a kept block the mask is evaluated from two int32
rows per batch row, so one pass serves prefix-LM, causal, padding and packing:

  key_kind  0 = no key (pad), 1 = causal key (seen by q >= k), 2 = prefix key (seen by all)
  seg       the packed batch's segment ids (0 = pad, and 0 everywhere when unpacked)

key k is visible from query q iff kind[k] == 2 or (kind[k] == 1 and k <= q), and
seg[q] == seg[k] or seg[q] == 0: AttentionMask.visible's rule. A row left with no
visible key outputs 0, as `sparse_attention` does. Softmax statistics and all
accumulators are float32; q, k, v may be bf16 or f32. Off CUDA the kernels run in
Pallas' interpret mode (the CPU tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from m6jax.model.sparse import Pattern, check_block_size

PAD_KIND, CAUSAL_KIND, PREFIX_KIND = 0, 1, 2


def mask_rows(mask):
    """(key_kind, seg) i32 [B, S] of an AttentionMask (see the module docstring)."""
    kind = jnp.where(mask.valid, jnp.where(mask.prefix, PREFIX_KIND, CAUSAL_KIND), PAD_KIND)
    seg = (jnp.zeros(mask.valid.shape, jnp.int32) if mask.segment_ids is None
           else mask.segment_ids.astype(jnp.int32))
    return kind.astype(jnp.int32), seg


def sparse_flash_attention(q, k, v, mask, pattern: Pattern, interpret: bool = False):
    """q, k, v [B, S, H, Dh]; mask an AttentionMask over S -> [B, S, H, Dh].

    Equals `sparse_attention(q, k, v, mask, pattern)` (m6jax/model/sparse.py), computed
    block by block with an online softmax: no score array beyond one block pair."""
    kind, seg = mask_rows(mask)
    return attend_rows(q, k, v, kind, seg, pattern=pattern, interpret=interpret)


def attend_rows(q, k, v, kind, seg, *, pattern: Pattern, interpret: bool = False):
    """q, k, v [B, S, H, Dh]; kind, seg i32 [B, S] (`mask_rows`) -> [B, S, H, Dh]. S is
    padded to whole blocks (pad slots are no key) and Dh to a power of two >= 16 (zero
    columns change no score; their outputs are dropped)."""
    check_block_size(pattern)
    _, s, _, dh = q.shape
    bs = pattern.block_size
    extra = -s % bs
    dh_pad = max(16, pl.next_power_of_2(dh))
    if extra or dh_pad != dh:
        widen = lambda a: jnp.pad(a, ((0, 0), (0, extra), (0, 0), (0, dh_pad - dh)))  # noqa: E731
        q, k, v = widen(q), widen(k), widen(v)
        kind = jnp.pad(kind, ((0, 0), (0, extra)), constant_values=PAD_KIND)
        seg = jnp.pad(seg, ((0, 0), (0, extra)))
    out = _flash(q, k, v, kind, seg, pattern, dh ** -0.5, bool(interpret))
    return out[:, :s, :, :dh]


# ----------------------------------------------------------------------------- tables

def _pad_pow2(n: int) -> int:
    return max(1, pl.next_power_of_2(n))


@functools.lru_cache(maxsize=None)
def _tables(pattern: Pattern, num_blocks: int):
    """(idx i32 [nb, n_max], counts i32 [nb'], idx_t, counts_t): per query block its
    kept key blocks (ascending, the first counts[i] entries valid); the `_t` pair is the
    transpose, per key block the query blocks that keep it. Widths padded to powers of
    two (Triton's shapes)."""
    layout = pattern.layout(num_blocks)

    def table(rows):
        counts = rows.sum(1).astype(np.int32)
        idx = np.zeros((num_blocks, _pad_pow2(int(counts.max()))), np.int32)
        for r, row in enumerate(rows):
            cols = np.flatnonzero(row)
            idx[r, :len(cols)] = cols
        padded = np.zeros(_pad_pow2(num_blocks), np.int32)
        padded[:num_blocks] = counts
        return idx, padded

    return (*table(layout), *table(layout.T))


# ----------------------------------------------------------------------------- kernels

def _visible(q_pos, seg_q, k_pos, kind_k, seg_k):
    """bool [bq, bk] from the rows (the module docstring's rule)."""
    seen = (kind_k[None, :] == PREFIX_KIND) | ((kind_k[None, :] == CAUSAL_KIND)
                                               & (k_pos[None, :] <= q_pos[:, None]))
    same = (seg_q[:, None] == seg_k[None, :]) | (seg_q[:, None] == 0)
    return seen & same


def _masked_scores(q, k, scale, vis):
    s = plgpu.dot(q, k, trans_b=True) * scale                           # f32 [bq, bk]
    return jnp.where(vis, s, -jnp.inf)


def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, kind_ref, seg_ref, o_ref, lse_ref,
                *, bs, scale):
    i = pl.program_id(2)
    q = q_ref[...]                                                      # [bs, dh]
    q_pos = i * bs + jnp.arange(bs)
    seg_q = seg_ref[pl.ds(i * bs, bs)]

    def body(t, carry):
        acc, m, l = carry
        j = idx_ref[t]
        ks = pl.ds(j * bs, bs)
        vis = _visible(q_pos, seg_q, j * bs + jnp.arange(bs), kind_ref[ks], seg_ref[ks])
        s = _masked_scores(q, k_ref[ks, :], scale, vis)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)   # rows with nothing seen yet
        p = jnp.exp(s - m_safe[:, None])
        corr = jnp.exp(m - m_safe)
        v = v_ref[ks, :]
        acc = acc * corr[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l * corr + jnp.sum(p, axis=1)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bs,), -jnp.inf, jnp.float32),
            jnp.zeros((bs,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, cnt_ref[i], body, init)
    empty = l == 0.0                                  # no visible key: output 0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m) + jnp.log(l_safe)       # 0 where empty


def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, kind_ref, seg_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, bs, scale):
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = i * bs + jnp.arange(bs)
    seg_q = seg_ref[pl.ds(i * bs, bs)]

    def body(t, dq):
        j = idx_ref[t]
        ks = pl.ds(j * bs, bs)
        vis = _visible(q_pos, seg_q, j * bs + jnp.arange(bs), kind_ref[ks], seg_ref[ks])
        k = k_ref[ks, :]
        p = jnp.exp(_masked_scores(q, k, scale, vis) - lse[:, None])
        dp = plgpu.dot(do, v_ref[ks, :], trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, cnt_ref[i], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, kind_ref, seg_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *, bs, scale):
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    k_pos = j * bs + jnp.arange(bs)
    ks = pl.ds(j * bs, bs)
    kind_k, seg_k = kind_ref[ks], seg_ref[ks]

    def body(t, carry):
        dk, dv = carry
        i = idx_ref[t]
        qs = pl.ds(i * bs, bs)
        q, do = q_ref[qs, :], do_ref[qs, :]
        vis = _visible(i * bs + jnp.arange(bs), seg_ref[qs], k_pos, kind_k, seg_k)
        p = jnp.exp(_masked_scores(q, k, scale, vis) - lse_ref[qs][:, None])   # [bq, bk]
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (plgpu.dot(do, v, trans_b=True) - delta_ref[qs][:, None])
        return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, cnt_ref[j], body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- calls

def _specs(s, dh, bs, n_max, n_counts):
    """BlockSpecs over grid (B, H, query-or-key block)."""
    return dict(
        table=pl.BlockSpec((None, n_max), lambda b, h, i: (i, 0)),
        counts=pl.BlockSpec((n_counts,), lambda b, h, i: (0,)),
        block=pl.BlockSpec((None, bs, None, dh), lambda b, h, i: (b, i, h, 0)),
        full=pl.BlockSpec((None, s, None, dh), lambda b, h, i: (b, 0, h, 0)),
        row=pl.BlockSpec((None, s), lambda b, h, i: (b, 0)),
        stat=pl.BlockSpec((None, None, bs), lambda b, h, i: (b, h, i)),
        stat_row=pl.BlockSpec((None, None, s), lambda b, h, i: (b, h, 0)),
    )


def _params(dh):
    return plgpu.CompilerParams(num_warps=4 if dh <= 64 else 8, num_stages=2)


def _forward(q, k, v, kind, seg, pattern, scale, interpret):
    b, s, h, dh = q.shape
    bs = pattern.block_size
    nb = s // bs
    idx, counts, _, _ = _tables(pattern, nb)
    sp = _specs(s, dh, bs, idx.shape[1], counts.shape[0])
    return pl.pallas_call(
        functools.partial(_fwd_kernel, bs=bs, scale=scale),
        grid=(b, h, nb),
        in_specs=[sp["table"], sp["counts"], sp["block"], sp["full"], sp["full"],
                  sp["row"], sp["row"]],
        out_specs=[sp["block"], sp["stat"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, s), jnp.float32)],
        compiler_params=_params(dh), interpret=interpret, name="sparse_flash_fwd",
    )(jnp.asarray(idx), jnp.asarray(counts), q, k, v, kind, seg)


def _backward(q, k, v, kind, seg, o, lse, do, pattern, scale, interpret):
    b, s, h, dh = q.shape
    bs = pattern.block_size
    nb = s // bs
    idx, counts, idx_t, counts_t = _tables(pattern, nb)
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))
    sp = _specs(s, dh, bs, idx.shape[1], counts.shape[0])
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, bs=bs, scale=scale),
        grid=(b, h, nb),
        in_specs=[sp["table"], sp["counts"], sp["block"], sp["full"], sp["full"],
                  sp["row"], sp["row"], sp["block"], sp["stat"], sp["stat"]],
        out_specs=sp["block"],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(dh), interpret=interpret, name="sparse_flash_dq",
    )(jnp.asarray(idx), jnp.asarray(counts), q, k, v, kind, seg, do, lse, delta)
    sp = _specs(s, dh, bs, idx_t.shape[1], counts_t.shape[0])
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, bs=bs, scale=scale),
        grid=(b, h, nb),
        in_specs=[sp["table"], sp["counts"], sp["full"], sp["block"], sp["block"],
                  sp["row"], sp["row"], sp["full"], sp["stat_row"], sp["stat_row"]],
        out_specs=[sp["block"], sp["block"]],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(dh), interpret=interpret, name="sparse_flash_dkv",
    )(jnp.asarray(idx_t), jnp.asarray(counts_t), q, k, v, kind, seg, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, kind, seg, pattern, scale, interpret):
    return _forward(q, k, v, kind, seg, pattern, scale, interpret)[0]


def _flash_fwd(q, k, v, kind, seg, pattern, scale, interpret):
    o, lse = _forward(q, k, v, kind, seg, pattern, scale, interpret)
    return o, (q, k, v, kind, seg, o, lse)


def _flash_bwd(pattern, scale, interpret, res, do):
    q, k, v, kind, seg, o, lse = res
    dq, dk, dv = _backward(q, k, v, kind, seg, o, lse, do, pattern, scale, interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
