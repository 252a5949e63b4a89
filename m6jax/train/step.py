"""Jitted train and eval steps with explicit in/out shardings."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from m6jax import sharding, streamed_update
from m6jax.train import moe_metrics
from m6jax.train.losses import text_loss


def make_train_step(model, tx, mesh, state_shardings, num_tasks: int, lr_schedule=None,
                    offload=None):
    """Returns `step(state, batch) -> (state, metrics)`, jitted and donating the state.

    `model` is the training-mode module (dropout on if configured). Metrics are scalars
    plus per-task vectors, all replicated. The loss optimised adds the MoE aux losses;
    the `loss` metric stays the text cross-entropy. With an active `offload` plan
    (`m6jax.offload.OffloadPlan`) the step takes and returns the state in its stored
    layout (offloaded layers in host memory) and `state_shardings` are ignored: a
    streamed stack's units come to the device one at a time inside the layer scan and
    the update (`m6jax.streamed_update`); a Pseudo stack (one unit) comes in whole.
    """
    model = model.clone(training=True)  # MoE: training capacity factor, router jitter
    streamed = offload is not None and offload.streamed

    def train_step(state, batch):
        if offload is not None:
            state = offload.resident(state)
        rng = jax.random.wrap_key_data(state.rng)
        rng, dropout_rng = jax.random.split(rng)
        dropout_rng = jax.random.fold_in(dropout_rng, state.step)

        def loss_fn(params):
            with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
                logits, inter = model.apply({"params": params}, batch, mutable=["intermediates"],
                                            rngs={"dropout": dropout_rng})
            loss, aux = text_loss(logits, batch, num_tasks)
            moe_loss, moe_aux = moe_metrics.aux_loss_and_metrics(
                model.cfg, inter.get("intermediates", {}))
            return loss + moe_loss, (loss, aux, moe_aux)

        (_, (loss, aux, moe_aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if streamed:
            grad_norm = streamed_update.global_norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            params, opt_state = streamed_update.update(tx, grads, state.opt_state, state.params,
                                                       grad_norm, finite)
        else:
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # a NaN/inf gradient => norm
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                             (params, opt_state), (state.params, state.opt_state))
        nonfinite_steps = state.nonfinite_steps + (~finite).astype(jnp.int32)
        metrics = dict(loss=loss, grad_norm=grad_norm, finite=finite,
                       nonfinite_steps=nonfinite_steps, **aux, **moe_aux)
        if lr_schedule is not None:
            metrics["learning_rate"] = lr_schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  rng=jax.random.key_data(rng), nonfinite_steps=nonfinite_steps)
        return new_state, metrics

    batch_sh = sharding.batch_sharding(mesh)
    if offload is not None and offload.active:
        state_shardings = offload.stored_shardings
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sh),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def make_eval_step(model, mesh, param_shardings, num_tasks: int):
    """Returns `eval_step(params, batch) -> aux` of summed losses and token counts."""
    def eval_step(params, batch):
        with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            logits = model.apply({"params": params}, batch)
        return text_loss(logits, batch, num_tasks)[1]

    return jax.jit(eval_step, in_shardings=(param_shardings, sharding.batch_sharding(mesh)))
