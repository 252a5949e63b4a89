"""The scanned stack of transformer blocks (`Stack`) and its three layer loops.

Initialisation and KV-cache decoding use Flax's `nn.scan`, which creates the stacked
`layers` parameters. Training, evaluation and decoding on a *streamed* stack (the offload
plan stores its layer leaves as `Segments`, some in host memory) run `scan.scan_units`,
one Block applied functionally per unit. With a pipeline schedule (`m6jax.pipeline`,
mesh.stage > 1) training runs the same `scan_units` once per stage and iteration, over
that stage's chunk of units.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from m6jax import pipeline as pipeline_lib
from m6jax.model.block import Block, BlockGroup
from m6jax.model.layers import constrain
from m6jax.model.moe import moe_config
from m6jax.model.remat import REMAT_POLICIES
from m6jax.model.scan import scan_units
from m6jax.offload_layout import Segments, is_segments


class Stack(nn.Module):
    """`num_layers` blocks applied with `nn.scan` along a `layers` parameter axis.

    With `share_layers` the block parameters have no layer axis and every layer applies
    the same weights (the Pseudo giant of Pseudo-to-Real); activations and FLOPs are
    those of the full-depth model either way.

    With `decode` (KV-cache generation, see M6) it returns (x, (keys, values) [B,
    num_layers, S, H, Dh]) of this call for the cache; a step passes the cache
    `cached` ([B, num_layers, L, H, Dh] each), which the scan reads layer by layer (axis
    1: the batch stays the leading axis of every cache array). Shared or not, each layer
    has its own cache. Decoding never rematerialises (there is no backward pass).
    """
    cfg: Any
    dtype: jnp.dtype = jnp.float32
    deterministic: bool = True
    training: bool = False
    decode: bool = False
    capacity_tokens: int = 0   # decode: MoE group size, one sequence's (0: moe.group_size)
    pipeline: pipeline_lib.Schedule | None = None  # train/eval run it when it is active

    @nn.compact
    def __call__(self, x, mask, route=None, cached=None):
        """Returns (x, MoE metrics stacked over the scanned units, or None if dense)."""
        cfg = self.cfg
        moe = moe_config(cfg)
        length, block, args, every = cfg.num_layers, Block, (), 1
        ctor = (cfg, self.dtype, self.deterministic)
        if moe is not None:
            # The scanned unit holds `every` layers (the last MoE), so units are identical.
            every = int(moe.every)
            length, args = cfg.num_layers // every, (route,)
            if every > 1:
                block, ctor = BlockGroup, ctor + (self.training,)
            else:
                ctor = ctor + (True, self.training)   # Block(use_moe=True, training)
        elif self.decode:
            ctor = ctor + (False, self.training)      # Block(use_moe=False, training)
        in_axes = (nn.broadcast,) * (1 + len(args))
        if self.decode:
            ctor = ctor + (True, self.capacity_tokens)
            if cached is not None and every > 1:      # [B, units, every, L, H, Dh]
                cached = tuple(c.reshape(c.shape[0], length, every, *c.shape[2:]) for c in cached)
            args = (route, cached)
            in_axes = (nn.broadcast, nn.broadcast, nn.broadcast if cached is None else 1)
        if self._pipelined(x):
            return self._pipeline(block(*ctor, parent=None), length, x, (mask, *args))
        streamed = self._streamed_layers()
        if streamed is not None:
            return self._scan_units(block(*ctor, parent=None), streamed, x, (mask, *args))
        policy = REMAT_POLICIES[cfg.remat_policy]
        if cfg.remat_policy != "none" and not self.decode:
            block = nn.remat(block, policy=policy, prevent_cse=False)
        if cfg.share_layers:
            scan_kw = dict(variable_broadcast="params", split_rngs={"params": False})
        else:
            scan_kw = dict(variable_axes={"params": 0}, split_rngs={"params": True},
                           metadata_params={nn.PARTITION_NAME: "layers"})
        scanned = nn.scan(block, length=length, in_axes=in_axes, out_axes=1 if self.decode else 0,
                          split_rngs={**scan_kw.pop("split_rngs"), "dropout": True},
                          **scan_kw)
        x, out = scanned(*ctor, name="layers")(x, mask, *args)
        if self.decode and every > 1:                 # [B, units, every, S, ...] -> layers
            out = tuple(o.reshape(o.shape[0], cfg.num_layers, *o.shape[3:]) for o in out)
        return x, out

    def _pipelined(self, x) -> bool:
        """Training and evaluation run the schedule (a plain scan over stage-sharded
        layers would gather the whole stack onto every device); decoding does not."""
        return (self.pipeline is not None and self.pipeline.active and not self.decode
                and not self.is_initializing() and x.shape[0] % self.pipeline.microbatches == 0)

    def _pipeline(self, unit, units, x, args):
        """The stack as `self.pipeline`'s schedule: each stage runs `scan_units` on its chunk."""
        rng = self.make_rng("dropout") if self.has_rng("dropout") else None
        layers = self.variables["params"]["layers"]
        shared = bool(self.cfg.share_layers)
        chunk_units = units // (self.pipeline.stages * self.pipeline.repeats)

        def stage_fn(params, x, args, chunk, microbatch):
            key = None if rng is None else jax.random.fold_in(jax.random.fold_in(rng, microbatch),
                                                              chunk)
            stacked = params if shared else jax.tree.map(lambda p: Segments((p,)), params)
            x, ys, _ = scan_units(unit, stacked, x, args, self.cfg.remat_policy, key,
                                  shared_units=chunk_units if shared else 0)
            return x, ys

        return pipeline_lib.run(stage_fn, layers, x, args, self.pipeline, constrain,
                                shared_units=units if shared else 0,
                                unit_axes=_unit_axes(unit, x, args))

    def _streamed_layers(self):
        """The stacked block params if the offload plan stores them as `Segments`
        (training, evaluation and KV-cache decoding alike)."""
        if self.is_initializing() or self.cfg.share_layers:
            return None
        layers = self.variables.get("params", {}).get("layers")
        leaves = jax.tree.leaves(layers, is_leaf=is_segments)
        if not leaves or not all(is_segments(s) for s in leaves):
            return None
        return layers

    def _scan_units(self, unit, layers, x, args):
        """`scan_units` over every segment in turn, with this stack's rngs and sows.
        Decoding: each unit reads its slice of the cache (axis 1 of [B, units, ...]) and
        the keys/values come back as `nn.scan`'s out_axes=1 gives them, per layer."""
        rng = self.make_rng("dropout") if self.has_rng("dropout") else None
        sow = self.is_mutable_collection("intermediates")
        cached = None
        if self.decode:
            args, cached = args[:-1], args[-1]
            cached = None if cached is None else jax.tree.map(
                lambda c: jnp.moveaxis(c, 1, 0), cached)
        x, ys, inter = scan_units(unit, layers, x, args, self.cfg.remat_policy, rng, sow,
                                  unit_args=cached)
        if sow and inter:
            self.put_variable("intermediates", "layers", inter)
        if self.decode:  # [units, B, (every,) S, ...] -> [B, num_layers, S, ...]
            ys = tuple(jnp.moveaxis(o, 0, 1) for o in ys)
            ys = tuple(o.reshape(o.shape[0], self.cfg.num_layers, *o.shape[-3:]) for o in ys)
        return x, ys


def _unit_axes(unit, x, args):
    """Each param leaf of one unit -> its logical axis names (a tuple), from an abstract
    init: the stored params are unboxed, and a pipeline stage's chunk must keep them."""
    key = jax.random.key(0)
    boxed = jax.eval_shape(lambda: unit.init({"params": key, "dropout": key}, x, *args))
    specs = nn.get_partition_spec(boxed)["params"]
    return jax.tree.map(lambda s: tuple(s), specs, is_leaf=lambda s: isinstance(s, P))
