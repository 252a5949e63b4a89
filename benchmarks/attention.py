r"""Dense vs block-sparse attention, forward + backward: time and peak memory.

  python benchmarks/attention.py --json=benchmarks/results/attention_cpu.json
  python benchmarks/attention.py --tokens=4096,16384 --fused=triton,triton_sparse --json=/tmp/attention_gpu.json
  python benchmarks/attention.py --tokens=4096,16384 --fused=splash --json=/tmp/attention_tpu.json

For each sequence length: q, k, v [batch, S, heads, head_dim] f32 and M6's prefix-LM
mask (a bidirectional prefix of --prefix tokens, the rest causal); grad of
sum(out * w) w.r.t. q, k and v, jitted. `sparse` is m6jax/model/sparse.py's fixed
pattern (block --block_size, window --window, stride --stride, --global_blocks leading
blocks); `dense` is jax.nn.dot_product_attention under the same mask AND'ed with the
pattern (so both compute the same function). `--fused` adds kernels: `splash` (TPU,
the pattern), `triton` (GPU: jax's dense flash attention, no pattern: a different
function, the dense-kernel baseline) and `triton_sparse` (GPU: our block-sparse Triton
kernel, m6jax/model/sparse_triton.py, the pattern); a fused variant that computes the
pattern's function also records `max_grad_diff_vs_sparse`. Off its platform a kernel
runs in interpret mode (a CPU smoke test, not a timing). Time: median of --iters calls,
the variants alternated call by call so all see the same background load. Memory: XLA's
compiled temp buffer size (`memory_analysis().temp_size_in_bytes`: the step's peak
scratch beyond inputs and outputs), plus the inputs' bytes (the mask is per-position
vectors since issue 28: the dense variant builds its [S, S] inside the step). Writes a list of {tokens, variant, ms, temp_mb, arg_mb, score_fraction}.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import report  # noqa: E402  (benchmarks/report.py)

flags.DEFINE_list("tokens", ["1024", "4096"], "sequence lengths")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_integer("heads", 8, "attention heads")
flags.DEFINE_integer("head_dim", 64, "width per head")
flags.DEFINE_integer("prefix", 256, "bidirectional prefix tokens (image + prompt)")
flags.DEFINE_integer("block_size", 64, "sparse block size")
flags.DEFINE_integer("window", 1, "sparse: neighbouring blocks each side")
flags.DEFINE_integer("stride", 8, "sparse: every stride-th block is a summary column")
flags.DEFINE_integer("global_blocks", 4, "sparse: leading blocks (the prefix) seen by all")
flags.DEFINE_integer("iters", 5, "timed calls per variant (after one warm-up call)")
flags.DEFINE_list("fused", [], "fused kernels to add: triton | triton_sparse (GPU) | "
                  "splash (TPU)")
flags.DEFINE_string("json", "", "write the results here")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from m6jax import kernels
    from m6jax.model import fused
    from m6jax.model.masks import AttentionMask
    from m6jax.model.sparse import Pattern, sparse_attention
    pattern = Pattern(FLAGS.block_size, FLAGS.window, FLAGS.stride, FLAGS.global_blocks)
    results = []
    for s in map(int, FLAGS.tokens):
        b, h, d = FLAGS.batch, FLAGS.heads, FLAGS.head_dim
        ks = jax.random.split(jax.random.key(0), 4)
        q, k, v, w = (jax.random.normal(kk, (b, s, h, d), jnp.float32) for kk in ks)
        pos = np.arange(s)
        # The model's mask: per-position vectors (masks.py); the dense path builds [S, S].
        mask = AttentionMask(jnp.ones((b, s), bool),
                             jnp.asarray(np.broadcast_to(pos < FLAGS.prefix, (b, s))))
        pmask = jnp.asarray(pattern.mask(s))[None, None]
        fns = {
            "dense": lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m.dense() & pmask,
                                                                     implementation="xla"),
            "sparse": lambda q, k, v, m: sparse_attention(q, k, v, m, pattern),
        }
        sparse_fused = {"splash": "splash", "triton_sparse": "triton"}  # with the pattern
        for name in FLAGS.fused:
            fns[name] = (lambda q, k, v, m, impl=sparse_fused.get(name, name),
                         pat=pattern if name in sparse_fused else None:
                         fused.attend(impl, q, k, v, m, pat, kernels.interpret(impl)))
        compiled, grads = {}, {}
        for name, fn in fns.items():
            grad = jax.jit(jax.grad(lambda q, k, v, m, fn=fn: jnp.sum(fn(q, k, v, m) * w),
                                    argnums=(0, 1, 2)))
            compiled[name] = grad.lower(q, k, v, mask).compile()
            grads[name] = jax.block_until_ready(compiled[name](q, k, v, mask))  # warm-up
        times = {n: [] for n in fns}
        for _ in range(FLAGS.iters):
            for name in fns:
                t0 = time.perf_counter()
                jax.block_until_ready(compiled[name](q, k, v, mask))
                times[name].append(time.perf_counter() - t0)
        nb = s // FLAGS.block_size
        kept = float(pattern.layout(nb).mean())
        for name in fns:
            mem = compiled[name].memory_analysis()
            row = dict(tokens=s, variant=name, ms=1000 * float(np.median(times[name])),
                       temp_mb=mem.temp_size_in_bytes / 2 ** 20,
                       arg_mb=mem.argument_size_in_bytes / 2 ** 20,
                       block_fraction_kept=kept, platform=jax.devices()[0].platform,
                       load_avg_1min=os.getloadavg()[0])
            if name in sparse_fused:   # same function as `sparse`: does the kernel agree?
                row["max_grad_diff_vs_sparse"] = max(
                    float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads[name], grads["sparse"]))
            results.append(row)
            print(json.dumps(row), flush=True)
        d_row, s_row = results[-len(fns)], results[-len(fns) + 1]
        print(f"{s} tokens: sparse/dense time {s_row['ms'] / d_row['ms']:.2f}x, temp memory "
              f"{s_row['temp_mb'] / d_row['temp_mb']:.2f}x ({kept:.0%} of blocks kept)", flush=True)
    if FLAGS.json:
        report.write_json(FLAGS.json, results, indent=2)


if __name__ == "__main__":
    app.run(main)
