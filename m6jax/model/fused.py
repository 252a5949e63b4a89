"""Fused attention kernels (Pallas, in jax) over an `AttentionMask`, never an S x S array.

Splash and jax's Triton kernel take segment ids, not M6's per-row prefix, so the
prefix-LM rule runs as two calls (`AttentionMask.kernel_segments`): a bidirectional one
whose rows serve the prefix queries and a causal one whose rows serve the rest, picked
per query. That is two kernel passes where one dense pass would do; the kernels skip
the blocks their static mask rules out (causal, the sparse pattern), not those the
segment ids do.
Block-sparse attention on CUDA is our own kernel (sparse_triton.py): it reads the mask
vectors inside each kept block, so it is one call.

Under a mesh each kernel runs per device (`shard_map` over the batch and head axes the
activations are already split on: a Pallas call is opaque to GSPMD, which would
otherwise gather q, k, v onto every device).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from m6jax.model.masks import NONE_SEGMENT, AttentionMask

_TILE = 128
_PAD_ID = NONE_SEGMENT - 1  # tile padding: apart from pads and from real tokens


def attend(impl: str, q, k, v, mask: AttentionMask, pattern=None, interpret: bool = False):
    """q, k, v [B, S, H, Dh] -> [B, S, H, Dh] with `impl` in {'splash', 'triton'}.

    'triton' with a sparse `pattern` is our block-sparse kernel (sparse_triton.py): one
    call, the mask from its vectors, no two-call split."""
    if impl == "triton" and pattern is not None:
        from m6jax.model import sparse_triton
        kernel = functools.partial(sparse_triton.attend_rows, pattern=pattern,
                                   interpret=interpret)
        return _per_device(kernel, q, k, v, *sparse_triton.mask_rows(mask))
    in_prefix, prefix_ids, causal_ids = mask.kernel_segments()
    call = functools.partial(_splash if impl == "splash" else _triton,
                             pattern=pattern, interpret=interpret)
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)

    def both(q, k, v, in_prefix, prefix_ids, causal_ids):
        # Both kernels tile the sequence by 128 (splash: lanes); the padded slots form
        # a segment of their own, seen by no real query.
        s = q.shape[1]
        extra = -s % _TILE
        if extra:
            q, k, v = (jnp.pad(a, ((0, 0), (0, extra), (0, 0), (0, 0))) for a in (q, k, v))
            prefix_ids, causal_ids = (jnp.pad(i, ((0, 0), (0, extra)), constant_values=_PAD_ID)
                                      for i in (prefix_ids, causal_ids))
        bidir = call(q, k, v, prefix_ids, causal=False)
        causal = call(q, k, v, causal_ids, causal=True)
        return jnp.where(in_prefix[:, :, None, None], bidir[:, :s], causal[:, :s])

    return _per_device(both, q, k, v, in_prefix, prefix_ids, causal_ids)


def _per_device(fn, q, k, v, *rows):
    """fn under shard_map over the mesh axes of logical 'batch' and 'heads' (if any)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, *rows)
    batch, _, heads, _ = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
    qkv, row = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(fn, in_specs=(qkv,) * 3 + (row,) * len(rows), out_specs=qkv,
                         check_vma=False)(q, k, v, *rows)


def _static_mask(s: int, pattern, causal: bool) -> np.ndarray:
    m = np.ones((s, s), bool) if pattern is None else pattern.mask(s)
    return m & np.tri(s, dtype=bool) if causal else m


def _splash(q, k, v, ids, *, causal, pattern, interpret):
    """Splash attention (TPU): the static mask (pattern, causal) and segment ids."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk, splash_attention_mask as sm)
    b, s, h, _ = q.shape
    if pattern is None:
        one = sm.CausalMask((s, s)) if causal else sm.FullMask((s, s))
    else:
        one = sm.NumpyMask(_static_mask(s, pattern, causal))
    blk = 512 if s % 512 == 0 else _TILE
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                          block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                          block_kv_dq=blk)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([one] * h), block_sizes=sizes,
                                head_shards=1, q_seq_shards=1, interpret=interpret)
    heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  [B, H, S, Dh]
    out = jax.vmap(lambda q, k, v, i: kernel(q, k, v, segment_ids=sk.SegmentIds(i, i)))(
        heads_first(q), heads_first(k), heads_first(v), ids)
    return heads_first(out)


def _triton(q, k, v, ids, *, causal, pattern, interpret):
    """jax's Pallas GPU flash attention (Triton): causal and segment ids; no block mask
    (a sparse pattern takes sparse_triton.py, see `attend`)."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention
    assert pattern is None, "attend routes sparse patterns to sparse_triton"
    sizes = gpu_attention.BlockSizes(block_q=_TILE, block_k=_TILE, block_q_dkv=32,
                                     block_kv_dkv=32, block_q_dq=32, block_kv_dq=32)
    return gpu_attention.mha(q, k, v, ids, sm_scale=1.0, causal=causal, block_sizes=sizes,
                             interpret=interpret)
