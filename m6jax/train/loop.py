"""The pretraining loop: config -> mesh -> data -> sharded state -> steps -> summary.json."""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np
from absl import logging

from m6jax import distributed, flops, plan, sharding
from m6jax import offload as offload_lib
from m6jax import pipeline
from m6jax import pseudo_to_real as p2r
from m6jax.config_checks import validate_config
from m6jax.data import Pipeline
from m6jax.data.config import data_settings
from m6jax.data.packing import real_token_scalars
from m6jax.train import evaluators as evaluators_lib
from m6jax.train import moe_metrics, resume, stages
from m6jax.train import summary as summary_lib
from m6jax.train.chrono import Chrono
from m6jax.train.metrics import MetricsWriter, Progress, task_losses
from m6jax.train.profile import StepProfiler
from m6jax.train.state import dummy_batch
from m6jax.train.summary import strict_json as _strict  # noqa: F401 (tests import it here)


def train(config, workdir: str) -> dict:
    """Runs `config.total_steps` steps, writes metrics and `workdir/summary.json`.

    Resumes from the newest checkpoint in `workdir/checkpoints` if there is one. Raises
    `resume.Preempted` after checkpointing on SIGTERM, `resume.NonFiniteLoss` under
    nonfinite_policy='stop'.
    """
    chrono, devices = Chrono(), jax.devices()
    mesh = _checked_mesh(config, devices)  # bad configs refused before anything is built
    main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)

    # ---- A checkpoint of another model refused, then data.
    run_ckpt = resume.RunCheckpoints(workdir, config)
    model_and_optimizer = functools.partial(stages.model_and_optimizer, config)
    example = _example_batch(config)  # zeros shaped like one global batch
    run_ckpt.check_fits(model_and_optimizer, example, mesh)
    pipe = _data_pipeline(config, workdir)
    tasks = list(pipe.task_names)

    # ---- Model, optimizer, sharded state (restored if workdir has a checkpoint), steps.
    # A Pseudo-to-Real run has two stages; a checkpoint says which one it was saved in.
    state, state_sh, start, stage_name = run_ckpt.initial_stage_state(model_and_optimizer,
                                                                      example, mesh)
    if start >= config.total_steps and summary_lib.exists(workdir):
        return summary_lib.already_complete(workdir, start, main, run_ckpt)
    pipe.restore_counters(run_ckpt.meta.get("counters", {}))
    stage = stages.Stage(config, stage_name, mesh, state_sh, pipe, tasks)  # state: stored layout
    if p2r.stage_at(config, start) != stage.name:  # resumed from the switch step's checkpoint
        state, stage = stage.next_stage(state, example, pipe, tasks)
    _describe_model(config, state, stage, main)
    cost = StepCost.of(config, pipe, devices)
    writer = MetricsWriter(workdir, enabled=main, resume_step=start)
    initial_eval = _initial_eval(run_ckpt.meta, stage, state, writer, start)
    evaluators = evaluators_lib.build(config, pipe, mesh, workdir)

    # ---- Train.
    progress = Progress(config.total_steps, start) if main else None  # the printed lines
    chrono.start_training(start, run_ckpt.meta.get("train_s", 0.0))
    m = None
    batches = pipe.loader(start, config.total_steps,  # workers + device prefetch
                          lambda s, b: sharding.global_batch(mesh, resume.apply_test_hooks(s, b)))
    profiler = StepProfiler(config, workdir, start)
    with jax.set_mesh(mesh), writer.closed_on_error():
        for step in range(start, config.total_steps):
            if p2r.stage_at(config, step) != stage.name:  # the Pseudo-to-Real switch
                state, stage = stage.next_stage(state, example, pipe, tasks)
                chrono.recompiling()
            state, metrics = stage.train_step(state, next(batches))
            done = step + 1
            profiler.after_step(done, metrics)
            chrono.after_step(done, metrics)
            if done % config.log_every == 0 or done == config.total_steps:
                m = distributed.fetch(metrics)
                _log_step(writer, progress, done, m, chrono, cost, stage, pipe)
            if done % config.eval_every == 0 and done != config.total_steps:
                with chrono.paused():  # not charged to training time or steps
                    _periodic_eval(writer, done, stage, state)
            # Last, so a checkpoint follows its step's metrics line; meta built if one is due.
            run_ckpt.after_step(done, state, metrics, lambda: dict(
                initial_eval=initial_eval, counters=pipe.counters(), train_s=chrono.train_s()),
                stage.name)
    run_ckpt.close()
    chrono.stop_training()

    # ---- Final evaluation and summary.
    results = evaluators_lib.run_all(evaluators, stage, state)
    summary, examples = summary_lib.assemble(
        config, results, initial_eval, chrono, cost, m, writer.last,
        num_params=flops.count_params(state.params), num_devices=len(devices),
        mesh=dict(mesh.shape), stage=stage.name)
    writer.write(config.total_steps, summary_lib.final_scalars(summary), jsonl=False)
    writer.close()
    if main:
        summary_lib.write_and_print(summary, examples, workdir)
    return summary


def _checked_mesh(config, devices):
    """The config's mesh over `devices`, after the checks that need no compile."""
    validate_config(config, len(devices))
    plan.check_offload(config, devices)  # pinned host memory exists; the offload plan fits
    mesh = sharding.make_mesh(config.mesh, devices)
    logging.info("mesh %s over %d %s devices, %d local to process %d of %d", dict(mesh.shape),
                 len(devices), devices[0].platform, jax.local_device_count(),
                 jax.process_index(), jax.process_count())
    return mesh


def _data_pipeline(config, workdir) -> Pipeline:
    with distributed.main_process_first("data"):  # process 0 writes caches and tokenizer
        pipe = Pipeline(config.data, seed=config.seed, batch_size=config.batch_size,
                        process_index=jax.process_index(), process_count=jax.process_count(),
                        workdir=workdir)
    pipe.log_image_notice()  # what the images become; a warning if colour or size is lost
    return pipe


def _initial_eval(meta, stage, state, writer, start) -> dict:
    """Eval losses of the initial params: measured on a fresh start, kept in the
    checkpoint meta so a resumed run reports the same."""
    initial_eval = meta.get("initial_eval") or stage.evaluator.losses(state.params)
    if not start:
        writer.write(0, initial_eval, jsonl=False)
    logging.info("initial eval loss %.4f%s", initial_eval["eval_loss"],
                 f"; resuming at step {start}" if start else "")
    return initial_eval


def _periodic_eval(writer, done, stage, state) -> None:
    ev = stage.evaluator.losses(state.params)
    writer.write(done, ev, jsonl=False)
    logging.info("step %d eval loss %.4f", done, ev["eval_loss"])


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One step's tokens and model FLOPs, and the peak FLOP/s they are measured against."""
    tokens: int
    flops: float
    peak: float
    peak_source: str

    @classmethod
    def of(cls, config, pipe, devices) -> "StepCost":
        peak, source = flops.peak_flops_total(config.peak_tflops_per_device, devices,
                                              config.model.dtype)
        seq_flops = flops.train_flops_per_sequence(config.model, pipe.num_patches,
                                                   pipe.patch_dim, pipe.text_len)
        cost = cls(config.batch_size * (pipe.num_patches + pipe.text_len),
                   seq_flops * config.batch_size, peak, source)
        logging.info("peak %.1f TFLOP/s (%s); %.2f GFLOP per step", peak / 1e12, source,
                     cost.flops / 1e9)
        return cost


def _describe_model(config, state, stage, main) -> None:
    logging.info("model: %s parameters (%s stage); params + optimizer per device: %.1f MB in "
                 "device memory, %.1f MB offloaded to host",
                 f"{flops.count_params(state.params):,}", stage.name,
                 sharding.per_device_bytes(state, "device") / 2**20,
                 sharding.per_device_bytes(state, offload_lib.HOST) / 2**20)
    schedule = pipeline.from_config(config)
    if main and schedule.active:
        print(schedule.describe(), flush=True)


def _example_batch(config):
    """Zeros shaped like one global batch (what Pipeline will make), from the config alone."""
    d = data_settings(config)
    return dummy_batch(config.batch_size, (d["image_size"] // d["patch_size"]) ** 2,
                       d["patch_size"] ** 2 * d["image_channels"], d["text_len"])


def _log_step(writer, progress, done, m, chrono, cost, stage, pipe) -> None:
    """metrics.jsonl, TensorBoard and (`progress`, main process) the printed line of log
    step `done`, from its fetched metrics `m`."""
    tasks = list(pipe.task_names)
    step_s = chrono.step_s(done)
    scalars = dict(loss=m["loss"], grad_norm=m["grad_norm"], learning_rate=m["learning_rate"],
                   nonfinite_steps=m["nonfinite_steps"], loss_scale=m["loss_scale"],
                   step_s=step_s, tokens_per_s=cost.tokens / step_s,
                   mfu=cost.flops / step_s / cost.peak)
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    scalars.update(task_losses(m, tasks))
    scalars.update(real_token_scalars(m, step_s, cost.tokens, cost.flops, cost.peak))
    scalars["train_s"] = chrono.train_s()
    scalars["pseudo_stage"] = float(stage.name == p2r.STAGE_PSEUDO)
    scalars.update(moe_metrics.scalars(m))
    scalars["bad_records"] = pipe.counters()["bad_records"]
    moe_metrics.write_histograms(writer, done, m)
    writer.write(done, scalars)
    if progress is not None:
        print(progress.line(done, scalars, tasks), flush=True)
