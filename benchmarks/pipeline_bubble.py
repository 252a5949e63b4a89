r"""The pipeline bubble, (S - 1) / (R M + S - 1), against measured step times on fake devices.

  python benchmarks/pipeline_bubble.py --json=benchmarks/results/pipeline_bubble_cpu.json
  python benchmarks/pipeline_bubble.py --stages=2 --schedules=2x1,4x1,8x1,4x2

On fake CPU devices all stages share the machine's cores, so a stage idle in the bubble
is not idle here: the SPMD loop computes every stage at every iteration (garbage in the
bubble, discarded): a pipelined step does R M + S - 1 iterations of S chunks of
U / (S R) units for one microbatch, against the R M iterations' worth of work of the
same step without a pipeline, so t_pipe / t_plain = 1 / (1 - bubble) if an iteration's
work costs what the plain step pays for it. The plain step runs on the same devices as
data parallelism (`mesh.data` = devices) with the same global batch = M x
`--microbatch_size` rows, so each device's matmuls have the rows a stage's microbatch
has (microbatch_size / (devices / S) examples): the comparison holds the matmul sizes
fixed. `measured_bubble` = 1 - t_plain / t_pipe against `formula_bubble`;
`per_iteration_ms` = t_pipe / (R M + S - 1). Timings interleave every variant in rounds
(median over rounds), so a shared machine's load hits them alike. On real accelerators
the bubble is idle time instead; the fraction is the same.
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

from absl import app, flags  # noqa: E402

import report  # noqa: E402  (benchmarks/report.py)

flags.DEFINE_integer("devices", 8, "fake CPU devices (stage x data)")
flags.DEFINE_integer("stages", 4, "mesh.stage")
flags.DEFINE_list("schedules", ["4x1", "8x1", "16x1", "4x2"],
                  "pipeline schedules as MICROBATCHESxREPEATS")
flags.DEFINE_integer("emb_dim", 128, "model width")
flags.DEFINE_integer("num_layers", 8, "layers")
flags.DEFINE_integer("text_len", 48, "text tokens (plus 16 image patches)")
flags.DEFINE_integer("microbatch_size", 8, "global rows per microbatch")
flags.DEFINE_integer("rounds", 5, "timing rounds; each times every variant `steps` times")
flags.DEFINE_integer("steps", 3, "steps per variant per round")
flags.DEFINE_string("json", "", "write the results here")
FLAGS = flags.FLAGS


def main(_):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={FLAGS.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    from configs import m6 as m6_config
    from m6jax import pipeline, sharding
    from m6jax import pseudo_to_real as p2r
    from m6jax.config_checks import validate_config
    from m6jax.train import stages
    from m6jax.train.state import create_train_state, dummy_batch

    from m6jax.train.step import make_train_step

    grid, patch_dim, t = 4, 4, FLAGS.text_len

    def build(stage, microbatches, repeats, b):
        c = m6_config.get_config("tiny")
        c.model.update(emb_dim=FLAGS.emb_dim, num_heads=4, mlp_dim=4 * FLAGS.emb_dim,
                       num_layers=FLAGS.num_layers)
        c.data.vocab_size = 256
        c.data.text_len = t
        c.batch_size = b
        c.mesh.update(data=FLAGS.devices // stage, stage=stage)
        # The same remat as the plain step: nothing recomputed, so only the bubble differs.
        c.pipeline.update(microbatches=microbatches, repeats=repeats, remat_stage=False)
        validate_config(c, FLAGS.devices)
        mesh = sharding.make_mesh(c.mesh)
        model, tx = stages.model_and_optimizer(c, p2r.STAGE_REAL)
        state, sh = create_train_state(model, tx, dummy_batch(b, grid * grid, patch_dim, t),
                                       mesh, seed=0)
        rng = np.random.default_rng(0)
        batch = {k: np.asarray(v) for k, v in dummy_batch(b, grid * grid, patch_dim, t).items()}
        batch["text_tokens"] = rng.integers(0, 256, (b, t)).astype(np.int32)
        batch["targets"] = rng.integers(0, 256, (b, t)).astype(np.int32)
        batch["loss_mask"] = np.ones((b, t), np.float32)
        batch = sharding.global_batch(mesh, batch)
        step = make_train_step(model, tx, mesh, sh, 4)
        with jax.set_mesh(mesh):
            step = step.lower(state, batch).compile()
            state, _ = step(state, batch)
        return dict(step=step, state=state, batch=batch, mesh=mesh,
                    schedule=pipeline.from_config(c))

    variants = {}
    for s in FLAGS.schedules:
        m, r = (int(x) for x in s.split("x"))
        variants[f"M{m}_R{r}"] = build(FLAGS.stages, m, r, m * FLAGS.microbatch_size)
        if f"plain_B{m * FLAGS.microbatch_size}" not in variants:
            variants[f"plain_B{m * FLAGS.microbatch_size}"] = build(1, 1, 1,
                                                                   m * FLAGS.microbatch_size)
    times = {k: [] for k in variants}
    for _ in range(FLAGS.rounds):
        for k, v in variants.items():
            with jax.set_mesh(v["mesh"]):
                t0 = time.perf_counter()
                for _ in range(FLAGS.steps):
                    v["state"], metrics = v["step"](v["state"], v["batch"])
                jax.block_until_ready(metrics)
            times[k].append((time.perf_counter() - t0) / FLAGS.steps)
    names = [k for k in variants if not k.startswith("plain")]
    scheds = [variants[k]["schedule"] for k in names]
    step_s = np.array([float(np.median(times[k])) for k in names])
    rows = []
    for k, sched, t_s in zip(names, scheds, step_s):
        b = sched.microbatches * FLAGS.microbatch_size
        plain = float(np.median(times[f"plain_B{b}"]))
        rows.append(dict(name=k, stages=sched.stages, microbatches=sched.microbatches,
                         repeats=sched.repeats, iterations=sched.iterations, batch_size=b,
                         formula_bubble=sched.bubble, measured_bubble=1.0 - plain / t_s,
                         step_ms=1000 * t_s, plain_step_ms=1000 * plain,
                         per_iteration_ms=1000 * t_s / sched.iterations))
    out = dict(devices=FLAGS.devices, microbatch_size=FLAGS.microbatch_size,
               num_layers=FLAGS.num_layers, emb_dim=FLAGS.emb_dim, rounds=FLAGS.rounds,
               load_average=os.getloadavg(), schedules=rows)
    print(f"{'schedule':<10} {'batch':>5} {'iters':>5} {'formula':>8} {'measured':>9} "
          f"{'step ms':>8} {'plain ms':>9} {'ms/iter':>8}")
    for r in rows:
        print(f"{r['name']:<10} {r['batch_size']:>5} {r['iterations']:>5} "
              f"{r['formula_bubble']:>8.1%} {r['measured_bubble']:>9.1%} {r['step_ms']:>8.1f} "
              f"{r['plain_step_ms']:>9.1f} {r['per_iteration_ms']:>8.2f}")
    if FLAGS.json:
        report.write_json(FLAGS.json, out, indent=2)


if __name__ == "__main__":
    app.run(main)
