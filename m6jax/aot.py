"""Ahead-of-time check of the analytic plan: compile the real train step for a mesh of
fake CPU devices and read XLA's memory analysis (nothing is allocated or run).

The depth is cut to a few scanned units so it compiles in about a minute here; the
analytic plan is computed for the same reduced model, so the two are comparable.
"""
from __future__ import annotations

import time

import flax.linen as nn
import jax

from m6jax import plan, sharding
from m6jax.data.config import TASK_NAMES
from m6jax.model.moe import moe_config
from m6jax.train import loss_scale
from m6jax.train.state import state_shardings
from m6jax.train.step import make_train_step


def reduced_depth(config, units: int):
    """A copy of `config` with `units` scanned units (MoE: groups of `every` layers)."""
    c = config.copy_and_resolve_references()
    moe = moe_config(c.model)
    every = int(moe.every) if moe is not None else 1
    with c.unlocked():
        c.model.num_layers = units * every
    return c


def compile_memory(config) -> dict:
    """XLA memory analysis of the jitted train step of `config` on all local devices."""
    mesh = sharding.make_mesh(config.mesh, jax.devices())
    model, tx, example = plan.build(config)
    state_sh = state_shardings(model, tx, example, mesh)
    abstract = nn.meta.unbox(plan.abstract_state(config))
    state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, state_sh)
    batch_sh = sharding.batch_sharding(mesh)
    batch_in = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
                for k, v in example.items()}
    step = make_train_step(model, tx, mesh, state_sh, len(TASK_NAMES),
                           loss_scale=loss_scale.from_config(config))
    t0 = time.time()
    with jax.set_mesh(mesh):
        compiled = step.lower(state_in, batch_in).compile()
    mem = compiled.memory_analysis()
    return dict(compile_s=time.time() - t0, xla_arguments=int(mem.argument_size_in_bytes),
                xla_outputs=int(mem.output_size_in_bytes), xla_temp=int(mem.temp_size_in_bytes),
                xla_alias=int(mem.alias_size_in_bytes))


def compare(config, units: int = 2) -> dict:
    """Analytic plan vs XLA's figures for `config` cut to `units` scanned units."""
    small = reduced_depth(config, units)
    analytic = plan.plan(small)
    pd = analytic["per_device_bytes"]
    out = dict(num_layers=int(small.model.num_layers),
               analytic_state=pd["params"] + pd["optimizer"],
               analytic_temp=pd["gradients"] + pd["activations"])
    out.update(compile_memory(small))
    return out
