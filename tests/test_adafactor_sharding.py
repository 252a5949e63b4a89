"""Adafactor's factored second moments shard like their parameters' remaining dims, so
the optimizer state per device is what the parameters' shards imply (M6-10T: ~10 MB of
moments per device instead of ~5 GB replicated on each of 512)."""
import math

import jax
import numpy as np
import optax
import pytest

from configs.m6_moe import moe_section
from helpers import tiny_config
from m6jax import plan, sharding
from m6jax.train.state import create_train_state

MESH = dict(data=1, fsdp=2, tensor=1, expert=4)
MIN_DIM_TO_FACTOR = 128  # optax.adafactor's min_dim_size_to_factor


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
