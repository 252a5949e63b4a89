"""The `model.moe` section's checks (called by m6jax/config_checks.py, in its order)."""
from __future__ import annotations

from m6jax.model.moe.dispatch import PRIORITIES
from m6jax.model.moe.layer import DISPATCHES, DROPLESS, capacity_impl
from m6jax.model.moe.routers import ROUTERS


def validate(config, mesh_sizes: dict[str, int]) -> None:
    """The `model.moe` section (absent or num_experts=0: a dense model, nothing to check)."""
    m = config.model
    moe = m.get("moe")
    if moe is None or moe.num_experts == 0:
        return
    e, k = int(moe.num_experts), int(moe.k)
    if e < 0:
        raise ValueError(f"model.moe.num_experts={e} must be >= 0 (0 = dense)")
    if moe.router not in ROUTERS:
        raise ValueError(f"model.moe.router={moe.router!r} is not one of {', '.join(ROUTERS)}")
    if moe.dispatch not in DISPATCHES:
        raise ValueError(f"model.moe.dispatch={moe.dispatch!r} is not one of "
                         f"{', '.join(DISPATCHES)}")
    if k < 1 or k > e:
        raise ValueError(f"model.moe.k={k} must be in [1, model.moe.num_experts={e}]")
    if moe.router == "prototype" and e % k:
        raise ValueError(f"model.moe.num_experts={e} is not divisible by model.moe.k={k} "
                         "(prototype routing splits the experts into k equal prototypes)")
    if moe.router in ("hash", "domain") and k != 1:
        raise ValueError(f"model.moe.k={k} must be 1 for model.moe.router={moe.router!r}")
    if moe.router == "domain" and e % 2:
        raise ValueError(f"model.moe.num_experts={e} must be even for router='domain' "
                         "(one half for image tokens, one for text)")
    every = int(moe.every)
    if every < 1 or m.num_layers % every:
        raise ValueError(f"model.moe.every={every} must be >= 1 and divide "
                         f"model.num_layers={m.num_layers}")
    for f in ("capacity_factor", "eval_capacity_factor", "aux_loss_weight", "z_loss_weight"):
        if moe[f] is not None and moe[f] < 0:
            raise ValueError(f"model.moe.{f}={moe[f]} must be >= 0")
    if not 0.0 <= moe.jitter < 1.0:
        raise ValueError(f"model.moe.jitter={moe.jitter} must be in [0, 1)")
    if e % mesh_sizes["expert"]:
        raise ValueError(f"mesh.expert={mesh_sizes['expert']} does not divide "
                         f"model.moe.num_experts={e}")
    _check_moe_groups(config, moe, mesh_sizes)


def _check_moe_groups(config, moe, sizes: dict[str, int]) -> None:
    """group_size, priority, and dropless dispatch under expert parallelism."""
    if moe.priority not in PRIORITIES:
        raise ValueError(f"model.moe.priority={moe.priority!r} is not one of "
                         f"{', '.join(PRIORITIES)}")
    gs = int(moe.group_size)
    d = config.data
    seq = (d.image_size // d.patch_size) ** 2 + d.text_len
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    accum = int(config.optimizer.grad_accum_steps)
    # A pipeline routes each of its microbatches alone, inside each grad-accum one.
    micro = int(config.pipeline.microbatches) if sizes.get("stage", 1) > 1 else 1
    local = config.batch_size // (shards * accum * micro) * seq
    if gs < 0 or (gs and local % gs):
        raise ValueError(f"model.moe.group_size={gs} must be >= 0 and divide the tokens per "
                         f"device and microbatch, {local} (batch_size={config.batch_size} / "
                         f"{shards} batch shards / optimizer.grad_accum_steps={accum} / "
                         f"pipeline.microbatches={micro} x {seq} tokens per example), so that "
                         "no routing group spans two devices or microbatches")
    grouped = capacity_impl(moe.dispatch, config.model.kernels) == "grouped"
    named = repr(moe.dispatch) + ("" if moe.dispatch == "grouped" else " (grouped here)")
    if grouped and (sizes["expert"] > 1 or sizes.get("stage", 1) > 1):
        raise ValueError(
            f"model.moe.dispatch={named} runs each device's tokens through all experts "
            f"(mesh.expert={sizes['expert']}, mesh.stage={sizes.get('stage', 1)} must be 1): use "
            "model.moe.dispatch='gather' to shard experts or stages")
    dropless = moe.dispatch in DROPLESS or not moe.capacity_factor or not moe.eval_capacity_factor
    if moe.peer_capacity_factor < 0:
        raise ValueError(f"model.moe.peer_capacity_factor={moe.peer_capacity_factor} must be "
                         ">= 0 (0 = room for all of a device's choices per expert peer)")
    sorting = grouped or dropless
    if sorting and sizes["tensor"] > 1 and sizes["expert"] == 1:
        raise ValueError(
            f"model.moe.dispatch={moe.dispatch!r} with mesh.tensor={sizes['tensor']} would hold "
            "every expert whole on each device and compute the same tokens on all tensor peers "
            "(its grouped matmuls do not split mlp): use model.moe.dispatch='gather' with a "
            "capacity factor, or put those devices on mesh.data")
    if dropless and sizes["expert"] > 1 and (sizes["fsdp"] > 1 or sizes["tensor"] > 1):
        raise ValueError(
            f"model.moe.dispatch={moe.dispatch!r} (dropless) with mesh.expert={sizes['expert']} "
            f"needs mesh.fsdp=1 and mesh.tensor=1 (got {sizes['fsdp']}, {sizes['tensor']}): "
            "its all-to-all exchange holds each local expert whole, which would replicate the "
            "experts' fsdp/tensor shards; use model.moe.dispatch='gather' with a capacity "
            "factor, or put those devices on mesh.data")
