"""A fine-tune loop for any `Adaptation` and any loss over the model's outputs.

The pretraining train step (`loop.finetune`) optimises every parameter against the text
loss; this one optimises only `trainable` (the whole model under method=full, else a
LoRA adapter or a prompt) against `loss_fn`, which sees the logits *and* the last
hidden states (a contrastive objective pools them). The base is an argument of the
jitted step that is neither differentiated nor donated: it cannot change, and the
optimizer state is the trainable tree's alone.
"""
from __future__ import annotations

import time
from typing import Callable

import flax.linen as nn
import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from m6jax import distributed, sharding
from m6jax.finetune.peft import Adaptation
from m6jax.train import optim
from m6jax.train.metrics import MetricsWriter


def init_trainable(adaptation: Adaptation, base, mesh, seed: int):
    """(base for the step, trainable): full -> ({}, base); else (base, a replicated
    adapter) -- adapters are small, so every device holds all of one."""
    if not adaptation.frozen_base:
        return {}, base
    replicated = NamedSharding(mesh, PartitionSpec())
    with jax.set_mesh(mesh):
        trainable = jax.jit(lambda b: adaptation.init(b, jax.random.key(seed)),
                            out_shardings=replicated)(base)
    return base, trainable


def make_step(model, adaptation: Adaptation, tx, loss_fn: Callable):
    """`step(trainable, opt_state, base, batch) -> (trainable, opt_state, metrics)`.

    loss_fn(logits [B, T, V], hidden [B, P + T, D], batch) -> (loss, {name: scalar}).
    """
    def step(trainable, opt_state, base, batch):
        def objective(t):
            with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
                logits, hidden, _ = adaptation.apply(model, base, t, batch)
            return loss_fn(logits, hidden, batch)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        updates, new_opt = tx.update(grads, opt_state, trainable)
        metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                       learning_rate=tx.schedule(optim.schedule_count(opt_state)), **aux)
        return optax.apply_updates(trainable, updates), new_opt, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def train(config, mesh, model, adaptation: Adaptation, base, trainable,
          batch_fn: Callable[[int], dict], loss_fn: Callable, workdir: str, name: str = ""):
    """`config.total_steps` steps on `batch_fn(step)` (this host's rows) -> (trainable, stats)."""
    t0 = time.time()
    tx = optim.make_optimizer(config.optimizer, config.total_steps)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init)(trainable)
    step_fn = make_step(model, adaptation, tx, loss_fn)
    main = jax.process_index() == 0
    writer = MetricsWriter(workdir, enabled=main, tensorboard=False)
    t_mark, mark_step, loss = None, 0, float("nan")
    with jax.set_mesh(mesh), writer.closed_on_error():
        for step in range(config.total_steps):
            batch = sharding.global_batch(mesh, batch_fn(step))
            trainable, opt_state, metrics = step_fn(trainable, opt_state, base, batch)
            done = step + 1
            if t_mark is None:  # the first step includes compilation: time from its end
                jax.block_until_ready(metrics)
                t_mark, mark_step = time.time(), done
            if done % config.log_every == 0 or done == config.total_steps:
                scalars = {k: float(v) for k, v in distributed.fetch(metrics).items()}
                loss = scalars["loss"]
                scalars["step_s"] = (time.time() - t_mark) / max(done - mark_step, 1)
                writer.write(done, scalars)
                if main:
                    print(f"[{name}] step {done:>5}/{config.total_steps} | loss {loss:.4f} | "
                          f"lr {scalars['learning_rate']:.2e} | "
                          f"{1000 * scalars['step_s']:.0f} ms/step", flush=True)
    writer.close()
    timed = config.total_steps - mark_step
    stats = dict(final_train_loss=loss,
                 step_ms=1000 * (time.time() - t_mark) / timed if timed else float("nan"),
                 train_s=time.time() - t0)
    return trainable, stats
