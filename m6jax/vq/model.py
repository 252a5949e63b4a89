"""VQ-VAE (van den Oord et al. 2017) with an EMA codebook: images <-> grids of codes.

Encoder: `num_downsamples` stride-2 convolutions (32 px -> 8 x 8 codes with 2), a
residual block, a 1x1 projection to `code_dim`. Quantizer: nearest codebook vector
(squared L2), straight-through gradients, commitment loss. The codebook is not a
gradient parameter: it lives in the "vq" collection (`codebook` [K, D], `cluster_size`
[K], `embed_sum` [K, D]) and `ema_update` moves it towards the encoder outputs assigned
to each code, which trains faster and uses more codes than the codebook loss.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def num_codes(cfg) -> int:
    """Codes per image: (image_size / 2**num_downsamples) ** 2."""
    side = cfg.image_size // 2 ** cfg.num_downsamples
    return side * side


def code_grid(cfg) -> int:
    return cfg.image_size // 2 ** cfg.num_downsamples


class _ResBlock(nn.Module):
    ch: int

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.ch, (3, 3))(nn.relu(x))
        h = nn.Conv(self.ch, (1, 1))(nn.relu(h))
        return x + h


class VQVAE(nn.Module):
    """cfg: the `vq` config section (image_size, image_channels, channels, num_downsamples,
    code_dim, codebook_size, commitment)."""
    cfg: Any

    def setup(self):
        c = self.cfg
        chans = [c.channels * 2 ** min(i, 2) for i in range(c.num_downsamples)]
        self.down = [nn.Conv(ch, (4, 4), strides=(2, 2)) for ch in chans]
        self.enc_res = _ResBlock(chans[-1])
        self.to_code = nn.Conv(c.code_dim, (1, 1))
        self.from_code = nn.Conv(chans[-1], (3, 3))
        self.dec_res = _ResBlock(chans[-1])
        outs = chans[-2::-1] + [c.image_channels]
        self.up = [nn.ConvTranspose(ch, (4, 4), strides=(2, 2)) for ch in outs]
        init = lambda shape: jax.random.normal(self.make_rng("params"), shape) * 0.1  # noqa: E731
        k, d = c.codebook_size, c.code_dim
        self.codebook = self.variable("vq", "codebook", init, (k, d))
        self.cluster_size = self.variable("vq", "cluster_size", jnp.ones, (k,))
        self.embed_sum = self.variable("vq", "embed_sum", lambda: self.codebook.value)

    def encode(self, images):
        """images f32 [B, S, S, C] in [0, 1] -> continuous z_e [B, s, s, D]."""
        x = images * 2.0 - 1.0
        for conv in self.down:
            x = nn.relu(conv(x))
        return self.to_code(self.enc_res(x))

    def quantize(self, z):
        """z [..., D] -> (codes i32 [...], z_q [..., D] straight-through to z)."""
        e = self.codebook.value
        dist = (jnp.sum(z ** 2, -1, keepdims=True) - 2 * z @ e.T + jnp.sum(e ** 2, -1))
        codes = jnp.argmin(dist, -1).astype(jnp.int32)
        z_q = e[codes]
        return codes, z + jax.lax.stop_gradient(z_q - z)

    def decode_latents(self, z_q):
        """z_q [B, s, s, D] -> images f32 [B, S, S, C] (unclipped)."""
        x = self.dec_res(nn.relu(self.from_code(z_q)))
        for i, conv in enumerate(self.up):
            x = conv(x if i == 0 else nn.relu(x))
        return (x + 1.0) / 2.0

    def decode(self, codes):
        """codes i32 [B, s, s] -> images f32 [B, S, S, C] clipped to [0, 1]."""
        return jnp.clip(self.decode_latents(self.codebook.value[codes]), 0.0, 1.0)

    def tokenize(self, images):
        """images [B, S, S, C] -> codes i32 [B, s, s]."""
        return self.quantize(self.encode(images))[0]

    def __call__(self, images):
        """images [B, S, S, C] -> (reconstruction, loss, aux); aux holds `z_e`, `codes`
        and the loss terms (for the EMA update and the metrics)."""
        z_e = self.encode(images)
        codes, z_q = self.quantize(z_e)
        recon = self.decode_latents(z_q)
        mse = jnp.mean((recon - images) ** 2)
        commit = jnp.mean((z_e - jax.lax.stop_gradient(z_q)) ** 2)
        loss = mse + self.cfg.commitment * commit
        return recon, loss, dict(z_e=z_e, codes=codes, mse=mse, commitment=commit)


def ema_update(vq, z_e, codes, key, decay: float, eps: float = 1e-5, dead_below: float = 0.03):
    """The EMA codebook step. vq: the "vq" collection; z_e [..., D] and codes [...] of
    one batch. Returns the new collection.

    A code whose EMA count falls below `dead_below` (about one use in 1/dead_below
    steps' worth of decay) is restarted at a random encoder output of this batch: dead
    codes are what keeps a small codebook's usage low, and restarting them is the
    standard fix (Dhariwal et al. 2020, Jukebox)."""
    k, d = vq["codebook"].shape
    z = z_e.reshape(-1, d)
    onehot = jax.nn.one_hot(codes.reshape(-1), k, dtype=z.dtype)          # [N, K]
    size = decay * vq["cluster_size"] + (1 - decay) * onehot.sum(0)
    embed_sum = decay * vq["embed_sum"] + (1 - decay) * onehot.T @ z
    n = size.sum()
    smoothed = (size + eps) / (n + k * eps) * n                           # Laplace smoothing
    codebook = embed_sum / smoothed[:, None]
    dead = size < dead_below
    fresh = z[jax.random.randint(key, (k,), 0, z.shape[0])]
    codebook = jnp.where(dead[:, None], fresh, codebook)
    embed_sum = jnp.where(dead[:, None], fresh, embed_sum)
    size = jnp.where(dead, 1.0, size)
    return dict(codebook=codebook, cluster_size=size, embed_sum=embed_sum)
