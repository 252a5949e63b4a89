"""The pretraining loop: config -> mesh -> data -> sharded state -> steps -> summary.json."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging

from m6jax import distributed, flops, sharding
from m6jax import offload as offload_lib
from m6jax import pipeline
from m6jax import pseudo_to_real as p2r
from m6jax.config_checks import validate_config
from m6jax.data import Pipeline, validate_data_config
from m6jax.data.config import data_settings
from m6jax.data.packing import real_token_scalars
from m6jax.t2i import evaluate as t2i_evaluate
from m6jax.train import moe_metrics, resume, stages
from m6jax.train.metrics import MetricsWriter, Progress, task_losses
from m6jax.train.profile import StepProfiler
from m6jax.train.state import dummy_batch


def train(config, workdir: str) -> dict:
    """Runs `config.total_steps` steps, writes metrics and `workdir/summary.json`.

    Resumes from the newest checkpoint in `workdir/checkpoints` if there is one. Raises
    `resume.Preempted` after checkpointing on SIGTERM, `resume.NonFiniteLoss` under
    nonfinite_policy='stop'.
    """
    t_start = time.time()
    devices = jax.devices()
    # ---- Refuse bad configs before anything is built or compiled.
    validate_config(config, len(devices))
    validate_data_config(config)
    offload_lib.check(config, devices)  # pinned host memory exists; the offload plan fits
    main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)

    # ---- Mesh, a checkpoint of another model refused, data.
    mesh = sharding.make_mesh(config.mesh, devices)
    logging.info("mesh %s over %d %s devices, %d local to process %d of %d", dict(mesh.shape),
                 len(devices), devices[0].platform, jax.local_device_count(),
                 jax.process_index(), jax.process_count())
    run_ckpt = resume.RunCheckpoints(workdir, config)
    run_ckpt.check_fits(lambda s: stages.model_and_optimizer(config, s),
                        _example_batch(config), mesh)
    with distributed.main_process_first("data"):  # process 0 writes caches and tokenizer
        pipe = Pipeline(config.data, seed=config.seed, batch_size=config.batch_size,
                        process_index=jax.process_index(), process_count=jax.process_count(),
                        workdir=workdir)
    tasks = list(pipe.task_names)
    pipe.log_image_notice()  # what the images become; a warning if colour or size is lost

    # ---- Model, optimizer, sharded state (restored if workdir has a checkpoint), steps.
    # A Pseudo-to-Real run has two stages; a checkpoint says which one it was saved in.
    example = dummy_batch(config.batch_size, pipe.num_patches, pipe.patch_dim, pipe.text_len)
    state, state_sh, start, stage_name = run_ckpt.initial_stage_state(
        lambda s: stages.model_and_optimizer(config, s), example, mesh)
    if start >= config.total_steps and _summary_exists(workdir):
        return _already_complete(workdir, start, main, run_ckpt)
    pipe.restore_counters(run_ckpt.meta.get("counters", {}))
    stage = stages.Stage(config, stage_name, mesh, state_sh, pipe, tasks)
    with jax.set_mesh(mesh):
        state = stage.store(state)  # offloaded layers' states go to host memory
    if p2r.stage_at(config, start) != stage.name:  # resumed from the switch step's checkpoint
        state, stage = stage.next_stage(state, example, pipe, tasks)
    num_params = flops.count_params(state.params)
    logging.info("model: %s parameters (%s stage); params + optimizer per device: %.1f MB in "
                 "device memory, %.1f MB offloaded to host", f"{num_params:,}", stage.name,
                 sharding.per_device_bytes(state, "device") / 2**20,
                 sharding.per_device_bytes(state, offload_lib.HOST) / 2**20)

    peak, peak_src = flops.peak_flops_total(config.peak_tflops_per_device, devices,
                                            config.model.dtype)
    seq_flops = flops.train_flops_per_sequence(config.model, pipe.num_patches, pipe.patch_dim,
                                               pipe.text_len)
    step_flops = seq_flops * config.batch_size
    step_tokens = config.batch_size * (pipe.num_patches + pipe.text_len)
    logging.info("peak %.1f TFLOP/s (%s); %.2f GFLOP per step", peak / 1e12, peak_src,
                 step_flops / 1e9)
    schedule = pipeline.from_config(config)
    if main and schedule.active:
        print(schedule.describe(), flush=True)

    writer = MetricsWriter(workdir, enabled=main, resume_step=start)
    initial_eval = run_ckpt.meta.get("initial_eval") or stage.evaluator.losses(stage.params(state))
    if not start:
        writer.write(0, initial_eval, jsonl=False)
    logging.info("initial eval loss %.4f%s", initial_eval["eval_loss"],
                 f"; resuming at step {start}" if start else "")

    # ---- Train.
    progress = Progress(config.total_steps, start)
    timed_steps, timed_s = 0, 0.0
    t_mark, steps_at_mark = None, start
    # Wall time spent in training steps (compiles and the delinking included, evals not),
    # carried across restarts: what the Pseudo-to-Real ablation compares.
    train_s = float(run_ckpt.meta.get("train_s", 0.0))
    t_train = time.time()
    m = None
    batches = pipe.loader(start, config.total_steps,  # workers + device prefetch
                          lambda s, b: sharding.global_batch(mesh, resume.apply_test_hooks(s, b)))
    profiler = StepProfiler(config, workdir, start)
    with jax.set_mesh(mesh), writer.closed_on_error():
        for step in range(start, config.total_steps):
            if p2r.stage_at(config, step) != stage.name:  # the Pseudo-to-Real switch
                state, stage = stage.next_stage(state, example, pipe, tasks)
                num_params = flops.count_params(state.params)
                t_mark = None  # the re-jitted step compiles: time from its end again
            state, metrics = stage.train_step(state, next(batches))
            done = step + 1
            profiler.after_step(done, metrics)
            if t_mark is None:  # the first step includes compilation: time from its end
                jax.block_until_ready(metrics)
                t_mark, steps_at_mark = time.time(), done
            if done % config.log_every == 0 or done == config.total_steps:
                m = distributed.fetch(metrics)
                now = time.time()
                if done > steps_at_mark:
                    step_s = (now - t_mark) / (done - steps_at_mark)
                    timed_s += now - t_mark
                    timed_steps += done - steps_at_mark
                    t_mark, steps_at_mark = now, done
                else:
                    step_s = now - progress.t0
                scalars = _step_scalars(m, tasks, step_s, step_flops, step_tokens, peak)
                scalars.update(real_token_scalars(m, step_s, step_tokens, step_flops, peak))
                scalars["train_s"] = train_s + time.time() - t_train
                scalars["pseudo_stage"] = float(stage.name == p2r.STAGE_PSEUDO)
                scalars.update(moe_metrics.scalars(m))
                moe_metrics.write_histograms(writer, done, m)
                scalars["bad_records"] = pipe.counters()["bad_records"]
                writer.write(done, scalars)
                if main:
                    print(progress.line(done, scalars, tasks), flush=True)
            if done % config.eval_every == 0 and done != config.total_steps:
                t_eval = time.time()
                ev = stage.evaluator.losses(stage.params(state))
                writer.write(done, ev, jsonl=False)
                logging.info("step %d eval loss %.4f", done, ev["eval_loss"])
                t_mark = time.time()  # do not charge eval time to training steps
                t_train += t_mark - t_eval
            # Last in the step, so a checkpoint of step `done` follows its metrics line.
            run_ckpt.after_step(done, state, metrics,
                                dict(initial_eval=initial_eval, counters=pipe.counters(),
                                     train_s=train_s + time.time() - t_train), stage.name,
                                canonical=stage.canonical if stage.offload.active else None)

    run_ckpt.close()

    # ---- Final evaluation and summary.
    train_s += time.time() - t_train
    final_eval = stage.evaluator.losses(stage.params(state))
    captions = stage.evaluator.caption_accuracy(stage.params(state))
    # nan when no step ran here (rerun of a finished run): nothing was timed.
    step_s = timed_s / timed_steps if timed_steps else float("nan")
    summary = dict(
        total_steps=config.total_steps,
        final_train_loss=float(m["loss"]) if m is not None else writer.last("loss"),
        eval_loss=final_eval["eval_loss"], initial_eval_loss=initial_eval["eval_loss"],
        **{k: v for k, v in final_eval.items() if k != "eval_loss"},
        **{k.replace("eval_loss", "initial_eval_loss"): v for k, v in initial_eval.items()
           if k != "eval_loss"},
        **{k: v for k, v in captions.items() if k.startswith("caption_")},
        tokens_per_s=step_tokens / step_s, step_ms=1000 * step_s,
        mfu=step_flops / step_s / peak, peak_flops=peak, peak_flops_source=peak_src,
        num_params=num_params, num_devices=len(devices), mesh=dict(mesh.shape),
        stage=stage.name, pseudo_to_real_switch_step=p2r.switch_step(config), train_s=train_s,
        pipeline_bubble=schedule.bubble,
        wall_s=time.time() - t_start, **moe_metrics.summary(m, writer.last))
    summary.update(t2i_evaluate.summary(config, stage.model, mesh, stage.params(state), pipe, workdir))
    writer.write(config.total_steps, {k: summary[k] for k in ("eval_loss", "caption_accuracy")
                                      if summary[k] is not None}, jsonl=False)
    writer.close()
    if main:
        _write_and_print_summary(summary, captions["examples"][: config.num_caption_samples],
                                 workdir)
    return summary


def _write_and_print_summary(summary, examples, workdir) -> None:
    """summary.json (strict JSON), then the captions and the one-line result a user reads."""
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(_strict(summary), f, indent=2, ensure_ascii=False, allow_nan=False)
    labelled = summary["caption_accuracy"] is not None
    print("\nGenerated captions (held-out digits):" if labelled else
          "\nGenerated captions (held-out records, reference -> generated):")
    for line in examples:
        print("  " + line)
    accuracy = (f"caption accuracy {summary['caption_accuracy']:.1%}" if labelled else
                "caption accuracy n/a (no digit labels; caption overlap F1 "
                f"{summary['caption_overlap_f1']:.2f})")
    print(f"\n{accuracy} | eval loss "
          f"{summary['initial_eval_loss']:.3f} -> {summary['eval_loss']:.3f} | "
          f"{summary['tokens_per_s']:,.0f} tok/s | mfu {summary['mfu']:.1%} | "
          f"wall {summary['wall_s']:.0f} s | {os.path.join(workdir, 'summary.json')}",
          flush=True)


def _summary_exists(workdir) -> bool:
    return os.path.exists(os.path.join(workdir, "summary.json"))


def _already_complete(workdir, step, main, run_ckpt) -> dict:
    """A rerun of a finished run: nothing to train, and the first run's measured figures
    (throughput, wall time) stay in summary.json rather than being overwritten."""
    run_ckpt.close()
    path = os.path.join(workdir, "summary.json")
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    if main:
        print(f"run already complete at step {step}: {path} kept; use another --workdir "
              "or a larger --config.total_steps to train further", flush=True)
    return summary


def _strict(tree):
    """NaN/inf -> None (JSON null): summary.json stays strict JSON."""
    if isinstance(tree, dict):
        return {k: _strict(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_strict(v) for v in tree]
    if isinstance(tree, float) and not np.isfinite(tree):
        return None
    return tree


def _example_batch(config):
    """Zeros shaped like one global batch (what Pipeline will make), from the config alone."""
    d = data_settings(config)
    return dummy_batch(config.batch_size, (d["image_size"] // d["patch_size"]) ** 2,
                       d["patch_size"] ** 2 * d["image_channels"], d["text_len"])


def _step_scalars(m, tasks, step_s, step_flops, step_tokens, peak) -> dict[str, float]:
    scalars = dict(loss=m["loss"], grad_norm=m["grad_norm"], learning_rate=m["learning_rate"],
                   nonfinite_steps=m["nonfinite_steps"], loss_scale=m["loss_scale"],
                   step_s=step_s, tokens_per_s=step_tokens / step_s,
                   mfu=step_flops / step_s / peak)
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    return {**scalars, **task_losses(m, tasks)}
