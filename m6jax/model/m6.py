"""The M6 model: one transformer stack over [image patches | text] with prefix-LM masks."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from m6jax.model.block import Stack
from m6jax.model.layers import constrain, dense_init, layer_norm
from m6jax.model.masks import prefix_lm_mask
from m6jax.model.moe import moe_config

_EMB_INIT = nn.initializers.normal(stddev=0.02)


class M6(nn.Module):
    """Single-stream multimodal transformer (Lin et al. 2021).

    Attributes:
      cfg: the config's `model` section.
      image_grid: patches per image side (image_size // patch_size).
      text_len: text slots per sequence.
      deterministic: False enables dropout (needs a 'dropout' rng).
    """
    cfg: Any
    image_grid: int
    text_len: int
    deterministic: bool = True
    training: bool = False  # the train step sets it: MoE capacity factor and router jitter

    @nn.compact
    def __call__(self, batch):
        """batch: dict with `patches` f32 [B, P, patch_dim], `image_mask` bool [B, P],
        `text_tokens` i32 [B, T], `text_mask` bool [B, T], `text_is_prefix` bool [B, T].
        Returns float32 logits [B, T, vocab] for the text positions."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        num_patches = self.image_grid ** 2

        # Image: linear projection of flattened patches + row/column position.
        img = nn.Dense(cfg.emb_dim, dtype=dtype, kernel_init=dense_init(("patch", "embed")),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                       name="patch_proj")(batch["patches"].astype(dtype))
        rows = self.param("patch_row_emb", nn.with_logical_partitioning(_EMB_INIT, (None, "embed")),
                          (self.image_grid, cfg.emb_dim))
        cols = self.param("patch_col_emb", nn.with_logical_partitioning(_EMB_INIT, (None, "embed")),
                          (self.image_grid, cfg.emb_dim))
        grid_pos = (rows[:, None, :] + cols[None, :, :]).reshape(num_patches, cfg.emb_dim)
        img = img + grid_pos.astype(dtype)

        # Text: token + 1-D position.
        embed = nn.Embed(cfg.vocab_size, cfg.emb_dim, dtype=dtype,
                         embedding_init=nn.with_logical_partitioning(_EMB_INIT, ("vocab", "embed")),
                         name="token_emb")
        txt = embed(batch["text_tokens"])
        txt_pos = self.param("text_pos_emb", nn.with_logical_partitioning(_EMB_INIT, (None, "embed")),
                             (self.text_len, cfg.emb_dim))
        txt = txt + txt_pos[: txt.shape[1]].astype(dtype)

        # Modality embedding: 0 = image, 1 = text.
        modality = self.param("modality_emb", nn.with_logical_partitioning(_EMB_INIT, (None, "embed")),
                              (2, cfg.emb_dim)).astype(dtype)
        x = jnp.concatenate([img + modality[0], txt + modality[1]], axis=1)     # [B, P+T, D]
        x = constrain(x, ("batch", "length", "act_embed"))

        mask = prefix_lm_mask(batch["image_mask"], batch["text_mask"], batch["text_is_prefix"])
        stack = Stack(cfg, dtype, self.deterministic, self.training, name="stack")
        if moe_config(cfg) is None:
            x, _ = stack(x, mask)
        else:
            # Hash routing keys on token ids; image patches hash by position (negative
            # ids never collide with the vocabulary). Domain routing keys on modality.
            b, t = batch["text_tokens"].shape
            patch_ids = jnp.broadcast_to(-1 - jnp.arange(num_patches, dtype=jnp.int32),
                                         (b, num_patches))
            token_ids = jnp.concatenate([patch_ids, batch["text_tokens"].astype(jnp.int32)], 1)
            modality = jnp.concatenate([jnp.zeros((b, num_patches), jnp.int32),
                                        jnp.ones((b, t), jnp.int32)], axis=1)
            valid = jnp.concatenate([batch["image_mask"], batch["text_mask"]], axis=1)
            x, metrics = stack(x, mask, (token_ids, modality, valid))
            self.sow("intermediates", "moe", metrics)  # per MoE layer, [L / every, ...]
        x = layer_norm(dtype, "final_norm")(x[:, num_patches:])                # [B, T, D]

        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, dtype=dtype, use_bias=False,
                              kernel_init=dense_init(("embed", "vocab")), name="lm_head")(x)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
