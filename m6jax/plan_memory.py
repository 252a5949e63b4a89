"""The planner's memory estimates: bytes per device of sharded state, activations under
a remat policy (with or without a pipeline schedule) and the offload plan's parts.

Works from abstract shapes and `sharding.py`'s rules table, like `m6jax.plan`, which
assembles these into the dry run.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from m6jax import offload, pipeline, sharding
from m6jax.model.moe import moe_config


def sequence_shape(config) -> tuple[int, int, int]:
    """(num_patches, patch_dim, text_len) of one example, from the data config."""
    d = config.data
    grid = d.image_size // d.patch_size
    return grid * grid, d.patch_size ** 2 * d.image_channels, d.text_len


def sharded_bytes(abstract_tree, mesh, fraction=None) -> int:
    """Bytes of the largest shard set any one device holds (even sharding: all equal);
    `fraction(path)` (if given) weighs each leaf, e.g. the offloaded share of it."""
    shardings = sharding.tree_shardings(mesh, abstract_tree)
    unboxed = nn.meta.unbox(abstract_tree)
    total = 0.0
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(unboxed)[0], jax.tree.leaves(
            shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
        shape = tuple(-(-dim // n) for dim, n in zip(leaf.shape, _split_counts(sh, leaf.ndim)))
        weight = fraction(path) if fraction is not None else 1.0
        total += weight * math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return int(total)


def _split_counts(sh: NamedSharding, ndim: int) -> list[int]:
    spec = tuple(sh.spec) + (None,) * (ndim - len(sh.spec))
    out = []
    for entry in spec:
        axes = entry if isinstance(entry, tuple) else (entry,)
        out.append(math.prod(sh.mesh.shape[a] for a in axes if a is not None))
    return out


# One layer's working set in the backward pass, in units of its forward working set: the
# recomputed forward plus the gradients alive at once. Calibrated on XLA:CPU's compiled
# step (tests/test_dry_run.py): 2 overcounted the dense model by 32% with remat `full`
# once the MLP ran on a 2-D view (XLA frees recomputed tensors as their gradients are
# made); 1.5 puts it at 1.14 and remat `none` at 0.98.
_WORKING_SETS = 1.5


def activation_bytes(config, mesh_shape, forward_only: bool = False) -> int:
    """Estimated peak activation bytes per device for one train step under the remat policy.

    An estimate, not a measurement: per layer the policy decides what the scan keeps
    for the backward pass (`full`: the layer input; `dots`: matmul outputs incl. the
    attention scores; `dots_no_batch`: matmul outputs without scores; `none`:
    everything); on top, one layer's working set 1.5 times (recomputed forward + its
    gradients), the float32 logits and their gradient, and with FSDP one layer's
    gathered weights and their unreduced gradient.

    `forward_only` (the eval step: a global batch of `batch_size` rows, nothing kept
    for a backward pass): one layer's working set, the logits and, with FSDP, one
    layer's gathered weights.
    """
    m, sizes = config.model, dict(zip(sharding.MESH_AXES, mesh_shape))
    p, _, t = sequence_shape(config)
    s, d, tp = p + t, m.emb_dim, sizes["tensor"]
    # Activations are those of one microbatch (optimizer.grad_accum_steps).
    accum = 1 if forward_only else int(config.optimizer.grad_accum_steps)
    b = config.batch_size / accum / (sizes["data"] * sizes["fsdp"] * sizes["expert"])
    c = jnp.dtype(m.dtype).itemsize
    h = m.num_heads / tp
    moe = moe_config(m)
    ffn = m.mlp_dim / tp
    route = 0.0
    if moe is not None:
        k = int(moe.k) if moe.router in ("topk", "prototype") else 1
        ffn_moe = k * float(moe.capacity_factor or 1.0) * m.mlp_dim / tp
        frac = 1.0 / int(moe.every)
        ffn = (1 - frac) * ffn + frac * ffn_moe
        # Routing buffers of an MoE layer: the choices' one-hot over experts and its
        # running count for the slot positions (int32 [K*S, E] each), and the router's
        # float32 logits and probabilities [S, E].
        e = int(moe.num_experts)
        route = frac * 4 * (2 * k * s * e + 2 * s * e)
    scores = 2 * h * s * s * 4                                  # f32 scores + probs
    dots = s * d + 4 * s * d / tp + s * ffn + s * d             # proj in/outs, mlp hidden
    everything = c * (4 * s * d + 4 * s * d / tp + 2 * s * ffn) + scores + route
    saved = {"full": c * s * d, "dots": c * dots + scores / 2, "dots_no_batch": c * dots,
             "none": everything}[m.remat_policy]
    logits = 2 * t * m.vocab_size / tp * 4
    # FSDP gathers one layer's dense weights (compute dtype) and reduce-scatters their
    # float32 gradient: both exist whole (over fsdp) while that layer runs.
    gathered = 0.0
    if sizes["fsdp"] > 1:
        gathered = (4 * d * d + 2 * d * m.mlp_dim) / tp * (c if forward_only else c + 4)
    if forward_only:
        return int(b * (everything + logits / 2) + gathered)  # no logits gradient
    sched = pipeline.from_config(config)
    if sched.active:
        return int(pipeline_activations(config, b, saved, everything, c * s * d)["total"]
                   + b * logits + gathered)
    return int(b * (m.num_layers * saved + _WORKING_SETS * everything + logits) + gathered)


def pipeline_activations(config, b, saved, everything, layer_input) -> dict[str, float]:
    """Per-device activation bytes of the stack under a pipeline schedule (per example
    terms as in `activation_bytes`, b examples per device in the step's batch).

    A stage holds num_layers / stage layers. Its microbatch (b / microbatches examples)
    runs one chunk of num_layers / (stage x repeats) layers per iteration; the backward
    pass needs each of the R M + S - 1 iterations' saved values: with
    `pipeline.remat_stage` only the stage's input (the chunk is recomputed), else what
    the remat policy keeps for every layer of the chunk. On top: one chunk's backward
    working set, and the M-microbatch buffer the last stage writes into (and its gradient).
    """
    sched, m = pipeline.from_config(config), config.model
    mb = b / sched.microbatches
    chunk_layers = m.num_layers / (sched.stages * sched.repeats)
    per_iteration = layer_input if sched.remat_stage else chunk_layers * saved
    in_flight = sched.iterations * mb * per_iteration
    working = mb * (chunk_layers * saved + _WORKING_SETS * everything)
    buffers = 2 * b * layer_input
    return dict(in_flight=in_flight, working=working, buffers=buffers,
                total=in_flight + working + buffers)


# The streamed units in flight on the device at once: the one being computed and the
# next one, which XLA's scheduler may fetch early to overlap the copy with compute.
UNITS_IN_FLIGHT = 2


def offload_bytes(config, abstract, mesh, stage: str) -> dict[str, float]:
    """Per-device bytes of the offload plan's parts: what lives in host memory (params,
    their gradients, optimizer state), one unit of each in flight, and the traffic."""
    off = offload.OffloadPlan(config, stage)
    params = sharded_bytes(abstract.params, mesh)
    opt = sharded_bytes(abstract.opt_state, mesh)
    p_host = sharded_bytes(abstract.params, mesh, off.host_fraction("params"))
    o_host = sharded_bytes(abstract.opt_state, mesh, off.host_fraction("opt_state"))
    n_p, n_o = len(off.host_units["params"]), len(off.host_units["opt_state"])
    # A Pseudo stack is one unit: brought in whole, gradients and update on the device.
    shared = off.shared
    in_flight = (lambda total, n: total if shared else UNITS_IN_FLIGHT * total / max(n, 1))
    unit_p = in_flight(p_host, n_p) if n_p else 0.0
    unit_o = in_flight(o_host, n_o) if n_o else 0.0
    grads_host = 0.0 if shared else p_host
    # Traffic per step: a host unit's params come in for the forward and again for the
    # rematerialised backward, its gradient goes out, and the update reads the gradient
    # twice (norm, update) and the param once and writes the param back; host optimizer
    # state is read and written once.
    traffic = (2 * p_host if shared else 7 * p_host) + 2 * o_host
    return dict(params=params - p_host + unit_p, gradients=params - grads_host + unit_p,
                optimizer=opt - o_host + unit_o, host=p_host + grads_host + o_host,
                traffic=traffic, params_host=p_host, optimizer_host=o_host)


def phase_peaks(config, abstract, mesh, stage: str, step_peak: int, eval_activations: int,
                pseudo_abstract=None) -> dict[str, dict]:
    """Per-device device bytes of each phase of a run in the offload plan's stored
    layout (`m6jax.offload`; docs/pseudo-to-real-and-offload.md), {phase: {device_peak,
    ...its terms}}. What is modelled (the rest is taken as negligible):

      init     the resident state (state not offloaded): offloaded stacks are made by
               host computation and never exist on the device
      restore  the resident state: offloaded stacks are read into host memory and split
               there; resident arrays are read straight into their device shardings
      step     the train step's peak (`plan`): resident state + units in flight +
               gradients + activations
      save     the resident state: the runs of a stack are joined on the host, device
               arrays are copied out by Orbax (no device buffer is added)
      eval     the resident state + `UNITS_IN_FLIGHT` units of params (a Pseudo stack:
               its one unit) + forward activations of one eval batch
      switch   the Pseudo stage's resident state + the Real stage's (both live while
               the delink runs; the shared stack is broadcast on the host); 0 without a
               switch
      generate the resident state + `UNITS_IN_FLIGHT` units of params (KV-cache decoding
               scans the stored units as the eval step does) + the KV cache of one batch
               of `batch_size` rows over the whole sequence
    """
    off = offload_bytes(config, abstract, mesh, stage)
    params = sharded_bytes(abstract.params, mesh)
    opt = sharded_bytes(abstract.opt_state, mesh)
    resident = params - off["params_host"] + opt - off["optimizer_host"]
    plan_ = offload.OffloadPlan(config, stage)
    n_p = len(plan_.host_units["params"])
    unit_p = (off["params_host"] if plan_.shared else
              UNITS_IN_FLIGHT * off["params_host"] / max(n_p, 1)) if n_p else 0.0
    phases = dict(
        init=dict(resident_state=resident), restore=dict(resident_state=resident),
        step=dict(step=step_peak), save=dict(resident_state=resident),
        eval=dict(resident_state=resident, units_in_flight=unit_p,
                  activations=eval_activations))
    if pseudo_abstract is not None:
        p_off = offload_bytes(config, pseudo_abstract, mesh, "pseudo")
        pseudo = (sharded_bytes(pseudo_abstract.params, mesh) - p_off["params_host"]
                  + sharded_bytes(pseudo_abstract.opt_state, mesh) - p_off["optimizer_host"])
        phases["switch"] = dict(pseudo_resident_state=pseudo, real_resident_state=resident)
    else:
        phases["switch"] = {}
    m, sizes = config.model, dict(zip(sharding.MESH_AXES, mesh.axis_sizes))
    p, _, t = sequence_shape(config)
    rows = config.batch_size / (sizes["data"] * sizes["fsdp"] * sizes["expert"])
    kv = (rows * m.num_layers * (p + t) * 2 * m.emb_dim / sizes["tensor"]
          * jnp.dtype(m.dtype).itemsize)
    phases["generate"] = dict(resident_state=resident, units_in_flight=unit_p, kv_cache=kv)
    for terms in phases.values():
        terms["device_peak"] = int(sum(terms.values()))
        for k in terms:
            terms[k] = int(terms[k])
    return phases
