"""Orbax checkpoints of the TrainState plus the JSON metadata that makes resume exact.

A checkpoint step directory `WORKDIR/checkpoints/<step>/` holds two items:
  state  the TrainState (params, AdamW state, step, RNG key data, non-finite count),
         saved as sharded arrays; restored into the *new* config's shardings
  meta   JSON: data-iterator position, training stage, pipeline counters, the initial
         eval losses (so summary.json is the same after a restart) and the config

Saving is asynchronous (orbax writes in a background thread after the device-to-host
copy) and atomic: a step directory only appears once complete, so a run killed mid-save
leaves the previous checkpoint as the newest. A step directory that fails validation
(unreadable metadata, truncated or deleted array files) is moved to
`WORKDIR/checkpoints_unreadable/` and the next older one is used, with a warning naming
why; an I/O error is retried and then fatal (`Checkpointer.restore_latest`).

This module is the manager (save policy, restore with validation, retries and the
processes' agreement); reading a checkpoint directory without one is
`m6jax.checkpoint_files`, the preemption signal `m6jax.preemption`. Their public names
are importable from here too.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from m6jax.checkpoint_files import (  # noqa: F401 (public here: callers use checkpoint.X)
    STAGE_DEFAULT, check_fits, checkpoint_dir, config_json, load_params, read_meta, step_dir)
from m6jax.offload_layout import for_disk
from m6jax.preemption import PreemptionWatch  # noqa: F401


class Checkpointer:
    """Saves and restores (state, meta) under `workdir/checkpoints` by the config's policy.

    Config fields: `checkpoint_every` (steps, 0 = only on preemption and at the end),
    `checkpoint_minutes` (also save when this many minutes passed since the last save
    started, or since this Checkpointer was made; 0 = off), `keep_checkpoints` (the last
    N), `keep_period` (also keep every K-th step).

    The minutes are timed here with `clock` (seconds; a test passes a fake one), not by
    orbax's ContinuousCheckpointingPolicy: that one saves at the first step of a run and
    skips a due save while an earlier async save is still writing, so it saved less
    often than asked. Here a due save waits for the earlier one to finish.
    """

    def __init__(self, workdir: str, config, clock=time.monotonic):
        self.directory = checkpoint_dir(workdir)
        self._clock = _test_skewed(clock)
        self._interval_s = 60.0 * float(config.checkpoint_minutes)
        self._last_save_t = clock()
        # Preemption is not a policy here: the loop forces that save (PreemptionWatch).
        save = []
        if config.checkpoint_every:
            save.append(policies.FixedIntervalPolicy(config.checkpoint_every))
        keep = [policies.LatestN(config.keep_checkpoints)]
        if config.keep_period:
            keep.append(policies.EveryNSteps(config.keep_period))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(save),
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=True,
            # A SIGKILL during an async save leaves a temporary directory: drop it.
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"),
                                             options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self._minutes_due(step) or self.manager.should_save(step)

    def _minutes_due(self, step: int) -> bool:
        """Process 0's clock decides, broadcast to all: every process must join a save
        (orbax syncs them), and a host whose clock runs ahead saving alone waited forever."""
        if not self._interval_s:
            return False
        latest = self.manager.latest_step()
        due = (latest is None or latest < step) and (
            self._clock() - self._last_save_t >= self._interval_s)
        return _from_process_0(int(due), [])[0] == 1

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        """Starts an async save of step `step` if the policy (or `force`) says so.

        `state` may be in an offload plan's stored layout: its `Segments` are joined on
        the host (`offload_layout.for_disk`), so every checkpoint has the canonical format
        whatever the offload setting, and no device copy of an offloaded stack is made."""
        if not self.manager.should_save(step) and not (force or self._minutes_due(step)):
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(for_disk(state)),
                                  meta=ocp.args.JsonSave(dict(meta, step=int(step))))
        saved = self.manager.save(step, args=args, force=force or self._minutes_due(step))
        if saved:
            self._last_save_t = self._clock()
            _test_kill_during_save(step, self.directory)
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore_latest(self, abstract_state):
        """(state, meta) of the newest valid checkpoint, or None if there is none.

        `abstract_state` is the TrainState of ShapeDtypeStructs with the current mesh's
        shardings (`state.abstract_train_state`): arrays are read straight into that
        layout, whatever mesh the checkpoint was written on. It may also be a function
        of the checkpoint's training stage ("pseudo" or "real", from its meta), since a
        Pseudo-to-Real run's state has another shape on each side of the switch.

        What happens to a checkpoint that cannot be used depends on why:
          fails validation (no or unparsable metadata, a meta that disagrees with its
            step, array data missing or corrupt): set aside to checkpoints_unreadable/
            with the reason logged, and the next older one is tried;
          does not fit this config (another model shape): InputError, nothing moved;
          an I/O error (OSError, a storage timeout): retried READ_ATTEMPTS times, then
            CheckpointReadError, nothing moved: a flaky disk must not roll a run back.
        With several processes, process 0 validates and picks the step and every process
        restores that one; a step that fails to read on any process is set aside by all.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        while True:
            step = self._agreed_candidate(steps)
            if step is None:
                return None
            try:  # process 0 validated it; another process may still fail to read it
                saved, stage = self._inspect(step)
                error = None
            except (ValueError, KeyError, OSError) as e:
                error = e
            if not _any_process(error is not None):
                target = abstract_state(stage) if callable(abstract_state) else abstract_state
                # A readable checkpoint that does not fit this config is the user's mistake
                # (a changed model in the same workdir), not damage: refuse, move nothing.
                check_fits(step, self.directory, saved, target)
                out, error = self._read(step, target)
            failed = _any_process(error is not None)
            if not failed:
                logging.info("checkpoint: resumed from step %d in %s", step, self.directory)
                return out.state, out.meta
            self._set_aside(step, error or RuntimeError("unreadable on another process"))
            steps = [s for s in steps if s < step]

    def check_newest_fits(self, abstract_state) -> None:
        """Raises InputError if the newest checkpoint is readable but of another model
        shape (cheap: metadata only), so a run refuses it before building anything."""
        steps = self.manager.all_steps()
        if not steps:
            return
        try:
            saved, stage = self._inspect(max(steps))
        except (ValueError, KeyError, OSError):
            return  # damaged: restore_latest decides what to do with it
        target = abstract_state(stage) if callable(abstract_state) else abstract_state
        check_fits(max(steps), self.directory, saved, target)

    def _agreed_candidate(self, steps):
        """The newest step that passes validation, decided by process 0 and followed by
        all (the steps process 0 rejected are set aside); None if none passes."""
        chosen, rejected = None, []
        if jax.process_index() == 0:
            for step in steps:
                try:
                    self._validate(step)
                except (ValueError, KeyError, OSError) as e:
                    rejected.append((step, e))
                    continue
                chosen = step
                break
        chosen, rejected_steps = _from_process_0(chosen, [s for s, _ in rejected])
        reasons = dict(rejected)
        for step in rejected_steps:
            self._set_aside(step, reasons.get(step, RuntimeError("failed validation on process 0")))
        return chosen

    def _validate(self, step: int):
        """Raises if the metadata of `step` says it is unusable (process 0's decision)."""
        _test_unreadable(step)
        self._inspect(step)

    def _inspect(self, step: int):
        """(saved tree metadata, stage) of `step`; raises if they are unreadable or the
        meta disagrees with the step."""
        path = epath.Path(self.directory) / str(step)
        saved = ocp.PyTreeCheckpointHandler().metadata(path / "state").tree
        meta = read_meta(str(path))
        if int(meta.get("step", step)) != step or int(meta["data"]["step"]) != step:
            raise ValueError(f"its meta says step {meta.get('step')} / data position "
                             f"{meta['data'].get('step')}")
        return saved, meta.get("stage", STAGE_DEFAULT)

    def _read(self, step: int, target):
        """(restored, None) or (None, the validation error); an I/O error is retried and
        then raised as CheckpointReadError."""
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                return self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    meta=ocp.args.JsonRestore())), None
            except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many types)
                if not _is_io_error(e):
                    return None, e
                if attempt == READ_ATTEMPTS:
                    raise CheckpointReadError(
                        f"checkpoint step {step} in {self.directory} could not be read after "
                        f"{READ_ATTEMPTS} attempts ({_reason(e)}); it was not set aside and "
                        "nothing older was restored. Fix the storage and rerun the same "
                        "command") from e
                logging.warning("checkpoint: reading step %d failed (%s); retrying in %.0f s "
                                "(attempt %d of %d)", step, _reason(e), READ_RETRY_S * attempt,
                                attempt, READ_ATTEMPTS)
                time.sleep(READ_RETRY_S * attempt)

    def _set_aside(self, step: int, error: Exception):
        # Moved, not deleted: it may still hold something a person wants to inspect,
        # and leaving it in place would block saving the same step number again.
        dest = os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable",
                            f"{step}.{int(time.time())}")
        logging.warning("checkpoint: step %d in %s is unreadable (fails validation: %s); "
                        "moved it to %s and falling back to the previous checkpoint", step,
                        self.directory, _reason(error), dest)
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), dest)
        _sync(f"m6jax_set_aside_{step}")
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


READ_ATTEMPTS = 3  # tries of one checkpoint's arrays before an I/O error is fatal
READ_RETRY_S = 2.0  # sleep before the k-th retry: k * this
# Test hook, not a feature: "PROCESS:STEP,..." makes validation of STEP fail on PROCESS
# (a process whose view of shared storage lags), to test that process 0 decides.
UNREADABLE_ENV = "M6JAX_TEST_UNREADABLE_STEPS"
# Test hook, not a feature: "P:S", process P's checkpoint clock jumps S seconds per read.
CLOCK_JUMP_ENV = "M6JAX_TEST_CLOCK_JUMP"
# Test hook, not a feature: SIGKILL right after the async save of this step started.
KILL_SAVE_ENV = "M6JAX_TEST_KILL_DURING_SAVE"


class CheckpointReadError(RuntimeError):
    """A checkpoint could not be read for a reason other than damage (I/O, storage)."""


# tensorstore reports storage trouble as ValueError with a status code in the message.
_TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED",
              "Input/output error")


def _is_io_error(e: BaseException) -> bool:
    for err in (e, e.__cause__, e.__context__):
        if err is None:
            continue
        if isinstance(err, OSError) and not isinstance(err, (FileNotFoundError,
                                                              IsADirectoryError)):
            return True
        if any(code in str(err) for code in _TRANSIENT):
            return True
    return False


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _test_skewed(clock):
    """Test hook: $CLOCK_JUMP_ENV's process reads a clock that runs ahead (a skewed host)."""
    proc, _, jump = os.environ.get(CLOCK_JUMP_ENV, "").partition(":")
    if not jump or int(proc) != jax.process_index():
        return clock
    reads = iter(range(1, 1 << 62))
    return lambda: clock() + float(jump) * next(reads)


def _test_kill_during_save(step: int, directory: str) -> None:
    """Test hook: SIGKILL this process right after the async save of step $KILL_SAVE_ENV
    started, before orbax commits it (the test checks the step never appears)."""
    if os.environ.get(KILL_SAVE_ENV) != str(step):
        return
    committed = os.path.isdir(os.path.join(directory, str(step)))
    print(f"test hook {KILL_SAVE_ENV}: SIGKILL during the save of step {step} "
          f"({'already committed' if committed else 'not committed yet'})", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _test_unreadable(step: int) -> None:
    for item in filter(None, os.environ.get(UNREADABLE_ENV, "").split(",")):
        proc, s = item.split(":")
        if int(proc) == jax.process_index() and int(s) == step:
            raise ValueError(f"test hook {UNREADABLE_ENV}: step {step} unreadable here")


def _from_process_0(chosen, rejected: list[int]):
    """Process 0's (chosen step or None, rejected steps), the same on every process."""
    if jax.process_count() == 1:
        return chosen, rejected
    from jax.experimental import multihost_utils
    import numpy as np
    n = 64  # rejected steps sent along; more than this many bad checkpoints in a row: rare
    msg = np.full((n + 1,), -1, np.int64)
    msg[0] = -1 if chosen is None else chosen
    msg[1:1 + min(n, len(rejected))] = rejected[:n]
    msg = np.asarray(multihost_utils.broadcast_one_to_all(msg))
    return (None if msg[0] < 0 else int(msg[0])), [int(s) for s in msg[1:] if s >= 0]


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    import numpy as np
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
