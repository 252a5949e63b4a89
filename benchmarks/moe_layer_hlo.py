r"""The MoE layer's lowered program on CPU, as a hash per dispatch: run it in two trees to
show a change leaves the CPU paths' programs (so their speed) unchanged.

  PYTHONPATH=. python benchmarks/moe_layer_hlo.py            # this tree
  git archive d1ae7e8 | tar -x -C /tmp/old && (cd /tmp/old && PYTHONPATH=. python \
      /path/to/this/benchmarks/moe_layer_hlo.py)             # the base revision

The layer at benchmarks/moe_layer.py's peer shape (groups of 256 tokens, D 512, M 2048,
top-1, E 8), training mode, value-and-gradient w.r.t. its parameters; prints
`dispatch sha256[:16] characters` of the StableHLO text (no debug info).
"""
import hashlib

import jax
import jax.numpy as jnp

from m6jax import schema
from m6jax.model.moe.layer import MoeMlp


def main():
    for dispatch in ("dropless", "blocked", "ragged_dot", "grouped"):
        moe = schema.moe_section()
        moe.update(num_experts=8, k=1, every=1, dispatch=dispatch, group_size=256,
                   capacity_factor=1.25 if dispatch == "grouped" else 0.0)
        layer = MoeMlp(moe, 2048, "gelu", jnp.float32, training=True)
        x = jnp.zeros((4, 256, 512))
        params = jax.eval_shape(lambda: layer.init(jax.random.key(0), x))
        f = jax.jit(lambda p, x: jax.grad(lambda p: layer.apply(p, x)[0].sum())(p))
        text = f.trace(params, x).lower().as_text(debug_info=False)
        print(dispatch, hashlib.sha256(text.encode()).hexdigest()[:16], len(text), flush=True)


if __name__ == "__main__":
    main()
