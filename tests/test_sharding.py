"""Parameters and optimizer state really are split over the fsdp and tensor axes."""
import jax
import numpy as np
import pytest

from helpers import GRID, PATCH_DIM, TEXT_LEN, tiny_config
from m6jax import sharding
from m6jax.model import M6
from m6jax.train import optim
from m6jax.train.state import create_train_state, dummy_batch


@pytest.fixture(scope="module")
def fsdp8_state(devices):
    c = tiny_config(fsdp=8)
    mesh = sharding.make_mesh(c.mesh, devices)
    model = M6(c.model, GRID, TEXT_LEN)
    tx = optim.make_optimizer(c.optimizer, c.total_steps)
    state, _ = create_train_state(model, tx, dummy_batch(8, GRID * GRID, PATCH_DIM, TEXT_LEN),
                                  mesh, seed=0)
    return state


def test_fsdp_weight_per_device_bytes_are_one_eighth(fsdp8_state):
    w = fsdp8_state.params["stack"]["layers"]["mlp"]["wi"]["kernel"]  # [layers, embed, mlp]
    assert w.sharding.spec[:2] == (None, "fsdp")
    for shard in w.addressable_shards:
        assert shard.data.nbytes * 8 == w.nbytes
        assert shard.data.shape == (w.shape[0], w.shape[1] // 8, w.shape[2])


def test_adam_moments_are_sharded_like_their_params(fsdp8_state):
    mu = fsdp8_state.opt_state[1][0].mu["stack"]["layers"]["attn"]["query"]
    assert mu.sharding.spec[1] == "fsdp"
    assert mu.addressable_shards[0].data.nbytes * 8 == mu.nbytes


def test_tensor_axis_splits_heads_and_mlp(devices):
    c = tiny_config(data=2, tensor=4)
    mesh = sharding.make_mesh(c.mesh, devices)
    model = M6(c.model, GRID, TEXT_LEN)
    tx = optim.make_optimizer(c.optimizer, c.total_steps)
    state, _ = create_train_state(model, tx, dummy_batch(8, GRID * GRID, PATCH_DIM, TEXT_LEN),
                                  mesh, seed=0)
    layers = state.params["stack"]["layers"]
    q = layers["attn"]["query"]  # [layers, embed, heads, kv]
    assert {s.data.shape for s in q.addressable_shards} == {(2, 32, 1, 8)}
    wo = layers["mlp"]["wo"]["kernel"]  # [layers, mlp, embed]
    assert {s.data.shape for s in wo.addressable_shards} == {(2, 16, 32)}


def test_mesh_minus_one_takes_remaining_devices(devices):
    assert sharding.resolve_mesh_shape(dict(data=2, fsdp=-1, tensor=2, expert=1), 8) == (2, 2, 2, 1, 1)
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1, expert=1), devices)
    assert dict(mesh.shape) == dict(data=8, fsdp=1, tensor=1, expert=1, stage=1)


def test_global_batch_is_split_over_batch_axes(devices):
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2, expert=1), devices)
    local = {"x": np.arange(16, dtype=np.int32).reshape(8, 2)}
    arr = sharding.global_batch(mesh, local)["x"]
    assert arr.shape == (8, 2)
    assert {s.data.shape for s in arr.addressable_shards} == {(2, 2)}
    np.testing.assert_array_equal(np.asarray(arr), local["x"])
