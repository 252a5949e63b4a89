"""Dynamic loss scaling (float16 compute): the rule worked by hand, a scaled step equal to
the unscaled one, a float16 model that trains, and the scale through a checkpoint."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import GRID, NUM_TASKS, PATCH_DIM, TEXT_LEN, synthetic_batch, tiny_config
from m6jax import checkpoint, offload, sharding
from m6jax import pseudo_to_real as p2r
from m6jax.config_checks import validate_config
from m6jax.offload_layout import for_disk
from m6jax.train import loss_scale, stages
from m6jax.train.state import abstract_train_state, create_train_state, dummy_batch
from m6jax.train.step import make_train_step

EXAMPLE = dummy_batch(8, GRID * GRID, PATCH_DIM, TEXT_LEN)


def _ls(scale, good):
    return dict(scale=jnp.float32(scale), good_steps=jnp.int32(good))


def _as_floats(s):
    return float(s["scale"]), int(s["good_steps"])


# ---- The rule, by hand: overflow halves (min 1) and resets; `period` clean steps double.
def test_an_overflowing_step_halves_the_scale_and_resets_the_count():
    assert _as_floats(loss_scale.next_state(_ls(8.0, 5), jnp.bool_(False), 2000)) == (4.0, 0)


def test_the_scale_never_halves_below_one():
    assert _as_floats(loss_scale.next_state(_ls(1.0, 0), jnp.bool_(False), 2000)) == (1.0, 0)


def test_period_clean_steps_in_a_row_double_the_scale():
    s, seen = _ls(8.0, 0), []
    for _ in range(7):
        s = loss_scale.next_state(s, jnp.bool_(True), 3)
        seen.append(_as_floats(s))
    assert seen == [(8.0, 1), (8.0, 2), (16.0, 0), (16.0, 1), (16.0, 2), (32.0, 0), (32.0, 1)]


def test_auto_is_dynamic_for_float16_only():
    c = tiny_config()
    assert loss_scale.from_config(c) == loss_scale.OFF
    c.model.dtype = "float16"
    assert loss_scale.from_config(c) == loss_scale.LossScale(True, 2.0 ** 15, 2000)
    c.mesh.update(data=8)
    assert validate_config(c, 8) == (8, 1, 1, 1, 1)  # float16 + auto is accepted


# ---- The train step.
def _config(dtype="float32", mode="none", init=2.0 ** 15, period=2000, accum=1, offload_all=False):
    c = tiny_config(data=2)
    c.model.dtype = dtype
    c.optimizer.update(loss_scale=mode, loss_scale_init=init, loss_scale_period=period,
                       grad_accum_steps=accum)
    if offload_all:
        c.model.num_layers = 4
        c.offload.update(optimizer_layers="all", param_layers="all")
    return c


def _run(c, devices, steps=1, batches=None):
    """(final canonical state, per-step metrics) of `steps` steps on 2 devices."""
    mesh = sharding.make_mesh(c.mesh, devices[:2])
    model, tx = stages.model_and_optimizer(c, p2r.STAGE_REAL)
    policy = loss_scale.from_config(c)
    state, sh = create_train_state(model, tx, EXAMPLE, mesh, seed=0, loss_scale=policy)
    plan = None
    if offload.requested(c):
        plan = offload.OffloadPlan(c, p2r.STAGE_REAL, sh,
                                   abstract_train_state(model, tx, EXAMPLE, mesh)[0])
    step = make_train_step(model, tx, mesh, sh, NUM_TASKS, offload=plan,
                           grad_accum_steps=int(c.optimizer.grad_accum_steps), loss_scale=policy)
    metrics = []
    with jax.set_mesh(mesh):
        if plan is not None:
            state = plan.to_stored(state)
        for i in range(steps):
            batch = batches[i] if batches else synthetic_batch(8, seed=i)
            state, m = step(state, sharding.global_batch(mesh, batch))
            metrics.append(jax.device_get(m))
        if plan is not None:
            state = for_disk(state)
    return jax.device_get(state), metrics


def _assert_trees_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("kind", ["plain", "accumulated", "streamed"])
def test_a_finite_scaled_step_equals_the_unscaled_update(devices, kind):
    """The scale (2**10, a power of 2) cancels: same params, optimizer moments, norm."""
    extra = dict(accum=2) if kind == "accumulated" else dict(offload_all=kind == "streamed")
    ref, ref_m = _run(_config(mode="none", **extra), devices)
    got, got_m = _run(_config(mode="dynamic", init=2.0 ** 10, **extra), devices)
    assert bool(got_m[0]["finite"]) and float(got_m[0]["loss_scale"]) == 2.0 ** 10
    np.testing.assert_allclose(got_m[0]["grad_norm"], ref_m[0]["grad_norm"], rtol=1e-6)
    _assert_trees_close(got.opt_state, ref.opt_state, rtol=1e-5)
    _assert_trees_close(got.params, ref.params, rtol=1e-5)
    assert _as_floats(got.loss_scale) == (2.0 ** 10, 1)


@pytest.mark.parametrize("streamed", [False, True])
def test_an_overflowing_float16_step_is_skipped_and_halves_the_scale(devices, streamed):
    """A scale of 2**30 pushes the float16 logits' cotangent past 65504: inf gradients."""
    c = _config(dtype="float16", mode="dynamic", init=2.0 ** 30, offload_all=streamed)
    before, _ = _run(c, devices, steps=0)
    after, (m,) = _run(c, devices, steps=1)
    assert not bool(m["finite"]) and np.isfinite(m["loss"])  # the loss itself was fine
    assert int(after.nonfinite_steps) == 1
    _assert_trees_close(after.params, before.params, rtol=0)
    _assert_trees_close(after.opt_state, before.opt_state, rtol=0)
    assert _as_floats(after.loss_scale) == (2.0 ** 29, 0)


def test_a_float16_model_computes_in_float16():
    c = _config(dtype="float16", mode="auto")
    model, _ = stages.model_and_optimizer(c, p2r.STAGE_REAL)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), EXAMPLE))["params"]
    hlo = jax.jit(lambda p: model.apply({"params": p}, EXAMPLE)).lower(params).as_text()
    dots = [ln for ln in hlo.splitlines() if "stablehlo.dot_general" in ln]
    # Every matmul (projections, MLP, attention, the tied LM head) takes float16 operands.
    assert len(dots) >= 10 and all(ln.split(" -> ")[0].count("xf16>") == 2 for ln in dots), dots
    out = jax.eval_shape(lambda p: model.apply({"params": p}, EXAMPLE), params)
    assert out.dtype == jnp.float32  # logits upcast before the loss


def test_a_tiny_float16_model_trains_with_finite_losses(devices):
    """auto = dynamic: the 2**15 start may overflow a few times, then the loss falls."""
    c = _config(dtype="float16", mode="auto")
    c.optimizer.learning_rate = 3e-3
    batch = synthetic_batch(8, seed=0)
    state, metrics = _run(c, devices, steps=12, batches=[batch] * 12)
    finite = [m for m in metrics if bool(m["finite"])]
    assert len(finite) >= 8 and all(np.isfinite(m["loss"]) for m in finite)
    assert finite[-1]["loss"] < finite[0]["loss"] - 0.2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    scales = [float(m["loss_scale"]) for m in metrics]
    assert scales[0] == 2.0 ** 15 and all(b <= a for a, b in zip(scales, scales[1:]))


def test_the_scale_survives_a_checkpoint_exactly(devices, tmp_path):
    c = _config(dtype="float16", mode="dynamic", init=2.0 ** 30, period=4)
    c.checkpoint_every = 1
    state, _ = _run(c, devices, steps=3)  # 2**30 overflows: halved at least once
    state = state.replace(loss_scale=dict(scale=np.float32(state.loss_scale["scale"]),
                                          good_steps=np.int32(3)))
    ckpt = checkpoint.Checkpointer(str(tmp_path), c)
    assert ckpt.save(3, state, dict(data={"step": 3}, stage="real"), force=True)
    ckpt.wait()
    ckpt.close()
    mesh = sharding.make_mesh(c.mesh, devices[:2])
    model, tx = stages.model_and_optimizer(c, p2r.STAGE_REAL)
    abstract, _ = abstract_train_state(model, tx, EXAMPLE, mesh, 0)
    restored, _ = checkpoint.Checkpointer(str(tmp_path), c).restore_latest(abstract)
    assert float(state.loss_scale["scale"]) < 2.0 ** 30
    assert _as_floats(restored.loss_scale) == _as_floats(state.loss_scale)
    assert restored.loss_scale["scale"].dtype == jnp.float32
    assert restored.loss_scale["good_steps"].dtype == jnp.int32
