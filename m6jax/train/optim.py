"""optax optimizers (AdamW or Adafactor) with linear warmup, cosine decay, global-norm
clipping, and one convention for both.

The update of every optimizer is AdamW's: `p <- p - lr_t * (u + wd * p)`, where `u` is
the optimizer's direction (Adam's m / sqrt(v), Adafactor's g / sqrt(v_hat)) and the
decoupled weight decay `wd` is scaled by the same schedule, so a learning rate of 0
(the start of warmup) moves nothing. optax's `adafactor(weight_decay_rate=wd)` adds
`wd * p` *after* the learning-rate scaling (`-(lr * u + wd * p)`): with wd = 0.01 it
removed 1% of every weight per step, warmup included (m6.py:tiny, 300 steps: caption
accuracy 6.5% vs AdamW's 75.3%). Both optimizers are therefore chained here from the
same optax parts: direction, `add_decayed_weights`, `scale_by_learning_rate`.

`optimizer.name`:
  adamw      AdamW (b1, b2, weight_decay): two float moments per parameter.
  adafactor  Adafactor (Shazeer & Stern 2018) with factored second moments (a row and a
             column vector per matrix of at least `min_dim_size_to_factor` on both
             factored dims) and no first moment: the memory-lean choice at trillion
             scale (M6-10T's state per parameter shrinks from 8 bytes to ~0). The
             second-moment decay is the paper's 1 - t**-decay_rate (0.8). The paper's
             parameter-scale multiplier and per-leaf update clipping are left out: they
             take statistics over a *whole* leaf, and a stacked leaf holds every layer
             (and the stream of one unit at a time could not reproduce them).

The optimizer always works in float32: it is initialised from and updates float32 views
of the parameters and gradients, so its state (Adam's moments, Adafactor's factors) is
float32 whatever `model.param_dtype` is. Low-precision master weights (bfloat16) take
the new value by stochastic rounding (`apply_updates`), so an update smaller than half
a bfloat16 ulp still moves the weight in expectation instead of vanishing.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from m6jax.train import loss_scale

NAMES = ("adamw", "adafactor")


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_cfg.learning_rate,
        warmup_steps=opt_cfg.warmup_steps, decay_steps=total_steps,
        end_value=opt_cfg.learning_rate * opt_cfg.end_lr_fraction)


_NO_DECAY = ("scale", "bias")


def _decay_mask(params):
    # Weight decay on weight matrices and embedding tables, not on norm scales or biases.
    # By name, not by rank: a scanned stack gives a norm scale a `layers` dimension, and
    # the Pseudo and Real models of Pseudo-to-Real must decay the same leaves.
    def decays(path, _):  # the innermost dict key is the parameter's name (boxes add more)
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return not names or names[-1] not in _NO_DECAY
    return jax.tree_util.tree_map_with_path(decays, params)


class ClippedOptimizer(NamedTuple):
    """An optax GradientTransformation (`init`, `update`) = clip_by_global_norm, then
    `core`. The parts are kept so that the streamed-offload update can clip with the
    norm of all gradients and then run `core` one offloaded unit at a time. The state is
    optax.chain's: (clip state, core state). `schedule` is the learning rate as a
    function of the optimizer's schedule count (`schedule_count`)."""
    init: Callable
    update: Callable
    core: Any
    max_norm: float
    schedule: optax.Schedule


def _float32(tree):
    return jax.tree.map(lambda x: x if x is None else jnp.asarray(x, jnp.float32), tree)


def in_float32(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` run on float32 views of params and gradients: state and updates in float32."""
    def init(params):
        return tx.init(_float32(params))

    def update(grads, state, params=None):
        return tx.update(_float32(grads), state, _float32(params))
    return optax.GradientTransformation(init, update)


def direction(opt_cfg) -> optax.GradientTransformation:
    """The optimizer's update direction `u` before weight decay and learning rate."""
    if opt_cfg.name == "adafactor":
        return optax.scale_by_factored_rms(
            factored=True, decay_rate=opt_cfg.decay_rate, epsilon=1e-30,
            min_dim_size_to_factor=opt_cfg.min_dim_size_to_factor)
    return optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=1e-8)


def make_core(opt_cfg, total_steps: int, schedule: optax.Schedule | None = None):
    """The optimizer without gradient clipping (elementwise per parameter), on `schedule`
    (of the optimizer's own step count), by default `learning_rate_schedule(opt_cfg,
    total_steps)`: direction, + wd * p, times -lr_t (the module docstring says why)."""
    schedule = schedule or learning_rate_schedule(opt_cfg, total_steps)
    return in_float32(optax.chain(
        direction(opt_cfg),
        optax.add_decayed_weights(opt_cfg.weight_decay, mask=_decay_mask),
        optax.scale_by_learning_rate(schedule)))


def make_optimizer(opt_cfg, total_steps: int,
                   schedule: optax.Schedule | None = None) -> ClippedOptimizer:
    schedule = schedule or learning_rate_schedule(opt_cfg, total_steps)
    core = make_core(opt_cfg, total_steps, schedule)
    chain = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip_norm), core)
    return ClippedOptimizer(chain.init, chain.update, core, float(opt_cfg.grad_clip_norm),
                            schedule)


def schedule_count(opt_state):
    """The learning-rate schedule's count inside an optimizer state (None if it has none):
    the step the next update's learning rate is taken at (a skipped step does not move
    it, so the applied learning rate is `schedule(schedule_count(state))`)."""
    kind = optax.ScaleByScheduleState
    found = [s.count for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, kind))
             if isinstance(s, kind)]
    return found[0] if found else None


def stochastic_round(x, dtype, key):
    """float32 `x` rounded to `dtype` (bfloat16) up or down at random, with the
    probability of rounding up equal to the distance to the lower neighbour in ulps:
    E[round(x)] = x. For bfloat16 (float32's upper 16 bits) that is adding 16 random bits
    below the kept ones and truncating."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        return x.astype(dtype)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) & jnp.uint32(0xFFFF)
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    out = jax.lax.bitcast_convert_type(rounded, jnp.float32)
    return jnp.where(jnp.isfinite(x), out, x).astype(dtype)  # inf/nan pass through


def apply_updates(params, updates, key=None):
    """`params + updates` computed in float32; float32 leaves take it as it is, lower
    precision leaves by `stochastic_round` (with `key`; nearest rounding without one)."""
    leaves, treedef = jax.tree.flatten(params)
    ups = treedef.flatten_up_to(updates)
    out = []
    for i, (p, u) in enumerate(zip(leaves, ups)):
        new = p.astype(jnp.float32) + u.astype(jnp.float32)
        if p.dtype == jnp.float32:
            out.append(new)
        elif key is None:
            out.append(new.astype(p.dtype))
        else:
            out.append(stochastic_round(new, p.dtype, jax.random.fold_in(key, i)))
    return jax.tree.unflatten(treedef, out)


def validate(config, sizes: dict[str, int]) -> None:
    """The `optimizer` section (its loss-scaling fields: `loss_scale.validate`)."""
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    o = config.optimizer
    if o.name not in NAMES:
        raise ValueError(f"optimizer.name={o.name!r} is not one of {', '.join(NAMES)}")
    accum = int(o.grad_accum_steps)
    if accum < 1 or config.batch_size % (accum * shards):
        raise ValueError(f"optimizer.grad_accum_steps={accum} must be >= 1 and its microbatches "
                         f"of batch_size={config.batch_size} / {accum} rows must divide by the "
                         f"{shards} batch shards (mesh.data*mesh.fsdp*mesh.expert)")
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
    if not 0.0 < o.decay_rate <= 1.0:
        raise ValueError(f"optimizer.decay_rate={o.decay_rate} must be in (0, 1] (Adafactor's "
                         "second-moment decay 1 - t**-decay_rate)")
    if int(o.min_dim_size_to_factor) < 1:
        raise ValueError(f"optimizer.min_dim_size_to_factor={o.min_dim_size_to_factor} must "
                         "be >= 1")
    loss_scale.validate(config)
    if not o.grad_clip_norm > 0:
        raise ValueError(f"optimizer.grad_clip_norm={o.grad_clip_norm} must be positive "
                         "(clipping by global norm; use a large value to clip nothing)")
