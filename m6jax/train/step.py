"""Jitted train and eval steps with explicit in/out shardings."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from m6jax import sharding, streamed_update
from m6jax.train import loss_scale as loss_scale_lib
from m6jax.train import moe_metrics, optim
from m6jax.train.losses import text_loss


_ROUNDING_STREAM = 0x5352  # folds the stochastic-rounding key out of the dropout key
_ACCUM_DTYPE = jnp.float32  # accumulated gradients, whatever the parameter dtype


def make_train_step(model, tx, mesh, state_shardings, num_tasks: int, offload=None,
                    grad_accum_steps: int = 1, loss_scale=None):
    """Returns `step(state, batch) -> (state, metrics)`, jitted and donating the state.

    `model` is the training-mode module (dropout on if configured). Metrics are scalars
    plus per-task vectors, all replicated. The loss optimised adds the MoE aux losses;
    the `loss` metric stays the text cross-entropy. With an active `offload` plan
    (`m6jax.offload.OffloadPlan`) the step takes and returns the state in its stored
    layout (offloaded layers in host memory) and `state_shardings` are ignored: a
    streamed stack's units come to the device one at a time inside the layer scan and
    the update (`m6jax.streamed_update`); a Pseudo stack (one unit) comes in whole.

    With `grad_accum_steps` N > 1 the batch is split into N microbatches (rows j, j+N,
    ... form microbatch j, so each device keeps its own rows) that a scan inside the step
    runs one at a time, summing their gradients; the text loss is each microbatch's
    summed cross-entropy over the whole batch's target tokens, so loss and gradients are
    the large batch's. MoE aux losses and metrics are the microbatches' mean; gradients
    are summed in float32 whatever the parameter dtype.

    The `learning_rate` metric is the one this step applies: `tx.schedule` at the
    optimizer's own schedule count, which a skipped (non-finite) step does not advance.
    Low-precision (bfloat16) master weights take their update by stochastic rounding
    (`optim.apply_updates`), with a key drawn from the state's RNG and the step.

    With a dynamic `loss_scale` (`m6jax.train.loss_scale.LossScale`; None = off) the
    objective is multiplied by `state.loss_scale["scale"]` before differentiating and the
    gradients divided by it in float32 before clipping and the update (streamed ones unit
    by unit); a non-finite step is skipped as ever, and the scale follows the dynamic rule.
    """
    model = model.clone(training=True)  # MoE: training capacity factor, router jitter
    streamed = offload is not None and offload.streamed
    dynamic = loss_scale is not None and loss_scale.dynamic

    def train_step(state, batch):
        if offload is not None:
            state = offload.resident(state)
        rng = jax.random.wrap_key_data(state.rng)
        rng, dropout_rng = jax.random.split(rng)
        dropout_rng = jax.random.fold_in(dropout_rng, state.step)
        round_rng = jax.random.fold_in(dropout_rng, _ROUNDING_STREAM)

        def loss_fn(params, batch=batch, rng=dropout_rng):
            with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
                logits, inter = model.apply({"params": params}, batch, mutable=["intermediates"],
                                            rngs={"dropout": rng})
            loss, aux = text_loss(logits, batch, num_tasks)
            moe_loss, moe_aux = moe_metrics.aux_loss_and_metrics(
                model.cfg, inter.get("intermediates", {}))
            objective = loss + moe_loss
            return objective * scale if dynamic else objective, (loss, aux, moe_aux)

        scale = state.loss_scale["scale"]  # f32; 1 and unused when scaling is off
        if grad_accum_steps > 1:
            loss, aux, moe_aux, grads = _accumulate(loss_fn, state.params, batch, dropout_rng,
                                                    grad_accum_steps, scale if dynamic else None)
        else:
            (_, (loss, aux, moe_aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params)
        if streamed:  # offloaded gradients are unscaled unit by unit inside the update
            grad_norm = streamed_update.global_norm(grads)
            if dynamic:
                grad_norm = grad_norm / scale
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            params, opt_state = streamed_update.update(tx, grads, state.opt_state, state.params,
                                                       grad_norm, finite, round_rng,
                                                       scale if dynamic else None)
        else:
            if dynamic:
                grads = loss_scale_lib.unscale(grads, scale)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optim.apply_updates(state.params, updates, round_rng)
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # a NaN/inf gradient => norm
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                             (params, opt_state), (state.params, state.opt_state))
        nonfinite_steps = state.nonfinite_steps + (~finite).astype(jnp.int32)
        new_scale = (loss_scale_lib.next_state(state.loss_scale, finite, loss_scale.period)
                     if dynamic else state.loss_scale)
        metrics = dict(loss=loss, grad_norm=grad_norm, finite=finite,
                       nonfinite_steps=nonfinite_steps, loss_scale=scale, **aux, **moe_aux)
        count = optim.schedule_count(state.opt_state)
        if count is not None:
            metrics["learning_rate"] = tx.schedule(count)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  rng=jax.random.key_data(rng), nonfinite_steps=nonfinite_steps,
                                  loss_scale=new_scale)
        return new_state, metrics

    batch_sh = sharding.batch_sharding(mesh)
    if offload is not None and offload.active:
        state_shardings = offload.stored_shardings
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sh),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def _accumulate(loss_fn, params, batch, rng, n: int, scale=None):
    """(loss, aux, MoE aux, grads) of the whole batch from `n` microbatches in a scan;
    with a loss `scale` the summed gradients are of the scaled objective (still scaled)."""
    total = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]),
                                                0, 1), batch)           # [n, B / n, ...]

    def scaled(params, mb, key):
        _, (loss, aux, moe_aux) = loss_fn(params, mb, key)
        moe_loss = moe_aux.get(moe_metrics.PREFIX + "aux_loss", 0.0)
        objective = aux["loss_sum"] / total + moe_loss / n
        return objective if scale is None else objective * scale, (aux, moe_aux)

    def body(acc, xs):
        mb, j = xs
        (_, out), g = jax.value_and_grad(scaled, has_aux=True)(params, mb,
                                                              jax.random.fold_in(rng, j))
        return jax.tree.map(lambda a, b: a + b.astype(_ACCUM_DTYPE), acc, g), out

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, _ACCUM_DTYPE), params)
    grads, (auxs, moe_auxs) = jax.lax.scan(body, zeros, (micro, jnp.arange(n)))
    aux = jax.tree.map(lambda x: x.sum(0), auxs)
    moe_aux = jax.tree.map(lambda x: x.mean(0), moe_auxs)
    return aux["loss_sum"] / total, aux, moe_aux, grads


def make_eval_step(model, mesh, param_shardings, num_tasks: int, offload=None):
    """Returns `eval_step(params, batch) -> aux` of summed losses and token counts.

    With an active `offload` plan the step takes the params in their stored layout
    (`param_shardings` ignored): a streamed stack runs `scan_units`, one unit's weights
    on the device at a time, as in the train step; a Pseudo stack comes in whole."""
    if offload is not None and offload.active:
        param_shardings = offload.stored_shardings.params

    def eval_step(params, batch):
        if offload is not None:
            params = offload.resident_params(params)
        with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            logits = model.apply({"params": params}, batch)
        return text_loss(logits, batch, num_tasks)[1]

    return jax.jit(eval_step, in_shardings=(param_shardings, sharding.batch_sharding(mesh)))
