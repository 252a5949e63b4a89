"""Memory and compute plan of a config on its intended device grid, without devices.

Everything here works from abstract shapes (`jax.eval_shape` of the TrainState init)
and the one rules table in `sharding.py`, on a `jax.sharding.AbstractMesh` of the
config's mesh shape: nothing is allocated, so a 10T-parameter config plans in seconds
on a laptop. `experiments/dry_run.py` prints the result; tests compare it with a real
materialised model. The memory estimates are `m6jax.plan_memory`, the pipeline and MoE
routing parts `m6jax.plan_parallel`; their public names are importable from here too.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AbstractMesh, AxisType

from m6jax import flops, offload, pipeline, sharding
from m6jax import pseudo_to_real as p2r
from m6jax.config_checks import validate_config
from m6jax.model.moe import moe_config
from m6jax.train.stages import model_and_optimizer
from m6jax.train.state import dummy_batch, init_fn
from m6jax.plan_memory import (  # noqa: F401 (public here: callers use plan.X)
    UNITS_IN_FLIGHT, sharded_bytes, activation_bytes, offload_bytes, phase_peaks,
    pipeline_activations, sequence_shape)
from m6jax.plan_parallel import MIN_CAPACITY, moe_routing_plan, pipeline_plan  # noqa: F401

GIB = 2 ** 30


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

def plan(config, mesh_shape=None, stage: str | None = None) -> dict[str, Any]:
    """The dry run: counts, FLOPs, the in-step device peak and the host memory of
    `config` on its intended grid, the step's transfer vs compute time, and the device
    peak of every phase of the run (`phases`: init, restore, step, save, eval, switch,
    generate; `plan_memory.phase_peaks` says what each models; `peak_phase` the largest).

    The device peak is resident state (params, their gradients and optimizer state not
    offloaded) + the streamed units in flight (`UNITS_IN_FLIGHT` of params, gradients and
    optimizer state) + activations (`activation_bytes`). `fits`: every phase's peak fits
    the device memory and the host bytes of a node fit `host_memory_gb_per_node`.
    `stage` (pseudo / real) plans that stage of a Pseudo-to-Real run; by default the one
    the run ends in. `step_s` is the planned step time if the transfers overlap compute:
    max(transfer_s_per_step, compute_s_per_step).
    """
    hw = hardware(config)
    num_devices = int(hw["num_devices"]) if hw["num_devices"] is not None else None
    if mesh_shape is None:
        if num_devices is None:
            raise ValueError("config has no hardware.num_devices; add a `hardware` section "
                             "(see experiments/configs/paper_scale.py) or pass mesh_shape")
        mesh_shape = validate_config(config, num_devices, check_files=False)
    mesh_shape = tuple(int(x) for x in mesh_shape)
    mesh_shape += (1,) * (len(sharding.MESH_AXES) - len(mesh_shape))  # no stage given: 1
    # A Pseudo-to-Real run must fit in both stages; the Real one is the larger.
    stage = stage or p2r.stage_at(config, config.total_steps - 1)
    abstract = abstract_state(config, stage=stage)  # the run's config: its stage optimizer
    switches = stage == p2r.STAGE_REAL and p2r.switch_step(config) is not None
    pseudo = abstract_state(config, stage=p2r.STAGE_PSEUDO) if switches else None
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
    phases = phase_peaks(config, abstract, mesh, stage, per_device["device_peak"],
                         activation_bytes(config, mesh_shape, forward_only=True), pseudo)
    fits = None
    if memory_gb is not None:  # every phase of the run, not the step alone
        fits = all(p["device_peak"] <= memory_gb * GIB for p in phases.values())
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
        fits=fits, phases=phases, peak_phase=max(phases, key=lambda k: phases[k]["device_peak"]),
        pipeline=pipeline_plan(config, mesh_shape, abstract))
    out = result
    if out["compute_s_per_step"] is not None:  # stages idle in the bubble
        out["compute_s_per_step"] /= 1.0 - pipeline.from_config(config).bubble
    if moe_config(config.model) is not None:
        out["moe"] = moe_routing_plan(config, mesh_shape)
    t, c = out["transfer_s_per_step"], out["compute_s_per_step"]
    out["step_s"] = max(t, c) if t is not None and c is not None else None
    return out

def overflow(result) -> str | None:
    """The term that does not fit, with its size, or None (for one-line refusals)."""
    pd, gib = result["per_device_bytes"], lambda b: f"{b / GIB:.1f} GiB"
    mem = result["device_memory_gb"]
    if mem is not None and pd["device_peak"] > mem * GIB:
        big = max(("params", "gradients", "optimizer", "activations"), key=lambda k: pd[k])
        return (f"the device peak {gib(pd['device_peak'])} exceeds the {mem:g} GiB of device "
                f"memory (largest term: {big} {gib(pd[big])})")
    for name, terms in result.get("phases", {}).items():
        if mem is not None and terms["device_peak"] > mem * GIB:
            big = max((k for k in terms if k != "device_peak"), key=lambda k: terms[k])
            return (f"the {name} phase's device peak {gib(terms['device_peak'])} exceeds the "
                    f"{mem:g} GiB of device memory by {gib(terms['device_peak'] - mem * GIB)} "
                    f"(largest term: {big} {gib(terms[big])})")
    host = result["host_memory_gb_per_node"]
    if host is not None and result["per_node_host_bytes"] and \
            result["per_node_host_bytes"] > host * GIB:
        return (f"the host memory of a node {gib(result['per_node_host_bytes'])} exceeds "
                f"hardware.host_memory_gb_per_node={host:g}")
    return None


def _device_memory_gb(config, devices):
    """The device's memory limit as the backend reports it (GPU, TPU), else the config's
    `hardware.device_memory_gb`, else None."""
    stats = getattr(devices[0], "memory_stats", lambda: None)() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"] / 2**30
    hw = config.get("hardware")
    return float(hw.device_memory_gb) if hw is not None and hw.device_memory_gb else None


def check_offload(config, devices) -> None:
    """Refuses an offload setting the backend cannot hold (no pinned host memory) or whose
    planned in-step peak does not fit the device, naming the field and the term over."""
    if not offload.requested(config):
        return
    offload.check_backend(config, devices)
    memory_gb = _device_memory_gb(config, devices)
    if memory_gb is None:
        return
    c = config.copy_and_resolve_references()
    with c.unlocked():
        hw = c.get("hardware")
        c.hardware = dict(hw.to_dict() if hw is not None else {}, num_devices=len(devices),
                          device_memory_gb=memory_gb)
    result = plan(c, sharding.resolve_mesh_shape(config.mesh, len(devices)))
    over = overflow(result)
    if over is not None:
        sec = config.offload
        raise ValueError(f"offload.param_layers={sec['param_layers']!r}, offload."
                         f"optimizer_layers={sec['optimizer_layers']!r}: {over}; offload more "
                         "layers (e.g. offload.param_layers=all) or use more devices")
