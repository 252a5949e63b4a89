"""M6 from a run config: what training, generation and fine-tuning all build."""
from __future__ import annotations

from m6jax import pipeline
from m6jax.model.mlp import ACTIVATIONS
from m6jax.model.remat import REMAT_POLICIES
from m6jax.model.m6 import M6


def build_model(config, deterministic: bool = True) -> M6:
    grid = config.data.image_size // config.data.patch_size
    return M6(config.model, grid, config.data.text_len, deterministic=deterministic,
              pipeline=pipeline.from_config(config))


DTYPES = ("float32", "bfloat16", "float16")


def validate(config, sizes: dict[str, int]) -> None:
    """The `model` section's own fields and their fit to the mesh (`sizes`); attention,
    MoE, the image encoder and text-to-image vocabulary are checked by their modules."""
    m = config.model
    for f in ("emb_dim", "num_heads", "mlp_dim", "num_layers", "vocab_size"):
        if int(m[f]) <= 0:
            raise ValueError(f"model.{f}={m[f]} must be positive")
    if m.emb_dim % m.num_heads:
        raise ValueError(f"model.num_heads={m.num_heads} does not divide model.emb_dim={m.emb_dim}")
    if m.dtype not in DTYPES:
        raise ValueError(f"model.dtype={m.dtype!r} is not one of {', '.join(DTYPES)}")
    if m.param_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.param_dtype={m.param_dtype!r} is not one of float32, bfloat16")
    if m.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"model.remat_policy={m.remat_policy!r} is not one of "
                         f"{', '.join(REMAT_POLICIES)}")
    if m.mlp_activation not in ACTIVATIONS:
        raise ValueError(f"model.mlp_activation={m.mlp_activation!r} is not one of "
                         f"{', '.join(ACTIVATIONS)}")
    if not 0.0 <= m.dropout_rate < 1.0:
        raise ValueError(f"model.dropout_rate={m.dropout_rate} must be in [0, 1)")
    t = sizes["tensor"]
    for f in ("num_heads", "mlp_dim", "vocab_size"):
        if m[f] % t:
            raise ValueError(f"mesh.tensor={t} does not divide model.{f}={m[f]}")
    if m.emb_dim % sizes["fsdp"]:
        raise ValueError(f"mesh.fsdp={sizes['fsdp']} does not divide model.emb_dim={m.emb_dim}")
