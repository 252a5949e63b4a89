r"""On a Hopper GPU: m6jax's mgpu grouped matmul (jax's Mosaic GPU ragged dot) against
jax.lax.ragged_dot, values and gradients, and both timed (forward + backward).

  python benchmarks/mgpu_check.py --json=benchmarks/results/mgpu_gpu.json

The CPU tests cannot run these kernels (no interpret mode): this is their numerical
check. Rows are sorted by expert with random group sizes (some empty, some rows past
the last group), bf16 operands, f32 comparison with a bf16 tolerance.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import report  # noqa: E402  (benchmarks/report.py)

flags.DEFINE_list("shapes", ["2048,512,2048,8", "16384,1024,4096,32"], "rows,K,M,E each")
flags.DEFINE_integer("iters", 20, "timed calls (after 3 warm-up calls)")
flags.DEFINE_string("json", "", "write the results here")
FLAGS = flags.FLAGS


def main(_):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from m6jax.model.moe import mgpu

    rows_out = []
    for spec in FLAGS.shapes:
        n, k, m, e = map(int, spec.split(","))
        rng = np.random.default_rng(0)
        cuts = np.sort(rng.integers(0, n - n // 16, e - 1))
        sizes = np.diff(np.concatenate([[0], cuts, [n - n // 16]])).astype(np.int32)
        sizes[1] = 0                                      # an empty expert
        x = jnp.asarray(rng.normal(size=(n, k)), jnp.bfloat16)
        w = jnp.asarray(rng.normal(size=(e, k, m)) / np.sqrt(k), jnp.bfloat16)
        gs = jnp.asarray(sizes)
        live = jnp.arange(n)[:, None] < int(sizes.sum())

        def loss(f):
            return lambda x, w: jnp.sum(jnp.where(live, f(x, w, gs), 0).astype(jnp.float32) ** 2)
        impls = {"mgpu": mgpu.gmm, "ragged_dot": jax.lax.ragged_dot}
        out = {name: jax.jit(f)(x, w, gs) for name, f in impls.items()}
        grads = {name: jax.jit(jax.grad(loss(f), (0, 1)))(x, w) for name, f in impls.items()}
        def err(a, b):
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
            return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-6))
        kept = {name: jnp.where(live, y, 0) for name, y in out.items()}
        row = dict(rows=n, k=k, m=m, experts=e, device=jax.devices()[0].device_kind,
                   rel_err_out=err(kept["mgpu"], kept["ragged_dot"]),
                   rel_err_dx=err(grads["mgpu"][0], grads["ragged_dot"][0]),
                   rel_err_dw=err(grads["mgpu"][1], grads["ragged_dot"][1]))
        for name, f in impls.items():
            step = jax.jit(jax.grad(loss(f), (0, 1)))
            for _ in range(3):
                jax.block_until_ready(step(x, w))
            ts = []
            for _ in range(FLAGS.iters):
                t = time.perf_counter()
                jax.block_until_ready(step(x, w))
                ts.append(time.perf_counter() - t)
            ms = 1000 * sorted(ts)[len(ts) // 2]
            row[f"{name}_ms"] = round(ms, 3)
            row[f"{name}_tflops"] = round(3 * 2 * int(sizes.sum()) * k * m / (ms / 1e3) / 1e12, 1)
        row["ok"] = max(row["rel_err_out"], row["rel_err_dx"], row["rel_err_dw"]) < 2e-2
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    if FLAGS.json:
        report.write_json(FLAGS.json, rows_out, indent=1)
    if not all(r["ok"] for r in rows_out):
        sys.exit("mgpu differs from jax.lax.ragged_dot beyond bf16 tolerance (see above)")


if __name__ == "__main__":
    app.run(main)
