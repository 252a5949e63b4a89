"""A checkpoint written on one mesh restores onto another in the new config's layout."""
import jax
import numpy as np
import pytest

from helpers import GRID, NUM_TASKS, PATCH_DIM, TEXT_LEN, synthetic_batch, tiny_config
from m6jax import sharding
from m6jax.checkpoint import Checkpointer, load_params
from m6jax.config_checks import validate_config
from m6jax.train import optim
from m6jax.model.build import build_model
from m6jax.train.state import abstract_train_state, create_train_state, dummy_batch
from m6jax.train.step import make_eval_step, make_train_step


def _parts(config, devices):
    mesh = sharding.make_mesh(config.mesh, devices)
    tx = optim.make_optimizer(config.optimizer, config.total_steps)
    example = dummy_batch(config.batch_size, GRID * GRID, PATCH_DIM, TEXT_LEN)
    return mesh, build_model(config), tx, example


def _eval_loss(model, mesh, params, param_shardings):
    eval_step = make_eval_step(model, mesh, param_shardings, NUM_TASKS)
    with jax.set_mesh(mesh):
        aux = jax.device_get(eval_step(params, sharding.global_batch(mesh, synthetic_batch(seed=7))))
    return float(aux["loss_sum"] / aux["tokens"])


@pytest.fixture(scope="module")
def saved(devices, tmp_path_factory):
    """One AdamW step on a (2,2,2,1) mesh, saved; returns (workdir, eval loss, host state)."""
    config = tiny_config(data=2, fsdp=2, tensor=2)
    mesh, model, tx, example = _parts(config, devices)
    state, shardings = create_train_state(model, tx, example, mesh, seed=0)
    step = make_train_step(model, tx, mesh, shardings, NUM_TASKS)
    with jax.set_mesh(mesh):
        state, _ = step(state, sharding.global_batch(mesh, synthetic_batch()))
    loss = _eval_loss(model, mesh, state.params, shardings.params)
    workdir = tmp_path_factory.mktemp("mesh_ckpt")
    ckpt = Checkpointer(str(workdir), config)
    ckpt.save(1, state, {"data": {"step": 1}}, force=True)
    ckpt.close()  # waits for the async write
    return workdir, loss, jax.device_get(state)


@pytest.mark.parametrize("mesh_fields, num_devices", [
    (dict(data=8), 8),
    (dict(data=1, fsdp=2, tensor=2), 4),
])
def test_restore_onto_another_mesh_gives_the_same_state_and_eval_loss(
        saved, devices, mesh_fields, num_devices):
    workdir, loss, host_state = saved
    config = tiny_config(**mesh_fields)
    validate_config(config, num_devices)
    mesh, model, tx, example = _parts(config, devices[:num_devices])
    abstract, shardings = abstract_train_state(model, tx, example, mesh)
    state, meta = Checkpointer(str(workdir), config).restore_latest(abstract)
    assert meta["data"] == {"step": 1} and int(state.step) == 1
    for (path, got), want, target in zip(jax.tree_util.tree_leaves_with_path(state),
                                         jax.tree.leaves(host_state), jax.tree.leaves(shardings)):
        name = jax.tree_util.keystr(path)
        assert got.sharding == target, name  # the new layout, not the saved one
        assert {d.id for d in got.sharding.device_set} == {d.id for d in devices[:num_devices]}
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)
        for shard in got.addressable_shards:  # each device holds its slice of the new layout
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], err_msg=name)
    # Same params, other reduction order across devices: equal to float32 rounding.
    assert _eval_loss(model, mesh, state.params, shardings.params) == pytest.approx(loss, rel=1e-6)


def test_a_checkpoint_of_another_model_shape_is_refused_and_left_in_place(saved, devices):
    workdir, _, _ = saved
    config = tiny_config(data=8)
    config.model.mlp_dim = 128
    mesh, model, tx, example = _parts(config, devices)
    abstract, _ = abstract_train_state(model, tx, example, mesh)
    with pytest.raises(ValueError, match=r"checkpoint step 1 in .* does not fit this config: "
                                         r"opt_state/.* is \(2, 32, 64\) there and \(2, 32, 128\) here"):
        Checkpointer(str(workdir), config).restore_latest(abstract)
    assert (workdir / "checkpoints" / "1").is_dir()


def test_load_params_restores_params_only_onto_a_new_mesh(saved, devices):
    workdir, _, host_state = saved
    config = tiny_config(data=8)
    mesh, model, tx, example = _parts(config, devices)
    abstract, shardings = abstract_train_state(model, tx, example, mesh)
    params = load_params(str(workdir), abstract.params)
    assert jax.tree.structure(params) == jax.tree.structure(abstract.params)
    for got, want, target in zip(jax.tree.leaves(params), jax.tree.leaves(host_state.params),
                                 jax.tree.leaves(shardings.params)):
        assert got.sharding == target
        np.testing.assert_array_equal(np.asarray(got), want)


def test_load_params_from_a_directory_without_checkpoints_names_the_field(tmp_path):
    with pytest.raises(ValueError, match=rf"init_from='{tmp_path}' holds no checkpoint"):
        load_params(str(tmp_path), {})


def test_checkpoint_fields_are_validated():
    for field, value, message in [
        ("checkpoint_every", -1, "checkpoint_every=-1 must be >= 0"),
        ("keep_checkpoints", 0, "keep_checkpoints=0 must be >= 1"),
        ("keep_period", -2, "keep_period=-2 must be >= 0"),
        ("nonfinite_policy", "ignore", "nonfinite_policy='ignore' is not one of skip, stop"),
    ]:
        config = tiny_config()
        config[field] = value
        with pytest.raises(ValueError, match=message):
            validate_config(config, 1)
