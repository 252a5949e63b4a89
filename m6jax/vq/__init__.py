"""The image tokenizer for text-to-image: a VQ-VAE turning images into discrete codes.

  model.py   encoder / quantizer / decoder (Flax), codes <-> images
  train.py   the training loop (EMA codebook, dead-code restart, Orbax checkpoints)
  load.py    a trained tokenizer from its workdir: encode / decode functions
"""
from m6jax.vq.model import VQVAE, num_codes  # noqa: F401
