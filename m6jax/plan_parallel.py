"""The planner's view of the parallel schedules: the pipeline (stages, bubble, per-stage
params and microbatch activations) and MoE routing (capacity, drops under uniform
routing, a warning when capacity is too small). Parts of `m6jax.plan.plan`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6jax import pipeline, sharding
from m6jax.model.moe import dispatch as dsp
from m6jax.model.moe import moe_config, parallel
from m6jax.model.moe.layer import DROPLESS
from m6jax.plan_memory import pipeline_activations, sequence_shape


def pipeline_plan(config, mesh_shape, abstract) -> dict[str, Any] | None:
    """The stage axis: schedule, bubble, per-stage params and microbatch activations."""
    sched = pipeline.from_config(config)
    if not sched.active:
        return None
    m, sizes = config.model, dict(zip(sharding.MESH_AXES, mesh_shape))
    p, _, t = sequence_shape(config)
    accum = int(config.optimizer.grad_accum_steps)
    b = config.batch_size / accum / (sizes["data"] * sizes["fsdp"] * sizes["expert"])
    layer_input = jnp.dtype(m.dtype).itemsize * (p + t) * m.emb_dim
    acts = pipeline_activations(config, b, 0.0, 0.0, layer_input)
    # A stage's params: its chunk of the stack (what its stage group holds in all); a
    # Pseudo stack's shared block is on every stage.
    stack = nn.meta.unbox(abstract.params["stack"])
    per_stage = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(stack))
    per_stage /= 1 if m.share_layers else sched.stages
    return dict(stages=sched.stages, repeats=sched.repeats, microbatches=sched.microbatches,
                iterations=sched.iterations, bubble=sched.bubble,
                layers_per_stage=m.num_layers // sched.stages,
                stack_params_bytes_per_stage=int(per_stage),
                microbatch_examples_per_device=b / sched.microbatches,
                microbatch_activations_in_flight_bytes=int(acts["in_flight"]))


MIN_CAPACITY = 4  # below this many slots per expert and group, drops are noisy and large


def moe_routing_plan(config, mesh_shape=None) -> dict[str, Any]:
    """Capacity of the training step's routing groups and the share of choices it would
    drop even under perfectly uniform routing; `warning` when C < MIN_CAPACITY. With a
    `mesh_shape`, `expert_exchange`: what one MoE layer's all-to-alls move per device."""
    moe = moe_config(config.model)
    p, _, t = sequence_shape(config)
    group = int(moe.group_size) or p + t
    k = int(moe.k) if moe.router in ("topk", "prototype") else 1
    e, factor = int(moe.num_experts), float(moe.capacity_factor or 0.0)
    out = dict(group_size=group, priority=moe.priority, dispatch=moe.dispatch,
               capacity_per_expert=None, uniform_drop_fraction=0.0, warning=None)
    if mesh_shape is not None:
        out["expert_exchange"] = expert_exchange(config, mesh_shape)
        out["warning"] = out["expert_exchange"].pop("warning")
    if moe.dispatch in DROPLESS or not factor:
        return out
    cap = dsp.expert_capacity(group, k, e, factor)
    out.update(capacity_per_expert=cap,
               uniform_drop_fraction=dsp.uniform_drop_fraction(group, k, e, cap))
    if cap < MIN_CAPACITY:
        out["warning"] = (
            f"moe.capacity_per_expert={cap} < {MIN_CAPACITY}: groups of {group} tokens give "
            f"each of {e} experts {cap} slot(s), so {out['uniform_drop_fraction']:.1%} of "
            "choices drop even under uniform routing; raise model.moe.group_size or "
            "model.moe.capacity_factor")
    return out


def expert_exchange(config, mesh_shape) -> dict[str, Any]:
    """Bytes one device sends per MoE layer and microbatch through the expert all-to-alls
    (forward; the backward sends the same again), and the rows of its send buffer.

    Dropless (`parallel.dropless`): n peer blocks of `peer_rows` rows each, the tokens'
    rows plus an int32 expert id out and the outputs back. Capacity paths: the
    [groups, E, C, D] slot buffer out and back. None of it without an expert axis."""
    moe, m = moe_config(config.model), config.model
    sizes = dict(zip(sharding.MESH_AXES, mesh_shape))
    n = sizes["expert"]
    out = dict(peers=n, send_rows=0, bytes_per_layer=0, grows_with_expert_axis=False,
               warning=None)
    if n == 1:
        return out
    p, _, t = sequence_shape(config)
    seq = p + t
    shards = sizes["data"] * sizes["fsdp"] * n
    micro = int(config.pipeline.microbatches) if sizes["stage"] > 1 else 1
    examples = config.batch_size / (shards * int(config.optimizer.grad_accum_steps) * micro)
    k = int(moe.k) if moe.router in ("topk", "prototype") else 1
    row = m.emb_dim * jnp.dtype(m.dtype).itemsize
    factor = float(moe.capacity_factor or 0.0)
    if moe.dispatch in DROPLESS or not factor:
        choices = int(examples * seq * k)
        f = float(moe.peer_capacity_factor)
        rows = n * parallel.peer_rows(choices, n, f)
        out.update(send_rows=rows, bytes_per_layer=int(rows * (2 * row + 4)),
                   grows_with_expert_axis=not f)
        if not f:
            out["warning"] = (
                f"model.moe.peer_capacity_factor=0 with mesh.expert={n}: each device's dropless "
                f"send buffer is {n} x its {choices} choices ({rows} rows per layer); set "
                "model.moe.peer_capacity_factor (e.g. 2.0) to bound it")
        return out
    group = int(moe.group_size) or seq
    groups = examples * seq / group
    rows = int(groups * int(moe.num_experts) * dsp.expert_capacity(group, k, int(moe.num_experts),
                                                                   factor))
    out.update(send_rows=rows, bytes_per_layer=int(2 * rows * row))
    return out
