"""M6 from a run config: what training, generation and fine-tuning all build."""
from __future__ import annotations

from m6jax import pipeline
from m6jax.model.m6 import M6


def build_model(config, deterministic: bool = True) -> M6:
    grid = config.data.image_size // config.data.patch_size
    return M6(config.model, grid, config.data.text_len, deterministic=deterministic,
              pipeline=pipeline.from_config(config))
