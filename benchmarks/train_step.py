r"""MFU of the M6 train step against this machine's measured matmul peak, in one run.

  python benchmarks/train_step.py                       # CPU, float32
  python benchmarks/train_step.py --dtype=bfloat16      # GPU/TPU
  python benchmarks/train_step.py --json=/tmp/bench.json --emb_dim=1024 --batch_size=16
  python benchmarks/train_step.py --dtype=bfloat16 --text_len=4080 --kernels=attention=xla  # vs
  python benchmarks/train_step.py --dtype=bfloat16 --text_len=4080    # the table's (GPU: triton)

The bench model has width >= 512 and sequence >= 256 (16 image patches + 240 text
tokens by default). Peak = the best of large jitted matmuls (2048^3, 4096^3) in the same process and dtype,
timed alternately with the steps; `mfu` = fastest step against that peak, `mfu_median`
= median step against the median matmul rate (both robust to a shared machine's load).
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

from absl import app, flags  # noqa: E402

import report  # noqa: E402  (benchmarks/report.py)

flags.DEFINE_integer("emb_dim", 512, "model width")
flags.DEFINE_integer("num_layers", 4, "layers")
flags.DEFINE_integer("num_heads", 8, "attention heads")
flags.DEFINE_integer("text_len", 240, "text tokens (plus 16 image patches)")
flags.DEFINE_integer("batch_size", 8, "global batch")
flags.DEFINE_integer("vocab_size", 8192, "vocabulary")
flags.DEFINE_integer("steps", 10, "timed steps (after 2 warm-up steps), each followed by "
                     "one matmul of every --peak_n size")
flags.DEFINE_string("dtype", "float32", "compute dtype")
flags.DEFINE_string("remat_policy", "none", "remat policy")
flags.DEFINE_string("activation", "gelu", "MLP activation")
flags.DEFINE_list("peak_n", ["2048", "4096"], "matmul sizes for the peak; the best rate counts")
flags.DEFINE_string("kernels", "", "model.kernels: overrides of m6jax/kernels.py's table")
flags.DEFINE_string("json", "", "write the results here")
flags.DEFINE_string("profile_dir", "", "if set, write a jax.profiler trace of 3 steps here")
FLAGS = flags.FLAGS


def main(_):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs import m6 as m6_config
    from m6jax import flops, sharding
    from m6jax.model import M6
    from m6jax.train import optim
    from m6jax.train.state import create_train_state, dummy_batch
    from m6jax.train.step import make_train_step

    c = m6_config.get_config("tiny")
    c.model.update(emb_dim=FLAGS.emb_dim, num_heads=FLAGS.num_heads, mlp_dim=4 * FLAGS.emb_dim,
                   num_layers=FLAGS.num_layers, dtype=FLAGS.dtype, remat_policy=FLAGS.remat_policy,
                   mlp_activation=FLAGS.activation, kernels=FLAGS.kernels)
    c.data.vocab_size = FLAGS.vocab_size
    c.data.text_len = FLAGS.text_len
    grid, patch_dim, b, t = 4, 4, FLAGS.batch_size, FLAGS.text_len
    mesh = sharding.make_mesh(c.mesh)
    model = M6(c.model, grid, t)
    tx = optim.make_optimizer(c.optimizer, 1000)
    state, sh = create_train_state(model, tx, dummy_batch(b, grid * grid, patch_dim, t), mesh, 0)
    step = make_train_step(model, tx, mesh, sh, num_tasks=4)

    rng = np.random.default_rng(0)
    pos = np.arange(t)[None].repeat(b, 0)
    batch = sharding.global_batch(mesh, dict(
        patches=rng.random((b, grid * grid, patch_dim), np.float32),
        image_mask=np.ones((b, grid * grid), bool),
        text_tokens=rng.integers(4, FLAGS.vocab_size, (b, t)).astype(np.int32),
        text_mask=np.ones((b, t), bool), text_is_prefix=pos < 8,
        targets=rng.integers(4, FLAGS.vocab_size, (b, t)).astype(np.int32),
        loss_mask=(pos >= 7).astype(np.float32), task_id=np.zeros((b,), np.int32)))

    dtype = jnp.dtype(FLAGS.dtype)
    devices = jax.devices()
    on_cpu = devices[0].platform == "cpu"
    sizes = [int(n) for n in FLAGS.peak_n]
    mats = {n: (jnp.ones((n, n), dtype), jax.jit(lambda a: a @ a)) for n in sizes}

    def matmul_rate(n):
        a, f = mats[n]
        t = time.perf_counter()
        f(a).block_until_ready()
        return 2.0 * n ** 3 / (time.perf_counter() - t)

    with jax.set_mesh(mesh):
        for _ in range(2):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        for n in sizes:
            matmul_rate(n)                                    # compile
        # Steps and peak matmuls alternate, so both see the same background load on a
        # shared machine; the fastest step is compared with the fastest matmul.
        step_times, rates = [], {n: [] for n in sizes}
        for _ in range(FLAGS.steps):
            t0 = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready(m)
            step_times.append(time.perf_counter() - t0)
            for n in sizes:
                rates[n].append(matmul_rate(n))
        step_s = min(step_times)
        median_step_s = sorted(step_times)[len(step_times) // 2]
        if FLAGS.profile_dir:
            jax.profiler.start_trace(FLAGS.profile_dir)
            for _ in range(3):
                state, m = step(state, batch)
            jax.block_until_ready(m)
            jax.profiler.stop_trace()
    peak_one = max(max(r) for r in rates.values())
    median_peak_one = max(sorted(r)[len(r) // 2] for r in rates.values())
    peak = peak_one if on_cpu else peak_one * len(devices)
    median_peak = median_peak_one if on_cpu else median_peak_one * len(devices)

    step_flops = flops.train_flops_per_sequence(c.model, grid * grid, patch_dim, t) * b
    result = dict(
        device=devices[0].device_kind, num_devices=len(devices), dtype=FLAGS.dtype,
        emb_dim=FLAGS.emb_dim, num_layers=FLAGS.num_layers, seq_len=grid * grid + t,
        batch_size=b, vocab_size=FLAGS.vocab_size, remat_policy=FLAGS.remat_policy,
        num_params=flops.count_params(state.params),
        step_ms=1000 * step_s, median_step_ms=1000 * median_step_s, step_gflop=step_flops / 1e9,
        achieved_tflops=step_flops / step_s / 1e12, peak_tflops=peak / 1e12,
        peak_source=(f"best jitted n^3 {FLAGS.dtype} matmul, n in {FLAGS.peak_n}, timed "
                     "alternately with the steps in the same process"),
        mfu=step_flops / step_s / peak, mfu_median=step_flops / median_step_s / median_peak,
        tokens_per_s=b * (grid * grid + t) / step_s, loss=float(m["loss"]))
    print(json.dumps(result, indent=2))
    if FLAGS.json:
        report.write_json(FLAGS.json, result, indent=2)


if __name__ == "__main__":
    app.run(main)
