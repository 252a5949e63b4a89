"""m6jax: M6-family multimodal pretraining (M6, M6-MoE/M6-T, M6-10T) in JAX/Flax."""

__version__ = "0.1.0"
