"""optax AdamW with linear warmup, cosine decay and global-norm clipping."""
from __future__ import annotations

import optax


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_cfg.learning_rate,
        warmup_steps=opt_cfg.warmup_steps, decay_steps=total_steps,
        end_value=opt_cfg.learning_rate * opt_cfg.end_lr_fraction)


def _decay_mask(params):
    # Weight decay on matrices only: norms, biases and the 1-D tables are left alone.
    import jax
    return jax.tree.map(lambda p: p.ndim >= 2 and p.shape[-1] > 2, params)


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(opt_cfg.grad_clip_norm),
        optax.adamw(learning_rate_schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2,
                    weight_decay=opt_cfg.weight_decay, mask=_decay_mask))
