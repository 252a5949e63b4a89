"""A small ResNet whose last feature map is the patch grid (`model.image_encoder='resnet'`).

M6 feeds the transformer one backbone feature per image patch. Here the CNN sees the
whole image (rebuilt from the batch's row-major patches, so the batch layout is the same
as for `patches`) and downsamples it by `patch_size` = 2**k with k stride-2 residual
stages, so its last map has exactly `image_grid`**2 positions, one per patch slot; a 1x1
convolution takes that map to `emb_dim`. It trains jointly with the transformer.

Pre-activation residual blocks (LayerNorm over channels: no batch statistics to carry in
the train state or to synchronise across devices). Widths: stage i has
`model.resnet_width * 2**i` channels, `model.resnet_blocks` blocks per stage.

Sharding: every kernel's output-channel dimension is logical `embed` (sharded over
`fsdp`, ZeRO-3 like the transformer's weights); activations keep `batch` sharded and
channels replicated. Each block is rematerialised under the model's `remat_policy`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6jax.model.remat import REMAT_POLICIES
from m6jax.model.layers import constrain, layer_norm

_ACT_AXES = ("batch", None, None, "act_embed")


def _conv(features: int, kernel: int, stride: int, dtype, name: str) -> nn.Conv:
    init = nn.with_logical_partitioning(
        nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal"),
        (None, None, None, "embed"))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                   use_bias=False, dtype=dtype, kernel_init=init, name=name)


class _Block(nn.Module):
    """[B, H, W, Cin] -> [B, H / stride, W / stride, features], pre-activation."""
    features: int
    stride: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        h = nn.relu(layer_norm(self.dtype, "norm1")(x))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = _conv(self.features, 1, self.stride, self.dtype, "proj")(h)
        h = _conv(self.features, 3, self.stride, self.dtype, "conv1")(h)
        h = nn.relu(layer_norm(self.dtype, "norm2")(h))
        h = _conv(self.features, 3, 1, self.dtype, "conv2")(h)
        return constrain(shortcut + h, _ACT_AXES)


def unpatchify(patches, image_grid: int):
    """[B, g*g, p*p*C] row-major patches -> [B, g*p, g*p, C] images (C = 1 or 3: p*p*C is
    a perfect square exactly when C = 1)."""
    b, _, patch_dim = patches.shape
    channels = 1 if math.isqrt(patch_dim) ** 2 == patch_dim else 3
    p = math.isqrt(patch_dim // channels)
    x = patches.reshape(b, image_grid, image_grid, p, p, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, image_grid * p, image_grid * p, channels)


class ResNetEncoder(nn.Module):
    """patches f32 [B, P, p*p*C] -> patch embeddings [B, P, emb_dim] (compute dtype)."""
    cfg: Any
    image_grid: int
    dtype: Any

    @nn.compact
    def __call__(self, patches):
        cfg = self.cfg
        x = unpatchify(patches, self.image_grid).astype(self.dtype)        # [B, S, S, C]
        stages = int(math.log2(x.shape[1] // self.image_grid))
        width = int(cfg.resnet_width)
        block = _Block
        if cfg.remat_policy != "none":
            block = nn.remat(_Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
        x = constrain(_conv(width, 3, 1, self.dtype, "stem")(x), _ACT_AXES)
        for i in range(stages):
            for j in range(int(cfg.resnet_blocks)):
                x = block(width * 2 ** i, 2 if j == 0 else 1, self.dtype, name=f"stage{i}_block{j}")(x)
        x = nn.relu(layer_norm(self.dtype, "final_norm")(x))
        x = _conv(cfg.emb_dim, 1, 1, self.dtype, "to_embed")(x)            # [B, g, g, D]
        b = x.shape[0]
        return constrain(x.reshape(b, self.image_grid ** 2, cfg.emb_dim), ("batch", "length", "act_embed"))


IMAGE_ENCODERS = ("patches", "resnet")


def validate(config, sizes) -> None:
    """model.image_encoder and the ResNet's widths against the data and the mesh."""
    m = config.model
    encoder = m.image_encoder
    if encoder not in IMAGE_ENCODERS:
        raise ValueError(f"model.image_encoder={encoder!r} is not one of {', '.join(IMAGE_ENCODERS)}")
    if encoder != "resnet":
        return
    p = int(config.data.patch_size)
    if p & (p - 1):
        raise ValueError(f"model.image_encoder='resnet' downsamples by 2 per stage: "
                         f"data.patch_size={p} must be a power of 2")
    width = int(m.resnet_width)
    if width <= 0 or width % sizes["fsdp"]:
        raise ValueError(f"model.resnet_width={width} must be positive and divisible by "
                         f"mesh.fsdp={sizes['fsdp']} (its channels shard like embed)")
    if int(m.resnet_blocks) <= 0:
        raise ValueError(f"model.resnet_blocks={m.resnet_blocks} must be positive")
