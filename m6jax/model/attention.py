"""Multi-head self-attention with logical axes on every weight and activation."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6jax.model.layers import constrain, dense_init

_QKV_AXES = ("batch", "length", "heads", "kv")


class SelfAttention(nn.Module):
    """[B, S, D] -> [B, S, D] masked multi-head attention (softmax in float32).

    With `decode` the keys and values of this call are written into a pre-allocated
    "cache" collection (`key`, `value`: [B, L, H, Dh], L = mask.shape[-1] = patches +
    text_len) at slot `cache_index`, and the queries attend to the whole cache; the mask
    hides slots not yet filled. Prefill writes S slots at index 0, a step one slot.
    """
    num_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, mask, cache_index=None):
        """x: [B, S, D]; mask: bool [B, 1, S, S] (True = may attend), or [B, 1, S, L]
        over the cache slots with `decode`; cache_index: i32 scalar (first slot written)."""
        d, h, dh = x.shape[-1], self.num_heads, self.head_dim
        # Kernels are created at their full [D, H, Dh] shape (flax's DenseGeneral would
        # box a flattened kernel with the wrong number of logical axes).
        qkv_init = dense_init(("embed", "heads", "kv"), in_axis=0, out_axis=(1, 2))
        x = x.astype(self.dtype)
        q, k, v = (constrain(jnp.einsum("bsd,dhk->bshk", x,
                                        self.param(n, qkv_init, (d, h, dh)).astype(self.dtype)),
                             _QKV_AXES)
                   for n in ("query", "key", "value"))
        if self.decode:
            k, v = self._cached(k, v, mask.shape[-1], cache_index)
        # jax's fused op can use cuDNN flash attention on GPU; the XLA path elsewhere.
        out = constrain(jax.nn.dot_product_attention(q, k, v, mask=mask), _QKV_AXES)
        wo = self.param("out", dense_init(("heads", "kv", "embed"), in_axis=(0, 1), out_axis=2),
                        (h, dh, d))
        out = jnp.einsum("bshk,hkd->bsd", out, wo.astype(self.dtype))
        out = nn.Dropout(self.dropout_rate)(out, deterministic=self.deterministic)
        return constrain(out, ("batch", "length", "act_embed"))

    def _cached(self, k, v, cache_len: int, cache_index):
        """Writes k, v [B, S, H, Dh] at `cache_index`; returns the full caches [B, L, H, Dh]."""
        shape = (k.shape[0], cache_len) + k.shape[2:]
        out = []
        for name, new in (("key", k), ("value", v)):
            slot = self.variable("cache", name, jnp.zeros, shape, new.dtype)
            slot.value = constrain(jax.lax.dynamic_update_slice_in_dim(
                slot.value, new, cache_index, axis=1), _QKV_AXES)
            out.append(slot.value)
        return out
