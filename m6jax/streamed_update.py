"""The optimizer update of a streamed (offloaded) stack, one unit at a time.

Gradients of offloaded units arrive in host memory (`Segments` parts in `pinned_host`).
The update never brings a whole offloaded stack onto the device: the global gradient
norm sums the host runs unit by unit, and each host run's update is a `lax.scan` over
its units that copies (param, grad, optimizer state) of one unit to the device, runs
the optimizer's elementwise `core` there, and sends the new param and state back, as
the scan's stacked outputs in host memory. Resident leaves (embeddings, the final norm,
device runs) are updated in place as usual.

Why a device-side scan rather than computing on the host (`compute_on("device_host")`):
the update is elementwise and cheap in FLOPs but reads ~5 arrays per parameter, and a
host CPU does that far more slowly than the device; the scan costs transfers the plan
already counts (`m6jax.plan`), overlapped by XLA with the next unit's update. It also
runs on every backend, and the numbers are the same as the resident update's.

The optimizer state mirrors the params tree wherever optax keeps per-parameter values
(AdamW's mu/nu, Adafactor's factors), so a "mirror" node is any dict of the state that
has the params' `stack` key; the stack subtree of each mirror is what streams.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from m6jax.offload_layout import Segments, fetch, is_segments, on_host
from m6jax.train import optim


def _is_mirror(node) -> bool:
    return isinstance(node, dict) and "stack" in node and "layers" in node["stack"]


def _split(tree):
    """(tree without stack/layers, the stack/layers subtree) of a params-like dict."""
    rest = dict(tree)
    stack = dict(rest.pop("stack"))
    layers = stack.pop("layers")
    if stack:
        rest["stack"] = stack
    return rest, layers


def _join(rest, layers):
    out = dict(rest)
    out["stack"] = dict(out.get("stack", {}), layers=layers)
    return out


def _send_like(x, like):
    """`x` placed in the memory space of `like` (host results go back to the host)."""
    return jax.device_put(x, jax.memory.Space.Host) if like is not None and on_host(like) else x


def _part(tree, i):
    return jax.tree.map(lambda s: s.parts[i] if is_segments(s) else s, tree, is_leaf=is_segments)


def _any_on_host(tree) -> bool:
    return any(on_host(x) for x in jax.tree.leaves(tree))


def _fold(key, i):
    return None if key is None else jax.random.fold_in(key, i)


def global_norm(grads) -> jax.Array:
    """sqrt of the sum of squares of every gradient; host runs are read unit by unit."""
    total = jnp.zeros((), jnp.float32)
    for leaf in jax.tree.leaves(grads, is_leaf=is_segments):
        for x in (leaf.parts if is_segments(leaf) else (leaf,)):
            if on_host(x):
                def add(acc, unit):
                    return acc + jnp.sum(jnp.square(fetch(unit).astype(jnp.float32))), None
                total = total + jax.lax.scan(add, jnp.zeros((), jnp.float32), x)[0]
            else:
                total = total + jnp.sum(jnp.square(x.astype(jnp.float32)))
    return jnp.sqrt(total)


def update(tx, grads, opt_state, params, grad_norm, finite, key=None, loss_scale=None):
    """(new params, new opt_state) of `tx` (`optim.ClippedOptimizer`) on a stored state
    whose stack leaves are `Segments`; a non-finite step (`finite` False) keeps the old
    values, unit by unit as well. `key` drives the stochastic rounding of low-precision
    params (`optim.apply_updates`), folded with the part and the unit. With a
    `loss_scale` (f32 scalar) `grads` are of the scaled loss: each part is divided by it
    in float32 on the device before clipping (`grad_norm` is the unscaled norm)."""
    clip_state, core_state = opt_state
    nodes, treedef = jax.tree.flatten(core_state, is_leaf=_is_mirror)
    mirror = [_is_mirror(n) for n in nodes]
    rest = [_split(n)[0] if m else n for n, m in zip(nodes, mirror)]
    layers = [_split(n)[1] if m else n for n, m in zip(nodes, mirror)]
    # Which leaves of a part's state have one row per unit (were Segments): the rest
    # (counters; Adafactor's placeholders) are whole in every part.
    per_unit = [is_segments(x) for x in jax.tree.leaves(layers, is_leaf=is_segments)]
    trigger = jnp.squeeze(grad_norm < tx.max_norm)

    def clip(g):  # optax.clip_by_global_norm's formula, with the norm of all gradients
        if loss_scale is not None:
            g = (g.astype(jnp.float32) / loss_scale).astype(g.dtype)
        return jax.lax.select(trigger, g, (g / grad_norm.astype(g.dtype)) * tx.max_norm)

    def step(g, vals, p, key):
        """The core update of one part: params `p`, the state's nodes restricted to
        that part (`vals`, a list in `treedef`'s order)."""
        u, new_s = tx.core.update(jax.tree.map(clip, g), jax.tree.unflatten(treedef, vals), p)
        keep = lambda new, old: jnp.where(finite, new, old)
        new_p = jax.tree.map(keep, optim.apply_updates(p, u, key), p)
        return new_p, jax.tree.map(keep, treedef.flatten_up_to(new_s), vals)

    def streamed(g, vals, p, key):
        """`step` unit by unit (scan), one unit's values on the device at a time."""
        flat, vals_def = jax.tree.flatten(vals)
        units = [x if u else None for x, u in zip(flat, per_unit)]

        def body(_, xs):
            g_u, units_u, p_u, j = xs
            g_d, units_d, p_d = jax.tree.map(fetch, (g_u, units_u, p_u))
            merged = [d if u else x for d, x, u in zip(units_d, flat, per_unit)]
            new_p, new_vals = step(g_d, jax.tree.unflatten(vals_def, merged), p_d,
                                   _fold(key, j))
            new_units = [_send_like(n, x) if u else None
                         for n, x, u in zip(jax.tree.leaves(new_vals), units_u, per_unit)]
            return None, (jax.tree.map(_send_like, new_p, p_u), new_units)
        n = jax.tree.leaves(p)[0].shape[0]
        new_p, new_units = jax.lax.scan(body, None, (g, units, p, jnp.arange(n)))[1]
        return new_p, jax.tree.unflatten(vals_def, [n if u else x for n, x, u in
                                                    zip(new_units, flat, per_unit)])

    g_rest, g_layers = _split(grads)
    p_rest, p_layers = _split(params)
    new_p_rest, new_rest = step(g_rest, rest, p_rest, _fold(key, 0))
    num_parts = len(jax.tree.leaves(p_layers, is_leaf=is_segments)[0].parts)
    new_p_parts, new_parts = [], []
    for i in range(num_parts):
        g, p, vals = _part(g_layers, i), _part(p_layers, i), _part(layers, i)
        unit_vals = [x for x, u in zip(jax.tree.leaves(vals), per_unit) if u]
        new_p, new_vals = (streamed if _any_on_host((g, p, unit_vals)) else step)(
            g, vals, p, _fold(key, i + 1))
        new_p_parts.append(new_p)
        new_parts.append(jax.tree.leaves(new_vals))

    segments = lambda *a: Segments(tuple(a))
    new_params = _join(new_p_rest, jax.tree.map(segments, *new_p_parts))
    # Per-unit leaves: Segments of every part's rows; whole leaves: the first part's.
    flat = [segments(*(v[j] for v in new_parts)) if u else new_parts[0][j]
            for j, u in enumerate(per_unit)]
    new_layers = jax.tree.unflatten(jax.tree.structure(layers, is_leaf=is_segments), flat)
    # Counters advance alike in every part: the resident part's are kept.
    out = [_join(r, l) if m else r for r, l, m in zip(new_rest, new_layers, mirror)]
    return new_params, (clip_state, jax.tree.unflatten(treedef, out))
