r"""CPU A/B of issue 28's mask change: today's attention paths with the mask carried as
vectors (m6jax/model/masks.py) vs the same paths fed the dense [B, 1, S, S] boolean as
before (sparse.py and the model as of git revision --base).

  python benchmarks/attention_masks_ab.py --tokens=1024 --iters=5 --base=d1ae7e8

Forward + backward (grad w.r.t. q, k, v) of one call, batch 1, 8 heads of 64, f32, a
256-token bidirectional prefix, the rest causal (benchmarks/attention.py's setting);
`dense` is jax.nn.dot_product_attention's XLA path, `sparse` the block-sparse path
(blocks of 64, window 1, stride 8, 4 global blocks). The four variants run alternated
call by call in one process (the same background load); prints median ms per variant
and the new/old ratios.
"""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

flags.DEFINE_list("tokens", ["1024"], "sequence lengths")
flags.DEFINE_integer("iters", 5, "timed calls per variant (after one warm-up call)")
flags.DEFINE_string("base", "d1ae7e8", "git revision whose sparse.py takes the dense mask")
FLAGS = flags.FLAGS


def _old_sparse(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:m6jax/model/sparse.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "old_sparse.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("old_sparse", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_sparse"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from m6jax.model.masks import AttentionMask
    from m6jax.model.sparse import Pattern, sparse_attention
    old = _old_sparse(FLAGS.base)
    pattern = Pattern(64, 1, 8, 4)
    old_pattern = old.Pattern(64, 1, 8, 4)
    for s in map(int, FLAGS.tokens):
        ks = jax.random.split(jax.random.key(0), 4)
        q, k, v, w = (jax.random.normal(kk, (1, s, 8, 64), jnp.float32) for kk in ks)
        pos = np.arange(s)
        dense = jnp.asarray(((pos[None, :] < 256) | (pos[None, :] <= pos[:, None]))[None, None])
        vec = AttentionMask(jnp.ones((1, s), bool), jnp.asarray(pos[None] < 256))
        pmask = jnp.asarray(pattern.mask(s))[None, None]
        fns = {
            "dense_old": (lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m & pmask),
                          dense),
            "dense_new": (lambda q, k, v, m: jax.nn.dot_product_attention(
                q, k, v, mask=m.dense() & pmask, implementation="xla"), vec),
            "sparse_old": (lambda q, k, v, m: old.sparse_attention(q, k, v, m, old_pattern), dense),
            "sparse_new": (lambda q, k, v, m: sparse_attention(q, k, v, m, pattern), vec),
        }
        compiled = {}
        for name, (fn, m) in fns.items():
            grad = jax.jit(jax.grad(lambda q, k, v, m, fn=fn: jnp.sum(fn(q, k, v, m) * w),
                                    argnums=(0, 1, 2)))
            compiled[name] = grad.lower(q, k, v, m).compile()
            jax.block_until_ready(compiled[name](q, k, v, m))
        times = {n: [] for n in fns}
        for _ in range(FLAGS.iters):
            for name, (_, m) in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(compiled[name](q, k, v, m))
                times[name].append(time.perf_counter() - t0)
        ms = {n: 1000 * float(np.median(t)) for n, t in times.items()}
        temp = {n: compiled[n].memory_analysis().temp_size_in_bytes / 2**20 for n in fns}
        print(json.dumps(dict(tokens=s, ms=ms, temp_mb=temp, load_avg_1min=os.getloadavg()[0])))
        for kind in ("dense", "sparse"):
            print(f"{s} tokens {kind}: new/old time {ms[kind + '_new'] / ms[kind + '_old']:.2f}x, "
                  f"temp {temp[kind + '_new'] / temp[kind + '_old']:.2f}x", flush=True)


if __name__ == "__main__":
    app.run(main)
