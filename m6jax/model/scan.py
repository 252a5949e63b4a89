"""The functional layer loop of a streamed or pipelined stack: `scan_units`.

Training and evaluation on a *streamed* stack (the offload plan stores its layer leaves
as `Segments`, some in host memory) run a plain `jax.lax.scan` over each segment of
units that applies one Block functionally, bringing a host unit's weights onto the
device inside the rematerialised body, so only the unit being computed is resident
(forward and backward; its gradient goes back to host memory as the unit's backward
ends, by the transpose of that `device_put`). A pipeline stage runs the same scan over
its chunk of units.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from m6jax.model.remat import REMAT_POLICIES
from m6jax.offload_layout import fetch, is_segments, on_host

# A streamed unit's device copy of its weights is never a residual of the backward pass
# (it is fetched again): with remat "none" everything else is still saved.
_NOT_THE_WEIGHTS = jax.checkpoint_policies.save_anything_except_these_names("streamed_weights")


def _to_device(w):
    """A unit's weight -> its device copy, named so that it is never saved for the
    backward pass (which fetches it again)."""
    return checkpoint_name(fetch(w), "streamed_weights") if on_host(w) else w


def scan_units(unit: nn.Module, layers, x, args, remat_policy: str, rng=None, sow=False,
               shared_units: int = 0, unit_args=None):
    """Applies the scanned unit (a Block or BlockGroup) once per unit of `layers`.

    layers: the stack's params, each leaf `Segments` of [n_i, ...] parts (the same runs
    for every leaf), or with `shared_units` = n one unit's params applied n times (a
    Pseudo stack). x: [B, S, D]; args: what each unit takes after x (mask, route...).
    A unit in host memory is copied to the device inside its rematerialised body, so
    the forward and the recomputed backward hold one unit's weights at a time.
    unit_args: None, or a pytree whose leaves have a leading units axis; unit i gets
    its slice after `args` (KV-cache decoding: each unit's cache).
    Returns (x, per-unit outputs stacked along axis 0, sown intermediates or {}).
    """
    policy = REMAT_POLICIES[remat_policy] or _NOT_THE_WEIGHTS

    def apply_unit(x, params, index, args, mine):
        params = jax.tree.map(_to_device, params)
        args = args if mine is None else (*args, mine)
        rngs = {} if rng is None else {"dropout": jax.random.fold_in(rng, index)}
        if sow:
            out, state = unit.apply({"params": params}, x, *args, rngs=rngs,
                                    mutable=["intermediates"])
            return out, state.get("intermediates", {})
        return unit.apply({"params": params}, x, *args, rngs=rngs), {}

    apply_unit = jax.checkpoint(apply_unit, policy=policy, prevent_cse=False)

    def body(x, xs):
        params, index, mine = xs
        (x, out), inter = apply_unit(x, params, index, args, mine)
        return x, (out, inter)

    if shared_units:
        x, (out, inter) = jax.lax.scan(lambda x, xs: body(x, (layers, *xs)), x,
                                       (jnp.arange(shared_units), unit_args))
        return x, out, inter
    num_parts = len(jax.tree.leaves(layers, is_leaf=is_segments)[0].parts)
    start, ys = 0, []
    for i in range(num_parts):
        part = jax.tree.map(lambda s: s.parts[i], layers, is_leaf=is_segments)
        n = jax.tree.leaves(part)[0].shape[0]
        mine = jax.tree.map(lambda a: a[start:start + n], unit_args)
        x, y = jax.lax.scan(body, x, (part, jnp.arange(start, start + n), mine))
        ys.append(y)
        start += n
    out, inter = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *ys) if len(ys) > 1 else ys[0]
    return x, out, inter
