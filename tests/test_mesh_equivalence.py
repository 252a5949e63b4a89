"""Invariant 2: the same forward pass, loss and gradients on 1 device and on every mesh."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from helpers import GRID, NUM_TASKS, PATCH_DIM, TEXT_LEN, synthetic_batch, tiny_config
from m6jax import sharding
from m6jax.model import M6
from m6jax.train import optim
from m6jax.train.losses import text_loss
from m6jax.train.state import create_train_state, dummy_batch
from m6jax.train.step import make_train_step

MESHES = [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 4, 1)]


def _run(mesh_shape, devices):
    """Loss, gradients and the loss after one update, on a mesh of the given shape."""
    c = tiny_config(**dict(zip(sharding.MESH_AXES, mesh_shape)))
    n = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(c.mesh, devices[:n])
    model = M6(c.model, GRID, TEXT_LEN)
    tx = optim.make_optimizer(c.optimizer, c.total_steps)
    state, shardings = create_train_state(
        model, tx, dummy_batch(c.batch_size, GRID * GRID, PATCH_DIM, TEXT_LEN), mesh, seed=0)
    batch = sharding.global_batch(mesh, synthetic_batch(c.batch_size))

    def loss_fn(params):
        with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            logits = model.apply({"params": params}, batch)
        return text_loss(logits, batch, NUM_TASKS)[0], logits

    step = make_train_step(model, tx, mesh, shardings, NUM_TASKS)
    with jax.set_mesh(mesh):
        (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params)
        out = jax.device_get((loss, logits, grads))
        state, _ = step(state, batch)
        _, m = step(state, batch)
    return (*out, float(m["loss"]), state)


@pytest.fixture(scope="module")
def reference(devices):
    return _run((1, 1, 1, 1), devices)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_forward_loss_and_grads_match_single_device(mesh_shape, devices, reference):
    loss, logits, grads, loss_after_update, _ = _run(mesh_shape, devices)
    ref_loss, ref_logits, ref_grads, ref_after, _ = reference
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=2e-4),
                 grads, ref_grads)
    np.testing.assert_allclose(loss_after_update, ref_after, rtol=1e-5)
    assert loss_after_update < ref_loss, "one AdamW step on the same batch must lower the loss"
