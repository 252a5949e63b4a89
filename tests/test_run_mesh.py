"""Generation and fine-tuning load a checkpoint in the layout it was trained in.

A run trained with FSDP + tensor parallelism (or expert parallelism) on 8 fake devices is
restored by `decoding.run.load_run` (generate.py) and `finetune.loop.load_params` (via
`pretrained.run_config`) onto its own fsdp/tensor/expert axes: every param has the
training sharding and each device holds only its shard. Loading them replicated (the old
`data=-1` mesh) fails these tests: each device would hold the whole model.
"""
import jax
import numpy as np
import pytest

from helpers import tiny_config
from m6jax import checkpoint, sharding
from m6jax.decoding.run import load_run
from m6jax.finetune import loop, pretrained
from m6jax.train import stages
from m6jax.train.state import create_train_state, dummy_batch

EXAMPLE = dummy_batch(8, 16, 4, 12)


def _param_bytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def _train_and_save(workdir, config, devices):
    mesh = sharding.make_mesh(config.mesh, devices)
    model, tx = stages.model_and_optimizer(config, "real")
    state, shardings = create_train_state(model, tx, EXAMPLE, mesh, 0)
    ckpt = checkpoint.Checkpointer(str(workdir), config)
    ckpt.save(1, state, dict(data={"step": 1}, stage="real",
                             config=checkpoint.config_json(config)), force=True)
    ckpt.wait()
    ckpt.close()
    return state, shardings


def _specs(shardings):
    return jax.tree.map(lambda s: tuple(s.spec), shardings)


@pytest.fixture(scope="module")
def fsdp_tensor_run(tmp_path_factory, devices):
    workdir = tmp_path_factory.mktemp("fsdp_tensor")
    config = tiny_config(data=2, fsdp=2, tensor=2)
    state, shardings = _train_and_save(workdir, config, devices)
    return workdir, config, state, shardings


def test_generate_loads_an_fsdp_tensor_run_in_its_layout(fsdp_tensor_run, devices):
    workdir, _, state, shardings = fsdp_tensor_run
    _, _, mesh, params, param_sh, _ = load_run(str(workdir), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1, "stage": 1}
    assert _specs(param_sh) == _specs(shardings.params)
    assert jax.tree.map(lambda x: tuple(x.sharding.spec), params) == _specs(shardings.params)
    per_device = sharding.per_device_bytes(params)
    assert per_device == sharding.per_device_bytes(state.params)
    assert per_device < _param_bytes(params) / 3  # sharded: replicated would hold it all
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # two decoder compiles, ~20 s here; the layout tests above stay default
def test_generate_decodes_on_the_run_layout_like_on_one_replica(fsdp_tensor_run, devices):
    from m6jax import generate
    workdir, config, _, _ = fsdp_tensor_run
    _, model, mesh, params, param_sh, _ = load_run(str(workdir), devices)
    rng = np.random.default_rng(0)
    patches = rng.random((4, 16, 4)).astype(np.float32)
    mask, prompt = np.ones((4, 16), bool), np.tile(np.array([[5, 6]], np.int32), (4, 1))

    def decode(mesh, param_sh, params):
        dec = generate.make_decoder(model, mesh, param_sh, 2, 6, eos_id=3)
        b = sharding.shard_full_batch(mesh, dict(p=patches, m=mask, t=prompt))
        with jax.set_mesh(mesh):
            return np.asarray(dec(params, b["p"], b["m"], b["t"]))
    sharded = decode(mesh, param_sh, params)
    one = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, expert=1), devices[:1])
    one_sh = jax.tree.map(lambda _: jax.sharding.NamedSharding(one, jax.sharding.PartitionSpec()),
                          param_sh)
    replica = decode(one, one_sh, jax.device_put(jax.device_get(params), one_sh))
    np.testing.assert_array_equal(sharded, replica)


def test_finetune_loads_an_fsdp_tensor_run_in_its_layout(fsdp_tensor_run, devices):
    from configs import finetune_caption
    workdir, config, state, shardings = fsdp_tensor_run
    source = pretrained.Pretrained(checkpoint.step_dir(str(workdir)), str(workdir),
                                   checkpoint.config_json(config), "unused.model")
    ft = finetune_caption.get_config()
    ft.batch_size = 8
    run = pretrained.run_config(ft, source)
    assert dict(run.mesh) == {"data": -1, "fsdp": 2, "tensor": 2, "expert": 1, "stage": 1}
    mesh = sharding.make_mesh(run.mesh, devices)
    params = loop.load_params(run, mesh, source.step_dir)
    assert jax.tree.map(lambda x: tuple(x.sharding.spec), params) == _specs(shardings.params)
    assert sharding.per_device_bytes(params) == sharding.per_device_bytes(state.params)


def test_generate_loads_an_expert_parallel_run_in_its_layout(tmp_path, devices):
    from configs.m6_moe import moe_section
    config = tiny_config(data=2, expert=4)
    config.model.moe = moe_section(num_experts=8, every=2)
    state, shardings = _train_and_save(tmp_path, config, devices)
    _, _, mesh, params, _, _ = load_run(str(tmp_path), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1, "expert": 4, "stage": 1}
    assert jax.tree.map(lambda x: tuple(x.sharding.spec), params) == _specs(shardings.params)
    wi = [x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
          if "wi" in jax.tree_util.keystr(p) and x.ndim == 4]
    assert wi and all(x.addressable_shards[0].data.shape[1] == x.shape[1] // 4 for x in wi)
    assert sharding.per_device_bytes(params) == sharding.per_device_bytes(state.params)


def test_a_layout_that_does_not_fit_the_devices_is_named():
    with pytest.raises(ValueError, match=r"the run's mesh \(fsdp=2, tensor=4, expert=1\) does "
                                         "not fit 4 devices"):
        sharding.run_layout(dict(data=1, fsdp=2, tensor=4, expert=1), 4)
