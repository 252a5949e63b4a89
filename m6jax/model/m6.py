"""The M6 model: one transformer stack over [image patches | text] with prefix-LM masks."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6jax.model.stack import Stack
from m6jax.model.layers import constrain, dense_init, layer_norm
from m6jax.model.masks import StepMask, attention_mask
from m6jax.model.moe import moe_config
from m6jax.model.resnet import ResNetEncoder
from m6jax.model.sparse import pattern_from_config

_EMB_INIT = nn.initializers.normal(stddev=0.02)


class M6(nn.Module):
    """Single-stream multimodal transformer (Lin et al. 2021).

    Attributes:
      cfg: the config's `model` section.
      image_grid: patches per image side (image_size // patch_size).
      text_len: text slots per sequence.
      deterministic: False enables dropout (needs a 'dropout' rng).
      decode: KV-cache mode for generation (apply with mutable=["cache"]); the params
        tree is the same as without it. See `__call__` for the two kinds of call.
    """
    cfg: Any
    image_grid: int
    text_len: int
    deterministic: bool = True
    training: bool = False  # the train step sets it: MoE capacity factor and router jitter
    decode: bool = False
    pipeline: Any = None  # an m6jax.pipeline.Schedule: the stack in training and evaluation

    @nn.compact
    def __call__(self, batch):
        """batch: dict with `patches` f32 [B, P, patch_dim], `image_mask` bool [B, P],
        `text_tokens` i32 [B, T], `text_mask` bool [B, T], `text_is_prefix` bool [B, T].
        Returns float32 logits [B, T, vocab] for the text positions.

        With `decode`, a batch with `patches` is a *prefill*: the same forward pass over
        [patches | T prompt tokens] (T <= text_len), which also fills the "cache"
        collection: `key`, `value` [B, num_layers, P + text_len, H, Dh] (compute dtype),
        the filled slots `key_valid` bool [B, P + text_len] and `index` i32 [], the next
        text position (= T). A batch holding only `text_tokens` i32 [B, 1] is one
        *step*: the token is embedded at text position `index` (shared by all rows),
        attends to the filled slots and itself, its keys/values are written into slot
        P + index, and its logits [B, 1, vocab] are returned.
        """
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        num_patches = self.image_grid ** 2
        step = self.decode and "patches" not in batch

        if not step:
            # Image: one embedding per patch (a linear projection, or the ResNet's grid)
            # + row/column position.
            if cfg.image_encoder == "resnet":
                img = ResNetEncoder(cfg, self.image_grid, dtype, name="resnet")(batch["patches"])
            else:
                img = nn.Dense(cfg.emb_dim, dtype=dtype, kernel_init=dense_init(("patch", "embed")),
                               bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                      ("norm",)),
                               name="patch_proj")(batch["patches"].astype(dtype))
            pos_init = nn.with_logical_partitioning(_EMB_INIT, (None, "embed"))
            rows = self.param("patch_row_emb", pos_init, (self.image_grid, cfg.emb_dim))
            cols = self.param("patch_col_emb", pos_init, (self.image_grid, cfg.emb_dim))
            grid_pos = (rows[:, None, :] + cols[None, :, :]).reshape(num_patches, cfg.emb_dim)
            img = img + grid_pos.astype(dtype)

        # Text: token + 1-D position.
        embed = nn.Embed(cfg.vocab_size, cfg.emb_dim, dtype=dtype,
                         embedding_init=nn.with_logical_partitioning(_EMB_INIT, ("vocab", "embed")),
                         name="token_emb")
        txt = embed(batch["text_tokens"])
        txt_pos = self.param("text_pos_emb",
                             nn.with_logical_partitioning(_EMB_INIT, (None, "embed")),
                             (self.text_len, cfg.emb_dim))
        b, t = batch["text_tokens"].shape
        if step:
            if not self.has_variable("cache", "index"):
                raise ValueError("M6(decode=True): a one-token step needs the cache of a "
                                 "prefill; call it with `patches` first and pass its cache")
            index = self.variable("cache", "index", jnp.zeros, (), jnp.int32)
            pos = index.value
            txt = txt + jax.lax.dynamic_slice_in_dim(txt_pos, pos, 1).astype(dtype)
        else:
            # A packed row restarts positions at each example (data.pack).
            txt = txt + (txt_pos[batch["text_positions"]] if "text_positions" in batch
                         else txt_pos[: txt.shape[1]]).astype(dtype)

        # Modality embedding: 0 = image, 1 = text.
        modality = self.param("modality_emb",
                              nn.with_logical_partitioning(_EMB_INIT, (None, "embed")),
                              (2, cfg.emb_dim)).astype(dtype)
        if step:
            x = txt + modality[1]                                               # [B, 1, D]
        else:
            x = jnp.concatenate([img + modality[0], txt + modality[1]], axis=1)  # [B, P+T, D]
        x = constrain(x, ("batch", "length", "act_embed"))

        cached = None
        if step:
            key_valid = self.variable("cache", "key_valid", lambda: None)
            kv_vars = [self.variable("cache", n, lambda: None) for n in ("key", "value")]
            cached = tuple(v.value for v in kv_vars)
            # The filled slots, and the sparse layout's row for this query's slot.
            mask = StepMask(key_valid.value, num_patches + index.value, pattern_from_config(cfg))
        else:
            mask = attention_mask(batch["image_mask"], batch["text_mask"],
                                  batch["text_is_prefix"], batch.get("segment_ids"))
        # Decoding routes each sequence in its own group (a sample must not depend on the
        # rest of the batch): a prefill's capacity is that of a whole P + text_len
        # sequence, the group the uncached decoder routes; a one-token step is a group of
        # one token (>= 1 slot per expert), never `moe.group_size` tokens of several rows.
        capacity_tokens = (1 if step else num_patches + self.text_len) if self.decode else 0
        stack = Stack(cfg, dtype, self.deterministic, self.training, self.decode,
                      capacity_tokens, self.pipeline, name="stack")
        # ys: MoE metrics (training, eval) or this call's keys/values (decode).
        if moe_config(cfg) is None:
            x, ys = stack(x, mask, None, cached)
        else:
            # Hash routing keys on token ids; image patches hash by position (negative
            # ids never collide with the vocabulary). Domain routing keys on modality.
            if step:
                route = (batch["text_tokens"].astype(jnp.int32), jnp.ones((b, 1), jnp.int32),
                         jnp.ones((b, 1), bool))
            else:
                patch_ids = jnp.broadcast_to(-1 - jnp.arange(num_patches, dtype=jnp.int32),
                                             (b, num_patches))
                token_ids = jnp.concatenate([patch_ids, batch["text_tokens"].astype(jnp.int32)], 1)
                modality = jnp.concatenate([jnp.zeros((b, num_patches), jnp.int32),
                                            jnp.ones((b, t), jnp.int32)], axis=1)
                valid = jnp.concatenate([batch["image_mask"], batch["text_mask"]], axis=1)
                route = (token_ids, modality, valid)
            x, ys = stack(x, mask, route, cached)
            if not self.decode:
                self.sow("intermediates", "moe", ys)  # per MoE layer, [L / every, ...]
        if step:
            slot = num_patches + pos
            _write_cache(kv_vars, ys, slot)
            key_valid.value = key_valid.value.at[:, slot].set(True)
            index.value = pos + 1
        elif self.decode:
            self._prefill_cache(batch, ys)
        x = layer_norm(dtype, "final_norm")(x if step else x[:, num_patches:])  # [B, T, D]

        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, dtype=dtype, use_bias=False,
                              kernel_init=dense_init(("embed", "vocab")), name="lm_head")(x)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def _prefill_cache(self, batch, kv):
        """Creates the cache from a prefill's keys/values [B, num_layers, P+T, H, Dh]."""
        b, t = batch["text_tokens"].shape
        if t > self.text_len:
            raise ValueError(f"prompt of {t} tokens exceeds data.text_len={self.text_len}")
        text_mask = jnp.pad(batch["text_mask"], ((0, 0), (0, self.text_len - t)))
        valid = jnp.concatenate([batch["image_mask"], text_mask], axis=1)      # [B, L]
        shape = kv[0].shape[:2] + valid.shape[1:] + kv[0].shape[3:]
        kv_vars = [self.variable("cache", n, jnp.zeros, shape, kv[0].dtype)
                   for n in ("key", "value")]
        self.variable("cache", "key_valid", lambda: valid)
        self.variable("cache", "index", jnp.zeros, (), jnp.int32).value = jnp.asarray(t, jnp.int32)
        _write_cache(kv_vars, kv, 0)


def _write_cache(kv_vars, kv, slot):
    """Writes keys/values [B, num_layers, S, H, Dh] at slot `slot` of the cache (in place
    inside the decode loop: one small update per step for all layers)."""
    for var, new in zip(kv_vars, kv):
        var.value = constrain(jax.lax.dynamic_update_slice_in_dim(
            var.value, new.astype(var.value.dtype), slot, axis=2),
            ("batch", None, "length", "heads", "kv"))
