"""Refuse bad configs before anything is compiled, with the field to fix in the message."""
from __future__ import annotations

import os

from m6jax import kernels, offload, pipeline, schema, sharding
from m6jax import pseudo_to_real as p2r
from m6jax.data.config import data_settings, validate_data_config
from m6jax.model import build, resnet, sparse
from m6jax.model.moe import checks as moe_checks
from m6jax.model.moe import moe_config
from m6jax.t2i import vocab as t2i_vocab
from m6jax.train import optim
from m6jax.train.profile import parse_profile_steps

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


def validate_config(config, num_devices: int, check_files: bool = True) -> tuple[int, ...]:
    """The one validation pass, before anything is built: each section checked by the
    module that owns it, in this order; returns the resolved mesh shape.

      schema (every field present) -> mesh (sharding) -> model (model/build) ->
      attention (model/sparse, kernels) -> vocabulary (t2i/vocab, or data = model) -> run fields
      (here: batch, steps, profiling, checkpointing) -> MoE (model/moe/checks) -> image
      encoder (model/resnet) -> pipeline -> optimizer (train/optim, loss_scale) ->
      Pseudo-to-Real -> offload -> data (data/config: fields, then the files' globs
      unless `check_files` is False: the dry run plans a config whose data is elsewhere,
      and then a text-to-image config without its tokenizer checkpoint too).
    """
    schema.check_complete(config)
    shape = sharding.resolve_mesh_shape(config.mesh, num_devices)
    sizes = dict(zip(sharding.MESH_AXES, shape))
    build.validate(config, sizes)
    sparse.validate(config)
    kernels.validate(config)
    if t2i_vocab.enabled(config):  # image codes appended: vocab_size is text + codes
        if check_files or t2i_vocab.vq_from(config):  # a dry run may plan without the tokenizer
            t2i_vocab.validate(config)
    elif config.model.vocab_size != config.data.vocab_size:
        raise ValueError(f"model.vocab_size={config.model.vocab_size} differs from "
                         f"data.vocab_size={config.data.vocab_size}; set data.vocab_size "
                         "(both follow it)")
    _validate_run(config, sizes)
    moe_checks.validate(config, sizes)
    resnet.validate(config, sizes)
    moe = moe_config(config.model)
    units = config.model.num_layers // (int(moe.every) if moe is not None else 1)
    pipeline.validate(config, sizes, units)
    optim.validate(config, sizes)
    p2r.validate(config)
    offload.validate(config, sizes)
    if check_files:
        validate_data_config(config)
    else:
        data_settings(config)
    return shape


def _validate_run(config, sizes: dict[str, int]) -> None:
    """The run's own (top-level) fields."""
    if int(config.batch_size) <= 0:
        raise ValueError(f"batch_size={config.batch_size} must be positive (the global batch)")
    if int(config.seed) < 0:
        raise ValueError(f"seed={config.seed} must be >= 0")
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if config.batch_size % shards:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by mesh.data*mesh.fsdp*"
                         f"mesh.expert={shards}")
    window = parse_profile_steps(config.profile_steps)
    if window and window[1] > config.total_steps:
        raise ValueError(f"config.profile_steps={config.profile_steps!r} ends after "
                         f"total_steps={config.total_steps}")
    for f in ("total_steps", "log_every", "eval_every"):
        if int(config[f]) <= 0:
            raise ValueError(f"{f}={config[f]} must be positive")
    for f in ("peak_tflops_per_device", "num_caption_samples"):
        if config[f] < 0:
            raise ValueError(f"{f}={config[f]} must be >= 0")
    _check_checkpointing(config)


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
