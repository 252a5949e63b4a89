"""The compiled train step holds each weight split the way its parallelism mode says.

GSPMD computes the same numbers whatever the annotations, so equal losses across meshes
cannot show a weight that silently became replicated. Here, per mode (fsdp, tensor,
expert), the train step is compiled and checked against an expectation written out in
this file, independent of the rules table in m6jax/sharding.py:
  * each param and Adam moment: its per-device shard shape in the compiled step's input
    and output shardings is the full shape divided along the logical axes the mode splits
    (`SPLITS`), and the weights the mode exists for are among them (`MUST_SPLIT`);
  * the compiled executable's per-device argument and output bytes equal the sum of those
    shards plus the batch (arguments) or the metrics (outputs).
A replicated weight fails both. The offload mode's sharding test is left to the streamed
offload rewrite (m6jax/offload.py is being replaced; its layout changes with it).
"""
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from helpers import GRID, PATCH_DIM, TEXT_LEN, tiny_config
from m6jax import sharding
from m6jax.train import stages
from m6jax.train.state import create_train_state, dummy_batch
from m6jax.train.step import make_train_step

BATCH = 8
# mode -> (mesh, {logical axis: ways it is split}), written by hand from the README's
# parallelism table: FSDP splits every weight's embed dim, Megatron tensor parallelism
# heads / mlp / vocab, expert parallelism the expert dim.
MODES = {
    "fsdp": (dict(data=1, fsdp=8), {"embed": 8}),
    "tensor": (dict(data=2, tensor=4), {"heads": 4, "mlp": 4, "vocab": 4}),
    "expert": (dict(data=2, expert=4), {"expert": 4}),
}
# Weights that must be split in each mode (path fragments of the param tree).
MUST_SPLIT = {
    "fsdp": ("attn/query", "attn/out", "mlp/wi", "mlp/wo", "token_emb"),
    "tensor": ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/wi", "mlp/wo",
               "token_emb"),
    "expert": ("moe/wi", "moe/wo"),
}


def _config(mode):
    mesh, _ = MODES[mode]
    c = tiny_config(**mesh)
    if mode == "expert":
        from configs.m6_moe import moe_section
        c.model.moe = moe_section(num_experts=8, every=1)
    return c


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _logical_names(config):
    """{param path: logical axis names} from the model's own annotations."""
    model, _ = stages.model_and_optimizer(config, "real")
    example = dummy_batch(BATCH, GRID * GRID, PATCH_DIM, TEXT_LEN)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), example))["params"]
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    return {_path(p): tuple(x.names) for p, x in leaves if isinstance(x, nn.Partitioned)}


def _expected_shard(shape, names, splits):
    return tuple(d // splits.get(n, 1) for d, n in zip(shape, names))


# fsdp runs by default; tensor and expert compile longer (~50 s each here) and run with
# -m slow, which CI runs too.
@pytest.fixture(scope="module", params=["fsdp", pytest.param("tensor", marks=pytest.mark.slow),
                                        pytest.param("expert", marks=pytest.mark.slow)])
def compiled(request, devices):
    mode = request.param
    config = _config(mode)
    mesh = sharding.make_mesh(config.mesh, devices)
    model, tx = stages.model_and_optimizer(config, "real")
    example = dummy_batch(BATCH, GRID * GRID, PATCH_DIM, TEXT_LEN)
    state, state_sh = create_train_state(model, tx, example, mesh, 0)
    step = make_train_step(model, tx, mesh, state_sh, 4)
    batch = sharding.global_batch(mesh, {k: np.asarray(v) for k, v in example.items()})
    with jax.set_mesh(mesh):
        exe = step.lower(state, batch).compile()
    return mode, config, state, batch, exe


def _state_leaves(tree):
    """(kind, param path, leaf) for params and the Adam moments (they mirror the params)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree.params)[0]:
        out.append(("params", _path(path), leaf))
    adam = tree.opt_state[1][0]
    for kind in ("mu", "nu"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(adam, kind))[0]:
            out.append((kind, _path(path), leaf))
    return out


def test_every_weight_is_split_as_its_mode_says_in_the_compiled_step(compiled):
    mode, config, state, _, exe = compiled
    _, splits = MODES[mode]
    names = _logical_names(config)
    in_state, out_state = exe.input_shardings[0][0], exe.output_shardings[0]
    split_paths = set()
    for (kind, path, leaf), s_in, s_out in zip(_state_leaves(state), _state_leaves(in_state),
                                               _state_leaves(out_state)):
        want = _expected_shard(leaf.shape, names[path], splits)
        for where, sh in (("input", s_in[2]), ("output", s_out[2])):
            assert sh.shard_shape(leaf.shape) == want, (mode, kind, path, where, sh.spec)
        if want != leaf.shape:
            split_paths.add(path)
    for fragment in MUST_SPLIT[mode]:
        assert any(fragment in p for p in split_paths), (mode, fragment, sorted(split_paths))


def _bytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def test_compiled_step_bytes_per_device_are_the_planned_shards(compiled):
    mode, config, state, batch, exe = compiled
    _, splits = MODES[mode]
    names = _logical_names(config)
    sharded = sum(_bytes(_expected_shard(leaf.shape, names[path], splits), leaf.dtype)
                  for _, path, leaf in _state_leaves(state))
    # The rest of the state is small and replicated: step, rng, counters, Adam's count.
    rest = sum(x.nbytes for x in jax.tree.leaves(state)) - sum(
        leaf.nbytes for _, _, leaf in _state_leaves(state))
    batch_bytes = sum(_bytes(v.sharding.shard_shape(v.shape), v.dtype) for v in batch.values())
    mem = exe.memory_analysis()
    assert mem.argument_size_in_bytes == sharded + rest + batch_bytes, mode
    # Outputs: the new state plus the replicated metrics (a few scalars per task).
    metrics_bytes = mem.output_size_in_bytes - sharded - rest
    assert 0 < metrics_bytes < 4096, (mode, mem.output_size_in_bytes, sharded + rest)
