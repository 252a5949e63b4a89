"""Pseudo-to-Real sharing-delinking (M6-10T, Lin et al. 2021).

A run with `model.share_layers=True` starts as the Pseudo giant: the stack's block
parameters have no layer axis and every layer applies them. At
`pseudo_to_real.switch_step` the state is *delinked*: each shared leaf is copied into
every layer of the Real giant (a new leading `layers` axis), the optimizer state is
re-initialised or its moments copied the same way, the result is re-sharded onto the
Real layout and training goes on with a re-jitted step, in the same process. The stage
is saved in each checkpoint's meta, so a run resumes on either side of the switch.

Config section `pseudo_to_real`:
  switch_step     step at which to delink (0 = never: a Pseudo run stays Pseudo)
  optimizer       reinit: fresh AdamW moments for the Real model |
                  copy: the shared moments copied to every layer
  lr_schedule     continue: the schedule goes on as if nothing happened |
                  restart: a fresh warmup + cosine over the steps left after the switch
  restart_warmup_steps   warmup of the restarted schedule
"""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import ml_collections
import optax

from m6jax.train import optim

STAGE_PSEUDO, STAGE_REAL = "pseudo", "real"
OPTIMIZER_MODES = ("reinit", "copy")
LR_MODES = ("continue", "restart")


def defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(switch_step=0, optimizer="reinit",
                                          lr_schedule="continue", restart_warmup_steps=0))


def section(config) -> ml_collections.ConfigDict:
    """The config's `pseudo_to_real` section (defaults for configs written before it)."""
    return config.get("pseudo_to_real") or defaults()


def switch_step(config) -> int | None:
    """The step at which the run delinks, or None if it never does."""
    s = int(section(config).switch_step)
    return s if config.model.share_layers and s > 0 else None


def stage_at(config, step: int) -> str:
    """The stage of the model that trains step `step + 1` (state.step == `step`)."""
    if not config.model.share_layers:
        return STAGE_REAL
    s = switch_step(config)
    return STAGE_REAL if s is not None and step >= s else STAGE_PSEUDO


def stage_config(config, stage: str):
    """A copy of `config` whose model is that of `stage` (share_layers on for Pseudo)."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.model.share_layers = stage == STAGE_PSEUDO
    return c


def checkpoint_config(config, stage: str):
    """The config to rebuild the model a checkpoint of `stage` was saved from, for use
    outside training (generation, fine-tuning): a P2R run's config says share_layers=True
    even after the switch, so the stage decides, and nothing switches any more."""
    c = stage_config(config, stage)
    if "pseudo_to_real" in c:
        with c.unlocked():
            c.pseudo_to_real.switch_step = 0
    return c


def stage_optimizer(config, stage: str):
    """(optax transform, lr schedule of the *global* step) for one stage of the run."""
    s = switch_step(config)
    restart = (stage == STAGE_REAL and s is not None
               and section(config).lr_schedule == "restart")
    if not restart:
        return (optim.make_optimizer(config.optimizer, config.total_steps),
                optim.learning_rate_schedule(config.optimizer, config.total_steps))
    opt_cfg = copy.deepcopy(config.optimizer)
    with opt_cfg.unlocked():
        opt_cfg.warmup_steps = int(section(config).restart_warmup_steps)
    steps_left = config.total_steps - s
    schedule = optim.learning_rate_schedule(opt_cfg, steps_left)
    return optim.make_optimizer(opt_cfg, steps_left), lambda step: schedule(step - s)


def delink_tree(shared_tree, real_abstract_tree):
    """Copies each shared leaf into every layer: a leaf that has one dimension fewer than
    its Real counterpart is broadcast along a new leading `layers` axis; other leaves
    (embeddings, final norm, counters) are kept as they are."""
    def leaf(x, target):
        if x.ndim + 1 == len(target.shape) and tuple(target.shape[1:]) == tuple(x.shape):
            return jnp.broadcast_to(x[None], target.shape).astype(target.dtype)
        if tuple(x.shape) != tuple(target.shape):
            raise ValueError(f"cannot delink a leaf of shape {x.shape} into {target.shape}: "
                             "the Pseudo and Real models differ in more than share_layers")
        return x
    return jax.tree.map(leaf, shared_tree, real_abstract_tree)


def _set_counts(opt_state, adam_count=None, schedule_count=None):
    """Sets the step counters inside an optax chain's state (Adam bias correction and
    the learning-rate schedule count separately)."""
    def fix(s):
        if isinstance(s, optax.ScaleByAdamState) and adam_count is not None:
            return s._replace(count=jnp.asarray(adam_count, s.count.dtype))
        if isinstance(s, optax.ScaleByScheduleState) and schedule_count is not None:
            return s._replace(count=jnp.asarray(schedule_count, s.count.dtype))
        return s
    kinds = (optax.ScaleByAdamState, optax.ScaleByScheduleState)
    return jax.tree.map(fix, opt_state, is_leaf=lambda s: isinstance(s, kinds))


def delink_params(pseudo_params, real_abstract_params, real_param_shardings):
    """Pseudo params -> Real params, placed with the Real shardings (jitted)."""
    fn = jax.jit(lambda p: delink_tree(p, real_abstract_params),
                 out_shardings=real_param_shardings)
    return fn(pseudo_params)


def delink_state(state, config, real_tx, real_abstract_state, real_shardings):
    """The TrainState of the Real model that continues the Pseudo `state` (jitted,
    re-sharded onto `real_shardings`).

    Params are copied into every layer, so the Real model's outputs equal the Pseudo
    model's at the switch. The optimizer state follows `pseudo_to_real.optimizer`;
    with `reinit` Adam's bias correction starts afresh while the learning-rate schedule
    count follows `pseudo_to_real.lr_schedule` (continue: the global step; restart: 0).
    """
    p2r = section(config)
    restart = p2r.lr_schedule == "restart"

    def delink(state):
        params = delink_tree(state.params, real_abstract_state.params)
        if p2r.optimizer == "copy":
            opt_state = delink_tree(state.opt_state, real_abstract_state.opt_state)
            opt_state = _set_counts(opt_state, schedule_count=0 if restart else None)
        else:
            opt_state = _set_counts(real_tx.init(params),
                                    schedule_count=0 if restart else state.step)
        return state.replace(params=params, opt_state=opt_state)

    return jax.jit(delink, out_shardings=real_shardings)(state)
