r"""Forward+backward time of the MoE layer vs a dense MLP with the same activated FLOPs.

  python benchmarks/moe_layer.py --json=/tmp/moe_layer.json
  python benchmarks/moe_layer.py --shape=peer --json=/tmp/moe_peer.json
  python benchmarks/moe_layer.py --groups=16 --tokens=512 --emb_dim=512   # GPU
  python benchmarks/moe_layer.py --shape=peer --dtype=bfloat16 \
      --dispatches=mgpu,blocked,ragged_dot                                  # Hopper GPU

`--shape=peer` is the shape the peers were timed on (BENCHMARKS.md): 2,048 tokens (8
groups of 256), D 512, M 2048, top-1, E in {8, 32}, every dispatch; `--shape=default`
keeps the flags below. Flags given explicitly override either shape.

For each router and E in --experts, the MoE layer (capacity factor --capacity_factor,
every dispatch scheme) and a dense MLP whose hidden width is k * mlp_dim (what one token
activates) are timed in the same process: median of --iters jitted calls of
grad(sum(y^2)) w.r.t. the input and all weights. Writes a list of {router, k,
num_experts, dispatch, moe_ms, dense_ms, ratio, dropped_fraction} (the layer's own
metric on the benchmark's input: the share of choices over capacity; 0 when dropless).
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import report  # noqa: E402  (benchmarks/report.py)

flags.DEFINE_enum("shape", "default", ["default", "peer"], "preset shape (see above)")
flags.DEFINE_integer("groups", 8, "routing groups (examples)")
flags.DEFINE_integer("tokens", 256, "tokens per group")
flags.DEFINE_integer("emb_dim", 256, "model width D")
flags.DEFINE_integer("mlp_dim", 1024, "expert hidden width M")
flags.DEFINE_list("experts", ["8", "32"], "expert counts E")
flags.DEFINE_list("routers", ["topk:1", "topk:2", "prototype:2", "hash:1", "domain:1"],
                  "router:k pairs")
flags.DEFINE_list("dispatches", ["gather", "einsum", "grouped", "blocked", "ragged_dot"],
                  "dispatch schemes")
flags.DEFINE_integer("group_size", 0, "model.moe.group_size (0 = one example per group)")
flags.DEFINE_enum("priority", "order", ["order", "score"], "model.moe.priority")
flags.DEFINE_float("capacity_factor", 1.25, "training capacity factor")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "activation / expert compute dtype (mgpu takes 16-bit operands)")
flags.DEFINE_integer("iters", 10, "timed calls per measurement (after 2 warm-up calls)")
flags.DEFINE_string("json", "", "write the results here")
FLAGS = flags.FLAGS

PEER = dict(groups=8, tokens=256, emb_dim=512, mlp_dim=2048, experts=["8", "32"],
            routers=["topk:1"])


def _apply_shape():
    if FLAGS.shape != "peer":
        return
    for name, value in PEER.items():
        if not FLAGS[name].present:
            FLAGS[name].value = value


def _time_pair(a, b) -> tuple[float, float]:
    """Median ms of two (jitted fn, args) pairs, timed alternately call by call.

    Alternating makes both medians see the same background load, so their ratio holds
    on a shared machine even when absolute timings drift.
    """
    import jax
    for f, args in (a, b):
        for _ in range(2):
            jax.block_until_ready(f(*args))
    ts = ([], [])
    for _ in range(FLAGS.iters):
        for i, (f, args) in enumerate((a, b)):
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts[i].append(time.perf_counter() - t)
    return tuple(1000 * sorted(t)[len(t) // 2] for t in ts)


def main(_):
    import jax
    import jax.numpy as jnp
    from m6jax import schema
    import numpy as np

    from m6jax.model.mlp import Mlp
    from m6jax.model.moe import MoeMlp

    _apply_shape()
    g, s, d, m = FLAGS.groups, FLAGS.tokens, FLAGS.emb_dim, FLAGS.mlp_dim
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(g, s, d)), FLAGS.dtype)
    ids = jnp.asarray(rng.integers(0, 8000, size=(g, s)), jnp.int32)
    modality = jnp.asarray(np.arange(s)[None, :].repeat(g, 0) >= s // 4, jnp.int32)

    def compiled(module, *extra):
        params = jax.tree.map(lambda b: getattr(b, "value", b),
                              module.init(jax.random.key(0), x, *extra)["params"],
                              is_leaf=lambda b: hasattr(b, "value"))

        def loss(p, xx):
            out = module.apply({"params": p}, xx, *extra)
            y = out[0] if isinstance(out, tuple) else out
            return jnp.sum(y.astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)

    dense = {}
    rows = []
    print(f"{jax.devices()[0].platform}: {g}x{s} tokens, D={d}, M={m}, "
          f"capacity factor {FLAGS.capacity_factor}, load {os.getloadavg()[0]:.2f}")
    for spec in FLAGS.routers:
        router, k = spec.split(":")[0], int(spec.split(":")[1])
        if k not in dense:  # a dense MLP k times wider: the same activated FLOPs
            dense[k] = compiled(Mlp(k * m, "gelu", dtype=FLAGS.dtype))
        for e in map(int, FLAGS.experts):
            for dispatch in FLAGS.dispatches:
                cfg = schema.moe_section(**dict(
                    num_experts=e, router=router, k=k, every=1,
                    capacity_factor=FLAGS.capacity_factor,
                    eval_capacity_factor=FLAGS.capacity_factor, aux_loss_weight=0.01,
                    z_loss_weight=1e-3, jitter=0.0, dispatch=dispatch,
                    group_size=FLAGS.group_size, priority=FLAGS.priority))
                layer = MoeMlp(cfg, m, "gelu", dtype=FLAGS.dtype)
                step, args = compiled(layer, ids, modality)
                moe_ms, dense_ms = _time_pair((step, args), dense[k])
                _, metrics = jax.jit(lambda p: layer.apply({"params": p}, x, ids, modality))(
                    args[0])
                row = dict(router=router, k=k, num_experts=e, dispatch=dispatch,
                           moe_ms=round(moe_ms, 3), dense_ms=round(dense_ms, 3),
                           ratio=round(moe_ms / dense_ms, 3),
                           dropped_fraction=round(float(metrics["dropped_fraction"]), 5))
                rows.append(row)
                print(json.dumps(row), flush=True)
    if FLAGS.json:
        report.write_json(FLAGS.json, rows, indent=1)


if __name__ == "__main__":
    app.run(main)
