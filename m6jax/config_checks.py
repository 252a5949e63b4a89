"""Refuse bad configs before anything is compiled, with the field to fix in the message."""
from __future__ import annotations

import os

from m6jax import offload, pipeline, schema, sharding
from m6jax import pseudo_to_real as p2r
from m6jax.model.remat import REMAT_POLICIES
from m6jax.model.mlp import ACTIVATIONS

_DTYPES = ("float32", "bfloat16", "float16")
NONFINITE_POLICIES = ("skip", "stop")


def clamp_warmup(config) -> str | None:
    """A short run (total_steps <= optimizer.warmup_steps) gets a tenth of its steps as
    warmup instead of an error; returns the one-line notice, or None if nothing changed."""
    o, total = config.optimizer, int(config.total_steps)
    if total <= 0 or int(o.warmup_steps) < total:
        return None
    old, o.warmup_steps = int(o.warmup_steps), total // 10
    return (f"optimizer.warmup_steps={old} clamped to {o.warmup_steps} (a tenth of "
            f"total_steps={total}); --config.optimizer.warmup_steps=N sets it")


def validate_config(config, num_devices: int) -> tuple[int, ...]:
    """Checks model, mesh, batch and optimizer fields; returns the resolved mesh shape."""
    schema.check_complete(config)
    m = config.model
    for f in ("emb_dim", "num_heads", "mlp_dim", "num_layers", "vocab_size"):
        if int(m[f]) <= 0:
            raise ValueError(f"model.{f}={m[f]} must be positive")
    if m.emb_dim % m.num_heads:
        raise ValueError(f"model.num_heads={m.num_heads} does not divide model.emb_dim={m.emb_dim}")
    if m.dtype not in _DTYPES:
        raise ValueError(f"model.dtype={m.dtype!r} is not one of {', '.join(_DTYPES)}")
    if m.param_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.param_dtype={m.param_dtype!r} is not one of float32, bfloat16")
    if m.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"model.remat_policy={m.remat_policy!r} is not one of "
                         f"{', '.join(REMAT_POLICIES)}")
    if m.mlp_activation not in ACTIVATIONS:
        raise ValueError(f"model.mlp_activation={m.mlp_activation!r} is not one of "
                         f"{', '.join(ACTIVATIONS)}")
    if not 0.0 <= m.dropout_rate < 1.0:
        raise ValueError(f"model.dropout_rate={m.dropout_rate} must be in [0, 1)")
    from m6jax.model import sparse
    from m6jax.t2i import vocab as t2i_vocab
    sparse.validate(config)
    if t2i_vocab.enabled(config):  # image codes appended: vocab_size is text + codes
        t2i_vocab.validate(config)
    elif m.vocab_size != config.data.vocab_size:
        raise ValueError(f"model.vocab_size={m.vocab_size} differs from data.vocab_size="
                         f"{config.data.vocab_size}; set data.vocab_size (both follow it)")

    if int(config.batch_size) <= 0:
        raise ValueError(f"batch_size={config.batch_size} must be positive (the global batch)")
    if int(config.seed) < 0:
        raise ValueError(f"seed={config.seed} must be >= 0")
    shape = sharding.resolve_mesh_shape(config.mesh, num_devices)
    sizes = dict(zip(sharding.MESH_AXES, shape))
    t = sizes["tensor"]
    for f in ("num_heads", "mlp_dim", "vocab_size"):
        if m[f] % t:
            raise ValueError(f"mesh.tensor={t} does not divide model.{f}={m[f]}")
    if m.emb_dim % sizes["fsdp"]:
        raise ValueError(f"mesh.fsdp={sizes['fsdp']} does not divide model.emb_dim={m.emb_dim}")
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if config.batch_size % shards:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by mesh.data*mesh.fsdp*"
                         f"mesh.expert={shards}")

    validate_moe(config, sizes)
    validate_image_encoder(config, sizes)
    from m6jax.train.profile import parse_profile_steps
    window = parse_profile_steps(config.profile_steps)
    if window and window[1] > config.total_steps:
        raise ValueError(f"config.profile_steps={config.profile_steps!r} ends after "
                         f"total_steps={config.total_steps}")
    _check_pipeline(config, sizes, shards)

    for f in ("total_steps", "log_every", "eval_every"):
        if int(config[f]) <= 0:
            raise ValueError(f"{f}={config[f]} must be positive")
    o = config.optimizer
    from m6jax.train.optim import NAMES
    if o.name not in NAMES:
        raise ValueError(f"optimizer.name={o.name!r} is not one of {', '.join(NAMES)}")
    accum = int(o.grad_accum_steps)
    if accum < 1 or config.batch_size % (accum * shards):
        raise ValueError(f"optimizer.grad_accum_steps={accum} must be >= 1 and its microbatches "
                         f"of batch_size={config.batch_size} / {accum} rows must divide by the "
                         f"{shards} batch shards (mesh.data*mesh.fsdp*mesh.expert)")
    if accum > 1 and offload.parse_layers(
            config.offload.param_layers, m.num_layers, "offload.param_layers"):
        raise ValueError(f"optimizer.grad_accum_steps={accum} with offload.param_layers="
                         f"{config.offload.param_layers!r}: accumulating offloaded gradients is "
                         "not built; set one of them back (grad_accum_steps=1 or "
                         "param_layers=none)")
    if o.learning_rate <= 0:
        raise ValueError(f"optimizer.learning_rate={o.learning_rate} must be positive")
    if o.warmup_steps < 0 or o.warmup_steps >= config.total_steps:
        raise ValueError(f"optimizer.warmup_steps={o.warmup_steps} must be in "
                         f"[0, total_steps={config.total_steps})")
    if not 0.0 <= o.end_lr_fraction <= 1.0:
        raise ValueError(f"optimizer.end_lr_fraction={o.end_lr_fraction} must be in [0, 1]")
    for f in ("b1", "b2"):
        if not 0.0 <= o[f] < 1.0:
            raise ValueError(f"optimizer.{f}={o[f]} must be in [0, 1) (an Adam decay rate)")
    if o.weight_decay < 0:
        raise ValueError(f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    _check_loss_scale(config)
    if not o.grad_clip_norm > 0:
        raise ValueError(f"optimizer.grad_clip_norm={o.grad_clip_norm} must be positive "
                         "(clipping by global norm; use a large value to clip nothing)")
    for f in ("peak_tflops_per_device", "num_caption_samples"):
        if f in config and config[f] < 0:
            raise ValueError(f"{f}={config[f]} must be >= 0")
    _check_checkpointing(config)
    _check_pseudo_to_real(config)
    offload.validate(config)
    return shape


def _check_loss_scale(config) -> None:
    from m6jax.train import loss_scale
    o = config.optimizer
    if o.loss_scale not in loss_scale.MODES:
        raise ValueError(f"optimizer.loss_scale={o.loss_scale!r} is not one of "
                         f"{', '.join(loss_scale.MODES)}")
    if config.model.dtype == "float16" and o.loss_scale == "none":
        raise ValueError("model.dtype='float16' with optimizer.loss_scale='none': float16 "
                         "gradients underflow unscaled; set optimizer.loss_scale='dynamic' "
                         "(or 'auto'), or model.dtype='bfloat16'")
    if not o.loss_scale_init >= 1.0:
        raise ValueError(f"optimizer.loss_scale_init={o.loss_scale_init} must be >= 1")
    if int(o.loss_scale_period) < 1:
        raise ValueError(f"optimizer.loss_scale_period={o.loss_scale_period} must be >= 1 "
                         "(finite steps before the scale doubles)")


def validate_moe(config, mesh_sizes: dict[str, int]) -> None:
    """The `model.moe` section (absent or num_experts=0: a dense model, nothing to check)."""
    from m6jax.model.moe import DISPATCHES, ROUTERS
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
    from m6jax.model.moe.dispatch import PRIORITIES
    from m6jax.model.moe.layer import DROPLESS
    if moe.priority not in PRIORITIES:
        raise ValueError(f"model.moe.priority={moe.priority!r} is not one of "
                         f"{', '.join(PRIORITIES)}")
    gs = int(moe.group_size)
    d = config.data
    seq = (d.image_size // d.patch_size) ** 2 + d.text_len
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    accum = int(config.optimizer.grad_accum_steps)
    local = config.batch_size // (shards * accum) * seq
    if gs < 0 or (gs and local % gs):
        raise ValueError(f"model.moe.group_size={gs} must be >= 0 and divide the tokens per "
                         f"device and microbatch, {local} (batch_size={config.batch_size} / "
                         f"{shards * accum} batch shards x {seq} tokens per example), so that "
                         "no routing group spans two devices")
    if moe.dispatch == "grouped" and (sizes["expert"] > 1 or sizes.get("stage", 1) > 1):
        raise ValueError(
            "model.moe.dispatch='grouped' runs each device's tokens through all experts "
            f"(mesh.expert={sizes['expert']}, mesh.stage={sizes.get('stage', 1)} must be 1): use "
            "model.moe.dispatch='gather' to shard experts or stages")
    dropless = moe.dispatch in DROPLESS or not moe.capacity_factor or not moe.eval_capacity_factor
    if dropless and sizes["expert"] > 1 and (sizes["fsdp"] > 1 or sizes["tensor"] > 1):
        raise ValueError(
            f"model.moe.dispatch={moe.dispatch!r} (dropless) with mesh.expert={sizes['expert']} "
            f"needs mesh.fsdp=1 and mesh.tensor=1 (got {sizes['fsdp']}, {sizes['tensor']}): "
            "its all-to-all exchange holds each local expert whole, which would replicate the "
            "experts' fsdp/tensor shards; use model.moe.dispatch='gather' with a capacity "
            "factor, or put those devices on mesh.data")


def _check_pipeline(config, sizes: dict[str, int], shards: int) -> None:
    from m6jax.model.moe import moe_config
    m, stages = config.model, sizes["stage"]
    moe = moe_config(m)
    units = m.num_layers // int(moe.every) if moe is not None else m.num_layers
    pipeline.validate(config, stages, units)
    if stages == 1:
        return
    mb = pipeline.section(config)["microbatches"]
    accum = int(config.optimizer.grad_accum_steps)
    rows = config.batch_size // accum
    if rows % (mb * shards):
        raise ValueError(f"batch_size={config.batch_size} (/ optimizer.grad_accum_steps={accum})"
                         f" is not divisible by pipeline.microbatches={mb} x the {shards} batch "
                         "shards (mesh.data*mesh.fsdp*mesh.expert): each microbatch is split "
                         "over the batch shards")
    if (offload.parse_layers(config.offload.param_layers, m.num_layers, "offload.param_layers")
            or offload.parse_layers(config.offload.optimizer_layers, m.num_layers,
                                    "offload.optimizer_layers")):
        raise ValueError(f"mesh.stage={stages} with offload.param_layers/optimizer_layers: "
                         "pipeline stages over a host-offloaded stack are not built; set "
                         "mesh.stage=1 or offload.*_layers='none'")


def _check_checkpointing(config) -> None:
    for f in ("checkpoint_every", "keep_period"):
        if int(config[f]) < 0:
            raise ValueError(f"{f}={config[f]} must be >= 0 (0 turns it off)")
    if int(config.keep_checkpoints) < 1:
        raise ValueError(f"keep_checkpoints={config.keep_checkpoints} must be >= 1 (the "
                         "newest checkpoint is what a restart resumes from)")
    if config.checkpoint_minutes < 0:
        raise ValueError(f"checkpoint_minutes={config.checkpoint_minutes} must be >= 0 "
                         "(0 turns it off)")
    if config.nonfinite_policy not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite_policy={config.nonfinite_policy!r} is not one of "
                         f"{', '.join(NONFINITE_POLICIES)}")
    if not isinstance(config.init_from, str):
        raise ValueError(f"init_from={config.init_from!r} must be a checkpoint path or ''")
    if config.init_from and "://" not in config.init_from and not os.path.exists(
            os.path.expanduser(config.init_from)):
        raise ValueError(f"init_from={config.init_from!r} does not exist; give a run's workdir, "
                         "its checkpoints/ directory or one checkpoints/<step> directory")


def _check_pseudo_to_real(config) -> None:
    sec = p2r.section(config)
    s = int(sec.switch_step)
    if s < 0 or s >= config.total_steps:
        raise ValueError(f"pseudo_to_real.switch_step={s} must be in [0, total_steps="
                         f"{config.total_steps}) (0 = never delink)")
    if s and not config.model.share_layers:
        raise ValueError(f"pseudo_to_real.switch_step={s} needs model.share_layers=True "
                         "(the Pseudo stage that shares one block's weights); set it, or "
                         "pseudo_to_real.switch_step=0 for a plain Real run")
    if sec.optimizer not in p2r.OPTIMIZER_MODES:
        raise ValueError(f"pseudo_to_real.optimizer={sec.optimizer!r} is not one of "
                         f"{', '.join(p2r.OPTIMIZER_MODES)}")
    p2r.check_handoff(config)
    if sec.lr_schedule not in p2r.LR_MODES:
        raise ValueError(f"pseudo_to_real.lr_schedule={sec.lr_schedule!r} is not one of "
                         f"{', '.join(p2r.LR_MODES)}")
    sw = p2r.switch_warmup_steps(config)
    if sw < 0:
        raise ValueError(f"pseudo_to_real.switch_warmup_steps={sw} must be >= 0 (0 = no "
                         "re-warmup at the switch)")
    if s and s + sw > config.total_steps:
        raise ValueError(f"pseudo_to_real.switch_warmup_steps={sw} runs past total_steps="
                         f"{config.total_steps} (switch_step={s}); make it at most "
                         f"{config.total_steps - s}")
    w = int(sec.restart_warmup_steps)
    if s and sec.lr_schedule == "restart" and not 0 <= w < config.total_steps - s:
        raise ValueError(f"pseudo_to_real.restart_warmup_steps={w} must be in [0, total_steps"
                         f" - switch_step = {config.total_steps - s})")


IMAGE_ENCODERS = ("patches", "resnet")


def validate_image_encoder(config, sizes) -> None:
    """model.image_encoder and the ResNet's widths against the data and the mesh."""
    m = config.model
    encoder = m.image_encoder
    if encoder not in IMAGE_ENCODERS:
        raise ValueError(f"model.image_encoder={encoder!r} is not one of {', '.join(IMAGE_ENCODERS)}")
    if encoder != "resnet":
        return
    p = int(config.data.patch_size)
    if p & (p - 1):
        raise ValueError(f"model.image_encoder='resnet' downsamples by 2 per stage: "
                         f"data.patch_size={p} must be a power of 2")
    width = int(m.resnet_width)
    if width <= 0 or width % sizes["fsdp"]:
        raise ValueError(f"model.resnet_width={width} must be positive and divisible by "
                         f"mesh.fsdp={sizes['fsdp']} (its channels shard like embed)")
    if int(m.resnet_blocks) <= 0:
        raise ValueError(f"model.resnet_blocks={m.resnet_blocks} must be positive")