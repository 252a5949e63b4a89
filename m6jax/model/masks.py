"""Attention masks that let one transformer stack be encoder and decoder (prefix-LM)."""
from __future__ import annotations

import jax.numpy as jnp


def prefix_lm_mask(image_mask, text_mask, text_is_prefix, segment_ids=None):
    """Which key each query may attend to, for a sequence [image patches | text].

    Args:
      image_mask: bool [B, P], True where an image patch exists.
      text_mask: bool [B, T], True on non-pad text tokens.
      text_is_prefix: bool [B, T], True on source text (seen bidirectionally).
      segment_ids: optional int32 [B, P+T] of a packed batch (`data.pack`): which example
        each slot belongs to, 0 = pad. A real query then sees only keys of its own
        example; a pad query keeps the unpacked rule (its row must not be empty).
    Returns:
      bool [B, 1, P+T, P+T]: key k is visible from query q iff k is a real token and
      (k is in the prefix, i.e. image or source text, or k <= q). Pad queries see the
      same keys as real ones, so no softmax row is empty; their outputs are never used.
    """
    valid = jnp.concatenate([image_mask, text_mask], axis=1)                    # [B, S]
    prefix = jnp.concatenate([image_mask, text_is_prefix & text_mask], axis=1)  # [B, S]
    s = valid.shape[1]
    causal = jnp.arange(s)[None, :] <= jnp.arange(s)[:, None]                   # [S(q), S(k)]
    visible = valid[:, None, :] & (prefix[:, None, :] | causal[None])           # [B, S, S]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]                # [B, S, S]
        visible &= same | (segment_ids[:, :, None] == 0)
    return visible[:, None]
