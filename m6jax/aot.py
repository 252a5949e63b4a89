"""Ahead-of-time checks: compile the real train step for a mesh of fake CPU devices and
read XLA's memory analysis (`compare`), or lower it for a platform this machine does not
have (`lower_for`: cuda or tpu, MaxText's train_compile.py idea) and read the kernels
and buffers of its StableHLO (`summarize`). Nothing is allocated or run.

The depth is cut to a few scanned units so it compiles in about a minute here; the
analytic plan is computed for the same reduced model, so the two are comparable.
"""
from __future__ import annotations

import collections
import re
import time

import flax.linen as nn
import jax

from m6jax import kernels, plan, sharding
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


def _train_step(config, devices=None):
    """(jitted train step, its abstract state and batch, the mesh) on `devices` (all)."""
    mesh = sharding.make_mesh(config.mesh, devices or jax.devices())
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
    return step, state_in, batch_in, mesh


def compile_memory(config) -> dict:
    """XLA memory analysis of the jitted train step of `config` on all local devices."""
    step, state_in, batch_in, mesh = _train_step(config)
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


def lower_for(config, platform: str, units: int = 2) -> str:
    """StableHLO text of `config`'s train step (cut to `units` scanned units) lowered for
    `platform` ('cuda' | 'tpu') on this machine: kernels resolve for that platform
    (m6jax/kernels.py) and Pallas kernels lower natively, not in interpret mode."""
    small = reduced_depth(config, units)
    # The planned grid's device count (the `hardware` section), of the fake CPU devices.
    n = int(small.hardware.num_devices) if "hardware" in small else None
    with kernels.lowering_for(platform):
        step, state_in, batch_in, mesh = _train_step(small, jax.devices()[:n])
        with jax.set_mesh(mesh):
            lowered = step.trace(state_in, batch_in).lower(lowering_platforms=(platform,))
    return lowered.as_text()


_ITEM_BYTES = {"f64": 8, "i64": 8, "f32": 4, "i32": 4, "ui32": 4, "bf16": 2, "f16": 2,
               "i16": 2, "i8": 1, "ui8": 1, "i1": 1}
_TENSOR = re.compile(r"tensor<((?:\d+x)+)([a-z]+\d+)>")
_CALL = re.compile(r"custom_call @([^\s(]+)\(")
_KERNEL = re.compile(r'(?:kernel_name|name) = "([A-Za-z0-9_]+)"')


def summarize(text: str, top: int = 3) -> dict:
    """Kernels and buffers of lowered StableHLO text: `custom_calls` {target or Pallas
    kernel name: count} (Sharding and other bookkeeping calls left out), `largest` the
    `top` largest tensor types [(type, bytes)], and `shapes` every tensor shape."""
    calls = collections.Counter()
    for line in text.splitlines():
        m = _CALL.search(line)
        if not m or m.group(1) in ("Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape",
                                   "annotate_device_placement", "MoveToHost", "MoveToDevice"):
            continue
        name = _KERNEL.search(line) if m.group(1) in ("tpu_custom_call",) else None
        if name is None and "triton" in m.group(1):
            name = re.search(r"name = \"([A-Za-z0-9_]+)\"", line)
        calls[name.group(1) if name else m.group(1)] += 1
    shapes = {}
    for dims, dtype in _TENSOR.findall(text):
        shape = tuple(int(d) for d in dims.rstrip("x").split("x"))
        size = _ITEM_BYTES.get(dtype, 4)
        for d in shape:
            size *= d
        shapes[f"{'x'.join(map(str, shape))}x{dtype}"] = (shape, size)
    largest = sorted(((k, b) for k, (_, b) in shapes.items()), key=lambda kb: -kb[1])[:top]
    return dict(custom_calls=dict(calls), largest=largest,
                shapes=[s for s, _ in shapes.values()])


def square_buffers(summary: dict, length: int) -> list[tuple[int, ...]]:
    """Tensor shapes with two dimensions of `length` (scores or a mask over S x S)."""
    return [s for s in summary["shapes"] if sum(d == length for d in s) >= 2]


def summary_line(platform: str, summary: dict, length: int) -> str:
    """One line: the kernels (custom calls) and the largest buffers of the lowered step."""
    calls = ", ".join(f"{k} x{v}" for k, v in sorted(summary["custom_calls"].items())) or "none"
    big = ", ".join(f"{t} ({b / 2**20:,.1f} MiB)" for t, b in summary["largest"])
    square = square_buffers(summary, length)
    return (f"lowered for {platform}: kernels {calls}; largest buffers {big}; "
            f"{len(square)} buffer shapes with two dimensions of {length}")
