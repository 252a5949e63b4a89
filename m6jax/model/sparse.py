"""Block-sparse self-attention: a fixed pattern (Child et al. 2019) on top of any mask.

The sequence is cut into blocks of `block_size` positions. Query block i sees key block
j iff
  |i - j| <= window                  local: the neighbouring blocks
  j % stride == stride - 1           strided: summary columns every query sees
  i < global_blocks or j < global_blocks   global: the leading blocks (image patches and
                                     the prompt, in M6's [image | text] order) see and
                                     are seen by everything
and the model's own mask (prefix-LM, padding) still applies inside the kept blocks.
Only the kept blocks are computed: each non-global query block gathers its (at most
`keys_per_block`) key blocks, so scores take [S, keys_per_block * block_size] instead of
[S, S]; the global query blocks are ordinary dense rows.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from m6jax import kernels

KINDS = ("dense", "sparse")


@dataclasses.dataclass(frozen=True)
class Pattern:
    block_size: int
    window: int = 1
    stride: int = 4
    global_blocks: int = 1

    def layout(self, num_blocks: int) -> np.ndarray:
        """bool [num_blocks (query), num_blocks (key)]: which blocks interact."""
        i, j = np.arange(num_blocks)[:, None], np.arange(num_blocks)[None, :]
        g = self.global_blocks
        return ((np.abs(i - j) <= self.window) | (j % self.stride == self.stride - 1)
                | (i < g) | (j < g))

    def mask(self, seq_len: int) -> np.ndarray:
        """bool [seq_len, seq_len]: the pattern at position level (for dense reference)."""
        nb = -(-seq_len // self.block_size)
        full = np.kron(self.layout(nb), np.ones((self.block_size,) * 2, bool))
        return full[:seq_len, :seq_len]


def pattern_from_config(cfg) -> Pattern | None:
    """The model section's pattern; None for model.attention='dense'."""
    if cfg.attention != "sparse":
        return None
    return Pattern(int(cfg.sparse_block_size), int(cfg.sparse_window),
                   int(cfg.sparse_stride), int(cfg.sparse_global_blocks))


def validate(config) -> None:
    """Refuses an unknown model.attention or a sparse block size that does not divide the
    sequence (num_patches + data.text_len), naming the field."""
    m = config.model
    kind = m.attention
    if kind not in KINDS:
        raise ValueError(f"model.attention={kind!r} is not one of {', '.join(KINDS)}")
    if kind == "dense":
        return
    d = config.data
    seq = (d.image_size // d.patch_size) ** 2 + d.text_len
    for f in ("sparse_block_size", "sparse_stride"):
        if int(m[f]) <= 0:
            raise ValueError(f"model.{f}={m[f]} must be positive")
    for f in ("sparse_window", "sparse_global_blocks"):
        if int(m[f]) < 0:
            raise ValueError(f"model.{f}={m[f]} must be >= 0")
    if seq % m.sparse_block_size:
        raise ValueError(f"model.sparse_block_size={m.sparse_block_size} does not divide the "
                         f"sequence of {seq} positions ((data.image_size / data.patch_size)**2 "
                         f"+ data.text_len); pick a divisor of {seq}")
    if kernels.resolve("sparse_attention", m.kernels) == "triton":
        check_block_size(pattern_from_config(m))


def check_block_size(pattern: Pattern) -> None:
    """The block-sparse Triton kernel (sparse_triton.py) tiles by the block: a power of 2."""
    bs = pattern.block_size
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"model.sparse_block_size={bs}: the Triton block-sparse kernel "
                         "needs a power of two >= 16; pick one or set "
                         "model.kernels=sparse_attention=blocks")


def _key_blocks(pattern: Pattern, num_blocks: int):
    """For query blocks g.. nb-1: key-block indices i32 [nq, nk] and their validity."""
    layout = pattern.layout(num_blocks)[pattern.global_blocks:]
    nk = int(layout.sum(1).max()) if len(layout) else 1
    idx = np.zeros((len(layout), nk), np.int32)
    valid = np.zeros((len(layout), nk), bool)
    for r, row in enumerate(layout):
        cols = np.flatnonzero(row)
        idx[r, :len(cols)], valid[r, :len(cols)] = cols, True
    return idx, valid


def sparse_attention(q, k, v, mask, pattern: Pattern):
    """q, k, v [B, S, H, Dh]; mask an `AttentionMask` over S -> [B, S, H, Dh].

    Equals `jax.nn.dot_product_attention(q, k, v, mask=mask.dense() & pattern.mask(S))`
    on every query row that keeps a visible key (rows left with none, e.g. trailing
    padding slots, give 0 here). The mask is evaluated at the kept blocks' positions
    only, so no [S, S] array exists. S need not divide into blocks (a decode prefill is
    shorter than the trained sequence): it is padded to whole blocks with invisible keys.
    """
    b, s, h, dh = q.shape
    bs = pattern.block_size
    nb = -(-s // bs)
    pad = nb * bs - s
    if pad:
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
    mask = mask.pad_to(nb * bs)
    g = min(pattern.global_blocks, nb)
    scale = dh ** -0.5
    outs = []
    if g:  # global query rows see every block: plain dense rows
        scores = jnp.einsum("bqhd,bkhd->bhqk", q[:, :g * bs], k).astype(jnp.float32) * scale
        m = mask.visible(np.arange(g * bs)[:, None], np.arange(nb * bs)[None, :])[:, None]
        outs.append(_softmax_combine(scores, m, v, "bhqk,bkhd->bqhd"))
    if g < nb:
        idx, valid = _key_blocks(pattern, nb)                        # [nq, nk]
        nq, nk = idx.shape
        kb = k.reshape(b, nb, bs, h, dh)[:, idx].reshape(b, nq, nk * bs, h, dh)
        vb = v.reshape(b, nb, bs, h, dh)[:, idx].reshape(b, nq, nk * bs, h, dh)
        qb = q[:, g * bs:].reshape(b, nq, bs, h, dh)
        scores = jnp.einsum("bnqhd,bnkhd->bhnqk", qb, kb).astype(jnp.float32) * scale
        q_pos = (g * bs + np.arange(nq * bs)).reshape(nq, bs, 1)
        k_pos = (idx[:, :, None] * bs + np.arange(bs)).reshape(nq, 1, nk * bs)
        m = mask.visible(q_pos, k_pos)                               # [B, nq, bs, nk*bs]
        m = m & jnp.asarray(np.repeat(valid, bs, axis=1))[None, :, None, :]
        out = _softmax_combine(scores, m[:, None], vb, "bhnqk,bnkhd->bnqhd")
        outs.append(out.reshape(b, nq * bs, h, dh))
    out = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    return out[:, :s].astype(q.dtype)


def _softmax_combine(scores, mask, values, spec):
    scores = jnp.where(mask, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    p = jnp.exp(scores - top)
    norm = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(norm == 0, 1.0, norm)
    return jnp.einsum(spec, p.astype(values.dtype), values)


def step_row(pattern: Pattern, slot, num_slots: int):
    """bool [num_slots]: the key slots that the query at `slot` (traced) may see."""
    nb = -(-num_slots // pattern.block_size)
    row = jnp.asarray(pattern.layout(nb))[slot // pattern.block_size]        # [nb]
    return jnp.repeat(row, pattern.block_size)[:num_slots]
