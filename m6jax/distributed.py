"""Multi-process (multi-host) helpers: start-up, main-process-first, host fetches, logs.

One process per host (or per local group of devices); every process runs the same
program on its own data shard and they form one global mesh. `initialize` must run
before any other JAX call in the process.
"""
from __future__ import annotations

import contextlib
import logging as std_logging

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the processes into one JAX runtime.

    With no arguments JAX detects the cluster (SLURM, TPU pod, Kubernetes, MPI); the
    local launcher passes all three. CPU devices need a collectives backend to talk
    across processes: gloo (ignored by GPU/TPU backends).
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    given = [a is not None for a in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("give all of --coordinator_address, --num_processes and "
                         "--process_id, or none of them (auto-detect the cluster)")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    _prefix_logs(jax.process_index(), jax.process_count())


class _ProcessPrefix(std_logging.Filter):
    def __init__(self, index: int, count: int):
        super().__init__()
        self.prefix = f"[process {index}/{count}] "

    def filter(self, record):
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def _prefix_logs(index: int, count: int) -> None:
    """Every absl log line names the process that wrote it."""
    logging.get_absl_handler().addFilter(_ProcessPrefix(index, count))


@contextlib.contextmanager
def main_process_first(name: str):
    """Process 0 runs the block first (e.g. writes a shared cache or tokenizer file),
    the others run it after, so they read what it wrote instead of racing it."""
    multi = jax.process_count() > 1
    if multi and jax.process_index() != 0:
        multihost_utils.sync_global_devices(f"{name}:main_done")
    yield
    if multi and jax.process_index() == 0:
        multihost_utils.sync_global_devices(f"{name}:main_done")


def fetch(tree):
    """device_get that also works for arrays sharded across processes (allgathers them)."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)
    return jax.tree.map(get, tree)
