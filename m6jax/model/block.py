"""One pre-LN transformer block (`Block`) and the MoE stack's scanned unit of
`moe.every` blocks (`BlockGroup`). The stack of them is `m6jax.model.stack`."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from m6jax.model.attention import SelfAttention
from m6jax.model.sparse import pattern_from_config
from m6jax.model.layers import constrain, layer_norm
from m6jax.model.mlp import Mlp
from m6jax.model.moe import MoeMlp


class Block(nn.Module):
    """[B, S, D] -> [B, S, D]: x + Attn(LN(x)), then + Mlp(LN(x)). Scan-compatible.

    With `use_moe` the Mlp is the MoE layer (`moe`); `route` = (token_ids i32 [B, S],
    modality i32 [B, S], valid bool [B, S]) feeds the hash / domain routers and keeps
    padding out of expert capacity. Returns (x, MoE metrics or None).

    With `decode` it returns (x, (keys, values) [B, S, H, Dh]) for the KV cache, and a
    one-token step reads this layer's cache `cached` ([B, L, H, Dh] each; see
    SelfAttention). `capacity_tokens` (decode) sets the MoE group size for capacity.
    """
    cfg: Any  # the config's `model` section
    dtype: jnp.dtype = jnp.float32
    deterministic: bool = True
    use_moe: bool = False
    training: bool = False
    decode: bool = False
    capacity_tokens: int = 0

    @nn.compact
    def __call__(self, x, mask, route=None, cached=None):
        cfg = self.cfg
        x = checkpoint_name(x, "layer_input")  # what remat "offload_layer_input" parks on the host
        h = layer_norm(self.dtype, "pre_attn_norm")(x)
        attn = SelfAttention(cfg.num_heads, cfg.emb_dim // cfg.num_heads, self.dtype,
                             cfg.dropout_rate, self.deterministic, self.decode,
                             sparse=pattern_from_config(cfg), kernels=cfg.kernels, name="attn")
        if self.decode:
            y, kv = attn(h, mask, cached)
        else:
            y = attn(h, mask)
        x = x + y
        h = layer_norm(self.dtype, "pre_mlp_norm")(x)
        metrics = None
        if self.use_moe:
            y, metrics = MoeMlp(cfg.moe, cfg.mlp_dim, cfg.mlp_activation, self.dtype,
                                cfg.dropout_rate, self.deterministic, self.training,
                                capacity_tokens=self.capacity_tokens, kernels=cfg.kernels,
                                name="moe")(h, *route)
            x = x + y
        else:
            x = x + Mlp(cfg.mlp_dim, cfg.mlp_activation, self.dtype, cfg.dropout_rate,
                        self.deterministic, name="mlp")(h)
        x = constrain(x, ("batch", "length", "act_embed"))
        return (x, kv) if self.decode else (x, metrics)


class BlockGroup(nn.Module):
    """`moe.every` blocks, the last one MoE: the scanned unit of an MoE stack, so the
    scan stays over identical units. Returns (x, the MoE block's metrics); with
    `decode` (x, (keys, values) [B, every, S, H, Dh]), reading cached [B, every, L, H, Dh]."""
    cfg: Any
    dtype: jnp.dtype = jnp.float32
    deterministic: bool = True
    training: bool = False
    decode: bool = False
    capacity_tokens: int = 0

    @nn.compact
    def __call__(self, x, mask, route, cached=None):
        every = int(self.cfg.moe.every)
        kvs = []
        for i in range(every):
            layer_cache = None if cached is None else (cached[0][:, i], cached[1][:, i])
            x, out = Block(self.cfg, self.dtype, self.deterministic, i == every - 1,
                           self.training, self.decode, self.capacity_tokens,
                           name=f"block_{i}")(x, mask, route, layer_cache)
            kvs.append(out)
        if self.decode:
            return x, tuple(jnp.stack([kv[j] for kv in kvs], axis=1) for j in range(2))
        return x, out
