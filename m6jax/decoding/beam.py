"""Beam search over the KV cache: W hypotheses per row, one pool of finished and alive.

Each row keeps W beams with their summed log-probability, length and a finished flag.
At each step every alive beam proposes all V next tokens; a finished beam proposes only
pad at no cost, so it survives unchanged while it still ranks in the top W. Candidates
are ranked by the length-normalised score  log p / ((5 + len) / 6) ** alpha  (GNMT, Wu
et al. 2016; alpha = `length_penalty`, 0 = raw log-probability), len counting generated
tokens up to and including eos. Alive candidates all have the same length, so among them
this is the log-probability order; the penalty only matters when a finished hypothesis
competes with longer alive ones. The search ends when all W beams of every row are
finished or after max_new tokens; the best-scoring beam is returned. Width 1 is greedy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from m6jax.decoding import cache as cache_lib


def gnmt_penalty(length, alpha: float):
    """((5 + length) / 6) ** alpha, f32 like `length`."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def beam_search(step_fn, logits0, cache, beam_size: int, max_new: int, eos_id: int,
                pad_id: int, length_penalty: float = 0.6, num_return: int = 1):
    """Returns (tokens i32 [B, max_new] of the best beam, its normalised score f32 [B]);
    with `num_return` = n > 1 the n best beams of each row, best first, as rows
    b * n + rank: tokens [B * n, max_new], scores [B * n]. Beams are distinct hypotheses
    (a finished one only extends with pad), so the n rows are n different outputs.

    logits0 f32 [B * W, V] and `cache` come from a prefill of each row repeated W times
    (rows b * W + w); `step_fn(cache, tokens [B * W]) -> (logits [B * W, V], cache)`.
    """
    bw, v = logits0.shape
    w = beam_size
    b = bw // w
    if w > v:
        raise ValueError(f"beam_size={w} exceeds the vocabulary ({v})")
    neg_inf = jnp.float32(-jnp.inf)
    # Only beam 0 is live at the start: W copies of one hypothesis would fill the beam.
    logp = jnp.where(jnp.arange(w) == 0, 0.0, neg_inf) * jnp.ones((b, 1), jnp.float32)
    pad_row = jnp.where(jnp.arange(v) == pad_id, 0.0, neg_inf)            # [V]

    def expand(i, logits, logp, length, finished, seqs, cache):
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, w, v)
        lp = jnp.where(finished[..., None], pad_row, lp)
        cand = (logp[..., None] + lp).reshape(b, w * v)                  # [B, W*V]
        new_len = jnp.where(finished, length, i + 1)                      # [B, W]
        key = cand / jnp.repeat(gnmt_penalty(new_len, length_penalty), v, axis=1)
        _, top = jax.lax.top_k(key, w)                                    # [B, W]
        parent, tok = top // v, (top % v).astype(jnp.int32)
        logp = jnp.take_along_axis(cand, top, axis=1)
        length = jnp.take_along_axis(new_len, parent, axis=1)
        finished = jnp.take_along_axis(finished, parent, axis=1) | (tok == eos_id)
        seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1)
        seqs = jax.lax.dynamic_update_slice_in_dim(seqs, tok[..., None], i, axis=2)
        rows = (jnp.arange(b)[:, None] * w + parent).reshape(bw)
        return logp, length, finished, seqs, cache_lib.reorder(cache, rows), tok.reshape(bw)

    seqs = jnp.full((b, w, max_new), pad_id, jnp.int32)
    length = jnp.zeros((b, w), jnp.int32)
    finished = jnp.zeros((b, w), bool)
    logp, length, finished, seqs, cache, tok = expand(0, logits0, logp, length, finished,
                                                      seqs, cache)

    def cond(carry):
        i, _, _, finished, *_ = carry
        return (i < max_new) & ~jnp.all(finished)

    def body(carry):
        i, logp, length, finished, seqs, cache, tok = carry
        logits, cache = step_fn(cache, tok)
        return (i + 1,) + expand(i, logits, logp, length, finished, seqs, cache)

    carry = (jnp.asarray(1, jnp.int32), logp, length, finished, seqs, cache, tok)
    _, logp, length, _, seqs, _, _ = jax.lax.while_loop(cond, body, carry)
    score = logp / gnmt_penalty(length, length_penalty)                   # [B, W]
    if num_return == 1:
        best = jnp.argmax(score, axis=1)
        return (jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0],
                jnp.take_along_axis(score, best[:, None], axis=1)[:, 0])
    if not 1 <= num_return <= w:
        raise ValueError(f"num_return={num_return} must lie in [1, beam_size={w}]")
    top, rank = jax.lax.top_k(score, num_return)                          # [B, n]
    return (jnp.take_along_axis(seqs, rank[..., None], axis=1).reshape(b * num_return, -1),
            top.reshape(b * num_return))
