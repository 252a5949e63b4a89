"""Granular host offload: which arrays live in pinned host memory, and that offloading
changes nothing about training (the same losses, the same state)."""
import jax
import numpy as np
import pytest

from helpers import GRID, NUM_TASKS, PATCH_DIM, TEXT_LEN, synthetic_batch, tiny_config
from m6jax import offload, sharding
from m6jax import pseudo_to_real as p2r
from m6jax.train import stages
from m6jax.train.state import create_train_state, dummy_batch
from m6jax.train.step import make_train_step

STEPS = 3


def _config(optimizer_layers="none", param_layers="none"):
    c = tiny_config(data=2)
    c.model.num_layers = 4
    c.offload.update(optimizer_layers=optimizer_layers, param_layers=param_layers)
    return c


def _train(c, devices):
    """Losses of STEPS steps, the final stored state and its plan (2 devices, Real model)."""
    mesh = sharding.make_mesh(c.mesh, devices[:2])
    model, tx = stages.model_and_optimizer(c, p2r.STAGE_REAL)
    state, sh = create_train_state(model, tx, dummy_batch(8, GRID * GRID, PATCH_DIM, TEXT_LEN),
                                   mesh, seed=0)
    plan = offload.OffloadPlan(c, p2r.STAGE_REAL, sh)
    step = make_train_step(model, tx, mesh, sh, NUM_TASKS, offload=plan)
    losses = []
    with jax.set_mesh(mesh):
        state = plan.to_stored(state)
        for i in range(STEPS):
            state, m = step(state, sharding.global_batch(mesh, synthetic_batch(8, seed=i)))
            losses.append(float(m["loss"]))
    return losses, state, plan


@pytest.fixture(scope="module")
def no_offload(devices):
    return _train(_config(), devices)


@pytest.fixture(scope="module")
def offloaded(devices):
    """Params of every layer and AdamW moments of layers 1 and 3 in host memory."""
    return _train(_config(optimizer_layers="1,3", param_layers="all"), devices)


def test_chosen_layers_live_in_pinned_host_memory(offloaded):
    _, state, _ = offloaded
    kinds = offload.memory_kinds(state)
    q = "['stack']['layers']['attn']['query']"
    assert kinds[f".params{q}"] == "pinned_host"  # all layers: the whole stacked leaf
    assert kinds[".params['token_emb']['embedding']"] == "device"  # never offloaded
    mu = state.opt_state[1][0].mu["stack"]["layers"]["attn"]["query"]
    assert isinstance(mu, offload.Split)
    assert mu.host.sharding.memory_kind == "pinned_host" and mu.host.shape[0] == 2
    assert mu.device.sharding.memory_kind == "device" and mu.device.shape[0] == 2
    assert sharding.per_device_bytes(state, "pinned_host") > 0


@pytest.mark.parametrize("layers", [("0,2", "1"), None])  # None: the `offloaded` run
def test_offload_gives_the_same_losses_and_state(no_offload, offloaded, devices, layers):
    losses, state, plan = _train(_config(*layers), devices) if layers else offloaded
    ref_losses, ref_state, _ = no_offload
    assert losses == ref_losses
    with jax.set_mesh(sharding.make_mesh(_config().mesh, devices[:2])):
        canonical = plan.to_canonical(state)
    for a, b in zip(jax.tree.leaves(canonical), jax.tree.leaves(ref_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("value,message", [
    ("0,7", "offload.optimizer_layers='0,7': layer 7 is not in [0, model.num_layers=4)"),
    ("first", "offload.optimizer_layers='first' must be 'none', 'all' or layer indices"),
])
def test_bad_layer_lists_are_refused(value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        offload.parse_layers(value, 4, "offload.optimizer_layers")


def test_layer_lists_parse():
    assert offload.parse_layers("all", 3, "f") == (0, 1, 2)
    assert offload.parse_layers("none", 3, "f") == ()
    assert offload.parse_layers("2, 0", 3, "f") == (0, 2)
    assert offload.parse_layers([1], 3, "f") == (1,)
