"""Small building blocks shared by the model files: initialisers with logical axes."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


def dense_init(axes, scale: float = 1.0, in_axis=-2, out_axis=-1):
    """Fan-in scaled normal init carrying logical axis names for sharding."""
    init = nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal",
                                            in_axis=in_axis, out_axis=out_axis)
    return nn.with_logical_partitioning(init, axes)


def layer_norm(dtype, name: str | None = None) -> nn.LayerNorm:
    """Pre-LN layer norm; its scale and bias are tiny, so they stay replicated."""
    return nn.LayerNorm(
        dtype=dtype, param_dtype=jnp.float32, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def constrain(x, axes):
    """Sharding constraint on an activation by logical axis names."""
    return nn.with_logical_constraint(x, axes)
