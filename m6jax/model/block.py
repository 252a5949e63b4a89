"""One pre-LN transformer block and the scanned stack of them."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6jax.model.attention import SelfAttention
from m6jax.model.layers import constrain, layer_norm
from m6jax.model.mlp import Mlp

# Named remat policies: what a scanned layer keeps for the backward pass.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no rematerialisation: keep everything (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
    """[B, S, D] -> [B, S, D]: x + Attn(LN(x)), then + Mlp(LN(x)). Scan-compatible."""
    cfg: Any  # the config's `model` section
    dtype: jnp.dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.cfg
        h = layer_norm(self.dtype, "pre_attn_norm")(x)
        x = x + SelfAttention(cfg.num_heads, cfg.emb_dim // cfg.num_heads, self.dtype,
                              cfg.dropout_rate, self.deterministic, name="attn")(h, mask)
        h = layer_norm(self.dtype, "pre_mlp_norm")(x)
        x = x + Mlp(cfg.mlp_dim, cfg.mlp_activation, self.dtype, cfg.dropout_rate,
                    self.deterministic, name="mlp")(h)
        return constrain(x, ("batch", "length", "act_embed")), None


class Stack(nn.Module):
    """`num_layers` blocks applied with `nn.scan` along a `layers` parameter axis.

    With `share_layers` the block parameters have no layer axis and every layer applies
    the same weights (the Pseudo giant of Pseudo-to-Real); activations and FLOPs are
    those of the full-depth model either way.
    """
    cfg: Any
    dtype: jnp.dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.cfg
        block = Block
        policy = REMAT_POLICIES[cfg.remat_policy]
        if cfg.remat_policy != "none":
            block = nn.remat(Block, policy=policy, prevent_cse=False)
        if cfg.share_layers:
            scan_kw = dict(variable_broadcast="params", split_rngs={"params": False})
        else:
            scan_kw = dict(variable_axes={"params": 0}, split_rngs={"params": True},
                           metadata_params={nn.PARTITION_NAME: "layers"})
        scanned = nn.scan(block, length=cfg.num_layers, in_axes=(nn.broadcast,),
                          split_rngs={**scan_kw.pop("split_rngs"), "dropout": True},
                          **scan_kw)
        x, _ = scanned(cfg, self.dtype, self.deterministic, name="layers")(x, mask)
        return x
