"""The block-padded grouped matmuls behind `dispatch=blocked` (m6jax/model/moe/grouped.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m6jax.model.mlp import gelu_exact
from m6jax.model.moe import dispatch as dsp
from m6jax.model.moe import grouped

N, D, M, E = 300, 8, 16, 8
# Experts 0 and 1 get more rows than the largest block (128 for 300 choices on 8
# experts), so each takes a full block plus a sized one; experts 4, 6 and 7 get none;
# 10 of the other experts' rows are dead.
COUNTS = (145, 135, 12, 5, 0, 3, 0, 0)


def _case(seed=0):
    rng = np.random.default_rng(seed)
    expert = rng.permutation(np.repeat(np.arange(E), COUNTS)).astype(np.int32)
    live = np.ones(N, bool)
    live[rng.choice(np.flatnonzero(expert > 1), 10, replace=False)] = False
    x = rng.normal(size=(N, D)).astype(np.float32)
    wi = (rng.normal(size=(E, D, M)) / np.sqrt(D)).astype(np.float32)
    wo = (rng.normal(size=(E, M, D)) / np.sqrt(M)).astype(np.float32)
    return jnp.asarray(expert), jnp.asarray(live), jnp.asarray(x), jnp.asarray(wi), jnp.asarray(wo)


def _reference(x, wi, wo, expert, live):
    """Each row through its own expert's weights, gathered per row: no sorting, no blocks."""
    h = gelu_exact(jnp.einsum("nd,ndm->nm", x, wi[expert]))
    return jnp.einsum("nm,nmd->nd", h, wo[expert]) * live[:, None]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_passes"])
def test_grouped_mlp_matches_per_row_reference_values_and_gradients(fused):
    expert, live, x, wi, wo = _case()
    assert grouped.block_sizes(N, E)[-1] < min(COUNTS[:2])  # the full-block loop runs

    def loss(f):
        return lambda x, wi, wo: jnp.sum(jnp.sin(f(x, wi, wo)))
    ours = lambda x, wi, wo: dsp.expert_mlp_rows(x, expert, live, wi, wo, gelu_exact,
                                                 "blocked", fused)
    ref = lambda x, wi, wo: _reference(x, wi, wo, expert, live)
    np.testing.assert_allclose(jax.jit(ours)(x, wi, wo), ref(x, wi, wo), atol=1e-5, rtol=1e-5)
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(x, wi, wo)
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(x, wi, wo)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    assert float(jnp.abs(g_ours[1][0]).max()) > 0 and float(jnp.abs(g_ours[1][4]).max()) == 0


def test_each_expert_is_one_block_padded_by_at_most_an_eighth():
    # The speed of the path rests on this (BENCHMARKS.md): one matmul per expert and
    # weight, and little padding, for any expert no larger than the largest block.
    rng = np.random.default_rng(1)
    n, e = 2048, 32
    expert = jnp.asarray(rng.integers(0, e, n), jnp.int32)
    sizes = grouped.block_sizes(n, e)
    lay = grouped.layout(expert, e, sizes)
    counts = np.bincount(np.asarray(expert), minlength=e)
    assert counts.max() <= sizes[-1]
    assert sum(int(u) for u in lay.used) == np.count_nonzero(counts)
    assert int(lay.used[-1]) == 0  # no full blocks needed
    rows = np.asarray(lay.row)
    for j in range(e):
        mine = rows[np.asarray(expert) == j]
        span = mine.max() - mine.min() + 1
        assert span == counts[j]  # an expert's rows are contiguous
    block = np.zeros(e, int)  # each expert's one block size
    for size, who, used in zip(lay.sizes, lay.block_expert, lay.used):
        block[np.asarray(who)[:int(used)]] += size
    assert np.all(block >= counts)
    assert np.all(block <= np.maximum(counts + 15, 1.125 * counts)), (block, counts)
    assert lay.slot_choice.shape[0] == grouped.buffer_rows(n, e, sizes)


def test_dropout_inside_the_dropless_layer_runs_the_two_pass_path():
    from m6jax import schema

    from m6jax.model.moe import MoeMlp
    cfg = schema.moe_section(**dict(
        num_experts=4, router="topk", k=1, every=1, capacity_factor=1.25,
        eval_capacity_factor=1.25, aux_loss_weight=0.01, z_loss_weight=1e-3, jitter=0.0,
        dispatch="blocked", group_size=0, priority="order"))
    x = jax.random.normal(jax.random.key(0), (2, 12, D))
    train = MoeMlp(cfg, M, "gelu", dropout_rate=0.5, deterministic=False, training=True)
    params = train.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x)
    evaluate = MoeMlp(cfg, M, "gelu", dropout_rate=0.5, deterministic=True)
    y_eval = evaluate.apply(params, x)[0]
    fn = lambda p, key: train.apply(p, x, rngs={"dropout": key})[0]
    y_a, y_b = fn(params, jax.random.key(3)), fn(params, jax.random.key(4))
    assert not np.allclose(y_a, y_eval) and not np.allclose(y_a, y_b)
    g = jax.grad(lambda p: jnp.sum(fn(p, jax.random.key(3)) ** 2))(params)
    assert all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(g))
