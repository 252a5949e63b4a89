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
  terms  learned weights of the words the text holds (as uniCOIL / DeepImpact weight a
         document's own terms), over M6's own tokens and their adjacent pairs: text
         position i (the task token left out) weighs its token t_i by w_i =
         softplus(logit of t_i at i) through the tied LM head; entry t of the vector is
         the max of w_i over the positions holding t, and entry V + hash(t_i, t_{i+1})
         the max of sqrt(w_i w_{i+1}) over the pairs hashed there (BIGRAM_BUCKETS of
         them): [vocab + BIGRAM_BUCKETS], mostly zeros. No new parameters; only
         fine-tuning makes the weights mean something (docs/finetuning.md)
Vectors are L2-normalised, so a dot product is the cosine.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

POOLINGS = ("mean", "first", "last", "lexical", "terms")
BIGRAM_BUCKETS = 32749  # a prime: the 4M token pairs of a 2000 vocabulary, mostly unseen


def pool(hidden_bsd, valid_bs, num_patches: int, pooling: str, logits_btv=None,
         tokens_bt=None):
    """hidden [B, S, D] (S = P + T), valid bool [B, S] -> unit vectors f32 [B, D]
    (lexical: from logits [B, T, V] -> [B, V]; terms: logits and the text tokens [B, T]
    -> [B, V + BIGRAM_BUCKETS])."""
    h = hidden_bsd.astype(jnp.float32)
    if pooling == "terms":
        v = _terms(jnp.asarray(logits_btv, jnp.float32), tokens_bt, valid_bs[:, num_patches:])
    elif pooling == "lexical":
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


def _terms(logits_btv, tokens_bt, text_valid_bt):
    vocab = logits_btv.shape[-1]
    held = jnp.asarray(text_valid_bt).at[:, 0].set(False)  # the task token: in every row
    tokens_bt = jnp.asarray(tokens_bt)
    own = jnp.take_along_axis(logits_btv, tokens_bt[..., None], axis=-1)[..., 0]      # [B, T]
    w = jnp.where(held, jax.nn.softplus(own), 0.0)
    rows = jnp.arange(tokens_bt.shape[0])[:, None]
    unigrams = jnp.zeros((tokens_bt.shape[0], vocab)).at[rows, tokens_bt].max(w)
    pair_held = held[:, :-1] & held[:, 1:]
    wb = jnp.where(pair_held, jnp.sqrt(w[:, :-1] * w[:, 1:] + 1e-12), 0.0)
    bucket = (tokens_bt[:, :-1] * vocab + tokens_bt[:, 1:]) % BIGRAM_BUCKETS
    bigrams = jnp.zeros((tokens_bt.shape[0], BIGRAM_BUCKETS)).at[rows, bucket].max(wb)
    return jnp.concatenate([unigrams, bigrams], axis=1)
