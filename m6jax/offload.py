"""Granular host offload (M6-10T): chosen layers' optimizer state, and optionally their
parameters, live in pinned host memory between steps; the step brings them in.

Config section `offload` (each "none", "all", or layer indices: "0,3" or a Python list):
  optimizer_layers  layers whose AdamW moments live in host memory
  param_layers      layers whose parameters live in host memory

The stack's parameters are stacked along a `layers` axis, and one array cannot live
half on the host. So a leaf of the stack is *stored* as `Split(device, host)`: the rows
of the layers kept on the device and those offloaded (each a [n, ...] array), and the
jitted step gathers it back into [L, ...] on the device, computes the ordinary step and
splits the result again; XLA overlaps the transfers with compute where it can. With
"all" a leaf is simply stored in host memory. Embeddings and the final norm are never
offloaded. An MoE stack scans groups of `moe.every` layers, so a layer index selects
its group; a Pseudo (shared-layer) stack has one set of weights, offloaded if any layer
is listed. Checkpoints always hold the ordinary (canonical) state, so a run can resume
with another offload setting.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from m6jax import pseudo_to_real as p2r
from m6jax.model.moe import moe_config

HOST = "pinned_host"


@flax.struct.dataclass
class Split:
    """A stacked leaf stored as the rows kept on the device and the offloaded rows."""
    device: Any
    host: Any


def parse_layers(value, num_layers: int, field: str) -> tuple[int, ...]:
    """"none" / "all" / "0,2" / [0, 2] -> sorted layer indices; errors name the field."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("", "none"):
            return ()
        if v == "all":
            return tuple(range(num_layers))
        try:
            idx = [int(s) for s in v.replace("[", "").replace("]", "").split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"{field}={value!r} must be 'none', 'all' or layer indices like "
                             "'0,3'") from None
    else:
        idx = [int(i) for i in value]
    bad = [i for i in idx if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"{field}={value!r}: layer {bad[0]} is not in [0, model.num_layers="
                         f"{num_layers})")
    return tuple(sorted(set(idx)))


def _section(config):
    return config.get("offload") or {"optimizer_layers": "none", "param_layers": "none"}


def validate(config) -> None:
    for f in ("optimizer_layers", "param_layers"):
        parse_layers(_section(config)[f], config.model.num_layers, f"offload.{f}")


def _in_stack(path) -> bool:
    keys = [getattr(k, "key", None) for k in path]
    return any(a == "stack" and b == "layers" for a, b in zip(keys, keys[1:]))


class OffloadPlan:
    """Where each leaf of one stage's TrainState is stored, and the moves in and out."""

    def __init__(self, config, stage: str, canonical_shardings=None):
        moe = moe_config(config.model)
        every = int(moe.every) if moe is not None else 1
        self.units = config.model.num_layers // every  # the scanned axis's length
        self.shared = stage == p2r.STAGE_PSEUDO
        sec = _section(config)

        def units(field):
            layers = parse_layers(sec[field], config.model.num_layers, f"offload.{field}")
            return tuple(sorted({i // every for i in layers}))
        self.host_units = dict(params=units("param_layers"), opt_state=units("optimizer_layers"))
        self.canonical = canonical_shardings
        self.active = any(self.host_units.values())
        self.stored_shardings = (self._stored_shardings() if self.active and canonical_shardings
                                 is not None else canonical_shardings)

    # ---- What is stored where.
    def _kind(self, part: str) -> str:
        """'device', 'host' (the whole leaf) or 'split' for stack leaves of a state part."""
        host = self.host_units[part]
        if not host:
            return "device"
        if self.shared or len(host) == self.units:
            return "host"
        return "split"

    def _rows(self, part):
        host = np.asarray(self.host_units[part])
        return np.setdiff1d(np.arange(self.units), host), host

    def _map(self, fn, state, *others):
        """`fn(part, x, *other leaves)` on the stack leaves of params and opt_state."""
        def part(name):
            trees = [getattr(t, name) for t in (state, *others)]
            return jax.tree_util.tree_map_with_path(
                lambda path, x, *o: fn(name, x, *o) if _in_stack(path) else x, *trees,
                is_leaf=lambda x: isinstance(x, Split))
        return state.replace(params=part("params"), opt_state=part("opt_state"))

    def _stored_shardings(self):
        def leaf(part, sh):
            kind = self._kind(part)
            if kind == "host":
                return sh.with_memory_kind(HOST)
            if kind == "split":
                return Split(sh, sh.with_memory_kind(HOST))
            return sh
        return self._map(leaf, self.canonical)

    def host_fraction(self, part: str):
        """`fraction(path)` of a leaf of `part` ("params" / "opt_state") kept in host
        memory: for the dry-run memory plan."""
        kind = self._kind(part)
        share = {"device": 0.0, "host": 1.0,
                 "split": len(self.host_units[part]) / self.units}[kind]
        return lambda path: share if _in_stack(path) else 0.0

    # ---- Moves (inside jit).
    def store(self, state):
        """Canonical state -> stored layout (output shardings put the host parts there)."""
        def leaf(part, x):
            if self._kind(part) != "split":
                return x
            dev, host = self._rows(part)
            return Split(jnp.take(x, dev, axis=0), jnp.take(x, host, axis=0))
        return self._map(leaf, state)

    def load(self, stored):
        """Stored layout -> canonical state on the device."""
        def leaf(part, x, sh):
            kind = self._kind(part)
            if kind == "host":
                return jax.device_put(x, sh)
            if kind == "split":
                dev, host = self._rows(part)
                both = jnp.concatenate([x.device, jax.device_put(x.host, sh)], axis=0)
                return jnp.take(both, np.argsort(np.concatenate([dev, host])), axis=0)
            return x
        return self._map(leaf, stored, self.canonical)

    # ---- Jitted conversions for the loop (restore, save, evaluate).
    def to_stored(self, state):
        if not self.active:
            return state
        return jax.jit(self.store, out_shardings=self.stored_shardings)(state)

    def to_canonical(self, stored):
        if not self.active:
            return stored
        return jax.jit(self.load, out_shardings=self.canonical)(stored)

    def params(self, stored):
        """The canonical params of a stored state (for evaluation)."""
        if not self.host_units["params"]:
            return stored.params
        return self.to_canonical(stored).params

    def wrap_step(self, step_fn):
        """A step on the canonical state -> the same step on the stored layout."""
        if not self.active:
            return step_fn

        def stored_step(stored, batch):
            state, metrics = step_fn(self.load(stored), batch)
            return self.store(state), metrics
        return stored_step


def memory_kinds(tree) -> dict[str, str]:
    """'path' -> memory kind of each array (for tests and the memory benchmark)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[jax.tree_util.keystr(path)] = x.sharding.memory_kind
    return out
