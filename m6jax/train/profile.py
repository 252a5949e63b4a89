"""`config.profile_steps = "A,B"`: a jax.profiler trace of training steps A..B (1-based,
inclusive) into the workdir's TensorBoard directory (open its Profile tab).

The first step compiles; a window starting at step >= 2 shows steady-state steps only.
"""
from __future__ import annotations

import os

import jax
from absl import logging


def parse_profile_steps(spec) -> tuple[int, int] | None:
    """'A,B' -> (A, B); '' -> None. ValueError naming config.profile_steps otherwise."""
    spec = str(spec or "").strip()
    if not spec:
        return None
    try:
        first, last = (int(p) for p in spec.split(","))
    except ValueError:
        raise ValueError(f"config.profile_steps={spec!r} is not 'FIRST,LAST' (two step "
                         "numbers, e.g. '10,15'; '' = off)") from None
    if not 1 <= first <= last:
        raise ValueError(f"config.profile_steps={spec!r} needs 1 <= FIRST <= LAST")
    return first, last


class StepProfiler:
    """Starts the trace before step A and stops it once step B's results are ready."""

    def __init__(self, config, workdir: str, start_step: int):
        self.window = parse_profile_steps(config.profile_steps)
        self.logdir = os.path.join(workdir, "tensorboard")
        self.active = False
        if self.window and start_step == self.window[0] - 1:
            self._start()

    def _start(self):
        jax.profiler.start_trace(self.logdir)
        self.active = True
        logging.info("profiling steps %d-%d into %s", *self.window, self.logdir)

    def after_step(self, done: int, outputs) -> None:
        """Call after step `done` (1-based) with anything that step produced."""
        if not self.window:
            return
        if self.active and done >= self.window[1]:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False
        elif not self.active and done == self.window[0] - 1:
            self._start()
