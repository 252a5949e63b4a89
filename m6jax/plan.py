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

from m6jax import flops, offload, sharding
from m6jax import pseudo_to_real as p2r
from m6jax.model import M6
from m6jax.model.moe import moe_config
from m6jax.train import optim
from m6jax.train.state import _init_fn, dummy_batch

GIB = 2 ** 30


def sequence_shape(config) -> tuple[int, int, int]:
    """(num_patches, patch_dim, text_len) of one example, from the data config."""
    d = config.data
    grid = d.image_size // d.patch_size
    return grid * grid, d.patch_size ** 2 * d.image_channels, d.text_len


def build(config):
    """The training-mode model, optimizer and example batch the train loop would build."""
    p, pd, t = sequence_shape(config)
    grid = config.data.image_size // config.data.patch_size
    model = M6(config.model, grid, t, deterministic=config.model.dropout_rate == 0.0)
    tx = optim.make_optimizer(config.optimizer, config.total_steps)
    return model, tx, dummy_batch(config.batch_size, p, pd, t)


def abstract_state(config, seed: int = 0):
    """The TrainState as ShapeDtypeStructs, leaves boxed with their logical axes."""
    model, tx, example = build(config)
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        return jax.eval_shape(_init_fn(model, tx, example, seed))


def abstract_mesh(mesh_shape) -> AbstractMesh:
    return AbstractMesh(tuple(mesh_shape), sharding.MESH_AXES,
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


def activation_bytes(config, mesh_shape) -> int:
    """Estimated peak activation bytes per device for one train step under the remat policy.

    An estimate, not a measurement: per layer the policy decides what the scan keeps
    for the backward pass (`full`: the layer input; `dots`: matmul outputs incl. the
    attention scores; `dots_no_batch`: matmul outputs without scores; `none`:
    everything); on top, one layer's full working set twice (recomputed forward + its
    gradients), the float32 logits and their gradient, and with FSDP one layer's
    gathered weights and their unreduced gradient.
    """
    m, sizes = config.model, dict(zip(sharding.MESH_AXES, mesh_shape))
    p, _, t = sequence_shape(config)
    s, d, tp = p + t, m.emb_dim, sizes["tensor"]
    b = config.batch_size / (sizes["data"] * sizes["fsdp"] * sizes["expert"])
    c = jnp.dtype(m.dtype).itemsize
    h = m.num_heads / tp
    moe = moe_config(m)
    ffn = m.mlp_dim / tp
    if moe is not None:
        k = int(moe.k) if moe.router in ("topk", "prototype") else 1
        ffn_moe = k * float(moe.capacity_factor or 1.0) * m.mlp_dim / tp
        frac = 1.0 / int(moe.every)
        ffn = (1 - frac) * ffn + frac * ffn_moe
    scores = 2 * h * s * s * 4                                  # f32 scores + probs
    dots = s * d + 4 * s * d / tp + s * ffn + s * d             # proj in/outs, mlp hidden
    everything = c * (4 * s * d + 4 * s * d / tp + 2 * s * ffn) + scores
    saved = {"full": c * s * d, "dots": c * dots + scores / 2, "dots_no_batch": c * dots,
             "none": everything}[m.remat_policy]
    logits = 2 * t * m.vocab_size / tp * 4
    # FSDP gathers one layer's dense weights (compute dtype) and reduce-scatters their
    # float32 gradient: both exist whole (over fsdp) while that layer runs.
    gathered = 0.0
    if sizes["fsdp"] > 1:
        gathered = (4 * d * d + 2 * d * m.mlp_dim) / tp * (c + 4)
    return int(b * (m.num_layers * saved + 2 * everything + logits) + gathered)


def plan(config, mesh_shape=None) -> dict[str, Any]:
    """The dry run: counts, FLOPs and per-device bytes of `config` on its intended grid."""
    from m6jax.config_checks import validate_config
    hw = config.get("hardware")
    num_devices = int(hw.num_devices) if hw is not None else None
    if mesh_shape is None:
        if num_devices is None:
            raise ValueError("config has no hardware.num_devices; add a `hardware` section "
                             "(see experiments/configs/paper_scale.py) or pass mesh_shape")
        mesh_shape = validate_config(config, num_devices)
    mesh_shape = tuple(int(x) for x in mesh_shape)
    # A Pseudo-to-Real run must fit in both stages; the Real one is the larger.
    stage = p2r.stage_at(config, config.total_steps - 1)
    config = p2r.stage_config(config, stage)
    abstract = abstract_state(config)
    mesh = abstract_mesh(mesh_shape)
    counts = param_counts(config, abstract)
    params_b = _sharded_bytes(abstract.params, mesh)
    # Offloaded layers' params / optimizer state live in host memory between steps.
    # Gradients stay on the device (the step brings a layer's states in to update it).
    off = offload.OffloadPlan(config, p2r.STAGE_PSEUDO if config.model.share_layers
                              else p2r.STAGE_REAL)
    params_host = _sharded_bytes(abstract.params, mesh, off.host_fraction("params"))
    opt_b = _sharded_bytes(abstract.opt_state, mesh)
    opt_host = _sharded_bytes(abstract.opt_state, mesh, off.host_fraction("opt_state"))
    per_device = dict(params=params_b - params_host,
                      gradients=params_b,  # float32, sharded like the params they update
                      optimizer=opt_b - opt_host,
                      activations=activation_bytes(config, mesh_shape),
                      host=params_host + opt_host)
    device_total = sum(v for k, v in per_device.items() if k != "host")
    memory_gb = float(hw.device_memory_gb) if hw is not None else None
    return dict(
        variant=config.get("variant"), stage=stage, total_params=counts["total"],
        activated_params=counts["activated"], expert_params=counts["expert"],
        flops_per_token=train_flops_per_token(config),
        num_devices=math.prod(mesh_shape), mesh=dict(zip(sharding.MESH_AXES, mesh_shape)),
        device_kind=hw.device_kind if hw is not None else None,
        device_memory_gb=memory_gb, remat_policy=config.model.remat_policy,
        per_device_bytes=per_device, per_device_total_bytes=device_total,
        fits=None if memory_gb is None else device_total <= memory_gb * GIB)
