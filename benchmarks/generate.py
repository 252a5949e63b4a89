r"""Greedy decoding throughput: KV-cache decoder vs the uncached reference, in one run.

  python benchmarks/generate.py                      # writes benchmarks/results/generate.json
  python benchmarks/generate.py --batch_size=32 --max_new=128 --json=/tmp/gen.json

Model: the tiny config (width 128, 4 layers, 4 heads, vocab 2000) with data.text_len=160
and 16 image patches; params are random (model.init), which does not change the cost.
Both decoders generate exactly --max_new tokens per row (no eos can stop them) from the
2-token caption prompt. tokens/s = batch x max_new / wall time of one jitted call (the
best of --repeats after one compiling call).
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

from absl import app, flags  # noqa: E402

import report  # noqa: E402  (benchmarks/report.py)

flags.DEFINE_integer("batch_size", 8, "rows decoded together")
flags.DEFINE_integer("max_new", 128, "new tokens per row")
flags.DEFINE_integer("text_len", 160, "data.text_len (>= prompt + max_new)")
flags.DEFINE_integer("repeats", 3, "timed calls per decoder (the best counts)")
flags.DEFINE_string("dtype", "float32", "compute dtype")
flags.DEFINE_string("json", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                         "generate.json"), "write the results here ('' = no)")
FLAGS = flags.FLAGS


def _best_seconds(fn, repeats):
    import jax
    jax.block_until_ready(fn())  # compiles
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def main(_):
    import flax.linen as nn
    import jax
    import numpy as np

    from configs import m6 as m6_config
    from m6jax import flops, generate, sharding
    from m6jax.model.build import build_model
    from m6jax.train.state import dummy_batch

    c = m6_config.get_config("tiny")
    c.data.text_len = FLAGS.text_len
    c.model.dtype = FLAGS.dtype
    c.mesh.update(data=1)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    model = build_model(c)
    p, pd, b = (c.data.image_size // c.data.patch_size) ** 2, c.data.patch_size ** 2, FLAGS.batch_size
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        init = lambda: model.init(jax.random.key(0), dummy_batch(1, p, pd, FLAGS.text_len))["params"]  # noqa: E731
        param_sh = sharding.tree_shardings(mesh, jax.eval_shape(init))
        params = jax.jit(lambda: nn.meta.unbox(init()), out_shardings=param_sh)()

    rng = np.random.default_rng(0)
    x = sharding.shard_full_batch(mesh, dict(
        patches=rng.random((b, p, pd), np.float32), image_mask=np.ones((b, p), bool),
        prompt=np.tile(np.array([[4, 9]], np.int32), (b, 1))))   # [<caption>, <en>]
    args = (params, x["patches"], x["image_mask"], x["prompt"])
    no_eos = -1
    cached = generate.make_decoder(model, mesh, param_sh, 2, FLAGS.max_new, no_eos)
    uncached = generate.make_greedy_decoder(model, mesh, param_sh, 2, FLAGS.max_new, no_eos)
    with jax.set_mesh(mesh):
        same = bool(np.array_equal(np.asarray(cached(*args)), np.asarray(uncached(*args))))
        cached_s = _best_seconds(lambda: cached(*args), FLAGS.repeats)
        uncached_s = _best_seconds(lambda: uncached(*args), FLAGS.repeats)

    tokens = b * FLAGS.max_new
    result = dict(
        device=jax.devices()[0].device_kind, num_devices=1, dtype=FLAGS.dtype,
        model="m6.py:tiny (emb 128, 4 layers, 4 heads, vocab 2000), random init",
        num_params=flops.count_params(params), image_patches=p, text_len=FLAGS.text_len,
        prompt_len=2, batch_size=b, max_new=FLAGS.max_new, repeats=FLAGS.repeats,
        cached_s=cached_s, uncached_s=uncached_s,
        cached_tokens_per_s=tokens / cached_s, uncached_tokens_per_s=tokens / uncached_s,
        speedup=uncached_s / cached_s, same_tokens=same)
    print(json.dumps(result, indent=2))
    if FLAGS.json:
        report.write_json(FLAGS.json, result, indent=2)


if __name__ == "__main__":
    app.run(main)
