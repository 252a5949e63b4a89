"""Every clock of a training run in one object: wall time, training time, step time.

- `wall_s`: from the start of `train()` to the summary (everything included).
- `train_s`: time in the step loop, compiles and the Pseudo-to-Real delinking included,
  held-out evals not; carried across restarts (checkpoint meta `train_s`): what the
  Pseudo-to-Real ablation compares.
- step time: measured from the end of a step that compiled (the first step, the first
  after a re-jit) to each log step, evals excluded; `mean_step_s` is the run's figure.
"""
from __future__ import annotations

import contextlib
import time

import jax


class Chrono:
    """The run's timers; `start_training` when the step loop begins."""

    def __init__(self):
        self.t_start = time.time()
        self._prior_train_s = 0.0  # of earlier runs of this workdir (checkpoint meta)
        self._t_train = None  # training clock start, moved forward past each eval
        self._t_loop = None
        self._mark, self._steps_at_mark = None, 0  # step timing starts here
        self._timed_s, self._timed_steps = 0.0, 0
        self._train_s = None  # frozen by stop_training

    def start_training(self, start_step: int, prior_train_s: float = 0.0) -> None:
        self._prior_train_s = float(prior_train_s)
        self._steps_at_mark = start_step
        self._t_loop = self._t_train = time.time()

    def recompiling(self) -> None:
        """The next step compiles (a re-jitted step): time steps from its end again."""
        self._mark = None

    def after_step(self, done: int, metrics) -> None:
        if self._mark is None:  # the step included compilation: time from its end
            jax.block_until_ready(metrics)
            self._mark, self._steps_at_mark = time.time(), done

    def step_s(self, done: int) -> float:
        """Seconds per step since the last log step (at log steps; counts them as timed).
        At the step that compiled: its own time since the loop started."""
        now = time.time()
        if done <= self._steps_at_mark:
            return now - self._t_loop
        step_s = (now - self._mark) / (done - self._steps_at_mark)
        self._timed_s += now - self._mark
        self._timed_steps += done - self._steps_at_mark
        self._mark, self._steps_at_mark = now, done
        return step_s

    @contextlib.contextmanager
    def paused(self):
        """An eval inside the loop: charged neither to training time nor to steps."""
        t0 = time.time()
        yield
        self._mark = time.time()
        self._t_train += self._mark - t0

    def train_s(self) -> float:
        if self._train_s is not None:
            return self._train_s
        return self._prior_train_s + time.time() - self._t_train

    def stop_training(self) -> None:
        self._train_s = self.train_s()

    def mean_step_s(self) -> float:
        """nan when no step was timed here (rerun of a finished run)."""
        return self._timed_s / self._timed_steps if self._timed_steps else float("nan")

    def wall_s(self) -> float:
        return time.time() - self.t_start
