"""Greedy and sampled decoding: one prefill, then a while loop of one-token steps."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def filter_logits(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """logits f32 [B, V] -> logits scaled by 1/temperature, -inf outside the top-k
    tokens (top_k > 0) and outside the nucleus: the fewest most likely tokens whose
    probability sums to >= top_p (top_p < 1). The most likely token always survives."""
    logits = logits / temperature
    neg = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        desc = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(desc, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p     # mass before it < top_p
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def chooser(strategy: str, temperature: float, top_k: int, top_p: float) -> Callable:
    """`choose(logits [B, V], key) -> i32 [B]` for 'greedy' or 'sample'."""
    if strategy == "greedy" or (strategy == "sample" and temperature == 0.0):
        return lambda logits, key: jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if strategy != "sample":
        raise ValueError(f"strategy={strategy!r}: use greedy, sample or beam")
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"sampling needs temperature >= 0 (got {temperature}), top_k >= 0 "
                         f"(got {top_k}) and 0 < top_p <= 1 (got {top_p})")

    def choose(logits, key):
        filtered = filter_logits(logits, temperature, top_k, top_p)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    return choose


def decode_loop(step_fn, logits0, cache, key, choose, max_new: int, eos_id: int, pad_id: int,
                return_logits: bool = False):
    """Tokens i32 [B, max_new] (and the logits f32 [B, max_new, V] each was chosen from).

    logits0 [B, V]: the prefill's last position; `step_fn(cache, tokens [B]) -> (logits
    [B, V], cache)`. Token i is drawn with key fold_in(key, i), so a fixed key gives the
    same tokens. A row stops at its eos; later slots hold pad_id. The loop exits early
    once every row has stopped (the skipped slots are pad already).
    """
    b, v = logits0.shape
    tok = choose(logits0, jax.random.fold_in(key, 0))
    tokens = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(tok)
    seen = jnp.zeros((b, max_new if return_logits else 0, v), jnp.float32)
    if return_logits:
        seen = seen.at[:, 0].set(logits0)

    def cond(carry):
        i, _, done, *_ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, tokens, done, cache, prev, seen = carry
        logits, cache = step_fn(cache, prev)
        tok = jnp.where(done, pad_id, choose(logits, jax.random.fold_in(key, i)))
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], i, axis=1)
        if return_logits:
            seen = jax.lax.dynamic_update_slice_in_dim(seen, logits[:, None], i, axis=1)
        return i + 1, tokens, done | (tok == eos_id), cache, tok, seen

    carry = (jnp.asarray(1, jnp.int32), tokens, tok == eos_id, cache, tok, seen)
    _, tokens, _, _, _, seen = jax.lax.while_loop(cond, body, carry)
    return (tokens, seen) if return_logits else tokens
