"""The optimizers against references we did not write: Adafactor worked by hand from
Shazeer & Stern (2018), AdamW's decoupled decay convention, learning rate 0, stochastic
rounding's expectation, and the learning rate the step reports."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import GRID, NUM_TASKS, PATCH_DIM, TEXT_LEN, synthetic_batch, tiny_config
from m6jax import sharding
from m6jax.train import optim, stages
from m6jax.train.state import create_train_state, dummy_batch, init_fn
from m6jax.train.step import _accumulate, make_train_step

EXAMPLE = dummy_batch(8, GRID * GRID, PATCH_DIM, TEXT_LEN)
EXAMPLE_10T = dummy_batch(2, 16, 4, 48)  # m6_10t:mini's sequence: 16 patches of 2x2, 48 tokens


def _opt_cfg(name, **kw):
    c = tiny_config().optimizer
    c.update(name=name, learning_rate=0.1, warmup_steps=0, end_lr_fraction=1.0,
             weight_decay=0.05, min_dim_size_to_factor=4, **kw)
    return c


def _adafactor_by_hand(w, b, grads, lr, wd, decay=0.8, eps=1e-30):
    """Shazeer & Stern (2018), Algorithm 4 (factored) and 3 (vector), no update clipping,
    no relative step size, plus decoupled weight decay on the matrix (not on the bias):
    R_t = b2_t R + (1 - b2_t) mean_cols(G^2 + eps), C_t likewise over rows,
    V_t = R_t C_t / mean(R_t), X_t = X - lr (G / sqrt(V_t) + wd X), b2_t = 1 - t^-0.8."""
    r = np.zeros(w.shape[0]); c = np.zeros(w.shape[1]); v = np.zeros(b.shape)
    for t, (gw, gb) in enumerate(grads, start=1):
        beta = 1.0 - t ** -decay
        g2 = gw.astype(np.float64) ** 2 + eps
        r = beta * r + (1 - beta) * g2.mean(axis=1)
        c = beta * c + (1 - beta) * g2.mean(axis=0)
        vhat = np.outer(r, c) / r.mean()
        w = w - lr * (gw / np.sqrt(vhat) + wd * w)
        v = beta * v + (1 - beta) * (gb.astype(np.float64) ** 2 + eps)
        b = b - lr * gb / np.sqrt(v)
    return w, b


def test_adafactor_steps_equal_shazeer_and_stern_by_hand():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 8)).astype(np.float32)  # wide side 8 is the column dim
    b = rng.normal(size=(8,)).astype(np.float32)
    grads = [(rng.normal(size=w.shape).astype(np.float32),
              rng.normal(size=b.shape).astype(np.float32)) for _ in range(3)]
    tx = optim.make_optimizer(_opt_cfg("adafactor", grad_clip_norm=1e9), 100)
    params = dict(dense=dict(kernel=jnp.asarray(w), bias=jnp.asarray(b)))
    state = tx.init(params)
    for gw, gb in grads:
        updates, state = tx.update(dict(dense=dict(kernel=gw, bias=gb)), state, params)
        params = optim.apply_updates(params, updates)
    want_w, want_b = _adafactor_by_hand(w, b, grads, lr=0.1, wd=0.05)
    np.testing.assert_allclose(params["dense"]["kernel"], want_w, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(params["dense"]["bias"], want_b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", optim.NAMES)
def test_weight_decay_is_scaled_by_the_learning_rate(name):
    # A zero gradient: the whole update is the decay, -lr * wd * p (AdamW's convention).
    tx = optim.make_optimizer(_opt_cfg(name), 100)
    params = dict(dense=dict(kernel=jnp.full((4, 4), 2.0)))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.05 * 2.0, rtol=1e-6)


@pytest.mark.parametrize("name", optim.NAMES)
def test_learning_rate_zero_leaves_every_parameter_unchanged(devices, name):
    # The first warmup step has learning rate 0: nothing may move (decay included).
    c = tiny_config()
    c.optimizer.update(name=name, warmup_steps=5, weight_decay=0.1, min_dim_size_to_factor=8)
    mesh = sharding.make_mesh(c.mesh, devices[:1])
    model, tx = stages.model_and_optimizer(c, "real")
    state, sh = create_train_state(model, tx, EXAMPLE, mesh, seed=0)
    before = jax.device_get(state.params)
    with jax.set_mesh(mesh):
        state, m = make_train_step(model, tx, mesh, sh, NUM_TASKS)(
            state, sharding.global_batch(mesh, synthetic_batch(8)))
    assert float(m["learning_rate"]) == 0.0
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", optim.NAMES)
def test_optimizer_state_is_float32_for_bfloat16_params(name):
    tx = optim.make_optimizer(_opt_cfg(name), 100)
    params = dict(dense=dict(kernel=jnp.ones((8, 8), jnp.bfloat16)))
    floats = [x for x in jax.tree.leaves(tx.init(params)) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)


def test_a_relative_update_of_1e4_survives_under_the_m6_10t_precision_settings(devices):
    # m6_10t stores bfloat16 masters, whose 8 significant bits round 1 + 1e-4 to 1 when
    # rounded to nearest; stochastic rounding goes up with probability 1e-4 / 2**-7, so
    # the mean moves by the update. Its norm scales (1.0) stay float32 and move exactly.
    from configs import m6_10t
    c = m6_10t.get_config("mini")
    dtype = jnp.dtype(c.model.param_dtype)
    assert dtype == jnp.bfloat16
    model, _ = stages.model_and_optimizer(c, "real")
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        params = nn.meta.unbox(jax.eval_shape(
            init_fn(model, optax.identity(), EXAMPLE_10T, 0)).params)
    layer = params["stack"]["layers"]
    assert layer["moe"]["wi"].dtype == jnp.bfloat16
    assert layer["pre_attn_norm"]["scale"].dtype == layer["moe"]["router"].dtype == jnp.float32
    n = 200_000
    p = dict(w=jnp.ones((n,), dtype), scale=jnp.ones((4,), jnp.float32))
    u = dict(w=jnp.full((n,), 1e-4, jnp.float32), scale=jnp.full((4,), 1e-4, jnp.float32))
    assert float(optim.apply_updates(p, u)["w"].astype(jnp.float32).mean()) == 1.0  # nearest
    moved = optim.apply_updates(p, u, jax.random.key(0))
    w = moved["w"].astype(jnp.float32)
    assert set(np.unique(np.asarray(w))) <= {1.0, 1.0 + 2 ** -7}
    # the mean's standard error: 2**-7 * sqrt(q (1 - q) / n), q = 1e-4 / 2**-7 = 0.0128
    assert float(w.mean()) - 1.0 == pytest.approx(1e-4, abs=4 * 2 ** -7 * (0.0128 / n) ** 0.5)
    np.testing.assert_array_equal(moved["scale"], np.float32(1.0) + np.float32(1e-4))


def test_bfloat16_masters_keep_the_router_and_norms_in_float32():
    from m6jax.train.state import _cast_params
    params = dict(moe=dict(router=jnp.ones((8, 4)), wi=jnp.ones((4, 8, 16))),
                  ln=dict(scale=jnp.ones((8,)), bias=jnp.zeros((8,))), dense=dict(kernel=jnp.ones((8, 8))))
    dtypes = jax.tree.map(lambda x: str(x.dtype), _cast_params(params, "bfloat16"))
    assert dtypes == dict(moe=dict(router="float32", wi="bfloat16"),
                          ln=dict(scale="float32", bias="float32"), dense=dict(kernel="bfloat16"))


def test_stochastic_rounding_is_unbiased_between_neighbours():
    x = jnp.full((100_000,), 1.0 + 0.25 * 2 ** -7, jnp.float32)  # a quarter ulp above 1
    r = optim.stochastic_round(x, jnp.bfloat16, jax.random.key(1)).astype(jnp.float32)
    assert float((r > 1.0).mean()) == pytest.approx(0.25, abs=0.01)
    np.testing.assert_array_equal(optim.stochastic_round(jnp.array([jnp.inf, -2.0]),
                                                         jnp.bfloat16, jax.random.key(2)),
                                  np.array([np.inf, -2.0], np.float32))


def test_gradient_accumulation_sums_in_float32():
    # bfloat16 params give bfloat16 microbatch gradients; their sum must be float32 and
    # equal the float32 sum of the per-microbatch gradients (a bf16 sum rounds each add).
    params = dict(w=jnp.ones((64,), jnp.bfloat16))
    batch = dict(x=jnp.linspace(0.0, 1.0, 32 * 64).reshape(32, 64),
                 loss_mask=jnp.ones((32, 1)))

    def loss_fn(p, mb, _key):
        s = jnp.sum(mb["x"] * p["w"].astype(jnp.float32) * 1.001)
        return s, (s, dict(loss_sum=s), {})
    _, _, _, grads = _accumulate(loss_fn, params, batch, jax.random.key(0), 16)
    assert grads["w"].dtype == jnp.float32
    micro = batch["x"].reshape(2, 16, 64).swapaxes(0, 1)  # microbatch j = rows j, j+16
    want = sum(np.asarray((jnp.sum(m, 0) * 1.001 / 32).astype(jnp.bfloat16), np.float32)
               for m in micro)
    np.testing.assert_allclose(np.asarray(grads["w"]), want, rtol=1e-6)


def test_logged_learning_rate_is_the_one_applied_after_a_skipped_step(devices):
    c = tiny_config()
    c.optimizer.update(warmup_steps=4, learning_rate=1e-3)
    mesh = sharding.make_mesh(c.mesh, devices[:1])
    model, tx = stages.model_and_optimizer(c, "real")
    state, sh = create_train_state(model, tx, EXAMPLE, mesh, seed=0)
    step = make_train_step(model, tx, mesh, sh, NUM_TASKS)
    good = synthetic_batch(8)
    bad = dict(good, patches=np.full_like(good["patches"], np.nan))
    bad["image_mask"] = np.ones_like(good["image_mask"])
    lrs = []
    with jax.set_mesh(mesh):
        for b in (good, bad, good):
            state, m = step(state, sharding.global_batch(mesh, b))
            lrs.append((bool(m["finite"]), float(m["learning_rate"])))
    assert [f for f, _ in lrs] == [True, False, True]
    # warmup 0, 1/4, 2/4 ... of 1e-3 by the optimizer's count: the skipped step leaves
    # the count at 1, so the third step applies (and reports) 2.5e-4 again, not 5e-4.
    assert [lr for _, lr in lrs] == pytest.approx([0.0, 2.5e-4, 2.5e-4])
