"""One vector per sequence from M6's last hidden states.

M6 has no [CLS] token trained for this, so the pooling is chosen by measurement
(docs/finetuning.md, "Embeddings"): on the text recall task the pretrained checkpoints'
R@1 is printed for every pooling here, and the fine-tune configs default to the best.
  mean   the average over the valid positions (image patches and text tokens)
  first  the first text position: the task token ([<lm>] / [<caption>]) that reads the
         whole (bidirectional) prefix
  last   the last valid text position
  lexical  SPLADE's pooling (Formal et al. 2021) through the (tied) LM head: per
         vocabulary entry v, max over the text positions of log(1 + relu(logit_v)),
         a [vocab]-sized bag of the words the model reads there and expects around them
Vectors are L2-normalised, so a dot product is the cosine.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

POOLINGS = ("mean", "first", "last", "lexical")


def pool(hidden_bsd, valid_bs, num_patches: int, pooling: str, logits_btv=None):
    """hidden [B, S, D] (S = P + T), valid bool [B, S] -> unit vectors f32 [B, D]
    (lexical: from logits [B, T, V] -> [B, V])."""
    h = hidden_bsd.astype(jnp.float32)
    if pooling == "lexical":
        w = jnp.log1p(jax.nn.relu(logits_btv.astype(jnp.float32)))
        v = jnp.where(valid_bs[:, num_patches:, None], w, 0.0).max(1)
    elif pooling == "mean":
        w = valid_bs.astype(jnp.float32)
        v = (h * w[..., None]).sum(1) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
    elif pooling == "first":
        v = h[:, num_patches]
    elif pooling == "last":
        text_valid = valid_bs[:, num_patches:]
        last = jnp.maximum(text_valid.sum(1) - 1, 0) + num_patches                  # [B]
        v = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    else:
        raise ValueError(f"pooling={pooling!r} is not one of {', '.join(POOLINGS)}")
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-6)
