"""Preemption: when a run should checkpoint and stop (SIGTERM, or JAX's sync point)."""
from __future__ import annotations

import signal

import jax
from absl import logging


class PreemptionWatch:
    """True once this run should checkpoint and stop: SIGTERM here, or JAX's sync point.

    On one host a SIGTERM handler sets a flag that the loop checks after each step. On
    several hosts JAX's preemption service (enabled by `jax.distributed.initialize`)
    owns the signal and `reached_preemption_sync_point` makes every host agree on the
    step, so no Python handler is installed there.
    """

    def __init__(self):
        self.signalled = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del frame
        logging.warning("received signal %d: will checkpoint after the current step", signum)
        self.signalled = True

    def should_stop(self, step: int) -> bool:
        if self.signalled:
            return True
        if jax.process_count() > 1:
            try:
                return bool(jax.experimental.multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # preemption service not enabled
                return False
        return False

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
