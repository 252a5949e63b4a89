"""A short fine-tune loop built from the pretraining pieces (state, optimizer, step, mesh).

No checkpointing, resume or eval-during-training: fine-tune runs here take minutes, and
everything that makes the pretraining loop long-running would only add code paths.
"""
from __future__ import annotations

import time
from typing import Callable

import jax

from m6jax import checkpoint, distributed, sharding
from m6jax.model.build import build_model
from m6jax.train import loss_scale, optim
from m6jax.train.metrics import MetricsWriter, task_losses
from m6jax.train.state import abstract_train_state, create_train_state, dummy_batch
from m6jax.train.step import make_train_step


def example_batch(config):
    """Zeros shaped like one global batch of `config` (init and abstract shapes)."""
    d = config.data
    num_patches = (d.image_size // d.patch_size) ** 2
    return dummy_batch(config.batch_size, num_patches, d.patch_size ** 2 * d.image_channels,
                       d.text_len)


def finetune(config, mesh, batch_fn: Callable[[int], dict], task_names, workdir: str,
             init_from: str | None, name: str = "",
             adaptation=None) -> tuple[object, object, dict]:
    """Trains `config.total_steps` AdamW steps on `batch_fn(step)` batches.

    `adaptation` (`peft.Adaptation`, None = full) lora / prompt: only the adapter trains
    (`adapt_loop`, the text loss), it is saved under WORKDIR/adapter and the stats add
    its bytes; lora returns the merged params, prompt the pair (base, prompt).

    Args:
      config: a run config (`pretrained.run_config`).
      batch_fn: step -> this host's rows of the global batch, in the pretraining layout
        (`m6jax.data.pipeline`); `task_id` indexes `task_names`.
      init_from: a checkpoint step dir whose params start the run, or None (random init
        from config.seed: the from-scratch control).
      workdir: metrics.jsonl goes here.
    Returns:
      (params, param_shardings, stats) with stats = final_train_loss, step_ms, train_s.
    """
    if adaptation is not None and adaptation.frozen_base:
        return _finetune_adapter(config, mesh, batch_fn, task_names, workdir, init_from, name,
                                 adaptation)
    t0 = time.time()
    train_model = build_model(config, deterministic=config.model.dropout_rate == 0.0)
    tx = optim.make_optimizer(config.optimizer, config.total_steps)
    example = example_batch(config)
    scaling = loss_scale.from_config(config)
    state, state_sh = create_train_state(train_model, tx, example, mesh, config.seed,
                                         loss_scale=scaling)
    if init_from:
        state = state.replace(params=load_params(config, mesh, init_from))
    train_step = make_train_step(train_model, tx, mesh, state_sh, len(task_names),
                                 loss_scale=scaling)

    main = jax.process_index() == 0
    writer = MetricsWriter(workdir, enabled=main, tensorboard=False)
    t_mark, mark_step, loss = None, 0, float("nan")
    with jax.set_mesh(mesh), writer.closed_on_error():
        for step in range(config.total_steps):
            state, metrics = train_step(state, sharding.global_batch(mesh, batch_fn(step)))
            done = step + 1
            if t_mark is None:  # the first step includes compilation: time from its end
                jax.block_until_ready(metrics)
                t_mark, mark_step = time.time(), done
            if done % config.log_every == 0 or done == config.total_steps:
                m = distributed.fetch(metrics)
                loss = float(m["loss"])
                step_s = (time.time() - t_mark) / max(done - mark_step, 1)
                scalars = dict(loss=loss, grad_norm=float(m["grad_norm"]),
                               learning_rate=float(m["learning_rate"]), step_s=step_s)
                scalars.update(task_losses(m, task_names))
                writer.write(done, scalars)
                if main:
                    tasks = " ".join(f"{t} {scalars[f'loss/{t}']:.3f}" for t in task_names
                                     if f"loss/{t}" in scalars and len(task_names) > 1)
                    eta_s = step_s * (config.total_steps - done)
                    print(f"[{name}] step {done:>5}/{config.total_steps} | loss {loss:.4f} | "
                          f"{tasks + ' | ' if tasks else ''}lr {scalars['learning_rate']:.2e} | "
                          f"{1000 * step_s:.0f} ms/step | eta {eta_s:.0f} s", flush=True)
    writer.close()
    timed = config.total_steps - mark_step
    stats = dict(final_train_loss=loss,
                 step_ms=1000 * (time.time() - t_mark) / timed if timed else float("nan"),
                 train_s=time.time() - t0)
    return state.params, state_sh.params, stats


def _finetune_adapter(config, mesh, batch_fn, task_names, workdir, init_from, name, adaptation):
    from m6jax.finetune import adapt_loop, peft
    from m6jax.train.losses import text_loss

    def loss_fn(logits, hidden, batch):
        del hidden
        return text_loss(logits, batch, len(task_names))[0], {}

    base = load_params(config, mesh, init_from)
    base, trainable = adapt_loop.init_trainable(adaptation, base, mesh, config.seed)
    model = build_model(config, deterministic=config.model.dropout_rate == 0.0)
    trainable, stats = adapt_loop.train(config, mesh, model, adaptation, base, trainable,
                                        batch_fn, loss_fn, workdir, name)
    stats.update(peft.summary(adaptation, base, trainable, workdir, init_from))
    if adaptation.method == "prompt":
        params = (base, trainable)
    else:
        with jax.set_mesh(mesh):
            params = jax.jit(adaptation.merge, out_shardings=shardings_of(base))(base, trainable)
    return params, shardings_of(params), stats


def load_params(config, mesh, step_dir: str):
    """The params of checkpoint `step_dir`, placed in this mesh's shardings.

    Shapes come from the run config, i.e. the pretraining config stored in that same
    checkpoint, so they match by construction.
    """
    model = build_model(config)
    tx = optim.make_optimizer(config.optimizer, config.total_steps)
    abstract, _ = abstract_train_state(model, tx, example_batch(config), mesh, config.seed)
    return checkpoint.load_params(step_dir, abstract.params)


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def host_rows(config) -> range:
    """Global row indices of the batch that this process builds."""
    per_host = config.batch_size // jax.process_count()
    return range(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)

