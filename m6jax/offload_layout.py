"""The offload plan's storage layout of a stacked leaf, and the memory-space helpers
that read it inside jit: `Segments` (runs of units, each in device or host memory),
`on_host` / `fetch` (an array's memory space; its device copy)."""
from __future__ import annotations

import flax
import jax


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
