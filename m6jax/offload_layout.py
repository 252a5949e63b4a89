"""The offload plan's storage layout of a stacked leaf, and the memory-space helpers
that read it inside jit: `Segments` (runs of units, each in device or host memory),
`on_host` / `fetch` / `to_host` (an array's memory space; its device or host copy),
and `for_disk` (a stored state in the canonical format checkpoints hold, joined on
the host)."""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
from jax.experimental.compute_on import compute_on

HOST = "pinned_host"


@flax.struct.dataclass
class Segments:
    """A stacked leaf [units, ...] stored as consecutive runs of units (`parts`, each
    [n, ...]), each in device or host memory: how the offload plan keeps a granular stack."""
    parts: tuple


def is_segments(x) -> bool:
    return isinstance(x, Segments)


def on_host(x) -> bool:
    """Inside jit: whether `x` lives in host memory (its aval's memory space)."""
    return jax.typeof(x).memory_space == jax.memory.Space.Host


def fetch(x):
    """An array in host memory -> its device copy; device arrays pass through."""
    return jax.device_put(x, jax.memory.Space.Device) if on_host(x) else x


def to_host(x):
    """A device array -> its host copy; host arrays pass through."""
    return x if on_host(x) else jax.device_put(x, jax.memory.Space.Host)


def for_disk(tree):
    """`tree` with each `Segments` leaf joined into its canonical [units, ...] array in
    host memory, sharded like its parts (the layers axis is never sharded with
    offload). The join runs as host computation, and a device run is copied out to
    the host first, so saving adds no device buffer. A one-part leaf is its part."""
    stored, treedef = jax.tree.flatten(tree, is_leaf=is_segments)
    idx = [i for i, x in enumerate(stored) if is_segments(x) and len(x.parts) > 1]
    leaves = [x.parts[0] if is_segments(x) else x for x in stored]
    if idx:
        shardings = tuple(leaves[i].sharding.with_memory_kind(HOST) for i in idx)
        joined = _join_on_host(shardings)([list(stored[i].parts) for i in idx])
        for i, x in zip(idx, joined):
            leaves[i] = x
    return jax.tree.unflatten(treedef, leaves)


@functools.lru_cache(maxsize=None)
def _join_on_host(shardings):
    def join(parts_list):
        out = []
        for parts in parts_list:
            parts = [to_host(p) for p in parts]
            with compute_on("device_host"):
                out.append(jnp.concatenate(parts, axis=0))
        return out
    return jax.jit(join, out_shardings=list(shardings))
