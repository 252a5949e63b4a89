"""Metrics out: metrics.jsonl, TensorBoard event files and a progress line with ETA."""
from __future__ import annotations

import contextlib
import json
import os
import time

import numpy as np


def task_losses(m, tasks) -> dict[str, float]:
    """`loss/<task>` for each task with tokens in the step's fetched metrics `m`."""
    return {f"loss/{t}": float(m["task_loss_sum"][i] / m["task_tokens"][i])
            for i, t in enumerate(tasks) if m["task_tokens"][i] > 0}


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsWriter:
    """Writes scalars to `workdir/metrics.jsonl` and TensorBoard (main process only).

    `resume_step` > 0 (a run resumed from the checkpoint of that step) keeps the lines of
    steps <= resume_step and drops later ones, which the resumed run writes again: the
    file keeps one line per logged step across restarts.
    """

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.eval_path = os.path.join(workdir, "eval.jsonl")  # held-out evals: a few rows
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl, self._eval = (_reopen(p, resume_step) for p in (self.path, self.eval_path))
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, float], jsonl: bool = True):
        """A metrics.jsonl line (`jsonl`) or, for held-out evaluations, an eval.jsonl
        line; TensorBoard gets both."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        out = self._jsonl if jsonl else self._eval
        out.write(json.dumps({"step": int(step), **clean}) + "\n")
        out.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)

    def last(self, key: str) -> float:
        """The newest value of `key` in metrics.jsonl (nan if none): for summaries."""
        if not os.path.exists(self.path):
            return float("nan")
        with open(self.path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return next((float(r[key]) for r in reversed(rows) if key in r), float("nan"))

    def histogram(self, step: int, name: str, values: np.ndarray):
        if self.enabled and self._tb is not None:
            self._tb.add_histogram(name, np.asarray(values), step)

    @contextlib.contextmanager
    def closed_on_error(self):
        """Closes (flushes) the writer if the block raises, e.g. on preemption."""
        try:
            yield
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._eval.close()
            if self._tb is not None:
                self._tb.close()


def _reopen(path: str, resume_step: int):
    """`path` opened for writing, keeping its lines of steps <= resume_step."""
    kept = _lines_up_to(path, resume_step) if resume_step else []
    f = open(path, "w", encoding="utf-8")
    f.writelines(kept)
    f.flush()
    return f


def _lines_up_to(path: str, step: int) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError):  # a line cut short by a kill: rewritten on resume
            continue
    return kept


class Progress:
    """One line per log step: loss, per-task losses, throughput, MFU and ETA."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.time()

    def line(self, step: int, m: dict[str, float], task_names) -> str:
        done = step - self.start_step
        elapsed = time.time() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        tasks = " ".join(f"{t} {m[f'loss/{t}']:.3f}" for t in task_names if f"loss/{t}" in m)
        moe = (f"moe drop {100 * m['moe/dropped_fraction']:.1f}% load max/mean "
               f"{m['moe/load_max_over_mean']:.2f} | " if "moe/dropped_fraction" in m else "")
        return (f"step {step:>6}/{self.total} | loss {m['loss']:.4f} | {tasks} | {moe}"
                f"{m.get('tokens_per_s', 0):,.0f} tok/s | mfu {100 * m.get('mfu', 0):.1f}% | "
                f"{1000 * m.get('step_s', 0):.0f} ms/step | eta {_fmt_duration(eta)}")
