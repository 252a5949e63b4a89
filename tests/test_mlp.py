"""The dense MLP: its GELU equals the exact formula, and the 2-D matmuls change nothing."""
import jax
import jax.numpy as jnp
import numpy as np

from m6jax.model.mlp import ACTIVATIONS, Mlp, gelu_exact


def _exact(h):
    return jax.nn.gelu(h, approximate=False)   # x/2 * erfc(-x / sqrt 2)


def _points():
    grid = np.linspace(-12.0, 12.0, 24001, dtype=np.float32)    # steps of 1e-3
    wide = np.random.default_rng(0).normal(0, 4, 20000).astype(np.float32)
    return jnp.asarray(np.concatenate([grid, wide, [0.0, -0.0, 1e-30, -1e-30]]))


def test_gelu_values_equal_the_exact_formula_fp32():
    h = _points()
    assert float(jnp.max(jnp.abs(gelu_exact(h) - _exact(h)))) <= 1e-6


def test_gelu_gradient_equals_the_exact_formulas_gradient_fp32():
    h = _points()
    ours = jax.vmap(jax.grad(gelu_exact))(h)
    ref = jax.vmap(jax.grad(_exact))(h)
    assert float(jnp.max(jnp.abs(ours - ref))) <= 1e-6


def test_gelu_is_the_default_activation():
    assert ACTIVATIONS["gelu"] is gelu_exact


def test_mlp_on_3d_input_equals_the_per_token_math():
    """Flattening [B, S, D] to [B*S, D] around the dense layers is a view, not new math:
    output and gradients equal a plain per-token einsum reference."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    mlp = Mlp(16)
    params = mlp.init(jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda v: getattr(v, "value", v), params,
                          is_leaf=lambda v: hasattr(v, "value"))
    assert params["wi"]["kernel"].shape == (8, 16) and params["wo"]["kernel"].shape == (16, 8)

    def ref(p, xx):
        h = _exact(jnp.einsum("bsd,dm->bsm", xx, p["wi"]["kernel"]))
        return jnp.einsum("bsm,md->bsd", h, p["wo"]["kernel"])

    def loss(f):
        return lambda p, xx: jnp.sum(f(p, xx) ** 2)

    ours = lambda p, xx: mlp.apply({"params": p}, xx)    # noqa: E731
    np.testing.assert_allclose(ours(params, x), ref(params, x), rtol=1e-5, atol=1e-6)
    g_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    g_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
