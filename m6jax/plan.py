"""Memory and compute plan of a config on its intended device grid, without devices.

Everything here works from abstract shapes (`jax.eval_shape` of the TrainState init)
and the one rules table in `sharding.py`, on a `jax.sharding.AbstractMesh` of the
config's mesh shape: nothing is allocated, so a 10T-parameter config plans in seconds
on a laptop. `experiments/dry_run.py` prints the result; tests compare it with a real
materialised model.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from m6jax import flops, offload, pipeline, sharding
from m6jax import pseudo_to_real as p2r
from m6jax.model.moe import moe_config
from m6jax.train.stages import model_and_optimizer
from m6jax.train.state import dummy_batch, init_fn

GIB = 2 ** 30


def sequence_shape(config) -> tuple[int, int, int]:
    """(num_patches, patch_dim, text_len) of one example, from the data config."""
    d = config.data
    grid = d.image_size // d.patch_size
    return grid * grid, d.patch_size ** 2 * d.image_channels, d.text_len


def build(config, stage: str | None = None):
    """The training-mode model, optimizer and example batch the train loop builds for
    `stage` (the same `train.stages.model_and_optimizer`: the stage's optimizer and the
    pipeline schedule included); by default the stage `config.model` describes."""
    p, pd, t = sequence_shape(config)
    stage = stage or (p2r.STAGE_PSEUDO if config.model.share_layers else p2r.STAGE_REAL)
    model, tx = model_and_optimizer(config, stage)
    return model, tx, dummy_batch(config.batch_size, p, pd, t)


def abstract_state(config, seed: int = 0, stage: str | None = None):
    """The TrainState as ShapeDtypeStructs, leaves boxed with their logical axes."""
    model, tx, example = build(config, stage)
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        return jax.eval_shape(init_fn(model, tx, example, seed))


def abstract_mesh(mesh_shape) -> AbstractMesh:
    mesh_shape = tuple(mesh_shape) + (1,) * (len(sharding.MESH_AXES) - len(mesh_shape))
    return AbstractMesh(mesh_shape, sharding.MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


def _is_expert_leaf(box) -> bool:
    names = getattr(box, "names", ()) or ()
    return "expert" in names


def param_counts(config, abstract) -> dict[str, int]:
    """Total parameters, expert parameters, and parameters a token activates.

    A token passes through every dense weight and through `k` of the `E` experts of
    each MoE layer (prototype: one per prototype, i.e. k; hash / domain: 1).
    """
    leaves = jax.tree.leaves(abstract.params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    total = sum(math.prod(b.value.shape if isinstance(b, nn.Partitioned) else b.shape)
                for b in leaves)
    expert = sum(math.prod(b.value.shape) for b in leaves
                 if isinstance(b, nn.Partitioned) and _is_expert_leaf(b))
    moe = moe_config(config.model)
    if moe is None:
        return dict(total=total, expert=0, activated=total)
    k = int(moe.k) if moe.router in ("topk", "prototype") else 1
    return dict(total=total, expert=expert,
                activated=total - expert + expert * k // int(moe.num_experts))


def train_flops_per_token(config) -> float:
    """Model FLOPs (forward + backward) per sequence position; MoE layers count the k
    experts a token activates plus the router (flops.matmul_params_per_layer)."""
    p, pd, t = sequence_shape(config)
    return flops.train_flops_per_sequence(config.model, p, pd, t) / (p + t)


def _sharded_bytes(abstract_tree, mesh, fraction=None) -> int:
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


def activation_bytes(config, mesh_shape) -> int:
    """Estimated peak activation bytes per device for one train step under the remat policy.

    An estimate, not a measurement: per layer the policy decides what the scan keeps
    for the backward pass (`full`: the layer input; `dots`: matmul outputs incl. the
    attention scores; `dots_no_batch`: matmul outputs without scores; `none`:
    everything); on top, one layer's working set 1.5 times (recomputed forward + its
    gradients), the float32 logits and their gradient, and with FSDP one layer's
    gathered weights and their unreduced gradient.
    """
    m, sizes = config.model, dict(zip(sharding.MESH_AXES, mesh_shape))
    p, _, t = sequence_shape(config)
    s, d, tp = p + t, m.emb_dim, sizes["tensor"]
    # Activations are those of one microbatch (optimizer.grad_accum_steps).
    accum = int(config.optimizer.grad_accum_steps)
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
        gathered = (4 * d * d + 2 * d * m.mlp_dim) / tp * (c + 4)
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
# Extra forward FLOPs of a rematerialised backward pass (`full`: the whole forward again).
_REMAT_FLOPS = {"full": 4.0 / 3.0}


def hardware(config) -> dict[str, Any]:
    """The `hardware` section with its optional fields filled (None = not given)."""
    hw = config.get("hardware")
    fields = ("num_devices", "device_kind", "device_memory_gb", "devices_per_node",
              "host_memory_gb_per_node", "host_device_gb_per_s", "device_tflops")
    return {f: (hw.get(f) if hw is not None else None) for f in fields}


def device_tflops(hw: dict, dtype) -> tuple[float | None, str | None]:
    """(peak TFLOP/s per device, where from) for the compute time: `hardware.device_tflops`
    if given (an override), else the spec-sheet peak of `hardware.device_kind` in the
    compute `dtype` (`flops.KNOWN_PEAK_TFLOPS`); (None, None) if neither is known."""
    if hw["device_tflops"]:
        return float(hw["device_tflops"]), "hardware.device_tflops"
    tf = flops.peak_tflops(hw["device_kind"] or "", dtype)
    if tf is None:
        return None, None
    return tf, f"spec sheet ({flops.known_device(hw['device_kind'])} {dtype})"


def offload_bytes(config, abstract, mesh, stage: str) -> dict[str, float]:
    """Per-device bytes of the offload plan's parts: what lives in host memory (params,
    their gradients, optimizer state), one unit of each in flight, and the traffic."""
    off = offload.OffloadPlan(config, stage)
    params = _sharded_bytes(abstract.params, mesh)
    opt = _sharded_bytes(abstract.opt_state, mesh)
    p_host = _sharded_bytes(abstract.params, mesh, off.host_fraction("params"))
    o_host = _sharded_bytes(abstract.opt_state, mesh, off.host_fraction("opt_state"))
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


def plan(config, mesh_shape=None, stage: str | None = None) -> dict[str, Any]:
    """The dry run: counts, FLOPs, the in-step device peak and the host memory of
    `config` on its intended grid, and the step's transfer vs compute time.

    The device peak is resident state (params, their gradients and optimizer state not
    offloaded) + the streamed units in flight (`UNITS_IN_FLIGHT` of params, gradients and
    optimizer state) + activations (`activation_bytes`). `fits`: the peak fits the
    device memory and the host bytes of a node fit `host_memory_gb_per_node`.
    `stage` (pseudo / real) plans that stage of a Pseudo-to-Real run; by default the one
    the run ends in. `step_s` is the planned step time if the transfers overlap compute:
    max(transfer_s_per_step, compute_s_per_step).
    """
    from m6jax.config_checks import validate_config
    hw = hardware(config)
    num_devices = int(hw["num_devices"]) if hw["num_devices"] is not None else None
    if mesh_shape is None:
        if num_devices is None:
            raise ValueError("config has no hardware.num_devices; add a `hardware` section "
                             "(see experiments/configs/paper_scale.py) or pass mesh_shape")
        mesh_shape = validate_config(config, num_devices)
    mesh_shape = tuple(int(x) for x in mesh_shape)
    mesh_shape += (1,) * (len(sharding.MESH_AXES) - len(mesh_shape))  # no stage given: 1
    # A Pseudo-to-Real run must fit in both stages; the Real one is the larger.
    stage = stage or p2r.stage_at(config, config.total_steps - 1)
    abstract = abstract_state(config, stage=stage)  # the run's config: its stage optimizer
    config = p2r.stage_config(config, stage)
    mesh = abstract_mesh(mesh_shape)
    counts = param_counts(config, abstract)
    off = offload_bytes(config, abstract, mesh, stage)
    per_device = dict(params=int(off["params"]), gradients=int(off["gradients"]),
                      optimizer=int(off["optimizer"]),
                      activations=activation_bytes(config, mesh_shape), host=int(off["host"]))
    per_device["device_peak"] = sum(per_device[k] for k in ("params", "gradients", "optimizer",
                                                            "activations"))
    n = math.prod(mesh_shape)
    step_flops = (train_flops_per_token(config) * sum(sequence_shape(config)[::2])
                  * config.batch_size * _REMAT_FLOPS.get(config.model.remat_policy, 1.0))
    memory_gb = float(hw["device_memory_gb"]) if hw["device_memory_gb"] is not None else None
    tflops, source = device_tflops(hw, config.model.dtype)
    per_node = hw["devices_per_node"] and per_device["host"] * min(int(hw["devices_per_node"]), n)
    fits = None
    if memory_gb is not None:
        fits = per_device["device_peak"] <= memory_gb * GIB
        if hw["host_memory_gb_per_node"] is not None and per_node is not None:
            fits = fits and per_node <= float(hw["host_memory_gb_per_node"]) * GIB
    result = dict(
        variant=config.get("variant"), stage=stage, total_params=counts["total"],
        activated_params=counts["activated"], expert_params=counts["expert"],
        flops_per_token=train_flops_per_token(config), num_devices=n,
        mesh=dict(zip(sharding.MESH_AXES, mesh_shape)),
        device_kind=hw["device_kind"], device_memory_gb=memory_gb,
        remat_policy=config.model.remat_policy,
        optimizer=config.optimizer.name,
        param_dtype=str(config.model.param_dtype),
        per_device_bytes=per_device, per_device_total_bytes=per_device["device_peak"],
        per_node_host_bytes=per_node, host_memory_gb_per_node=hw["host_memory_gb_per_node"],
        transfer_bytes_per_step=int(off["traffic"]),
        transfer_s_per_step=(off["traffic"] / (float(hw["host_device_gb_per_s"]) * 1e9)
                             if hw["host_device_gb_per_s"] else None),
        compute_dtype=str(config.model.dtype), device_tflops=tflops, device_tflops_source=source,
        compute_s_per_step=step_flops / n / (tflops * 1e12) if tflops else None,
        fits=fits, pipeline=_pipeline_plan(config, mesh_shape, abstract))
    out = result
    if out["compute_s_per_step"] is not None:  # stages idle in the bubble
        out["compute_s_per_step"] /= 1.0 - pipeline.from_config(config).bubble
    if moe_config(config.model) is not None:
        out["moe"] = moe_routing_plan(config)
    t, c = out["transfer_s_per_step"], out["compute_s_per_step"]
    out["step_s"] = max(t, c) if t is not None and c is not None else None
    return out


def _pipeline_plan(config, mesh_shape, abstract) -> dict[str, Any] | None:
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


def moe_routing_plan(config) -> dict[str, Any]:
    """Capacity of the training step's routing groups and the share of choices it would
    drop even under perfectly uniform routing; `warning` when C < MIN_CAPACITY."""
    from m6jax.model.moe import dispatch as dsp
    from m6jax.model.moe.layer import DROPLESS
    moe = moe_config(config.model)
    p, _, t = sequence_shape(config)
    group = int(moe.group_size) or p + t
    k = int(moe.k) if moe.router in ("topk", "prototype") else 1
    e, factor = int(moe.num_experts), float(moe.capacity_factor or 0.0)
    out = dict(group_size=group, priority=moe.priority, dispatch=moe.dispatch,
               capacity_per_expert=None, uniform_drop_fraction=0.0, warning=None)
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


def overflow(result) -> str | None:
    """The term that does not fit, with its size, or None (for one-line refusals)."""
    pd, gib = result["per_device_bytes"], lambda b: f"{b / GIB:.1f} GiB"
    mem = result["device_memory_gb"]
    if mem is not None and pd["device_peak"] > mem * GIB:
        big = max(("params", "gradients", "optimizer", "activations"), key=lambda k: pd[k])
        return (f"the device peak {gib(pd['device_peak'])} exceeds the {mem:g} GiB of device "
                f"memory (largest term: {big} {gib(pd[big])})")
    host = result["host_memory_gb_per_node"]
    if host is not None and result["per_node_host_bytes"] and \
            result["per_node_host_bytes"] > host * GIB:
        return (f"the host memory of a node {gib(result['per_node_host_bytes'])} exceeds "
                f"hardware.host_memory_gb_per_node={host:g}")
    return None
