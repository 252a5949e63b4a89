"""Prefill and one-token steps of M6(decode=True), and reordering the cache's rows.

Cache layout (the "cache" collection, batch first in every array so rows can be
gathered alike): `key`, `value` [B, num_layers, P + text_len, H, Dh] (compute dtype;
the scanned layers read their slice, the model writes one slot per step for all
layers), `key_valid` bool [B, P + text_len] (filled slots) and `index` i32 [] (the next
text position, shared by all rows: every row of a batch has the same prompt length).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6jax import sharding


def decode_model(model):
    """The same M6 in KV-cache mode: same params, eval MoE capacity, no dropout."""
    return model.clone(decode=True, deterministic=True, training=False)


def prefill(model, params, patches, image_mask, prompt, num_prefix: int):
    """Runs [patches | prompt] once. Returns (logits f32 [B, V] of the last prompt
    position, cache).

    patches f32 [B, P, patch_dim], image_mask bool [B, P] (all False: text only),
    prompt i32 [B, Tp]; its first `num_prefix` tokens are the bidirectional prefix, the
    rest attend causally (as the target text of the task they continue did in training).
    """
    b, t = prompt.shape
    batch = dict(patches=patches, image_mask=image_mask, text_tokens=prompt,
                 text_mask=jnp.ones((b, t), bool),
                 text_is_prefix=jnp.broadcast_to(jnp.arange(t) < num_prefix, (b, t)))
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        logits, out = model.apply({"params": params}, batch, mutable=["cache"])
    return logits[:, -1], out["cache"]


def step(model, params, cache, tokens):
    """tokens i32 [B] at the cache's next position -> (logits f32 [B, V], new cache)."""
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        logits, out = model.apply({"params": params, "cache": cache},
                                  {"text_tokens": tokens[:, None]}, mutable=["cache"])
    return logits[:, 0], out["cache"]


def reorder(cache, rows):
    """Gathers rows i32 [B'] of every cache array (beam search: each beam's parent)."""
    return jax.tree.map(lambda a: a if a.ndim == 0 else jnp.take(a, rows, axis=0), cache)
