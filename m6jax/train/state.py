"""Train state, created directly sharded: no full copy ever sits on one device."""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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


_FLOAT32_ALWAYS = ("router", "scale", "bias")


def _cast_params(params, param_dtype):
    """Master weights in `model.param_dtype` (default float32). With bfloat16 masters the
    router's weights, norm scales and biases stay float32: they are small, and the
    router's logits and a norm scale near 1.0 (bf16 ulp 2**-7) need the precision."""
    if param_dtype is None or jnp.dtype(param_dtype) == jnp.float32:
        return params

    def cast(path, x):
        names = {k.key for k in path if isinstance(k, jax.tree_util.DictKey)}
        return x if names & set(_FLOAT32_ALWAYS) else x.astype(param_dtype)
    return jax.tree_util.tree_map_with_path(cast, params)


def _factored_drops(shape, v_row, v_col, v) -> tuple[int, int] | None:
    """(dim v_row averages away, dim v_col averages away) of a parameter of `shape` whose
    Adafactor second moment is factored, else None. optax's `_factored_dims` factors the
    two largest dims `d1, d0 = argsort(shape)[-2:]`: v_row drops d0, v_col drops d1; an
    unfactored leaf keeps a full-shape `v` (and shape-(1,) placeholders in v_row/v_col)."""
    if len(shape) < 2 or tuple(v.shape) == tuple(shape):
        return None
    d1, d0 = (int(d) for d in np.argsort(shape)[-2:])  # the same call as optax's
    drop = lambda d: tuple(shape[:d]) + tuple(shape[d + 1:])
    if (tuple(v_row.shape), tuple(v_col.shape)) != (drop(d0), drop(d1)):
        raise ValueError(f"Adafactor moments v_row {v_row.shape}, v_col {v_col.shape} of a "
                         f"parameter {tuple(shape)} do not drop its dims {d0}, {d1}: optax's "
                         "factoring rule changed; update state._factored_drops")
    return d0, d1


def _box_factored(state: optax.FactoredState, params) -> optax.FactoredState:
    """v_row / v_col boxed with the parameter's logical axes minus the dim each averages
    away, so they shard like the parameter's remaining dims; `v` like the parameter;
    placeholders and the count stay replicated."""
    rows, cols, vs = [], [], []
    leaves, treedef = jax.tree.flatten(params, is_leaf=_is_box)
    for p, r, c, v in zip(leaves, treedef.flatten_up_to(state.v_row),
                          treedef.flatten_up_to(state.v_col), treedef.flatten_up_to(state.v)):
        drops = _factored_drops(p.value.shape, r, c, v) if _is_box(p) else None
        if drops is not None:
            less = lambda d: tuple(n for i, n in enumerate(p.names) if i != d)
            row_names, col_names = less(drops[0]), less(drops[1])
            r, c = p.replace(value=r, names=row_names), p.replace(value=c, names=col_names)
        elif _is_box(p) and v.shape == p.value.shape:
            v = p.replace_boxed(v)
        rows.append(r)
        cols.append(c)
        vs.append(v)
    return state._replace(v_row=treedef.unflatten(rows), v_col=treedef.unflatten(cols),
                          v=treedef.unflatten(vs))


def _boxed_opt_state(tx, params):
    """`tx.init` of the params, with each per-parameter state leaf boxed with its
    parameter's logical axes, so it shards like it: a leaf of the parameter's shape with
    all of them, Adafactor's factored row/column moments (optax.FactoredState) with all
    but the dim each averages away (replicated, they would be ~5 GB per device at
    M6-10T). Other leaves (counters, placeholders) stay unboxed, i.e. replicated."""
    state = tx.init(nn.meta.unbox(params))
    keys = set(params)
    is_params_like = lambda n: isinstance(n, dict) and set(n) == keys

    def box_node(node):
        if isinstance(node, optax.FactoredState):
            return _box_factored(node, params)
        if not is_params_like(node):
            return node
        return jax.tree.map(lambda p, s: p.replace_boxed(s) if _is_box(p) and s.shape ==
                            p.value.shape else s, params, node, is_leaf=_is_box)
    return jax.tree.map(box_node, state, is_leaf=lambda n: isinstance(n, optax.FactoredState)
                        or is_params_like(n))


def init_fn(model: nn.Module, tx: optax.GradientTransformation, example_batch, seed: int,
             loss_scale=None):
    """The function that initialises the TrainState (params boxed with their logical
    axes): `jax.eval_shape` it for abstract shapes, jit it to create the state."""
    param_dtype = model.cfg.param_dtype

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
        abstract = jax.eval_shape(init_fn(model, tx, example_batch, seed))
    return sharding.tree_shardings(mesh, abstract)


def create_train_state(model, tx, example_batch, mesh, seed: int, make_offload=None,
                       loss_scale=None):
    """Initialises the TrainState under jit with out_shardings: each device builds its shard.

    `loss_scale` (`m6jax.train.loss_scale.LossScale`, None = off) sets the first scale.

    `make_offload(shardings, shapes)` may return an `m6jax.offload.OffloadPlan`: the state is
    then created straight into its stored layout (`OffloadPlan.init`: offloaded layers
    made and kept in host memory), so the full state never sits in device memory.
    """
    shardings = state_shardings(model, tx, example_batch, mesh, seed)
    init = init_fn(model, tx, example_batch, seed, loss_scale)
    plan = None
    if make_offload is not None:
        with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            shapes = jax.eval_shape(lambda: nn.meta.unbox(init()))
        plan = make_offload(shardings, shapes)

    def unboxed_init():
        return nn.meta.unbox(init())

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        if plan is not None:
            state = plan.init(unboxed_init)()
        else:
            state = jax.jit(unboxed_init, out_shardings=shardings)()
    return state, shardings


def abstract_train_state(model, tx, example_batch, mesh, seed: int = 0):
    """ShapeDtypeStructs of the TrainState carrying this mesh's shardings: a restore target.

    Restoring into it places every array straight into the new layout, so a checkpoint
    saved on one mesh loads onto any other without materialising a fresh init first.
    """
    shardings = state_shardings(model, tx, example_batch, mesh, seed)
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        shapes = jax.eval_shape(lambda: nn.meta.unbox(init_fn(model, tx, example_batch, seed)()))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings), shardings
