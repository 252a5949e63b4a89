r"""Bytes one device sends through the dropless expert all-to-all, read from the compiled
HLO, at a fixed number of tokens per device and expert axis n = 2, 4, 8 (issue 27).

  python benchmarks/expert_exchange.py --json=benchmarks/results/expert_exchange_cpu.json

Each of 8 fake CPU devices holds `--tokens` tokens with k=2 choices over 8 experts on a
(data 8/n, expert n) mesh; `parallel.dropless` runs under `jax.jit` and the all-to-all
results (per device: rows out, their int32 expert ids, outputs back) are summed from
`compiled.as_text()`. peer_capacity_factor 0 reserves all of a device's choices per peer
(n-fold); f > 0 reserves ceil(f N / n) rows per peer.
"""
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

import report  # noqa: E402  (benchmarks/report.py)

flags.DEFINE_integer("tokens", 256, "tokens per device")
flags.DEFINE_integer("emb_dim", 64, "model width D")
flags.DEFINE_list("factors", ["0", "1", "2"], "model.moe.peer_capacity_factor values")
flags.DEFINE_string("json", None, "write the result here")
FLAGS = flags.FLAGS
_BYTES = {"f32": 4, "s32": 4, "bf16": 2}


def all_to_all_bytes(hlo: str) -> int:
    total = 0
    for line in hlo.splitlines():
        if re.search(r"\ball-to-all\(", line):
            for dtype, dims in re.findall(r"(f32|s32|bf16)\[([\d,]*)\]", line.split("all-to-all(")[0]):
                n = 1
                for d in filter(None, dims.split(",")):
                    n *= int(d)
                total += _BYTES[dtype] * n
    return total


def main(_):
    import jax
    import numpy as np
    from m6jax import sharding
    from m6jax.model.moe import parallel
    from m6jax.model.moe.routers import Routing
    e, k, d, m = 8, 2, FLAGS.emb_dim, 2 * FLAGS.emb_dim
    g, s = 8 * 2, FLAGS.tokens // 2
    rng = np.random.default_rng(0)
    x = rng.normal(size=(g, s, d)).astype(np.float32)
    idx = rng.integers(0, e, size=(g, s, k)).astype(np.int32)
    comb = np.full((g, s, k), 0.5, np.float32)
    wi = rng.normal(size=(e, d, m)).astype(np.float32)
    wo = rng.normal(size=(e, m, d)).astype(np.float32)
    rows = []
    for factor in map(float, FLAGS.factors):
        for n in (2, 4, 8):
            mesh = sharding.make_mesh(dict(data=8 // n, fsdp=1, tensor=1, expert=n, stage=1))
            f = jax.jit(lambda *a, factor=factor: parallel.dropless(
                a[0], Routing(a[1], a[2], None, None, None), a[3], a[4], jax.nn.relu,
                "blocked", True, factor))
            with jax.set_mesh(mesh):
                compiled = f.lower(x, idx, comb, wi, wo).compile()
                _, sent = compiled(x, idx, comb, wi, wo)
            rows.append(dict(peer_capacity_factor=factor, expert=n, tokens_per_device=FLAGS.tokens,
                             choices_per_device=FLAGS.tokens * k,
                             all_to_all_bytes_per_device=all_to_all_bytes(compiled.as_text()),
                             dropped_fraction_random_routing=float(1 - np.asarray(sent).mean())))
            print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    if FLAGS.json:
        report.write_json(FLAGS.json, rows)


if __name__ == "__main__":
    app.run(main)
