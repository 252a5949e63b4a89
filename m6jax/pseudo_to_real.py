"""Pseudo-to-Real sharing-delinking (M6-10T, Lin et al. 2021).

A run with `model.share_layers=True` starts as the Pseudo giant: the stack's block
parameters have no layer axis and every layer applies them. At
`pseudo_to_real.switch_step` the state is *delinked*: each shared leaf is copied into
every layer of the Real giant (a new leading `layers` axis), the optimizer state is
handed over as `optimizer` says, the result is re-sharded onto the Real layout and
training goes on with a re-jitted step, in the same process. The stage is saved in each
checkpoint's meta, so a run resumes on either side of the switch.

Config section `pseudo_to_real`:
  switch_step     step at which to delink (0 = never: a Pseudo run stays Pseudo)
  optimizer       scaled: the shared optimizer moments copied to every layer, AdamW's
                  first divided by L and its second by L**2, Adafactor's factored
                  second moments (row, column, unfactored) by L**2 (below) |
                  copy: the shared moments copied to every layer unscaled |
                  reinit: fresh moments (Adam's bias correction, Adafactor's decay
                  schedule start again)
  switch_warmup_steps  0, or a linear learning-rate re-warmup over that many steps
                  after the switch: the schedule is multiplied by min(1, (k + 1) / W) at
                  the k-th Real step (k = 0 at switch_step); with any `optimizer`
  lr_schedule     continue: the schedule goes on as if nothing happened |
                  restart: a fresh warmup + cosine over the steps left after the switch
  restart_warmup_steps   warmup of the restarted schedule

Why `scaled` divides by L and L**2. The Pseudo stack applies one weight w at L places
(L = the length of the layer scan: `num_layers`, or `num_layers / moe.every` for an MoE
stack, whose scanned unit is a group of `moe.every` layers with the MoE layer last), so
its gradient is the sum of the L per-place gradients, g = sum_l g_l. AdamW keeps
m = EMA(g) and v = EMA(g**2). Right after delinking every layer holds the same weights
and sees a similar signal, so take g_l ~ g / L: the first moment of one layer is then
EMA(g / L) = m / L, and its second moment EMA(g**2 / L**2) = v / L**2. The Adam step
m / sqrt(v) is unchanged by the scaling, so the first Real step equals what `copy`
would take; what changes is what follows. Under `copy` the new gradients are L times
smaller than the moments they are averaged into: m forgets its inherited L-fold excess
in ~1/(1 - b1) steps, v only in ~1/(1 - b2), and in between every update is about L
times too small (b2 = 0.98: v still holds 0.98**100 * L**2 ~ 19x a layer's own at
L = 12 after 100 steps). If the per-place gradients were uncorrelated, v's excess
would be L, not L**2; the L**2 of the correlated case is what the switch starts from
(identical weights). In an MoE stack the same share holds for every leaf of the scanned
unit, the experts' and the router's included: each is applied once per unit, so L is
the number of units, `num_layers / moe.every` (with every=2 and 12 layers, L = 6 for
the attention, the dense MLP, the router and the experts alike). In code, L is simply
the size of the `layers` axis the delinking adds to the leaf. Adam's step count (bias
correction) is kept under copy and scaled, restarted under reinit.

Adafactor (Shazeer & Stern 2018) keeps no first moment and factors the second: for a
matrix gradient G it holds R = EMA(row means of G**2) and C = EMA(column means of G**2)
and divides G by sqrt(V) with V = R C^T / mean(R) (a leaf it does not factor keeps the
full V = EMA(G**2)). With g_l ~ g / L every G**2 of a layer is G**2 / L**2, so its R
and C are the shared ones divided by L**2, and so is V (R / L**2 times C / L**2 over
mean(R) / L**2): `scaled` divides R, C and the unfactored V by L**2 alike. The first Real
update of a layer is then (g / L) / sqrt(V / L**2) = g / sqrt(V), the Pseudo weight's
own last update size; under `copy` it is g / L / sqrt(V), L times smaller, and stays
smaller until V forgets the shared statistics (Adafactor's decay 1 - t**-0.8 makes that
slower the later the switch). Adafactor's count (its decay schedule) is kept under copy
and scaled. An optimizer state the handoff has no rule for is refused at config time
(`check_handoff`).
"""
from __future__ import annotations

import contextlib
import copy

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.experimental.compute_on import compute_on

from m6jax.offload_layout import to_host
from m6jax.train import optim

STAGE_PSEUDO, STAGE_REAL = "pseudo", "real"
OPTIMIZER_MODES = ("copy", "scaled", "reinit")
LR_MODES = ("continue", "restart")


def section(config) -> ml_collections.ConfigDict:
    """The config's `pseudo_to_real` section (fields: m6jax/schema.py)."""
    return config.pseudo_to_real


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


def switch_warmup_steps(config) -> int:
    """`pseudo_to_real.switch_warmup_steps`."""
    return int(section(config).switch_warmup_steps)


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
    """(optax transform, lr schedule of the *global* step) for one stage of the run.

    The Real stage after a switch at step s may restart the schedule (`lr_schedule`:
    the optimizer's schedule count then starts at 0 at step s) and may re-warm it up
    (`switch_warmup_steps`: a linear ramp over the first Real steps, on top of either).
    """
    s = switch_step(config)
    after_switch = stage == STAGE_REAL and s is not None
    opt_cfg, horizon, offset = config.optimizer, config.total_steps, 0
    if after_switch and section(config).lr_schedule == "restart":
        opt_cfg = copy.deepcopy(config.optimizer)
        with opt_cfg.unlocked():
            opt_cfg.warmup_steps = int(section(config).restart_warmup_steps)
        horizon, offset = config.total_steps - s, s
    base = optim.learning_rate_schedule(opt_cfg, horizon)  # of the schedule's own count
    warmup = switch_warmup_steps(config) if after_switch else 0

    def schedule(count):  # count: the optimizer's schedule count = global step - offset
        if not warmup:
            return base(count)
        ramp = jnp.clip((count + offset - s + 1) / warmup, 0.0, 1.0)
        return base(count) * ramp

    return optim.make_optimizer(opt_cfg, horizon, schedule), lambda step: schedule(step - offset)


def delink_tree(shared_tree, real_abstract_tree, divide_by_layers_power: int = 0,
                on_host: bool = False):
    """Copies each shared leaf into every layer: a leaf that has one dimension fewer than
    its Real counterpart is broadcast along a new leading `layers` axis of size L (and
    divided by L**divide_by_layers_power: 1 for Adam's first moment, 2 for its second,
    under `scaled`); other leaves (embeddings, final norm, counters) are kept as they are.
    `on_host` (inside jit): the broadcast runs as host computation on a host copy of the
    shared leaf, so the L-layer stack is made in host memory only (offload)."""
    def broadcast(x, target):
        y = jnp.broadcast_to(x[None], target.shape).astype(target.dtype)
        if divide_by_layers_power:
            y = y / jnp.asarray(target.shape[0] ** divide_by_layers_power, target.dtype)
        return y

    def leaf(x, target):
        if x.ndim + 1 == len(target.shape) and tuple(target.shape[1:]) == tuple(x.shape):
            if not on_host:
                return broadcast(x, target)
            x = to_host(x)
            with compute_on("device_host"):
                return broadcast(x, target)
        if tuple(x.shape) != tuple(target.shape):
            raise ValueError(f"cannot delink a leaf of shape {x.shape} into {target.shape}: "
                             "the Pseudo and Real models differ in more than share_layers")
        return x
    return jax.tree.map(leaf, shared_tree, real_abstract_tree)


# How `scaled` divides each kind of per-parameter optimizer state: {field: power of L}.
_SCALED = {optax.ScaleByAdamState: dict(mu=1, nu=2),
           optax.FactoredState: dict(v_row=2, v_col=2, v=2)}
# The optimizers (optimizer.name) whose whole state `scaled` understands.
SCALED_OPTIMIZERS = ("adamw", "adafactor")


def validate(config) -> None:
    """The `pseudo_to_real` section."""
    sec = section(config)
    s = int(sec.switch_step)
    if s < 0 or s >= config.total_steps:
        raise ValueError(f"pseudo_to_real.switch_step={s} must be in [0, total_steps="
                         f"{config.total_steps}) (0 = never delink)")
    if s and not config.model.share_layers:
        raise ValueError(f"pseudo_to_real.switch_step={s} needs model.share_layers=True "
                         "(the Pseudo stage that shares one block's weights); set it, or "
                         "pseudo_to_real.switch_step=0 for a plain Real run")
    if sec.optimizer not in OPTIMIZER_MODES:
        raise ValueError(f"pseudo_to_real.optimizer={sec.optimizer!r} is not one of "
                         f"{', '.join(OPTIMIZER_MODES)}")
    check_handoff(config)
    if sec.lr_schedule not in LR_MODES:
        raise ValueError(f"pseudo_to_real.lr_schedule={sec.lr_schedule!r} is not one of "
                         f"{', '.join(LR_MODES)}")
    sw = switch_warmup_steps(config)
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


def check_handoff(config) -> None:
    """Refuses a `scaled` handoff of an optimizer whose state it has no rule for."""
    if switch_step(config) is None or section(config).optimizer != "scaled":
        return
    if config.optimizer.name not in SCALED_OPTIMIZERS:
        raise ValueError(f"pseudo_to_real.optimizer='scaled' has no rule for the state of "
                         f"optimizer.name={config.optimizer.name!r} (it scales "
                         f"{', '.join(SCALED_OPTIMIZERS)}); use pseudo_to_real.optimizer="
                         "'copy' or 'reinit'")


def delink_opt_state(shared_opt_state, real_abstract_opt_state, scaled: bool,
                     on_host: bool = False):
    """The shared optimizer state copied into every layer (`copy`), with each moment
    divided by its power of L (`_SCALED`) if `scaled` (the module docstring says why).
    Under `scaled` a per-parameter state of a kind without a rule is an error: copying it
    unscaled would silently be `copy`."""
    kinds = tuple(_SCALED)

    def node(s, target):
        if scaled and isinstance(s, kinds):
            powers = _SCALED[type(s)]
            return s._replace(**{f: delink_tree(getattr(s, f), getattr(target, f), k, on_host)
                                 for f, k in powers.items()})
        out = delink_tree(s, target, on_host=on_host)
        if scaled and _broadcasts(s, target):
            raise ValueError(f"pseudo_to_real.optimizer='scaled' has no rule for optimizer "
                             f"state {type(s).__name__}; use 'copy' or 'reinit'")
        return out
    return jax.tree.map(node, shared_opt_state, real_abstract_opt_state,
                        is_leaf=lambda s: isinstance(s, kinds) or _is_state_node(s))


def _is_state_node(s) -> bool:
    return isinstance(s, tuple) and hasattr(s, "_fields")


def _broadcasts(shared, real) -> bool:
    return any(x.ndim + 1 == len(t.shape) for x, t in
               zip(jax.tree.leaves(shared), jax.tree.leaves(real)))


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


def delink_params(pseudo_params, real_abstract_params, real_param_shardings,
                  on_host: bool = False):
    """Pseudo params -> Real params, placed with `real_param_shardings` (jitted); with
    `on_host` (offload) the stacks are broadcast on the host (`delink_tree`)."""
    fn = jax.jit(lambda p: delink_tree(p, real_abstract_params, on_host=on_host),
                 out_shardings=real_param_shardings)
    return fn(pseudo_params)


def delink_state(state, config, real_tx, real_abstract_state, real_shardings, plan=None):
    """`delink_state_fn(...)(state)`."""
    return delink_state_fn(config, real_tx, real_abstract_state, real_shardings, plan)(state)


def delink_state_fn(config, real_tx, real_abstract_state, real_shardings, plan=None):
    """The jitted function from the Pseudo TrainState to the Real one that continues it (
    re-sharded onto `real_shardings`, or with an active offload `plan` made straight
    into its stored layout: every delinked stack is broadcast on the host from the
    shared weights and split there, so no L-layer stack is made on the device).

    Params are copied into every layer, so the Real model's outputs equal the Pseudo
    model's at the switch. The optimizer state follows `pseudo_to_real.optimizer`
    (copy and scaled keep Adam's count; reinit starts its bias correction afresh); the
    learning-rate schedule count follows `pseudo_to_real.lr_schedule` (continue: the
    global step; restart: 0).
    """
    p2r = section(config)
    restart = p2r.lr_schedule == "restart"
    host = plan is not None and plan.active

    def delink(state):
        params = delink_tree(state.params, real_abstract_state.params, on_host=host)
        if p2r.optimizer in ("copy", "scaled"):
            opt_state = delink_opt_state(state.opt_state, real_abstract_state.opt_state,
                                         scaled=p2r.optimizer == "scaled", on_host=host)
            opt_state = _set_counts(opt_state, schedule_count=0 if restart else None)
        else:
            with compute_on("device_host") if host else contextlib.nullcontext():
                opt_state = real_tx.init(params)  # fresh zeros, in host memory if offloaded
            opt_state = _set_counts(opt_state, schedule_count=0 if restart else state.step)
        real = state.replace(params=params, opt_state=opt_state)
        return plan.store_on_host(real) if host else real

    out = plan.stored_shardings if host else real_shardings
    return jax.jit(delink, out_shardings=out)
