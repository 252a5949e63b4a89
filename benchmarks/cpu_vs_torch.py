r"""m6jax's layers against the same math in PyTorch, forward+backward, on one CPU.

  python benchmarks/cpu_vs_torch.py --json=benchmarks/results/cpu_vs_torch.json
  python benchmarks/cpu_vs_torch.py --ops=mlp,block --iters=20

Each op is m6jax's module (`Mlp`, `SelfAttention`, `MoeMlp` with the capacity and the
dropless dispatch, one dense `Block`) and a hand-written PyTorch version of the same
computation on the same shapes, with the same weights (copied from the Flax init) and
input. A call is grad(mean(y^2)) w.r.t. the input and every weight: `jax.jit` of
`jax.grad` on one side, `torch.autograd.grad` on the other (eager, `--torch_threads`
threads). Both sides' forward outputs are compared once, so the rows time the same
math. Calls alternate JAX / PyTorch one by one and the medians are compared, so both
see the same background load on a shared machine. Writes a list of {op, shape, jax_ms,
torch_ms, ratio} (ratio = jax / torch: below 1 is JAX faster).

PyTorch is an optional benchmark dependency (`pip install torch`, CPU wheel): without
it the script says so and exits 0 without writing rows.
"""
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import report  # noqa: E402  (benchmarks/report.py)

OPS = ("mlp", "mlp_relu", "attention", "moe_capacity", "moe_dropless", "block")
flags.DEFINE_list("ops", list(OPS), f"which rows, from {OPS}")
flags.DEFINE_integer("batch", 8, "batch B (MoE: routing groups)")
flags.DEFINE_integer("length", 256, "sequence S (16 image patches + text, prefix-LM mask)")
flags.DEFINE_integer("emb_dim", 512, "width D")
flags.DEFINE_integer("mlp_dim", 2048, "hidden width M (dense and per expert)")
flags.DEFINE_integer("num_heads", 8, "attention heads")
flags.DEFINE_integer("num_experts", 8, "MoE experts E (top-1 router)")
flags.DEFINE_float("capacity_factor", 1.25, "MoE capacity factor")
flags.DEFINE_integer("iters", 10, "timed calls per side (after 2 warm-up calls)")
flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads")
flags.DEFINE_string("json", "", "write the rows here")
FLAGS = flags.FLAGS


# ---------------------------------------------------------------- PyTorch versions
def _t_layer_norm(torch, x, p):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], p["scale"], p["bias"], eps=1e-6)


def _t_mlp(torch, x, p, act):
    h = act(x.reshape(-1, x.shape[-1]) @ p["wi"]["kernel"])
    return (h @ p["wo"]["kernel"]).reshape(x.shape)


def _t_attention(torch, x, p, mask):
    b, s, d = x.shape
    h, dh = p["query"].shape[1:]
    x2 = x.reshape(b * s, d)
    q, k, v = ((x2 @ p[n].reshape(d, h * dh)).reshape(b, s, h, dh).transpose(1, 2)
               for n in ("query", "key", "value"))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return (out.transpose(1, 2).reshape(b * s, h * dh) @ p["out"].reshape(h * dh, d)).reshape(b, s, d)


def _t_route(torch, x, p):
    probs = torch.softmax(x @ p["router"], dim=-1)                      # [G, S, E]
    weight, expert = probs.max(dim=-1)                                  # [G, S]
    return weight, expert


def _t_moe_capacity(torch, x, p, capacity, act):
    """Top-1, capacity C per expert and group in token order; dropped tokens give 0."""
    g, s, d = x.shape
    e = p["wi"].shape[0]
    weight, expert = _t_route(torch, x, p)
    onehot = torch.nn.functional.one_hot(expert, e)                     # [G, S, E]
    pos = ((onehot.cumsum(1) - 1) * onehot).sum(-1)                     # [G, S]
    kept = pos < capacity
    slot = torch.where(kept, expert * capacity + pos, torch.full_like(pos, e * capacity))
    index = slot[..., None].expand(g, s, d)
    xe = torch.zeros(g, e * capacity + 1, d).scatter(1, index, x)       # [G, E*C+1, D]
    xe = xe[:, :-1].reshape(g, e, capacity, d)
    he = act(torch.einsum("gecd,edm->gecm", xe, p["wi"]))
    ye = torch.einsum("gecm,emd->gecd", he, p["wo"]).reshape(g, e * capacity, d)
    ye = torch.cat([ye, torch.zeros(g, 1, d)], 1)
    return torch.gather(ye, 1, index) * weight[..., None]


def _t_moe_dropless(torch, x, p, act):
    """Top-1, every token computed: sort by expert, one matmul pair per expert."""
    g, s, d = x.shape
    e = p["wi"].shape[0]
    weight, expert = _t_route(torch, x, p)
    flat, rows = expert.reshape(-1), x.reshape(g * s, d)
    order = torch.argsort(flat, stable=True)
    sizes = torch.bincount(flat, minlength=e).tolist()
    outs = [act(chunk @ p["wi"][i]) @ p["wo"][i]
            for i, chunk in enumerate(torch.split(rows[order], sizes))]
    y = torch.empty_like(rows).index_copy(0, order, torch.cat(outs))
    return y.reshape(g, s, d) * weight[..., None]


def _t_block(torch, x, p, mask, act):
    x = x + _t_attention(torch, _t_layer_norm(torch, x, p["pre_attn_norm"]), p["attn"], mask)
    return x + _t_mlp(torch, _t_layer_norm(torch, x, p["pre_mlp_norm"]), p["mlp"], act)


# ---------------------------------------------------------------- the rows
def _median_pair(jax_call, torch_call, iters):
    for _ in range(2):
        jax_call()
        torch_call()
    ts = ([], [])
    for _ in range(iters):
        for i, f in enumerate((jax_call, torch_call)):
            t = time.perf_counter()
            f()
            ts[i].append(time.perf_counter() - t)
    return tuple(1000 * sorted(t)[len(t) // 2] for t in ts)


def main(_):
    try:
        import torch
    except ImportError:
        print("cpu_vs_torch: PyTorch is not installed (an optional benchmark dependency: "
              "pip install torch); skipped, no rows written.")
        return
    import jax
    import jax.numpy as jnp
    import ml_collections
    from m6jax import schema
    import numpy as np

    from m6jax.model.attention import SelfAttention
    from m6jax.model.block import Block
    from m6jax.model.masks import prefix_lm_mask
    from m6jax.model.mlp import Mlp
    from m6jax.model.moe import MoeMlp
    from m6jax.model.moe.dispatch import expert_capacity

    torch.set_num_threads(FLAGS.torch_threads)
    b, s, d, m, h = FLAGS.batch, FLAGS.length, FLAGS.emb_dim, FLAGS.mlp_dim, FLAGS.num_heads
    e = FLAGS.num_experts
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(b, s, d)).astype(np.float32)
    patches = min(16, s // 2)
    pos = np.arange(s - patches)[None].repeat(b, 0)
    mask_np = np.array(prefix_lm_mask(jnp.ones((b, patches), bool),
                                        jnp.ones((b, s - patches), bool), jnp.asarray(pos < 8)))
    mask_j, mask_t = jnp.asarray(mask_np), torch.from_numpy(mask_np)
    gelu_t = torch.nn.functional.gelu  # exact (erf) GELU, m6jax's default
    relu_t = torch.relu

    def moe_cfg(dispatch):
        return schema.moe_section(**dict(
            num_experts=e, router="topk", k=1, every=1, capacity_factor=FLAGS.capacity_factor,
            eval_capacity_factor=FLAGS.capacity_factor, aux_loss_weight=0.01,
            z_loss_weight=1e-3, jitter=0.0, dispatch=dispatch))

    block_cfg = ml_collections.ConfigDict(dict(
        emb_dim=d, num_heads=h, mlp_dim=m, mlp_activation="gelu", dropout_rate=0.0))
    capacity = expert_capacity(s, 1, e, FLAGS.capacity_factor)
    specs = {  # op -> (flax module, extra call args, torch fn(x, params), shape text)
        "mlp": (Mlp(m, "gelu"), (), lambda x, p: _t_mlp(torch, x, p, gelu_t),
                f"[{b},{s},{d}] {d}->{m}->{d} gelu"),
        "mlp_relu": (Mlp(m, "relu"), (), lambda x, p: _t_mlp(torch, x, p, relu_t),
                     f"[{b},{s},{d}] {d}->{m}->{d} relu"),
        "attention": (SelfAttention(h, d // h), (mask_j,),
                      lambda x, p: _t_attention(torch, x, p, mask_t),
                      f"[{b},{s},{d}] {h} heads, prefix-LM mask"),
        "moe_capacity": (MoeMlp(moe_cfg("gather"), m, "gelu", training=True), (),
                         lambda x, p: _t_moe_capacity(torch, x, p, capacity, gelu_t),
                         f"[{b},{s},{d}] E={e} top-1 M={m} C={capacity}"),
        "moe_dropless": (MoeMlp(moe_cfg("dropless"), m, "gelu", training=True), (),
                         lambda x, p: _t_moe_dropless(torch, x, p, gelu_t),
                         f"[{b},{s},{d}] E={e} top-1 M={m} dropless"),
        "block": (Block(block_cfg), (mask_j,),
                  lambda x, p: _t_block(torch, x, p, mask_t, gelu_t),
                  f"[{b},{s},{d}] {h} heads, MLP {m} gelu, prefix-LM mask"),
    }
    x_j = jnp.asarray(x_np)
    rows = []
    print(f"{jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), fwd+bwd of mean(y^2), fp32")
    for op in FLAGS.ops:
        module, extra, torch_fn, shape = specs[op]
        params = jax.tree.map(lambda v: getattr(v, "value", v),
                              module.init(jax.random.key(0), x_j, *extra)["params"],
                              is_leaf=lambda v: hasattr(v, "value"))

        def forward(p, xx, module=module, extra=extra):
            out = module.apply({"params": p}, xx, *extra)
            return out[0] if isinstance(out, tuple) else out

        def loss(p, xx, forward=forward):
            return jnp.mean(forward(p, xx) ** 2)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        p_t = jax.tree.map(lambda v: torch.tensor(np.asarray(v), requires_grad=True), params)
        x_t = torch.tensor(x_np, requires_grad=True)
        leaves = [x_t] + jax.tree.leaves(p_t)

        def torch_call(torch_fn=torch_fn, p_t=p_t, x_t=x_t, leaves=leaves):
            y = torch_fn(x_t, p_t)
            return torch.autograd.grad((y * y).mean(), leaves)

        with torch.no_grad():
            diff = float(np.max(np.abs(np.asarray(jax.jit(forward)(params, x_j))
                                       - torch_fn(x_t, p_t).numpy())))
        jax_ms, torch_ms = _median_pair(lambda: jax.block_until_ready(grad(params, x_j)),
                                        torch_call, FLAGS.iters)
        row = dict(op=op, shape=shape, jax_ms=round(jax_ms, 2), torch_ms=round(torch_ms, 2),
                   ratio=round(jax_ms / torch_ms, 3))
        rows.append(row)
        print(json.dumps(row), f"(forward max |jax - torch| = {diff:.1e})", flush=True)
        if not diff < 1e-3 * max(1.0, math.sqrt(d)):
            raise SystemExit(f"{op}: JAX and PyTorch forwards differ by {diff}: not the same math")
    if FLAGS.json:
        report.write_json(FLAGS.json, rows, indent=1)


if __name__ == "__main__":
    app.run(main)
