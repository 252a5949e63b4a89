"""Expert parallelism: the MoE train step's loss and gradients are the same on 1 device
and on 8 devices with expert axis 8, 4, 2 (combined with data / fsdp / tensor)."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from configs.m6_moe import moe_section
from helpers import GRID, NUM_TASKS, PATCH_DIM, TEXT_LEN, synthetic_batch, tiny_config
from m6jax import sharding
from m6jax.config_checks import validate_config
from m6jax.model import M6
from m6jax.train import moe_metrics, optim
from m6jax.train.losses import text_loss
from m6jax.train.state import create_train_state, dummy_batch

# (data, fsdp, tensor, expert)
MESHES = [(1, 1, 1, 8), (1, 2, 1, 4), (2, 1, 2, 2)]


def moe_tiny_config(**mesh):
    c = tiny_config(**mesh)
    # capacity 1.0 so that some tokens are dropped: drops must match across meshes too
    c.model.moe = moe_section(num_experts=8, k=2, every=2, capacity_factor=1.0)
    return c


def _run(mesh_shape, devices):
    c = moe_tiny_config(**dict(zip(sharding.MESH_AXES, mesh_shape)))
    n = int(np.prod(mesh_shape))
    validate_config(c, n)
    mesh = sharding.make_mesh(c.mesh, devices[:n])
    model = M6(c.model, GRID, TEXT_LEN, training=True)
    tx = optim.make_optimizer(c.optimizer, c.total_steps)
    state, _ = create_train_state(
        model, tx, dummy_batch(c.batch_size, GRID * GRID, PATCH_DIM, TEXT_LEN), mesh, seed=0)
    batch = sharding.global_batch(mesh, synthetic_batch(c.batch_size))

    def loss_fn(params):  # what make_train_step optimises
        with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            logits, inter = model.apply({"params": params}, batch, mutable=["intermediates"])
        moe_loss, m = moe_metrics.aux_loss_and_metrics(c.model, inter["intermediates"])
        return text_loss(logits, batch, NUM_TASKS)[0] + moe_loss, m

    f = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    with jax.set_mesh(mesh):
        hlo = f.lower(state.params).compile().as_text()
        (loss, m), grads = f(state.params)
    return jax.device_get((loss, m, grads)), hlo


@pytest.fixture(scope="module")
def reference(devices):
    return _run((1, 1, 1, 1), devices)[0]


def assert_same_step(got, ref):
    """(loss, MoE metrics, grads) of a meshed step equal the one-device step's."""
    (loss, m, grads), (ref_loss, ref_m, ref_grads) = got, ref
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for k in ref_m:
        np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=2e-4),
                 grads, ref_grads)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_moe_loss_metrics_and_grads_match_single_device(mesh_shape, devices, reference):
    (loss, m, grads), hlo = _run(mesh_shape, devices)
    ref_m = reference[1]
    assert ref_m["moe/dropped_fraction"] > 0, "the case should drop some tokens"
    assert_same_step((loss, m, grads), reference)
    assert "all-to-all" in hlo, "tokens must reach their experts through an all-to-all"


def test_expert_weights_are_sharded_over_the_expert_axis(devices):
    c = moe_tiny_config(data=2, expert=4)
    mesh = sharding.make_mesh(c.mesh, devices)
    model = M6(c.model, GRID, TEXT_LEN)
    state, _ = create_train_state(model, optim.make_optimizer(c.optimizer, 10),
                                  dummy_batch(8, GRID * GRID, PATCH_DIM, TEXT_LEN), mesh, 0)
    wi = state.params["stack"]["layers"]["block_1"]["moe"]["wi"]      # [L/2, E, D, M]
    assert wi.shape[1] == 8
    assert wi.addressable_shards[0].data.shape[1] == 2                 # 8 experts / 4
    assert "mlp" in state.params["stack"]["layers"]["block_0"]        # the dense layer
