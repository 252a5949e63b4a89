"""Train state, created directly sharded: no full copy ever sits on one device."""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from m6jax import sharding
from m6jax.train import loss_scale as loss_scale_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_steps: jax.Array  # steps whose update was skipped for a non-finite loss/grad
    loss_scale: Any  # {"scale": f32, "good_steps": i32} (m6jax.train.loss_scale); 1 when off


def dummy_batch(batch_size: int, num_patches: int, patch_dim: int, text_len: int):
    """Zeros with the batch layout's shapes and dtypes (for init and eval_shape)."""
    return dict(
        patches=jnp.zeros((batch_size, num_patches, patch_dim), jnp.float32),
        image_mask=jnp.ones((batch_size, num_patches), bool),
        text_tokens=jnp.zeros((batch_size, text_len), jnp.int32),
        text_mask=jnp.ones((batch_size, text_len), bool),
        text_is_prefix=jnp.zeros((batch_size, text_len), bool),
        targets=jnp.zeros((batch_size, text_len), jnp.int32),
        loss_mask=jnp.zeros((batch_size, text_len), jnp.float32),
        task_id=jnp.zeros((batch_size,), jnp.int32))


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def _cast_params(params, param_dtype):
    """Master weights in `model.param_dtype` (default float32; layer norms included)."""
    if param_dtype is None or jnp.dtype(param_dtype) == jnp.float32:
        return params
    return jax.tree.map(lambda x: x.astype(param_dtype), params)


def _boxed_opt_state(tx, params):
    """`tx.init` of the params, with each per-parameter state leaf that has its
    parameter's shape boxed with the parameter's logical axes, so it shards like it.
    Other leaves (counters, Adafactor's factored row/column moments, which have fewer
    dimensions) stay unboxed, i.e. replicated: they are O(rows + columns)."""
    state = tx.init(nn.meta.unbox(params))
    keys = set(params)

    def box_node(node):
        if not (isinstance(node, dict) and set(node) == keys):
            return node
        return jax.tree.map(lambda p, s: p.replace_boxed(s) if _is_box(p) and s.shape ==
                            p.value.shape else s, params, node, is_leaf=_is_box)
    return jax.tree.map(box_node, state, is_leaf=lambda n: isinstance(n, dict) and set(n) == keys)


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, example_batch, seed: int,
             loss_scale=None):
    param_dtype = getattr(model.cfg, "get", lambda *_: None)("param_dtype", None)

    def init():
        rng = jax.random.key(seed)
        init_rng, state_rng = jax.random.split(rng)
        params = model.init(init_rng, example_batch)["params"]
        params = _cast_params(params, param_dtype)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=_boxed_opt_state(tx, params),
                          rng=jax.random.key_data(state_rng),
                          nonfinite_steps=jnp.zeros((), jnp.int32),
                          loss_scale=loss_scale_lib.init_state(loss_scale))
    return init


def state_shardings(model, tx, example_batch, mesh, seed: int = 0):
    """NamedShardings of the TrainState, from abstract shapes and the rules table."""
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        abstract = jax.eval_shape(_init_fn(model, tx, example_batch, seed))
    return sharding.tree_shardings(mesh, abstract)


def create_train_state(model, tx, example_batch, mesh, seed: int, make_offload=None,
                       loss_scale=None):
    """Initialises the TrainState under jit with out_shardings: each device builds its shard.

    `loss_scale` (`m6jax.train.loss_scale.LossScale`, None = off) sets the first scale.

    `make_offload(shardings, shapes)` may return an `m6jax.offload.OffloadPlan`: the state is
    then created straight into its stored layout (offloaded layers in host memory), so
    the full state never sits in device memory at once.
    """
    shardings = state_shardings(model, tx, example_batch, mesh, seed)
    init = _init_fn(model, tx, example_batch, seed, loss_scale)
    plan = None
    if make_offload is not None:
        with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            shapes = jax.eval_shape(lambda: nn.meta.unbox(init()))
        plan = make_offload(shardings, shapes)
    store = plan.store if plan is not None and plan.active else (lambda s: s)

    def unboxed_init():
        return store(nn.meta.unbox(init()))

    out_shardings = plan.stored_shardings if plan is not None else shardings
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        state = jax.jit(unboxed_init, out_shardings=out_shardings)()
    return state, shardings


def abstract_train_state(model, tx, example_batch, mesh, seed: int = 0):
    """ShapeDtypeStructs of the TrainState carrying this mesh's shardings: a restore target.

    Restoring into it places every array straight into the new layout, so a checkpoint
    saved on one mesh loads onto any other without materialising a fresh init first.
    """
    shardings = state_shardings(model, tx, example_batch, mesh, seed)
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        shapes = jax.eval_shape(lambda: nn.meta.unbox(_init_fn(model, tx, example_batch, seed)()))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings), shardings
