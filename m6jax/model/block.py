"""One pre-LN transformer block and the scanned stack of them."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6jax.model.attention import SelfAttention
from m6jax.model.layers import constrain, layer_norm
from m6jax.model.mlp import Mlp
from m6jax.model.moe import MoeMlp, moe_config

# Named remat policies: what a scanned layer keeps for the backward pass.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no rematerialisation: keep everything (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
    """[B, S, D] -> [B, S, D]: x + Attn(LN(x)), then + Mlp(LN(x)). Scan-compatible.

    With `use_moe` the Mlp is the MoE layer (`moe`); `route` = (token_ids i32 [B, S],
    modality i32 [B, S], valid bool [B, S]) feeds the hash / domain routers and keeps
    padding out of expert capacity. Returns (x, MoE metrics or None).

    With `decode` attention reads and writes the KV cache at `cache_index` (see
    SelfAttention). The MoE capacity of a prefill is then computed for the whole cache
    length L = mask.shape[-1], the group size the uncached decoder routes, so the prompt
    is routed as there; a one-token step gets capacity >= 1 per expert and never drops.
    """
    cfg: Any  # the config's `model` section
    dtype: jnp.dtype = jnp.float32
    deterministic: bool = True
    use_moe: bool = False
    training: bool = False
    decode: bool = False

    @nn.compact
    def __call__(self, x, mask, route=None, cache_index=None):
        cfg = self.cfg
        h = layer_norm(self.dtype, "pre_attn_norm")(x)
        x = x + SelfAttention(cfg.num_heads, cfg.emb_dim // cfg.num_heads, self.dtype,
                              cfg.dropout_rate, self.deterministic, self.decode,
                              name="attn")(h, mask, cache_index)
        h = layer_norm(self.dtype, "pre_mlp_norm")(x)
        metrics = None
        if self.use_moe:
            prefill = self.decode and x.shape[1] > 1
            y, metrics = MoeMlp(cfg.moe, cfg.mlp_dim, cfg.mlp_activation, self.dtype,
                                cfg.dropout_rate, self.deterministic, self.training,
                                capacity_tokens=mask.shape[-1] if prefill else 0,
                                name="moe")(h, *route)
            x = x + y
        else:
            x = x + Mlp(cfg.mlp_dim, cfg.mlp_activation, self.dtype, cfg.dropout_rate,
                        self.deterministic, name="mlp")(h)
        return constrain(x, ("batch", "length", "act_embed")), metrics


class BlockGroup(nn.Module):
    """`moe.every` blocks, the last one MoE: the scanned unit of an MoE stack, so the
    scan stays over identical units. Returns (x, the MoE block's metrics)."""
    cfg: Any
    dtype: jnp.dtype = jnp.float32
    deterministic: bool = True
    training: bool = False
    decode: bool = False

    @nn.compact
    def __call__(self, x, mask, route, cache_index=None):
        every = int(self.cfg.moe.every)
        for i in range(every):
            x, metrics = Block(self.cfg, self.dtype, self.deterministic, i == every - 1,
                               self.training, self.decode,
                               name=f"block_{i}")(x, mask, route, cache_index)
        return x, metrics


class Stack(nn.Module):
    """`num_layers` blocks applied with `nn.scan` along a `layers` parameter axis.

    With `share_layers` the block parameters have no layer axis and every layer applies
    the same weights (the Pseudo giant of Pseudo-to-Real); activations and FLOPs are
    those of the full-depth model either way.

    With `decode` every layer keeps its KV cache in the "cache" collection, stacked on
    axis 1 ([B, layers, L, H, Dh]) so that the batch is the leading axis of every cache
    array (beam search reorders rows of all of them alike); shared or not, each layer
    has its own cache. Decoding never rematerialises (there is no backward pass).
    """
    cfg: Any
    dtype: jnp.dtype = jnp.float32
    deterministic: bool = True
    training: bool = False
    decode: bool = False

    @nn.compact
    def __call__(self, x, mask, route=None, cache_index=None):
        """Returns (x, MoE metrics stacked over the scanned units, or None if dense)."""
        cfg = self.cfg
        moe = moe_config(cfg)
        length, block, args = cfg.num_layers, Block, ()
        ctor = (cfg, self.dtype, self.deterministic)
        if moe is not None:
            # The scanned unit holds `every` layers (the last MoE), so units are identical.
            every = int(moe.every)
            length, args = cfg.num_layers // every, (route,)
            if every > 1:
                block, ctor = BlockGroup, ctor + (self.training,)
            else:
                ctor = ctor + (True, self.training)   # Block(use_moe=True, training)
        elif self.decode:
            ctor = ctor + (False, self.training)      # Block(use_moe=False, training)
        if self.decode:
            args, ctor = (route, cache_index), ctor + (True,)
        policy = REMAT_POLICIES[cfg.remat_policy]
        if cfg.remat_policy != "none" and not self.decode:
            block = nn.remat(block, policy=policy, prevent_cse=False)
        cache_axes = {"cache": 1} if self.decode else {}
        if cfg.share_layers:
            scan_kw = dict(variable_broadcast="params", split_rngs={"params": False},
                           variable_axes=cache_axes)
        else:
            scan_kw = dict(variable_axes={"params": 0, **cache_axes}, split_rngs={"params": True},
                           metadata_params={nn.PARTITION_NAME: "layers"})
        scanned = nn.scan(block, length=length, in_axes=(nn.broadcast,) * (1 + len(args)),
                          split_rngs={**scan_kw.pop("split_rngs"), "dropout": True},
                          **scan_kw)
        x, metrics = scanned(*ctor, name="layers")(x, mask, *args)
        return x, metrics
