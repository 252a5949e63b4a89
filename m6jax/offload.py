"""Granular host offload (M6-10T): which layers' state lives in pinned host memory, and
how it is stored so that the step can stream it.

Config section `offload` (each "none", "all", or layer indices: "0,3" or a Python list):
  optimizer_layers  layers whose optimizer state (AdamW moments, Adafactor factors)
                    lives in host memory
  param_layers      layers whose parameters live in host memory; their gradients are
                    made on the device one unit at a time and leave for host memory too

The stack's parameters are stacked along a `layers` axis (one scanned unit per row; an
MoE stack's unit is a group of `moe.every` layers, so a layer index selects its group).
One array cannot live half on the host, so with an active plan every stack leaf of the
params and of the optimizer state is *stored* as `Segments`: the consecutive runs of
units that share a placement, each run its own [n, ...] array in device or host memory.
Inside the step nothing is gathered back into a whole stack:

- the forward and the rematerialised backward scan each run, and a host unit's weights
  are copied to the device inside the scanned body (`model.scan.scan_units`), so one
  unit is resident at a time; its gradient leaves for host memory as its backward ends;
- the update (`m6jax.streamed_update`) scans the host runs unit by unit: (param, grad,
  moments) come in, the optimizer's update runs on the device, the results go back.

Non-offloaded leaves (embeddings, final norm, device runs) are used where they are.
A Pseudo (shared-layer) stack has one layer's weights: offloaded if any layer is listed,
and brought in whole for the step (it *is* one unit).

Every phase keeps this one stored layout (docs/pseudo-to-real-and-offload.md): init
creates into it (`init`, on the host), restore reads into host memory and splits there
(`restore_target`, `to_stored`), saves join the runs on the host
(`offload_layout.for_disk`: checkpoints hold the canonical format, so a run can resume
with another offload setting or mesh), evaluation scans the stored units, the
Pseudo-to-Real switch delinks on the host (`pseudo_to_real.delink_state`).
"""
from __future__ import annotations

import itertools
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.experimental.compute_on import compute_on

from m6jax import pseudo_to_real as p2r
from m6jax.offload_layout import HOST, Segments, fetch, is_segments, on_host, to_host
from m6jax.model.moe import moe_config



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
    return config.offload


def validate(config, sizes: dict[str, int]) -> None:
    """The `offload` section: layer lists, and what offload is not built with."""
    m, sec = config.model, _section(config)
    params, opt = (parse_layers(sec[f], m.num_layers, f"offload.{f}")
                   for f in ("param_layers", "optimizer_layers"))
    accum = int(config.optimizer.grad_accum_steps)
    if accum > 1 and params:
        raise ValueError(f"optimizer.grad_accum_steps={accum} with offload.param_layers="
                         f"{sec.param_layers!r}: accumulating offloaded gradients is "
                         "not built; set one of them back (grad_accum_steps=1 or "
                         "param_layers=none)")
    if sizes["stage"] > 1 and (params or opt):
        raise ValueError(f"mesh.stage={sizes['stage']} with offload.param_layers/"
                         "optimizer_layers: pipeline stages over a host-offloaded stack are "
                         "not built; set mesh.stage=1 or offload.*_layers='none'")


def requested(config) -> bool:
    sec = _section(config)
    return any(parse_layers(sec[f], config.model.num_layers, f"offload.{f}")
               for f in ("optimizer_layers", "param_layers"))


def check_backend(config, devices) -> None:
    """An offload setting needs a backend with pinned host memory."""
    if not requested(config):
        return
    kinds = {m.kind for m in devices[0].addressable_memories()}
    if HOST not in kinds:
        sec = _section(config)
        field = "param_layers" if parse_layers(sec["param_layers"], config.model.num_layers,
                                               "") else "optimizer_layers"
        raise ValueError(f"offload.{field}={sec[field]!r}: the {devices[0].platform} backend has "
                         f"no {HOST} memory (it has {', '.join(sorted(kinds))}); set "
                         f"offload.{field}=none")


def in_stack(path) -> bool:
    keys = [getattr(k, "key", None) for k in path]
    return any(a == "stack" and b == "layers" for a, b in zip(keys, keys[1:]))


class OffloadPlan:
    """Where each leaf of one stage's TrainState is stored, and the moves in and out."""

    def __init__(self, config, stage: str, canonical_shardings=None, shapes=None):
        """`canonical_shardings` and `shapes` (the TrainState's NamedShardings and
        ShapeDtypeStructs) are needed for the stored layout; the dry run needs neither."""
        moe = moe_config(config.model)
        every = int(moe.every) if moe is not None else 1
        self.units = config.model.num_layers // every  # the scanned axis's length
        self.shared = stage == p2r.STAGE_PSEUDO
        sec = _section(config)

        def units(field):
            layers = parse_layers(sec[field], config.model.num_layers, f"offload.{field}")
            return tuple(sorted({i // every for i in layers}))
        self.host_units = dict(params=units("param_layers"), opt_state=units("optimizer_layers"))
        self.active = any(self.host_units.values())
        self.streamed = self.active and not self.shared
        # Runs of consecutive units with the same (params on host, opt state on host).
        key = lambda u: tuple(u in self.host_units[p] for p in ("params", "opt_state"))
        self.runs = []  # (start, stop, {"params": on host, "opt_state": on host})
        for k, grp in itertools.groupby(range(self.units), key):
            grp = list(grp)
            self.runs.append((grp[0], grp[-1] + 1, dict(params=k[0], opt_state=k[1])))
        self.canonical = canonical_shardings
        self.stored_shardings = canonical_shardings
        if self.active and canonical_shardings is not None:
            if self.streamed and shapes is None:
                raise ValueError("OffloadPlan: a streamed layout needs the state's shapes")
            self.stored_shardings = self._stored_shardings(shapes)
        self._to_stored = self._to_stored_params = self._decode = None

    # ---- What is stored where.
    def on_host(self, part: str) -> bool:
        """Whether any unit of `part` ("params" / "opt_state") is offloaded."""
        return bool(self.host_units[part])

    def _map(self, fn, state, *others):
        """`fn(part, x, *other leaves)` on the stack leaves of params and opt_state."""
        def part(name):
            trees = [getattr(t, name) for t in (state, *others)]
            return jax.tree_util.tree_map_with_path(
                lambda path, x, *o: fn(name, x, *o) if in_stack(path) else x, *trees,
                is_leaf=is_segments)
        return state.replace(params=part("params"), opt_state=part("opt_state"))

    def _per_unit(self, x) -> bool:
        """A stack leaf with one row per unit (others, e.g. Adafactor's placeholder
        moments of shape (1,), are kept whole on the device)."""
        return len(x.shape) >= 1 and x.shape[0] == self.units

    def _stored_shardings(self, shapes):
        def leaf(part, sh, x):
            if self.shared:
                return sh.with_memory_kind(HOST) if self.on_host(part) else sh
            if not self._per_unit(x):
                return sh
            return Segments(tuple(sh.with_memory_kind(HOST if host[part] else "device")
                                  for _, _, host in self.runs))
        if self.shared:
            return self._map(lambda part, sh: leaf(part, sh, None), self.canonical)
        return self._map(leaf, self.canonical, shapes)

    def host_fraction(self, part: str):
        """`fraction(path)` of a leaf of `part` kept in host memory (for the dry run)."""
        if self.shared:
            share = float(self.on_host(part))
        else:
            share = len(self.host_units[part]) / self.units
        return lambda path: share if in_stack(path) else 0.0

    # ---- Layout conversions.
    def store(self, state):
        """Canonical state -> stored layout, inside jit (output shardings put the host
        parts there)."""
        if not self.streamed:
            return state
        return self._map(lambda part, x: Segments(tuple(x[a:b] for a, b, _ in self.runs))
                         if self._per_unit(x) else x, state)

    def init(self, init_fn):
        """`init_fn() -> canonical state` jitted into the stored layout. With an active
        plan the whole init runs as host computation (`compute_on("device_host")`):
        a stack leaf exists whole only in host memory, resident leaves are copied to
        the device as they leave (Flax's `nn.scan` init makes every unit at once, so
        unit-by-unit on the device would be another init)."""
        if not self.active:
            return jax.jit(init_fn, out_shardings=self.stored_shardings)
        def made_on_host():
            with compute_on("device_host"):
                return self.store(init_fn())
        return jax.jit(made_on_host, out_shardings=self.stored_shardings)

    def restore_target(self, abstract):
        """The canonical ShapeDtypeStructs to restore a checkpoint into: a stack leaf
        with any unit offloaded is read straight into host memory (its device runs are
        split off on the host by `to_stored`)."""
        if not self.active:
            return abstract
        def leaf(part, x):
            host = self.on_host(part) and (self.shared or self._per_unit(x))
            sh = x.sharding.with_memory_kind(HOST) if host else x.sharding
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
        return self._map(leaf, abstract)

    def to_stored(self, state):
        """A canonical state (restored, delinked, or made on the device by a test) ->
        the stored layout. Stack leaves go to host memory first and are split there
        (host computation), so no whole stack is made on the device."""
        return self.to_stored_fn()(state) if self.active else state

    def to_stored_fn(self):
        """The jitted `to_stored` (one per plan: every restore reuses its compile)."""
        if self._to_stored is None:
            self._to_stored = jax.jit(self.store_on_host, out_shardings=self.stored_shardings)
        return self._to_stored

    def to_stored_params(self, params):
        """`to_stored` of canonical params alone (`init_from`)."""
        if not self.active:
            return params
        if self._to_stored_params is None:
            fn = lambda p: self.store_on_host(ParamsOnly(params=p, opt_state={})).params
            self._to_stored_params = jax.jit(fn, out_shardings=self.stored_shardings.params)
        return self._to_stored_params(params)

    def store_on_host(self, state):
        """`store` inside jit, with each stack leaf that has an offloaded unit copied to
        host memory first and split there (host computation); a stack with none (all its
        runs on the device) is split where it is."""
        def leaf(part, x):
            if not self.shared and not self._per_unit(x):
                return x
            split = lambda x: (Segments(tuple(x[a:b] for a, b, _ in self.runs))
                               if self.streamed else x)
            if not self.on_host(part) and not on_host(x):
                return split(x)
            x = to_host(x)
            with compute_on("device_host"):
                return split(x)
        return self._map(leaf, state)

    def resident(self, stored):
        """What the train step works on: a streamed stack stays as stored (its units come
        in inside the layer scan and the update); a shared (Pseudo) stack is one unit's
        weights and state, brought onto the device whole."""
        if not self.active or self.streamed:
            return stored
        return self._map(lambda part, x: fetch(x), stored)

    def resident_params(self, params):
        """`resident` of the params alone (the eval step's input)."""
        return self.resident(ParamsOnly(params=params, opt_state={})).params

    def decode_params(self, stored_params, param_shardings):
        """The params KV-cache decoding takes: a streamed stack as stored (the decoder's
        layer loop is `scan_units` too, one unit's weights on the device at a time); a
        shared (Pseudo) stack, one unit, brought onto the device whole
        (`param_shardings`: the canonical ones)."""
        if not self.active or self.streamed:
            return stored_params
        if self._decode is None:
            self._decode = jax.jit(self.resident_params, out_shardings=param_shardings)
        return self._decode(stored_params)

    def decode_shardings(self, param_shardings):
        """The shardings of `decode_params`'s result (a decoder's in_shardings)."""
        return self.stored_shardings.params if self.streamed else param_shardings


@flax.struct.dataclass
class ParamsOnly:
    """A params-only stand-in for a TrainState: an OffloadPlan over params alone
    (`OffloadPlan(config, stage, ParamsOnly(shardings, {}), ParamsOnly(shapes, {}))`)."""
    params: Any
    opt_state: Any
