"""The dense feed-forward layer (the MoE layer replaces it every `moe.every` layers)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf

from m6jax.model.layers import constrain, dense_init

_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))


@jax.custom_vjp
def gelu_exact(h):
    """Exact GELU, x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)), written with erf and a
    hand-written derivative Phi(x) + x * phi(x).

    The same function as `jax.nn.gelu(approximate=False)`, which writes it with erfc:
    XLA expands erfc into an exp and two branches (three loop fusions on CPU, each
    re-reading the [tokens, mlp] activation), erf into one polynomial; the backward
    saves only the input. A small gain next to the MLP's 2-D view (BENCHMARKS.md,
    "CPU speed"). In float32
    the two agree to < 1e-6 absolute, values and gradients (tests/test_mlp.py). Being
    a `custom_vjp`, it supports reverse mode only (no `jax.jvp` / `jacfwd` through it).
    """
    return _gelu_erf(h)


def _gelu_erf(h):
    return 0.5 * h * (1.0 + erf(h * np.asarray(_SQRT_HALF, h.dtype)))


def _gelu_fwd(h):
    return _gelu_erf(h), h


def _gelu_bwd(h, g):
    cdf = 0.5 * (1.0 + erf(h * np.asarray(_SQRT_HALF, h.dtype)))
    pdf = jnp.exp(-0.5 * h * h) * np.asarray(_INV_SQRT_2PI, h.dtype)
    return (g * (cdf + h * pdf),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)


# Exact (erf) GELU is the default: on CPU XLA's tanh approximation costs ~1.7x more
# in a small model's MLP (measured: 52 ms vs 31 ms fwd+bwd at 2048x128x512).
ACTIVATIONS = {
    "gelu": gelu_exact,
    "gelu_tanh": lambda h: jax.nn.gelu(h, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class Mlp(nn.Module):
    """[B, S, D] -> [B, S, D]: D -> mlp_dim (activation) -> D.

    The two matmuls run on the [B*S, D] view: on a 3-D activation XLA:CPU transposes
    the backward's operands and computes the activation's derivative twice (once per
    layout), which made this layer 1.4-2.7x slower than the same math on 2-D
    (BENCHMARKS.md, "CPU speed"). The reshapes are free (bitcasts) and the parameters are the same.
    """
    mlp_dim: int
    activation: str = "gelu"
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        lead, d = x.shape[:-1], x.shape[-1]
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, use_bias=False,
                     kernel_init=dense_init(("embed", "mlp")), name="wi")(x.reshape(-1, d))
        h = ACTIVATIONS[self.activation](h).reshape(*lead, self.mlp_dim)
        h = constrain(h, ("batch", "length", "mlp")) if len(lead) == 2 else h
        h = nn.Dropout(self.dropout_rate)(h, deterministic=self.deterministic)
        out = nn.Dense(d, dtype=self.dtype, use_bias=False,
                       kernel_init=dense_init(("mlp", "embed")),
                       name="wo")(h.reshape(-1, self.mlp_dim)).reshape(*lead, d)
        return constrain(out, ("batch", "length", "act_embed")) if len(lead) == 2 else out
