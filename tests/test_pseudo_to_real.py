"""Pseudo-to-Real: shared-layer (Pseudo) model, delinking into the Real model, the optimizer
state across the switch, and config checks. Resume across the switch: test_p2r_resume.py."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.m6_moe import moe_section
from helpers import GRID, NUM_TASKS, PATCH_DIM, TEXT_LEN, synthetic_batch, tiny_config
from m6jax import pseudo_to_real as p2r
from m6jax import sharding
from m6jax.config_checks import validate_config
from m6jax.train import optim, stages
from m6jax.train.state import abstract_train_state, create_train_state, dummy_batch
from m6jax.train.step import make_train_step

EXAMPLE = dummy_batch(8, GRID * GRID, PATCH_DIM, TEXT_LEN)


def _config(moe=False, optimizer="reinit", lr_schedule="continue", **mesh):
    c = tiny_config(**mesh)
    c.model.num_layers = 4
    if moe:  # capacity large enough that no token is dropped: routing is then per-token
        c.model.moe = moe_section(num_experts=4, k=1, every=2, capacity_factor=4.0)
    c.model.share_layers = True
    c.pseudo_to_real.update(switch_step=5, optimizer=optimizer, lr_schedule=lr_schedule)
    return c


def _pseudo(c, devices, train_steps=0):
    """(mesh, Pseudo model, its train state after `train_steps` steps, a batch)."""
    n = int(np.prod([c.mesh[a] for a in sharding.MESH_AXES]))
    mesh = sharding.make_mesh(c.mesh, devices[:n])
    model, tx = stages.model_and_optimizer(c, p2r.STAGE_PSEUDO)
    state, sh = create_train_state(model, tx, EXAMPLE, mesh, seed=0)
    batch = sharding.global_batch(mesh, synthetic_batch(8))
    if train_steps:
        step = make_train_step(model, tx, mesh, sh, NUM_TASKS)
        with jax.set_mesh(mesh):
            for _ in range(train_steps):
                state, _ = step(state, batch)
    return mesh, model, state, batch


def _delinked(c, mesh, state):
    """(Real model, Real optax transform, delinked Real state, its shardings)."""
    real_model, real_tx = stages.model_and_optimizer(c, p2r.STAGE_REAL)
    abstract, real_sh = abstract_train_state(real_model, real_tx, EXAMPLE, mesh)
    with jax.set_mesh(mesh):
        real = p2r.delink_state(state, c, real_tx, abstract, real_sh)
    return real_model, real_tx, real, real_sh


@pytest.fixture(scope="module")
def trained_pseudo(devices):
    """A dense Pseudo state after one step on 1 device (non-zero Adam moments)."""
    return _pseudo(_config(), devices[:1], train_steps=1)


def _logits(model, params, batch, mesh):
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        return np.asarray(jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch))


def test_pseudo_params_have_no_layer_axis(devices):
    c = _config()
    model, tx = stages.model_and_optimizer(c, p2r.STAGE_PSEUDO)
    real_model, real_tx = stages.model_and_optimizer(c, p2r.STAGE_REAL)
    mesh = sharding.make_mesh(c.mesh, devices[:1])
    pseudo = abstract_train_state(model, tx, EXAMPLE, mesh)[0].params["stack"]["layers"]
    real = abstract_train_state(real_model, real_tx, EXAMPLE, mesh)[0].params["stack"]["layers"]
    assert pseudo["attn"]["query"].shape == (32, 4, 8)
    assert real["attn"]["query"].shape == (4, 32, 4, 8)
    jax.tree.map(lambda p, r: (r.shape == (4, *p.shape)) or pytest.fail(f"{p} vs {r}"),
                 pseudo, real)


@pytest.mark.parametrize("moe,mesh_shape", [
    (False, (1, 1, 1, 1)),
    pytest.param(False, (2, 2, 2, 1), marks=pytest.mark.slow),  # the MoE case is sharded too
    (True, (2, 1, 1, 4))])
def test_real_model_equals_pseudo_at_the_switch(devices, moe, mesh_shape):
    c = _config(moe=moe, **dict(zip(sharding.MESH_AXES, mesh_shape)))
    validate_config(c, int(np.prod(mesh_shape)))
    mesh, model, state, batch = _pseudo(c, devices)
    real_model, _, real, real_sh = _delinked(c, mesh, state)
    np.testing.assert_array_equal(_logits(real_model, real.params, batch, mesh),
                                  _logits(model, state.params, batch, mesh))
    # Re-sharded onto the Real layout (the experts' axis over `expert` for MoE).
    jax.tree.map(lambda x, sh: x.sharding.is_equivalent_to(sh, x.ndim) or pytest.fail(
        f"{x.sharding} is not {sh}"), real.params, real_sh.params)
    if moe:
        wi = real.params["stack"]["layers"]["block_1"]["moe"]["wi"]
        assert wi.shape[:2] == (2, 4) and wi.addressable_shards[0].data.shape[1] == 1


def test_layers_diverge_after_the_switch(trained_pseudo):
    c = _config()
    mesh, _, state, batch = trained_pseudo
    real_model, real_tx, real, real_sh = _delinked(c, mesh, state)
    kernel = np.asarray(real.params["stack"]["layers"]["mlp"]["wi"]["kernel"])
    assert all(np.array_equal(kernel[0], kernel[i]) for i in range(4))
    with jax.set_mesh(mesh):
        real, _ = make_train_step(real_model, real_tx, mesh, real_sh, NUM_TASKS)(real, batch)
    kernel = np.asarray(real.params["stack"]["layers"]["mlp"]["wi"]["kernel"])
    assert not any(np.allclose(kernel[0], kernel[i]) for i in range(1, 4))


def _adam(opt_state):
    return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(
        s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)][0]


def _schedule_count(opt_state):
    return [int(s.count) for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(
        s, optax.ScaleByScheduleState)) if isinstance(s, optax.ScaleByScheduleState)][0]


def test_copy_gives_every_layer_the_shared_moments(trained_pseudo):
    c = _config(optimizer="copy")
    mesh, _, state, _ = trained_pseudo
    real = _delinked(c, mesh, state)[2]
    shared = np.asarray(_adam(state.opt_state).mu["stack"]["layers"]["attn"]["out"])
    per_layer = np.asarray(_adam(real.opt_state).mu["stack"]["layers"]["attn"]["out"])
    assert np.abs(shared).sum() > 0
    for i in range(4):
        np.testing.assert_array_equal(per_layer[i], shared)
    assert int(_adam(real.opt_state).count) == 1 and _schedule_count(real.opt_state) == 1


def test_scaled_divides_the_moments_by_the_number_of_layers(trained_pseudo):
    c = _config(optimizer="scaled")  # 4 layers share each stack leaf: L = 4
    mesh, _, state, _ = trained_pseudo
    real = _delinked(c, mesh, state)[2]
    shared, per_layer = _adam(state.opt_state), _adam(real.opt_state)
    mu = np.asarray(shared.mu["stack"]["layers"]["attn"]["out"])
    nu = np.asarray(shared.nu["stack"]["layers"]["attn"]["out"])
    assert np.abs(mu).sum() > 0 and nu.sum() > 0
    for i in range(4):  # float32 division by 4 and 16 is exact
        np.testing.assert_array_equal(
            np.asarray(per_layer.mu["stack"]["layers"]["attn"]["out"])[i], mu / 4)
        np.testing.assert_array_equal(
            np.asarray(per_layer.nu["stack"]["layers"]["attn"]["out"])[i], nu / 16)
    # Leaves outside the stack are not shared: their moments are kept as they are.
    np.testing.assert_array_equal(np.asarray(per_layer.nu["token_emb"]["embedding"]),
                                  np.asarray(shared.nu["token_emb"]["embedding"]))
    assert int(per_layer.count) == 1 and _schedule_count(real.opt_state) == 1


@pytest.mark.slow  # another Pseudo train step to compile (~20-60 s on the shared CPU)
def test_scaled_moe_stack_divides_by_its_number_of_units(devices):
    # 4 layers, moe.every=2: the scanned unit is 2 layers, applied twice, so L = 2 for the
    # unit's attention and for the experts and the router of its MoE layer alike.
    c = _config(moe=True, optimizer="scaled")
    mesh, _, state, _ = _pseudo(c, devices[:1], train_steps=1)
    real = _delinked(c, mesh, state)[2]
    shared = _adam(state.opt_state).nu["stack"]["layers"]["block_1"]
    per_layer = _adam(real.opt_state).nu["stack"]["layers"]["block_1"]
    for path in (("moe", "wi"), ("moe", "router"), ("attn", "query")):
        x, y = shared[path[0]][path[1]], per_layer[path[0]][path[1]]
        assert np.asarray(x).sum() > 0 and y.shape == (2, *x.shape)
        for i in range(2):
            np.testing.assert_array_equal(np.asarray(y)[i], np.asarray(x) / 4, err_msg=str(path))


def test_reinit_starts_fresh_moments_and_continues_the_schedule(trained_pseudo):
    c = _config(optimizer="reinit")
    mesh, _, state, _ = trained_pseudo
    real = _delinked(c, mesh, state)[2]
    adam = _adam(real.opt_state)
    assert not np.asarray(adam.mu["stack"]["layers"]["attn"]["out"]).any()
    assert int(adam.count) == 0 and _schedule_count(real.opt_state) == 1


def test_restart_resets_the_schedule_over_the_steps_left(trained_pseudo):
    c = _config(optimizer="copy", lr_schedule="restart")
    c.pseudo_to_real.restart_warmup_steps = 2
    mesh, _, state, _ = trained_pseudo
    real = _delinked(c, mesh, state)[2]
    assert _schedule_count(real.opt_state) == 0
    _, schedule = p2r.stage_optimizer(c, p2r.STAGE_REAL)
    assert float(schedule(5)) == 0.0  # warmup again from the switch step
    assert float(schedule(7)) == pytest.approx(c.optimizer.learning_rate)


def _wi(params):
    return np.asarray(params["stack"]["layers"]["mlp"]["wi"]["kernel"])


@pytest.mark.slow  # 16 layers, two steps to compile, ~70 steps (~15 s unloaded)
def test_scaled_handoff_keeps_the_per_layer_update_size_and_copy_does_not(devices):
    # 16 layers share the Pseudo weights; b2 = 0.999, so an inherited second moment
    # lingers. Over Real steps 15-29 (after the first moment's excess has decayed) each
    # layer's update (the mean over the 16 layers of |delta W_l|) must stay within a factor
    # 2 of the Pseudo stage's last |delta W|. Measured here over steps 15-29: scaled
    # 0.92-1.02x, copy 0.28-0.39x, reinit (fresh moments) 0.98-1.12x (its first step: 2.2x).
    def cfg(mode):
        c = _config(optimizer=mode)
        c.model.num_layers, c.total_steps, c.optimizer.b2 = 16, 200, 0.999
        return c
    mesh = sharding.make_mesh(cfg("scaled").mesh, devices[:1])
    model, tx = stages.model_and_optimizer(cfg("scaled"), p2r.STAGE_PSEUDO)
    state, sh = create_train_state(model, tx, EXAMPLE, mesh, seed=0)
    batch = sharding.global_batch(mesh, synthetic_batch(8))
    step = make_train_step(model, tx, mesh, sh, NUM_TASKS)
    with jax.set_mesh(mesh):
        for _ in range(10):
            before = _wi(state.params)
            state, _ = step(state, batch)
    pseudo_update = np.linalg.norm(_wi(state.params) - before)
    ratios, real_step = {}, None
    for mode in ("copy", "scaled"):
        real_model, real_tx, real, real_sh = _delinked(cfg(mode), mesh, state)
        real_step = real_step or make_train_step(real_model, real_tx, mesh, real_sh, NUM_TASKS)
        ratios[mode] = []
        with jax.set_mesh(mesh):
            for _ in range(30):
                before = _wi(real.params)
                real, _ = real_step(real, batch)
                per_layer = np.linalg.norm(_wi(real.params) - before, axis=(1, 2))  # [16]
                ratios[mode].append(per_layer.mean() / pseudo_update)
    late = {m: np.array(r[15:]) for m, r in ratios.items()}
    assert ((late["scaled"] > 0.5) & (late["scaled"] < 2.0)).all(), late["scaled"].min()
    assert (late["copy"] < 0.5).all(), late["copy"].max()  # the bug this mode fixes


def test_switch_warmup_ramps_the_learning_rate_after_the_switch():
    c = _config(optimizer="reinit")  # switch at 5 of 10 steps, no initial warmup
    c.pseudo_to_real.switch_warmup_steps = 4
    validate_config(c, 1)
    base = optim.learning_rate_schedule(c.optimizer, c.total_steps)
    pseudo_tx, pseudo_schedule = p2r.stage_optimizer(c, p2r.STAGE_PSEUDO)
    real_tx, real_schedule = p2r.stage_optimizer(c, p2r.STAGE_REAL)
    assert float(pseudo_schedule(5)) == pytest.approx(float(base(5)))
    for step, ramp in ((5, 0.25), (6, 0.5), (7, 0.75), (8, 1.0), (9, 1.0)):
        assert float(real_schedule(step)) == pytest.approx(ramp * float(base(step)))
    # The transform itself uses the ramp: reinit's first Adam step is about -lr * sign(g)
    # on a leaf without weight decay; its schedule count is the global step (continue).
    params = {"bias": np.ones(3, np.float32)}
    opt_state = p2r._set_counts(real_tx.init(params), schedule_count=5)
    updates, _ = real_tx.update({"bias": np.full(3, 0.5, np.float32)}, opt_state, params)
    np.testing.assert_allclose(np.asarray(updates["bias"]), -0.25 * float(base(5)), rtol=1e-4)
    # With a restarted schedule the ramp sits on top of the restart's own warmup.
    c.pseudo_to_real.update(lr_schedule="restart", restart_warmup_steps=2)
    _, restart_schedule = p2r.stage_optimizer(c, p2r.STAGE_REAL)
    assert float(restart_schedule(5)) == 0.0
    assert float(restart_schedule(7)) == pytest.approx(0.75 * c.optimizer.learning_rate)


@pytest.mark.parametrize("field,value,message", [
    ("switch_step", 12, "pseudo_to_real.switch_step=12 must be in [0, total_steps=10)"),
    ("optimizer", "zero", "pseudo_to_real.optimizer='zero' is not one of copy, scaled, reinit"),
    ("switch_warmup_steps", -1, "pseudo_to_real.switch_warmup_steps=-1 must be >= 0"),
    ("switch_warmup_steps", 6, "pseudo_to_real.switch_warmup_steps=6 runs past total_steps=10 "
     "(switch_step=5); make it at most 5"),
    ("lr_schedule", "cosine", "pseudo_to_real.lr_schedule='cosine' is not one of"),
])
def test_bad_pseudo_to_real_fields_are_refused(field, value, message):
    c = _config()
    c.pseudo_to_real[field] = value
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        validate_config(c, 1)


def test_switch_without_share_layers_is_refused():
    c = _config()
    c.model.share_layers = False
    with pytest.raises(ValueError, match="needs model.share_layers=True"):
        validate_config(c, 1)


@pytest.mark.parametrize("mode", ["scaled", "copy"])
def test_adafactor_scaled_handoff_keeps_the_per_layer_update_size(devices, mode):
    # Adafactor has no first moment: its first Real step is g_l / sqrt(V_l). With the
    # shared factors divided by L**2 (scaled) each of the L = 8 layers moves about as far
    # as the shared weight's last Pseudo update; copied unscaled, about L times less
    # (measured here: scaled 1.05x, copy 0.26x).
    def cfg(m):
        c = _config(optimizer=m)
        c.model.num_layers, c.total_steps = 8, 1000  # the learning rate ~constant here
        c.optimizer.update(name="adafactor", min_dim_size_to_factor=16, weight_decay=0.0)
        return c
    mesh, model, state, batch = _pseudo(cfg(mode), devices[:1])
    tx = stages.model_and_optimizer(cfg(mode), p2r.STAGE_PSEUDO)[1]
    step = make_train_step(model, tx, mesh, create_train_state(model, tx, EXAMPLE, mesh, 0)[1],
                           NUM_TASKS)
    assert "v_row" in str(jax.tree.map(np.shape, state.opt_state))  # wi is factored
    with jax.set_mesh(mesh):
        for _ in range(6):
            before = _wi(state.params)
            state, _ = step(state, batch)
    pseudo_update = np.linalg.norm(_wi(state.params) - before)
    real_model, real_tx, real, real_sh = _delinked(cfg(mode), mesh, state)
    before = _wi(real.params)
    with jax.set_mesh(mesh):
        real, _ = make_train_step(real_model, real_tx, mesh, real_sh, NUM_TASKS)(real, batch)
    ratio = np.linalg.norm(_wi(real.params) - before, axis=(1, 2)).mean() / pseudo_update
    if mode == "scaled":
        assert 0.7 < ratio < 1.4, ratio
    else:
        assert ratio < 0.4, ratio  # the bug `scaled` fixes: L times too small


def test_scaled_handoff_of_a_state_without_a_rule_is_refused():
    shared = dict(w=jnp.ones((3,)))
    real = dict(w=jax.ShapeDtypeStruct((4, 3), jnp.float32))
    state = optax.TraceState(trace=shared)  # momentum: no scaling rule
    with pytest.raises(ValueError, match="no rule for optimizer state TraceState"):
        p2r.delink_opt_state((state,), (optax.TraceState(trace=real),), scaled=True)
    out = p2r.delink_opt_state((state,), (optax.TraceState(trace=real),), scaled=False)
    assert out[0].trace["w"].shape == (4, 3)
