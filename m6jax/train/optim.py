"""optax optimizers (AdamW or Adafactor) with linear warmup, cosine decay and global-norm
clipping.

`optimizer.name`:
  adamw      AdamW (b1, b2, weight_decay): two float moments per parameter.
  adafactor  optax's Adafactor with factored second moments (a row and a column vector
             per matrix) and no first moment: the memory-lean choice at trillion scale
             (M6-10T's state per parameter shrinks from 8 bytes to ~0). Two of optax's
             defaults are turned off because they take statistics over a *whole* leaf,
             and a stacked leaf holds every layer: the parameter-scale multiplier and the
             per-leaf update clipping would then mix the layers (and the stream of one
             unit at a time could not reproduce them). Global-norm clipping stays.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import optax

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
    import jax
    def decays(path, _):  # the innermost dict key is the parameter's name (boxes add more)
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return not names or names[-1] not in _NO_DECAY
    return jax.tree_util.tree_map_with_path(decays, params)


class ClippedOptimizer(NamedTuple):
    """An optax GradientTransformation (`init`, `update`) = clip_by_global_norm, then
    `core`. The parts are kept so that the streamed-offload update can clip with the
    norm of all gradients and then run `core` one offloaded unit at a time. The state is
    optax.chain's: (clip state, core state)."""
    init: Callable
    update: Callable
    core: Any
    max_norm: float


def make_core(opt_cfg, total_steps: int, schedule: optax.Schedule | None = None):
    """The optimizer without gradient clipping (elementwise per parameter), on `schedule`
    (of the optimizer's own step count), by default `learning_rate_schedule(opt_cfg,
    total_steps)`."""
    if schedule is None:
        schedule = learning_rate_schedule(opt_cfg, total_steps)
    if opt_cfg.get("name", "adamw") == "adafactor":
        return optax.adafactor(schedule, multiply_by_parameter_scale=False,
                               clipping_threshold=None, weight_decay_rate=opt_cfg.weight_decay,
                               weight_decay_mask=_decay_mask)
    return optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2,
                       weight_decay=opt_cfg.weight_decay, mask=_decay_mask)


def make_optimizer(opt_cfg, total_steps: int,
                   schedule: optax.Schedule | None = None) -> ClippedOptimizer:
    core = make_core(opt_cfg, total_steps, schedule)
    chain = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip_norm), core)
    return ClippedOptimizer(chain.init, chain.update, core, float(opt_cfg.grad_clip_norm))
