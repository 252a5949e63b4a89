"""Flax (Linen) modules of the M6 model."""
from m6jax.model.m6 import M6
from m6jax.model.masks import prefix_lm_mask

__all__ = ["M6", "prefix_lm_mask"]
