"""optax AdamW with linear warmup, cosine decay and global-norm clipping."""
from __future__ import annotations

import optax


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


def make_optimizer(opt_cfg, total_steps: int,
                   schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
    """AdamW on `schedule` (of the optimizer's own step count), by default
    `learning_rate_schedule(opt_cfg, total_steps)`."""
    if schedule is None:
        schedule = learning_rate_schedule(opt_cfg, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(opt_cfg.grad_clip_norm),
        optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2,
                    weight_decay=opt_cfg.weight_decay, mask=_decay_mask))
