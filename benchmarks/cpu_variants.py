r"""The CPU fixes one by one: the formulations the model had and has, timed in one run.

  python benchmarks/cpu_variants.py --json=benchmarks/results/cpu_variants.json
  python benchmarks/cpu_variants.py --shape=32,64,128,512     # the quickstart's MLP

MLP [B, S, D] -> M -> D fwd+bwd of mean(y^2) w.r.t. input and weights:
  3d_erfc       einsums on [B, S, D] with jax.nn.gelu (erfc): the code before issue 20
  2d_erfc       matmuls on [B*S, D], jax.nn.gelu
  2d_erf        matmuls on [B*S, D], GELU written with erf, autodiff
  2d_gelu_exact matmuls on [B*S, D], m6jax.model.mlp.gelu_exact (erf + own derivative)
  2d_relu       the same with ReLU (a floor for the activation's cost)
  torch         PyTorch's exact GELU MLP (if installed; 2 threads)
MoE experts [G, E, C, D] -> M -> D (gelu_exact), fwd+bwd:
  moe_gecd      einsums on [G, E, C, D]: before
  moe_expert_major  [E, G*C, D] (m6jax.model.moe.layer._experts): after
Calls alternate variant by variant; medians. Writes {name, shape, ms, ratio_to_first}.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import report  # noqa: E402  (benchmarks/report.py)

flags.DEFINE_list("shape", ["8", "256", "512", "2048"], "MLP B,S,D,M")
flags.DEFINE_list("moe_shape", ["32", "8", "10", "128", "512"], "MoE G,E,C,D,M")
flags.DEFINE_integer("iters", 9, "timed calls per variant (after 2 warm-up calls)")
flags.DEFINE_string("json", "", "write the rows here")
FLAGS = flags.FLAGS


def _alternate(calls, iters):
    for f in calls.values():
        for _ in range(2):
            f()
    ts = {k: [] for k in calls}
    for _ in range(iters):
        for k, f in calls.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return {k: 1000 * sorted(v)[len(v) // 2] for k, v in ts.items()}


def main(_):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.scipy.special import erf

    from m6jax.model.mlp import gelu_exact
    from m6jax.model.moe.layer import _experts

    b, s, d, m = map(int, FLAGS.shape)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32)
    wi = jnp.asarray(rng.normal(size=(d, m)) / np.sqrt(d), jnp.float32)
    wo = jnp.asarray(rng.normal(size=(m, d)) / np.sqrt(m), jnp.float32)

    def erfc_gelu(h):
        return jax.nn.gelu(h, approximate=False)

    def erf_gelu(h):
        return 0.5 * h * (1.0 + erf(h * np.float32(np.sqrt(0.5))))

    def mlp3(xx, a, c, act):
        return jnp.einsum("bsm,md->bsd", act(jnp.einsum("bsd,dm->bsm", xx, a)), c)

    def mlp2(xx, a, c, act):
        return (act(xx.reshape(-1, d) @ a) @ c).reshape(xx.shape)

    def graded(f, act):
        g = jax.jit(jax.grad(lambda xx, a, c: jnp.mean(f(xx, a, c, act) ** 2), argnums=(0, 1, 2)))
        return lambda: jax.block_until_ready(g(x, wi, wo))

    calls = {"3d_erfc": graded(mlp3, erfc_gelu), "2d_erfc": graded(mlp2, erfc_gelu),
             "2d_erf": graded(mlp2, erf_gelu), "2d_gelu_exact": graded(mlp2, gelu_exact),
             "2d_relu": graded(mlp2, jax.nn.relu)}
    try:
        import torch
        torch.set_num_threads(2)
        tx, ti, to = (torch.tensor(np.asarray(v), requires_grad=True) for v in (x, wi, wo))

        def torch_call():
            y = torch.nn.functional.gelu(tx.reshape(-1, d) @ ti) @ to
            return torch.autograd.grad((y * y).mean(), (tx, ti, to))
        calls["torch"] = torch_call
    except ImportError:
        print("PyTorch not installed: no torch row")

    g, e, c, dd, mm = map(int, FLAGS.moe_shape)
    xe = jnp.asarray(rng.normal(size=(g, e, c, dd)), jnp.float32)
    ewi = jnp.asarray(rng.normal(size=(e, dd, mm)) / np.sqrt(dd), jnp.float32)
    ewo = jnp.asarray(rng.normal(size=(e, mm, dd)) / np.sqrt(mm), jnp.float32)

    def gecd(xx, a, cc, act):
        return jnp.einsum("gecm,emd->gecd", act(jnp.einsum("gecd,edm->gecm", xx, a)), cc)

    def moe_graded(f):
        gr = jax.jit(jax.grad(lambda xx, a, cc: jnp.mean(f(xx, a, cc, gelu_exact) ** 2),
                              argnums=(0, 1, 2)))
        return lambda: jax.block_until_ready(gr(xe, ewi, ewo))

    moe_calls = {"moe_gecd": moe_graded(gecd), "moe_expert_major": moe_graded(_experts)}
    rows = []
    for group, shape in ((calls, f"[{b},{s},{d}] {d}->{m}->{d}"),
                         (moe_calls, f"G={g} E={e} C={c} D={dd} M={mm}")):
        ms = _alternate(group, FLAGS.iters)
        first = next(iter(ms.values()))
        for k, v in ms.items():
            rows.append(dict(name=k, shape=shape, ms=round(v, 2), ratio_to_first=round(v / first, 3)))
            print(json.dumps(rows[-1]), flush=True)
    if FLAGS.json:
        report.write_json(FLAGS.json, rows, indent=1)


if __name__ == "__main__":
    app.run(main)
