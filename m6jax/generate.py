"""Greedy caption / text decoding by recomputing the sequence each step.

This is the simple, obviously-correct decoder used for evaluation during pretraining.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m6jax import sharding


def make_greedy_decoder(model, mesh, param_shardings, prompt_len: int, max_new: int,
                        eos_id: int, pad_id: int = 0):
    """Returns `decode(params, patches, image_mask, prompt) -> tokens [B, max_new]`.

    patches f32 [B, P, patch_dim], image_mask bool [B, P], prompt i32 [B, prompt_len]
    (the prefix text, e.g. [<caption>, <en>]). Tokens after an eos are `pad_id`.
    """
    text_len = model.text_len
    if prompt_len + max_new > text_len:
        raise ValueError(f"prompt ({prompt_len}) + max_new ({max_new}) exceeds text_len={text_len}")

    def decode(params, patches, image_mask, prompt):
        b = prompt.shape[0]
        tokens = jnp.zeros((b, text_len), jnp.int32).at[:, :prompt_len].set(prompt)
        positions = jnp.arange(text_len)[None, :]
        is_prefix = jnp.broadcast_to(positions < prompt_len, (b, text_len))

        def body(i, carry):
            tokens, done = carry
            cur = prompt_len + i  # slot to fill
            batch = dict(patches=patches, image_mask=image_mask, text_tokens=tokens,
                         text_mask=jnp.broadcast_to(positions < cur, (b, text_len)),
                         text_is_prefix=is_prefix)
            with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
                logits = model.apply({"params": params}, batch)           # [B, T, V]
            nxt = jnp.argmax(logits[:, cur - 1], axis=-1).astype(jnp.int32)
            nxt = jnp.where(done, pad_id, nxt)
            tokens = tokens.at[:, cur].set(nxt)
            return tokens, done | (nxt == eos_id)

        tokens, _ = jax.lax.fori_loop(0, max_new, body, (tokens, jnp.zeros((b,), bool)))
        return tokens[:, prompt_len:prompt_len + max_new]

    bs = sharding.batch_sharding(mesh)
    return jax.jit(decode, in_shardings=(param_shardings, bs, bs, bs), out_shardings=bs)


def pad_rows(arrays: list[np.ndarray], multiple: int) -> tuple[list[np.ndarray], int]:
    """Pads the leading dim of each array (repeating the last row) to a multiple."""
    n = arrays[0].shape[0]
    target = -(-n // multiple) * multiple
    if target == n:
        return arrays, n
    return [np.concatenate([a, np.repeat(a[-1:], target - n, axis=0)]) for a in arrays], n
