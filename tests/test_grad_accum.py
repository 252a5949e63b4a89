"""Gradient accumulation inside the step: N microbatches give the large batch's loss,
gradients and update."""
import jax
import numpy as np
import pytest

from helpers import GRID, NUM_TASKS, PATCH_DIM, TEXT_LEN, synthetic_batch, tiny_config
from m6jax import sharding
from m6jax import pseudo_to_real as p2r
from m6jax.config_checks import validate_config
from m6jax.train import stages
from m6jax.train.state import create_train_state, dummy_batch
from m6jax.train.step import make_train_step


def _two_steps(accum, devices):
    c = tiny_config(data=2)
    mesh = sharding.make_mesh(c.mesh, devices[:2])
    model, tx = stages.model_and_optimizer(c, p2r.STAGE_REAL)
    state, sh = create_train_state(model, tx, dummy_batch(8, GRID * GRID, PATCH_DIM, TEXT_LEN),
                                   mesh, seed=0)
    step = make_train_step(model, tx, mesh, sh, NUM_TASKS, grad_accum_steps=accum)
    losses, norms = [], []
    with jax.set_mesh(mesh):
        for i in range(2):
            state, m = step(state, sharding.global_batch(mesh, synthetic_batch(8, seed=i)))
            losses.append(float(m["loss"]))
            norms.append(float(m["grad_norm"]))
            task_tokens = np.asarray(m["task_tokens"])
    return losses, norms, task_tokens, state


def test_four_microbatches_equal_the_large_batch(devices):
    ref, run = _two_steps(1, devices), _two_steps(4, devices)
    np.testing.assert_allclose(run[0], ref[0], rtol=1e-6)   # loss over all target tokens
    np.testing.assert_allclose(run[1], ref[1], rtol=1e-5)   # gradient norm
    np.testing.assert_array_equal(run[2], ref[2])           # per-task token counts summed
    for a, b in zip(jax.tree.leaves(run[3].params), jax.tree.leaves(ref[3].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("accum,offload,message", [
    (3, "none", "optimizer.grad_accum_steps=3 must be >= 1 and its microbatches"),
    (0, "none", "optimizer.grad_accum_steps=0 must be >= 1"),
    (2, "all", "optimizer.grad_accum_steps=2 with offload.param_layers='all'"),
])
def test_bad_accumulation_is_refused(accum, offload, message):
    c = tiny_config(data=2)
    c.optimizer.grad_accum_steps = accum
    c.offload.param_layers = offload
    with pytest.raises(ValueError, match=message):
        validate_config(c, 2)
