"""Orbax checkpoints of the TrainState plus the JSON metadata that makes resume exact.

A checkpoint step directory `WORKDIR/checkpoints/<step>/` holds two items:
  state  the TrainState (params, AdamW state, step, RNG key data, non-finite count),
         saved as sharded arrays; restored into the *new* config's shardings
  meta   JSON: data-iterator position, training stage, pipeline counters, the initial
         eval losses (so summary.json is the same after a restart) and the config

Saving is asynchronous (orbax writes in a background thread after the device-to-host
copy) and atomic: a step directory only appears once complete, so a run killed mid-save
leaves the previous checkpoint as the newest. A step directory that exists but cannot be
read (truncated or deleted files) is moved to `WORKDIR/checkpoints_unreadable/` and the
next older one is used, with a warning naming why.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import flax
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

STAGE_DEFAULT = "real"  # checkpoints written before Pseudo-to-Real have no other stage


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    """Saves and restores (state, meta) under `workdir/checkpoints` by the config's policy.

    Config fields: `checkpoint_every` (steps, 0 = only on preemption and at the end),
    `checkpoint_minutes` (also save when this many minutes passed since the last save,
    0 = off), `keep_checkpoints` (the last N), `keep_period` (also keep every K-th step).
    """

    def __init__(self, workdir: str, config):
        self.directory = checkpoint_dir(workdir)
        # Preemption is not a policy here: the loop forces that save (PreemptionWatch).
        save = []
        if config.checkpoint_every:
            save.append(policies.FixedIntervalPolicy(config.checkpoint_every))
        if config.checkpoint_minutes:
            save.append(policies.ContinuousCheckpointingPolicy(
                minimum_interval_secs=max(1, round(60 * config.checkpoint_minutes))))
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
        return self.manager.should_save(step)

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        """Starts an async save of step `step` if the policy (or `force`) says so."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(dict(meta, step=int(step))))
        saved = self.manager.save(step, args=args, force=force)
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore_latest(self, abstract_state):
        """(state, meta) of the newest readable checkpoint, or None if there is none.

        `abstract_state` is the TrainState of ShapeDtypeStructs with the current mesh's
        shardings (`state.abstract_train_state`): arrays are read straight into that
        layout, whatever mesh the checkpoint was written on. It may also be a function
        of the checkpoint's training stage ("pseudo" or "real", from its meta), since a
        Pseudo-to-Real run's state has another shape on each side of the switch.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                saved = ocp.PyTreeCheckpointHandler().metadata(
                    epath.Path(self.directory) / str(step) / "state").tree
                stage = read_meta(os.path.join(self.directory, str(step))).get(
                    "stage", STAGE_DEFAULT)
            except Exception as e:  # noqa: BLE001 (no readable metadata: not usable)
                self._set_aside(step, e)
                continue
            target = abstract_state(stage) if callable(abstract_state) else abstract_state
            # A readable checkpoint that does not fit this config is the user's mistake
            # (a changed model in the same workdir), not damage: refuse, move nothing.
            _check_fits(step, self.directory, saved, target)
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 (any read error means: not usable)
                self._set_aside(step, e)
                continue
            logging.info("checkpoint: resumed from step %d in %s", step, self.directory)
            return out.state, out.meta
        return None

    def _set_aside(self, step: int, error: Exception):
        # Moved, not deleted: it may still hold something a person wants to inspect,
        # and leaving it in place would block saving the same step number again.
        dest = os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable",
                            f"{step}.{int(time.time())}")
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        logging.warning("checkpoint: step %d in %s is unreadable (%s); moved it to %s and "
                        "falling back to the previous checkpoint", step, self.directory,
                        reason, dest)
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), dest)
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def _check_fits(step: int, directory: str, saved, abstract_state) -> None:
    def shapes(tree):  # "opt_state/1/0/mu/..." whether a level is a tuple, list or dict
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
                tuple(getattr(x, "shape", ())) for path, x in leaves}
    want = shapes(flax.serialization.to_state_dict(abstract_state))
    have = shapes(saved)
    diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if diff:
        k = diff[0]
        raise ValueError(
            f"checkpoint step {step} in {directory} does not fit this config: {k} is "
            f"{have.get(k, 'absent')} there and {want.get(k, 'absent')} here ({len(diff)} "
            "arrays differ). Use another --workdir, or --config.init_from to start from its "
            "params with the same model shape")


def step_dir(path: str) -> str:
    """One checkpoint step directory from a run's workdir, its `checkpoints/` directory
    (the newest step) or a `checkpoints/<step>` directory."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if not os.path.isdir(os.path.join(path, "state")):  # a checkpoints root: take the newest
        steps = sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []
        if not steps:
            raise ValueError(f"init_from={path!r} holds no checkpoint; give a run's workdir, "
                             "its checkpoints/ directory or one checkpoints/<step> directory")
        path = os.path.join(path, str(steps[-1]))
    return path


def read_meta(path: str) -> dict:
    """The JSON meta (data position, stage, config, ...) of a checkpoint `step_dir(path)`."""
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        return ckptr.restore(os.path.join(step_dir(path), "meta"))


def load_params(path: str, abstract_params):
    """Params only from a checkpoint (`.../checkpoints/<step>` or `.../checkpoints`).

    For `init_from`: optimizer state, step and RNG of the source run are ignored, so the
    fine-tuning run may use another optimizer or schedule; shapes must match the model.
    """
    path = step_dir(path)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(os.path.join(path, "state"), args=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args},
            partial_restore=True))
    logging.info("init_from: loaded params from %s", path)
    return out["params"]


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


def config_json(config) -> dict:
    """The config as plain JSON (stored in each checkpoint's meta, for the record)."""
    return json.loads(config.to_json_best_effort())
