"""Refuse a bad tokenizer config before anything is built, naming the field."""
from __future__ import annotations

from m6jax.data.config import IMAGE_TEXT_SUFFIXES, expand_globs


def validate_vq_config(config) -> None:
    v = config.vq
    for f in ("image_size", "channels", "num_downsamples", "code_dim", "codebook_size"):
        if not isinstance(v[f], int) or v[f] <= 0:
            raise ValueError(f"vq.{f}={v[f]!r} must be a positive integer")
    if v.image_size % 2 ** v.num_downsamples:
        raise ValueError(f"vq.num_downsamples={v.num_downsamples} halvings do not divide "
                         f"vq.image_size={v.image_size}; use a multiple of {2 ** v.num_downsamples}")
    if v.image_channels not in (1, 3):
        raise ValueError(f"vq.image_channels={v.image_channels} must be 1 (grey) or 3 (RGB)")
    if not 0.0 <= v.ema_decay < 1.0:
        raise ValueError(f"vq.ema_decay={v.ema_decay} must be in [0, 1)")
    for f in ("total_steps", "batch_size", "log_every"):
        if int(config[f]) <= 0:
            raise ValueError(f"{f}={config[f]} must be positive")
    if config.data.image_text_files:
        expand_globs(config.data.image_text_files, "data.image_text_files", IMAGE_TEXT_SUFFIXES)
