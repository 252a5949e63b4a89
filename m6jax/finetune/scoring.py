"""Likelihood scoring of candidate targets, label-word accuracy and recall@k.

M6 is generative, so both downstream evaluations here score candidates by the model's
log-likelihood of a target given a prefix (and an image), in batched forward passes
without decoding: the sentiment label word given the review, a caption given an image.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m6jax import distributed, sharding

_MODEL_KEYS = ("patches", "image_mask", "text_tokens", "text_mask", "text_is_prefix")


def make_scorer(model, mesh, param_shardings, adaptation=None):
    """Returns `score(params, batch) -> f32 [B]`: sum of log p(targets) where loss_mask.

    batch holds the pretraining layout's keys (`m6jax.data.pipeline`) for B rows; the
    text arrays may be shorter than the model's text_len (position embeddings are sliced),
    which keeps scoring short captions cheap. The sum covers the target and its eos. With an
    `adaptation` (`peft.Adaptation`, method=prompt) params is the pair (base, prompt).
    """
    def score(params, batch):
        inputs = {k: batch[k] for k in _MODEL_KEYS}
        with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            logits = (adaptation.apply(model, params[0], params[1], inputs)[0] if adaptation
                      else model.apply({"params": params}, inputs))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)             # [B, T, V]
        token_logp = jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]  # [B, T]
        return (token_logp * batch["loss_mask"]).sum(-1)

    bs = sharding.batch_sharding(mesh)
    return jax.jit(score, in_shardings=(param_shardings, bs), out_shardings=bs)


def score_rows(score, params, mesh, rows: dict[str, np.ndarray], chunk: int = 256) -> np.ndarray:
    """Scores N rows (numpy, every host holds all of them) in fixed-size chunks -> f32 [N].

    Every chunk is padded to the same size (a multiple of the batch shards), so the
    scorer compiles once.
    """
    shards = sharding.batch_shards(mesh)
    chunk = max(shards, chunk // shards * shards)
    n = len(rows["targets"])
    keys = list(rows)
    out = []
    with jax.set_mesh(mesh):
        for start in range(0, n, chunk):
            part = [rows[k][start:start + chunk] for k in keys]
            if len(part[0]) < chunk:  # the last chunk: repeat its last row up to `chunk`
                part = [np.concatenate([a, np.repeat(a[-1:], chunk - len(a), axis=0)]) for a in part]
            batch = sharding.shard_full_batch(mesh, dict(zip(keys, part)))
            out.append(np.asarray(distributed.fetch(score(params, batch))))
    return np.concatenate(out)[:n] if out else np.zeros((0,), np.float32)


def label_accuracy(scores_nl: np.ndarray, labels_n: np.ndarray) -> float:
    """Fraction of rows whose highest-scoring candidate (scores [N, L]) is the label [N]."""
    return float(np.mean(np.argmax(scores_nl, axis=1) == labels_n))


def recall_at_k(scores_qc: np.ndarray, relevant_qc: np.ndarray, k: int) -> float:
    """Fraction of queries with a relevant candidate among their k best (scores [Q, C]).

    Ties go to the lower candidate index (a stable sort).
    """
    order = np.argsort(-scores_qc, axis=1, kind="stable")[:, :k]                    # [Q, k]
    return float(np.mean(np.take_along_axis(relevant_qc, order, axis=1).any(axis=1)))

