"""Adafactor's factored second moments shard like their parameters' remaining dims, so
the optimizer state per device is what the parameters' shards imply (M6-10T: ~10 MB of
moments per device instead of ~5 GB replicated on each of 512)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.m6_moe import moe_section
from helpers import GRID, NUM_TASKS, PATCH_DIM, TEXT_LEN, synthetic_batch, tiny_config
from m6jax import offload, plan, sharding
from m6jax import pseudo_to_real as p2r
from m6jax.offload_layout import for_disk
from m6jax.train import stages
from m6jax.train.state import abstract_train_state, create_train_state, dummy_batch
from m6jax.train.step import make_train_step

MESH = dict(data=1, fsdp=2, tensor=1, expert=4)
MIN_DIM_TO_FACTOR = 128  # optax.adafactor's min_dim_size_to_factor
EXAMPLE = dummy_batch(8, GRID * GRID, PATCH_DIM, TEXT_LEN)


def _config():
    """A tiny MoE model whose matrices are factored: emb 128 x mlp 256, vocab 256."""
    c = tiny_config(**MESH)
    c.model.update(emb_dim=128, mlp_dim=256, num_heads=4)
    c.data.vocab_size = 256
    c.optimizer.name = "adafactor"
    c.model.moe = moe_section(num_experts=8, every=2, dispatch="gather")  # grouped: expert=1
    return c


@pytest.fixture(scope="module")
def adafactor_state(devices):
    c = _config()
    mesh = sharding.make_mesh(c.mesh, devices[:8])
    model, tx, example = plan.build(c)
    state, _ = create_train_state(model, tx, example, mesh, seed=0)
    return c, state


def _moment_bytes_by_hand(param) -> int:
    """f32 bytes on one device of one parameter's Adafactor moments, from its shard shape.
    Factored (its two largest dims both >= 128): a row moment (the shard without the
    largest dim), a column moment (without the second largest) and a (1,) placeholder.
    Unfactored: the whole shard and two (1,) placeholders."""
    shape, shard = param.shape, param.sharding.shard_shape(param.shape)
    order = sorted(range(len(shape)), key=lambda i: shape[i])  # no ties here
    if len(shape) >= 2 and shape[order[-2]] >= MIN_DIM_TO_FACTOR:
        without = lambda d: math.prod(n for i, n in enumerate(shard) if i != d)
        return 4 * (without(order[-1]) + without(order[-2]) + 1)
    return 4 * (math.prod(shard) + 2)


def _expected_optimizer_bytes(state) -> int:
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype("float32")}
    counters = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if x.ndim == 0)
    return sum(_moment_bytes_by_hand(p) for p in jax.tree.leaves(state.params)) + counters


def test_optimizer_bytes_per_device_follow_the_param_shards(adafactor_state):
    c, state = adafactor_state
    expected = _expected_optimizer_bytes(state)
    for dev in jax.devices()[:8]:
        held = sum(s.data.nbytes for x in jax.tree.leaves(state.opt_state)
                   for s in x.addressable_shards if s.device == dev)
        assert held == expected, dev
    mesh_shape = tuple(MESH[a] for a in sharding.MESH_AXES if a in MESH)
    assert plan.plan(c, mesh_shape)["per_device_bytes"]["optimizer"] == expected


def is_factored(node) -> bool:
    return isinstance(node, optax.FactoredState)


def test_expert_moments_split_over_expert_and_fsdp(adafactor_state):
    """wi [units, expert 8, embed 128, mlp 256]: v_row averages mlp away, v_col embed."""
    _, state = adafactor_state
    factored, = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_factored)
                 if is_factored(s)]
    row = factored.v_row["stack"]["layers"]["block_1"]["moe"]["wi"]
    col = factored.v_col["stack"]["layers"]["block_1"]["moe"]["wi"]
    assert (row.shape, col.shape) == ((1, 8, 128), (1, 8, 256))
    assert {s.data.shape for s in row.addressable_shards} == {(1, 2, 64)}
    assert {s.data.shape for s in col.addressable_shards} == {(1, 2, 256)}


def _stage_setup(c, devices, stage):
    mesh = sharding.make_mesh(c.mesh, devices[:8])
    model, tx = stages.model_and_optimizer(c, stage)
    state, sh = create_train_state(model, tx, EXAMPLE, mesh, seed=0)
    return mesh, model, tx, state, sh


def test_pseudo_to_real_scales_factored_moments_into_every_layer_sharded(devices):
    """The Pseudo stack's v_row [expert, embed] is copied into each of the Real stack's
    L = 2 units ([units, expert, embed]), divided by L**2 (`scaled`), and lands sharded
    like the Real param minus mlp."""
    c = _config()
    c.model.update(num_layers=4, share_layers=True)
    c.pseudo_to_real.update(switch_step=5, optimizer="scaled")  # m6_10t's handoff
    mesh, _, _, state, _ = _stage_setup(c, devices, p2r.STAGE_PSEUDO)
    ramp = lambda x: x + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)  # non-zero moments
    state = state.replace(opt_state=jax.jit(lambda s: jax.tree.map(
        lambda x: ramp(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, s))(state.opt_state))
    real_model, real_tx = stages.model_and_optimizer(c, p2r.STAGE_REAL)
    abstract, real_sh = abstract_train_state(real_model, real_tx, EXAMPLE, mesh)
    with jax.set_mesh(mesh):
        real = p2r.delink_state(state, c, real_tx, abstract, real_sh)
    shared, = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_factored) if is_factored(s)]
    per_layer, = [s for s in jax.tree.leaves(real.opt_state, is_leaf=is_factored)
                  if is_factored(s)]
    x = shared.v_row["stack"]["layers"]["block_1"]["moe"]["wi"]
    y = per_layer.v_row["stack"]["layers"]["block_1"]["moe"]["wi"]
    assert x.shape == (8, 128) and y.shape == (2, 8, 128)
    assert {s.data.shape for s in y.addressable_shards} == {(2, 2, 64)}
    for unit in range(2):
        np.testing.assert_array_equal(np.asarray(y)[unit], np.asarray(x) / 4)


def test_offloaded_factored_moments_are_stored_sharded(devices):
    """Optimizer state of unit 0 of 2 in host memory: the stored factored moments are
    Segments sharded like the canonical ones, so the host and device bytes per device
    are the plan's (replicated host parts would be 4-8x the planned host bytes)."""
    c = _config()
    c.model.num_layers = 4
    c.offload.update(optimizer_layers="0,1", param_layers="none")
    mesh, model, tx, state, sh = _stage_setup(c, devices, p2r.STAGE_REAL)
    off = offload.OffloadPlan(c, p2r.STAGE_REAL, sh,
                              abstract_train_state(model, tx, EXAMPLE, mesh)[0])
    with jax.set_mesh(mesh):
        stored = off.to_stored(state)
    row = next(s for s in jax.tree.leaves(stored.opt_state, is_leaf=is_factored)
               if is_factored(s)).v_row["stack"]["layers"]["block_1"]["moe"]["wi"]
    assert row.parts[0].sharding.memory_kind == "pinned_host"
    assert {s.data.shape for s in row.parts[0].addressable_shards} == {(1, 2, 64)}
    planned = plan.offload_bytes(c, plan.abstract_state(c), plan.abstract_mesh(
        tuple(MESH[a] for a in sharding.MESH_AXES if a in MESH)), p2r.STAGE_REAL)
    # The plan weighs every stack leaf by the host share (1/2), also the (1,)-shaped
    # placeholders, which stay whole on the device.
    placeholders = sum(x.nbytes for path, x in jax.tree_util.tree_leaves_with_path(
        state.opt_state) if offload.in_stack(path) and x.shape == (1,))
    host = sharding.per_device_bytes(stored.opt_state, "pinned_host")
    assert host + placeholders // 2 == planned["optimizer_host"]
    assert sharding.per_device_bytes(stored.opt_state, "device") == (
        sharding.per_device_bytes(state.opt_state) - host)


@pytest.mark.slow  # two train steps of a 128-wide MoE model to compile (~30 s here)
def test_streamed_update_of_sharded_factored_moments_trains_like_resident(devices):
    """Two steps with unit 0's params and optimizer state streamed from host memory end
    in the same params and moments as with nothing offloaded, step by step."""
    def train(**off):
        c = _config()
        c.model.num_layers = 4
        c.offload.update(**off)
        mesh, model, tx, state, sh = _stage_setup(c, devices, p2r.STAGE_REAL)
        plan_ = offload.OffloadPlan(c, p2r.STAGE_REAL, sh,
                                    abstract_train_state(model, tx, EXAMPLE, mesh)[0])
        step = make_train_step(model, tx, mesh, sh, NUM_TASKS, offload=plan_)
        after = []
        with jax.set_mesh(mesh):
            state = plan_.to_stored(state)
            for i in range(2):
                state, _ = step(state, sharding.global_batch(mesh, synthetic_batch(8, seed=i)))
                after.append(jax.tree.map(np.asarray, for_disk(state)))  # the next step donates
        return after
    run = train(optimizer_layers="0,1", param_layers="0,1")
    ref = train(optimizer_layers="none", param_layers="none")
    # An unfactored Adafactor update is g / sqrt(v), sign(g) at the first step whatever
    # |g|: an element whose gradient is rounding noise (v below 1e-10 of its leaf's mean;
    # CI found one of 32,768 at v = 1.5e-21 against a mean of 2.7e-9) takes a full step
    # in whichever direction that path's rounding gives, and keeps the difference. Every
    # other element must agree.
    noise = None
    for got, want in zip(run, ref):
        for a, b in zip(jax.tree.leaves(got.opt_state), jax.tree.leaves(want.opt_state)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
        v, = [s.v for s in jax.tree.leaves(want.opt_state, is_leaf=is_factored) if is_factored(s)]
        now = [x < 1e-10 * x.mean() if x.shape == p.shape else np.zeros(p.shape, bool)
               for x, p in zip(jax.tree.leaves(v), jax.tree.leaves(want.params))]
        noise = now if noise is None else [n | m for n, m in zip(noise, now)]
        for a, b, n in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params), noise):
            assert n.mean() < 1e-3
            np.testing.assert_allclose(np.where(n, b, a), b, rtol=1e-4, atol=5e-5)
