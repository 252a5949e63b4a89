"""A jitted encoder: (params, rows) -> one unit vector per row, batched over the mesh."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m6jax import distributed, sharding
from m6jax.embed.pooling import POOLINGS, pool
from m6jax.finetune.peft import Adaptation

MODEL_KEYS = ("patches", "image_mask", "text_tokens", "text_mask", "text_is_prefix")


def make_encoder(model, mesh, param_shardings, adaptation: Adaptation | None = None,
                 poolings=POOLINGS):
    """Returns `encode((base, trainable), rows) -> {pooling: f32 [B, D]}`, jitted.

    params is the pair an `Adaptation` applies ((base, trainable); full: ({}, params));
    `param_shardings` the same pair's shardings. Rows are sharded over the batch axes.
    """
    adaptation = adaptation or Adaptation("full")

    def encode(params, batch):
        with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            logits, hidden, _ = adaptation.apply(model, params[0], params[1],
                                            {k: batch[k] for k in MODEL_KEYS})
        valid = jnp.concatenate([batch["image_mask"], batch["text_mask"]], axis=1)
        p = batch["patches"].shape[1]
        return {name: pool(hidden, valid, p, name, logits, batch["text_tokens"])
                for name in poolings}

    bs = sharding.batch_sharding(mesh)
    return jax.jit(encode, in_shardings=(param_shardings, bs), out_shardings=bs)


def encode_rows(encoder, params, mesh, rows: dict[str, np.ndarray], chunk: int = 256):
    """Encodes N rows (numpy, every host holds all) in equal chunks -> {pooling: [N, D]}.

    The last chunk is padded by repeating its last row, so the encoder compiles once.
    """
    shards = sharding.batch_shards(mesh)
    chunk = max(shards, chunk // shards * shards)
    n = len(rows["text_tokens"])
    keys = [k for k in MODEL_KEYS if k in rows]
    out = []
    with jax.set_mesh(mesh):
        for start in range(0, n, chunk):
            part = [rows[k][start:start + chunk] for k in keys]
            if len(part[0]) < chunk:
                part = [np.concatenate([a, np.repeat(a[-1:], chunk - len(a), axis=0)])
                        for a in part]
            batch = sharding.shard_full_batch(mesh, dict(zip(keys, part)))
            out.append(jax.tree.map(np.asarray, distributed.fetch(encoder(params, batch))))
    return {k: np.concatenate([o[k] for o in out])[:n] for k in out[0]}
