"""A trained image tokenizer read back from its workdir (`experiments/train_vq.py`)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from m6jax import checkpoint
from m6jax.errors import InputError
from m6jax.vq.model import VQVAE, code_grid


def vq_config(vq_from: str, field: str = "vq_from") -> ml_collections.ConfigDict:
    """The tokenizer run's config from its newest checkpoint's meta (a JSON read, no
    arrays): what the config checks need. InputError naming `field` if there is none."""
    if not vq_from:
        raise InputError(f"{field}='' : the text_to_image tasks (data.task_weights) need an "
                         "image tokenizer; train one (python experiments/train_vq.py "
                         "--config=experiments/configs/vq.py:tiny --workdir=DIR) and pass "
                         f"--config.{field}=DIR")
    try:
        meta = checkpoint.read_meta(checkpoint.step_dir(vq_from))
        return ml_collections.ConfigDict(meta["config"])
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{field}={vq_from!r} holds no image-tokenizer checkpoint ({e}); give "
                         "the --workdir of experiments/train_vq.py") from e


class ImageTokenizer:
    """Images f32 [N, S, S, C] <-> codes i32 [N, grid * grid] (row-major)."""

    def __init__(self, vq_from: str, field: str = "vq_from"):
        self.config = vq_config(vq_from, field)
        v = self.config.vq
        self.image_size, self.channels = v.image_size, v.image_channels
        self.codebook_size, self.grid = v.codebook_size, code_grid(v)
        self.num_codes = self.grid ** 2
        self.model = VQVAE(v)
        x = jnp.zeros((1, v.image_size, v.image_size, v.image_channels))
        shapes = jax.eval_shape(lambda: dict(self.model.init(jax.random.key(0), x)))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                                shapes)
        self.variables = checkpoint.load_params(checkpoint.step_dir(vq_from), abstract)

    @functools.cached_property
    def _encode(self):
        return jax.jit(lambda v, x: self.model.apply(v, x, method=VQVAE.tokenize))

    @functools.cached_property
    def _decode(self):
        return jax.jit(lambda v, c: self.model.apply(v, c, method=VQVAE.decode))

    def encode(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        out = [np.asarray(self._encode(self.variables, images[i:i + batch]))
               for i in range(0, len(images), batch)]
        return np.concatenate(out).reshape(len(images), self.num_codes)

    def decode(self, codes) -> np.ndarray:
        """codes [N, num_codes] (numpy or jax, values in [0, K)) -> images [N, S, S, C]."""
        codes = jnp.asarray(codes).reshape(-1, self.grid, self.grid)
        return np.asarray(self._decode(self.variables, codes))
