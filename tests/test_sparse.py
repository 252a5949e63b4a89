"""Block-sparse attention equals dense attention under the same (pattern & model) mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m6jax.model.masks import attention_mask
from m6jax.model.sparse import Pattern, sparse_attention, step_row

PATTERN = Pattern(block_size=4, window=1, stride=3, global_blocks=1)


def _inputs(s, seed=0, b=2, h=2, d=8):
    ks = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(kk, (b, s, h, d)) for kk in ks)
    # A prefix-LM mask with padding: 4 image slots (row 1 has none), text of lengths 14 / 9.
    p, t = 4, s - 4
    image_mask = jnp.array([[True] * p, [False] * p])
    text_mask = jnp.arange(t)[None] < jnp.array([[14], [9]])
    prefix = jnp.arange(t)[None] < jnp.array([[3], [5]])
    return q, k, v, attention_mask(image_mask, text_mask, prefix)


@jax.jit
def _sparse(q, k, v, mask):
    return sparse_attention(q, k, v, mask, PATTERN)


@jax.jit
def _dense(q, k, v, mask):
    dense = mask.dense() & PATTERN.mask(q.shape[1])[None, None]
    return jax.nn.dot_product_attention(q, k, v, mask=dense)


def _real_rows(mask):
    # Rows that keep at least one visible key under pattern & mask (all real queries do).
    return np.asarray(mask.dense() & PATTERN.mask(mask.length)[None, None]).any(-1)[:, 0]


# 22: not whole blocks (a decode prefill), so also the padding path; 24 runs with the slow set.
@pytest.mark.parametrize("s", [pytest.param(24, marks=pytest.mark.slow), 22])
def test_sparse_equals_dense_values(s):
    q, k, v, mask = _inputs(s)
    rows = _real_rows(mask)
    got, want = _sparse(q, k, v, mask), _dense(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=1e-5)


def test_sparse_equals_dense_gradients():
    q, k, v, mask = _inputs(24, seed=1)
    w = jnp.asarray(_real_rows(mask), jnp.float32)[..., None, None]  # loss on real rows only

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * w)

    g_sparse = jax.jit(jax.grad(loss(lambda q, k, v: _sparse(q, k, v, mask)),
                                argnums=(0, 1, 2)))(q, k, v)
    g_dense = jax.jit(jax.grad(loss(lambda q, k, v: _dense(q, k, v, mask)),
                               argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_sparse, g_dense):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_pattern_is_sparse_and_keeps_local_strided_global_blocks():
    layout = PATTERN.layout(8)
    assert layout[5, 4] and layout[5, 6] and not layout[5, 3]    # window 1
    assert layout[7, 2] and layout[7, 5]                         # stride 3: blocks 2, 5
    assert layout[0].all() and layout[:, 0].all()                # global block 0
    assert layout.mean() < 0.7


def test_decode_step_row_is_the_pattern_row():
    full = PATTERN.mask(24)
    for slot in (0, 5, 13, 23):
        np.testing.assert_array_equal(np.asarray(step_row(PATTERN, jnp.int32(slot), 24)), full[slot])
