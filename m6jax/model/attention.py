"""Multi-head self-attention with logical axes on every weight and activation."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6jax import kernels
from m6jax.model import fused
from m6jax.model.layers import constrain, dense_init
from m6jax.model.sparse import Pattern, sparse_attention

_QKV_AXES = ("batch", "length", "heads", "kv")


class SelfAttention(nn.Module):
    """[B, S, D] -> [B, S, D] masked multi-head attention (softmax in float32).

    With `decode` it also returns this call's keys and values ([B, S, H, Dh] each) for
    the caller's KV cache, and a one-token step (`cached` given) attends to the cache's
    filled slots plus its own key; the cache itself is only read here (the model writes
    the new slot once for all layers, so no step copies the whole cache).
    """
    num_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0
    deterministic: bool = True
    decode: bool = False
    sparse: Pattern | None = None  # model.attention='sparse': the block pattern
    kernels: str = ""  # model.kernels: overrides of m6jax/kernels.py's table

    @nn.compact
    def __call__(self, x, mask, cached=None):
        """x: [B, S, D]; mask: an AttentionMask over S, or for a step a StepMask over
        the cache slots; cached: (keys, values) [B, L, H, Dh] or None."""
        d, h, dh = x.shape[-1], self.num_heads, self.head_dim
        # Kernels are created at their full [D, H, Dh] shape (flax's DenseGeneral would
        # box a flattened kernel with the wrong number of logical axes).
        qkv_init = dense_init(("embed", "heads", "kv"), in_axis=0, out_axis=(1, 2))
        x = x.astype(self.dtype)
        q, k, v = (constrain(jnp.einsum("bsd,dhk->bshk", x,
                                        self.param(n, qkv_init, (d, h, dh)).astype(self.dtype)),
                             _QKV_AXES)
                   for n in ("query", "key", "value"))
        # The kernel per backend (m6jax/kernels.py); the step is one query row.
        impl = kernels.resolve("attention" if self.sparse is None else "sparse_attention",
                               self.kernels)
        if cached is not None:
            out = _attend_step(q, k, v, cached, mask.dense())
        elif impl in ("splash", "triton"):
            out = fused.attend(impl, q, k, v, mask, self.sparse, kernels.interpret(impl))
        elif self.sparse is not None:
            out = sparse_attention(q, k, v, mask, self.sparse)
        elif q.dtype == jnp.float16 and jax.default_backend() == "cpu":
            out = _attend_f16_cpu(q, k, v, mask.dense())
        else:  # jax's XLA path: the dense [B, 1, S, S] mask and S x S scores
            out = jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), implementation="xla")
        out = constrain(out, _QKV_AXES)
        wo = self.param("out", dense_init(("heads", "kv", "embed"), in_axis=(0, 1), out_axis=2),
                        (h, dh, d))
        out = jnp.einsum("bshk,hkd->bsd", out, wo.astype(self.dtype))
        out = nn.Dropout(self.dropout_rate)(out, deterministic=self.deterministic)
        out = constrain(out, ("batch", "length", "act_embed"))
        return (out, (k, v)) if self.decode else out


def _attend_f16_cpu(q, k, v, mask):
    """jax.nn.dot_product_attention's XLA path for float16 q, k, v [B, S, H, Dh] on CPU,
    whose dot_general refuses the F16_F16_F32 precision jax asks for: scores and softmax
    in float32 (as there), the products in float16."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores * q.shape[-1] ** -0.5, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _attend_step(q, k, v, cached, mask):
    """One query [B, 1, H, Dh] over the cache [B, L, H, Dh] (slots where mask [B, 1, 1, L])
    and its own key/value [B, 1, H, Dh]; softmax in float32 over the L + 1 scores."""
    ck, cv = cached
    scale = q.shape[-1] ** -0.5
    s_cache = jnp.einsum("bqhd,bkhd->bhqk", q, ck).astype(jnp.float32) * scale   # [B, H, 1, L]
    s_cache = jnp.where(mask, s_cache, -jnp.inf)
    s_self = jnp.einsum("bqhd,bqhd->bhq", q, k).astype(jnp.float32)[..., None] * scale
    top = jnp.maximum(jnp.max(s_cache, -1, keepdims=True), s_self)
    p_cache, p_self = jnp.exp(s_cache - top), jnp.exp(s_self - top)            # [B, H, 1, *]
    norm = jnp.sum(p_cache, -1, keepdims=True) + p_self
    out = (jnp.einsum("bhqk,bkhd->bqhd", (p_cache / norm).astype(cv.dtype), cv)
           + jnp.einsum("bhqk,bqhd->bqhd", (p_self / norm).astype(v.dtype), v))
    return out.astype(q.dtype)
