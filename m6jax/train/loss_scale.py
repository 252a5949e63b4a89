"""Dynamic loss scaling for float16 compute (M6-T trained on V100s, which lack bf16).

float16's 5-bit exponent flushes small gradients to zero in the backward pass. The
step multiplies the loss by `scale` before differentiating, so the float16 cotangents
sit higher in the representable range, and divides the gradients by it in float32
before the optimizer sees them: a finite step's update is the unscaled one.

Dynamic rule (as in Micikevicius et al. 2018, "Mixed precision training"): a step whose
gradients are not finite is skipped (the train step's `finite` check) and the scale
halves, never below 1; after `period` consecutive finite steps the scale doubles. The
state, `{"scale": f32[], "good_steps": i32[]}`, is a TrainState field, so checkpoints
save and restore it. With scaling off the scale stays 1 and the step does not touch
the loss or the gradients at all.

Config (`optimizer` section): `loss_scale` ('auto' | 'dynamic' | 'none'),
`loss_scale_init`, `loss_scale_period`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MODES = ("auto", "dynamic", "none")
MIN_SCALE = 1.0


@dataclasses.dataclass(frozen=True)
class LossScale:
    """The resolved policy: `dynamic` (else off), the first scale, the growth period."""
    dynamic: bool
    init: float
    period: int


OFF = LossScale(dynamic=False, init=1.0, period=1)


def from_config(config) -> LossScale:
    """`optimizer.loss_scale` resolved: 'auto' is dynamic iff model.dtype == 'float16'."""
    o = config.optimizer
    mode = o.loss_scale
    if mode == "auto":
        mode = "dynamic" if config.model.dtype == "float16" else "none"
    if mode == "none":
        return OFF
    return LossScale(dynamic=True, init=float(o.loss_scale_init), period=int(o.loss_scale_period))


def init_state(policy: LossScale | None) -> dict:
    """The TrainState's `loss_scale` field at step 0 (scale 1 when scaling is off)."""
    scale = policy.init if policy is not None and policy.dynamic else 1.0
    return dict(scale=jnp.asarray(scale, jnp.float32), good_steps=jnp.zeros((), jnp.int32))


def unscale(grads, scale):
    """grads / scale, divided in float32 and cast back to each gradient's dtype."""
    return jax.tree.map(lambda g: (g.astype(jnp.float32) / scale).astype(g.dtype), grads)


def next_state(state: dict, finite, period: int) -> dict:
    """The dynamic rule: a non-finite step halves the scale (min 1) and resets the count;
    the `period`-th consecutive finite step doubles it (while it stays finite in
    float32) and resets the count."""
    scale, good = state["scale"], state["good_steps"] + 1
    grow = finite & (good >= period)
    doubled = jnp.where(jnp.isfinite(scale * 2.0), scale * 2.0, scale)
    scale = jnp.where(finite, jnp.where(grow, doubled, scale),
                      jnp.maximum(scale * 0.5, MIN_SCALE))
    good = jnp.where(finite & ~grow, good, 0)
    return dict(scale=scale.astype(jnp.float32), good_steps=good.astype(jnp.int32))


def validate(config) -> None:
    """The loss-scaling fields of the `optimizer` section."""
    o = config.optimizer
    if o.loss_scale not in MODES:
        raise ValueError(f"optimizer.loss_scale={o.loss_scale!r} is not one of "
                         f"{', '.join(MODES)}")
    if config.model.dtype == "float16" and o.loss_scale == "none":
        raise ValueError("model.dtype='float16' with optimizer.loss_scale='none': float16 "
                         "gradients underflow unscaled; set optimizer.loss_scale='dynamic' "
                         "(or 'auto'), or model.dtype='bfloat16'")
    if not o.loss_scale_init >= 1.0:
        raise ValueError(f"optimizer.loss_scale_init={o.loss_scale_init} must be >= 1")
    if int(o.loss_scale_period) < 1:
        raise ValueError(f"optimizer.loss_scale_period={o.loss_scale_period} must be >= 1 "
                         "(finite steps before the scale doubles)")
