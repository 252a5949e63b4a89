"""Training the image tokenizer: batches -> VQ-VAE step -> EMA codebook -> checkpoints.

A checkpoint (`WORKDIR/checkpoints/<step>`, m6jax.checkpoint, the same manager as
pretraining) holds `params` = the model's variables (the "params" and "vq" collections),
the optimizer state and the step; rerunning the same command resumes. Batches are a pure
function of (seed, step). At the end `summary.json` gets `vq_psnr` (held-out
reconstructions, dB), `codebook_usage` (share of the K codes used by the held-out
images), `codebook_perplexity` and `recon_mse`, and `reconstructions.png` shows pairs.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from m6jax import checkpoint
from m6jax.vq.data import TokenizerImages
from m6jax.vq.model import VQVAE, ema_update


def make_optimizer(config):
    o = config.optimizer
    schedule = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, o.warmup_steps,
                                                  config.total_steps, o.learning_rate * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def init_state(config, tx):
    model = VQVAE(config.vq)
    x = jnp.zeros((1, config.vq.image_size, config.vq.image_size, config.vq.image_channels))
    variables = model.init(jax.random.key(config.seed), x)
    variables = jax.tree.map(jnp.array, dict(variables))  # copies: embed_sum starts as the codebook
    return dict(params=variables, opt_state=tx.init(variables["params"]),
                step=jnp.zeros((), jnp.int32))


def data_mesh(batch_size: int, devices=None) -> jax.sharding.Mesh:
    """A 1-D `data` mesh over the most local devices that divide `batch_size`."""
    devices = list(devices or jax.devices())
    n = math.gcd(len(devices), int(batch_size))
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices[:n])


def make_step(config, tx, mesh=None):
    """The jitted step. With `mesh`, each device runs the model's forward and backward
    on its share of the images (`shard_map` over `data`; left to GSPMD the encoder's
    input was all-gathered onto every device in one of two compiles tried), the
    gradients and losses are averaged over devices (equal shares: the batch means), and
    the EMA codebook update runs replicated on the gathered codes and encodings."""
    model = VQVAE(config.vq)

    def forward_backward(variables, images):
        def loss_fn(params):
            _, loss, aux = model.apply({**variables, "params": params}, images)
            return loss, aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        scalars = dict(loss=loss, mse=aux["mse"], commitment=aux["commitment"])
        if mesh is not None:
            grads, scalars = jax.lax.pmean((grads, scalars), "data")
            aux = {n: jax.lax.all_gather(aux[n], "data", tiled=True) for n in ("z_e", "codes")}
        return grads, scalars, aux["z_e"], aux["codes"]

    if mesh is not None:
        forward_backward = jax.shard_map(forward_backward, mesh=mesh,
                                         in_specs=(P(), P("data")), out_specs=P(),
                                         check_vma=False)

    def step(state, images, key):
        variables = state["params"]
        grads, scalars, z_e, codes = forward_backward(variables, images)
        updates, opt_state = tx.update(grads, state["opt_state"], variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        vq = ema_update(variables["vq"], z_e, codes, key, config.vq.ema_decay)
        k = config.vq.codebook_size
        used = jnp.mean(jnp.zeros(k).at[codes.reshape(-1)].set(1.0))
        metrics = dict(scalars, batch_usage=used)
        return dict(params=dict(params=params, vq=vq), opt_state=opt_state,
                    step=state["step"] + 1), metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(step, in_shardings=(rep, rows, rep), out_shardings=(rep, rep),
                   donate_argnums=0)


def evaluate(config, variables, images: np.ndarray, batch: int = 256) -> dict:
    """Held-out metrics of a tokenizer: vq_psnr (dB, mean over images), recon_mse,
    codebook_usage (distinct codes used / K), codebook_perplexity."""
    model = VQVAE(config.vq)

    @jax.jit
    def run(x):
        codes = model.apply(variables, x, method=VQVAE.tokenize)
        return codes, model.apply(variables, codes, method=VQVAE.decode)

    codes, recons = [], []
    for i in range(0, len(images), batch):
        c, r = run(images[i:i + batch])
        codes.append(np.asarray(c))
        recons.append(np.asarray(r))
    codes, recons = np.concatenate(codes), np.concatenate(recons)
    mse = ((recons - images) ** 2).reshape(len(images), -1).mean(1)
    counts = np.bincount(codes.reshape(-1), minlength=config.vq.codebook_size)
    p = counts / counts.sum()
    return dict(vq_psnr=float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10)))),
                recon_mse=float(mse.mean()),
                codebook_usage=float((counts > 0).mean()),
                codebook_perplexity=float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())),
                reconstructions=recons)


def train(config, workdir: str) -> dict:
    t0 = time.time()
    os.makedirs(workdir, exist_ok=True)
    v = config.vq
    data = TokenizerImages(config.data.image_text_files, v.image_size, v.image_channels)
    tx = make_optimizer(config)
    mesh = data_mesh(config.batch_size)
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    logging.info("vq: data-parallel over %d device(s)", mesh.size)
    state = jax.device_put(init_state(config, tx), rep)
    ckpt = checkpoint.Checkpointer(workdir, config)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                            state)
    restored = ckpt.restore_latest(abstract)
    start = 0
    if restored is not None:
        state, meta = restored
        start = int(meta["step"])
        logging.info("vq: resuming at step %d", start)
    step_fn = make_step(config, tx, mesh)
    key = jax.random.key(config.seed + 1)
    meta = dict(config=checkpoint.config_json(config))
    m = None
    for step in range(start, config.total_steps):
        rng = np.random.default_rng([config.seed, step])
        images = jax.device_put(data.batch(rng.choice(data.train, config.batch_size)), rows)
        state, metrics = step_fn(state, images, jax.random.fold_in(key, step))
        done = step + 1
        if done % config.log_every == 0 or done == config.total_steps:
            m = {k: float(x) for k, x in jax.device_get(metrics).items()}
            print(f"vq step {done:>5}/{config.total_steps} | loss {m['loss']:.4f} | mse "
                  f"{m['mse']:.4f} | batch codebook usage {m['batch_usage']:.2f} | "
                  f"{time.time() - t0:.0f} s", flush=True)
        ckpt.save(done, state, dict(meta, data=dict(step=done)),
                  force=done == config.total_steps)
    ckpt.wait()
    ckpt.close()

    heldout = data.batch(data.heldout)
    ev = evaluate(config, state["params"], heldout)
    _save_pairs(os.path.join(workdir, "reconstructions.png"), heldout[:16], ev.pop("reconstructions")[:16])
    summary = dict(total_steps=config.total_steps, codebook_size=v.codebook_size,
                   codes_per_image=(v.image_size // 2 ** v.num_downsamples) ** 2,
                   final_train_loss=m["loss"] if m else float("nan"), **ev,
                   num_heldout=len(heldout), wall_s=time.time() - t0)
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(f"vq_psnr {summary['vq_psnr']:.2f} dB | codebook_usage {summary['codebook_usage']:.2f} "
          f"| perplexity {summary['codebook_perplexity']:.1f} | wall {summary['wall_s']:.0f} s | "
          f"{os.path.join(workdir, 'summary.json')}", flush=True)
    return summary


def _save_pairs(path, originals, recons):
    """Top row originals, bottom row reconstructions."""
    from m6jax.t2i.images import save_grid
    save_grid(path, np.concatenate([originals, recons]), cols=len(originals))
