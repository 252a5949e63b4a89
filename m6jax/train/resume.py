"""The loop's side of fault tolerance: where the state comes from and when it is saved.

`RunCheckpoints.initial_stage_state` restores the newest checkpoint of the workdir (onto
the current mesh), or initialises fresh, optionally taking params from `init_from`,
either way straight into the stored layout of the offload plan (`m6jax.offload`).
`RunCheckpoints.after_step` saves by policy, stops on preemption after saving, and applies
`nonfinite_policy`. The loop calls these two plus `close`; nothing else about
checkpoints lives in the loop.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import logging

from m6jax import checkpoint, offload
from m6jax import pseudo_to_real as p2r
from m6jax.train import loss_scale
from m6jax.train.state import abstract_train_state, create_train_state

# Test hooks, not features (tests/test_checkpoint.py drives the real entry point):
# comma-separated 1-based steps whose batch gets a NaN loss mask, so the loss and every
# gradient are NaN there (exercises `nonfinite_policy` end to end) ...
NAN_STEPS_ENV = "M6JAX_TEST_NAN_STEPS"
# ... and seconds to sleep before each step, so a test can kill a tiny run mid-way.
STEP_DELAY_ENV = "M6JAX_TEST_STEP_DELAY_S"


class Preempted(Exception):
    """Raised after the checkpoint of the step at which SIGTERM / preemption arrived."""


class NonFiniteLoss(Exception):
    """Raised under nonfinite_policy='stop'; the bad state was never saved."""


def apply_test_hooks(step: int, batch: dict) -> dict:
    """The batch of 1-based `step`, NaN-poisoned if listed in $M6JAX_TEST_NAN_STEPS."""
    if os.environ.get(STEP_DELAY_ENV):
        time.sleep(float(os.environ[STEP_DELAY_ENV]))
    steps = os.environ.get(NAN_STEPS_ENV, "")
    if steps and step in {int(s) for s in steps.split(",")}:
        logging.warning("test hook %s: poisoning the batch of step %d with NaN",
                        NAN_STEPS_ENV, step)
        batch = dict(batch, loss_mask=batch["loss_mask"] * np.float32("nan"))
    return batch


class RunCheckpoints:
    """Checkpointing, preemption and the non-finite policy for one run of the loop."""

    def __init__(self, workdir: str, config):
        self.config = config
        self.ckpt = checkpoint.Checkpointer(workdir, config)
        self.watch = checkpoint.PreemptionWatch()
        self.meta: dict = {}  # of the restored checkpoint; {} on a fresh start
        self._config_json = checkpoint.config_json(config)  # once per run, not per save

    def check_fits(self, model_and_optimizer, example_batch, mesh) -> None:
        """Refuses (InputError) a newest checkpoint of another model shape, from metadata
        and abstract shapes only: called before the data pipeline is built."""
        self.ckpt.check_newest_fits(lambda stage: abstract_train_state(
            *model_and_optimizer(stage), example_batch, mesh, self.config.seed)[0])

    def initial_stage_state(self, model_and_optimizer, example_batch, mesh):
        """(state, state_shardings, start_step, stage): restored, or fresh (+ init_from).

        `model_and_optimizer(stage)` gives the (model, optax transform) of a training
        stage ("pseudo" or "real"); a restored state has the stage saved with it, which
        may be behind the config's stage at that step (the caller delinks then).
        """
        seed, plans = self.config.seed, {}

        def abstract(stage):
            return abstract_train_state(*model_and_optimizer(stage), example_batch, mesh, seed)

        def plan(stage):  # the stored layout of `stage`'s state (offload.OffloadPlan)
            if stage not in plans:
                a, sh = abstract(stage)
                plans[stage] = offload.OffloadPlan(self.config, stage, sh, a)
            return plans[stage]

        restored = self.ckpt.restore_latest(
            lambda stage: plan(stage).restore_target(abstract(stage)[0]))
        if restored is not None:
            state, self.meta = restored
            stage = self.meta.get("stage", checkpoint.STAGE_DEFAULT)
            start = int(self.meta["data"]["step"])
            if start != int(jax.device_get(state.step)):
                raise ValueError(f"checkpoint in {self.ckpt.directory}: data position {start} "
                                 f"differs from state.step {int(state.step)}")
            with jax.set_mesh(mesh):
                return plan(stage).to_stored(state), abstract(stage)[1], start, stage
        stage = p2r.stage_at(self.config, 0)
        state, shardings = create_train_state(*model_and_optimizer(stage), example_batch,
                                              mesh, seed, make_offload=lambda *_: plan(stage),
                                              loss_scale=loss_scale.from_config(self.config))
        if self.config.init_from:
            with jax.set_mesh(mesh):
                state = state.replace(params=plan(stage).to_stored_params(
                    self._init_params(stage, abstract, shardings, plan)))
        return state, shardings, 0, stage

    def _init_params(self, stage, abstract, shardings, plan):
        """Params of `init_from` (offloaded leaves read into host memory); a Pseudo
        checkpoint is delinked into a Real model."""
        src = checkpoint.read_meta(self.config.init_from).get("stage", checkpoint.STAGE_DEFAULT)
        target = lambda s: plan(s).restore_target(abstract(s)[0]).params
        if src == stage:
            logging.info("init_from: params from %s", self.config.init_from)
            return checkpoint.load_params(self.config.init_from, target(stage))
        if src == p2r.STAGE_PSEUDO and stage == p2r.STAGE_REAL:
            shared = checkpoint.load_params(self.config.init_from, target(p2r.STAGE_PSEUDO))
            logging.info("init_from: delinking the Pseudo (shared-layer) params of %s",
                         self.config.init_from)
            return p2r.delink_params(shared, abstract(stage)[0].params,
                                     jax.tree.map(lambda x: x.sharding, target(stage)),
                                     on_host=plan(stage).active)
        raise ValueError(f"init_from={self.config.init_from!r} is a Real (per-layer) "
                         "checkpoint and this run starts Pseudo (model.share_layers=True): "
                         "layers cannot be re-shared; set model.share_layers=False")

    def after_step(self, done: int, state, metrics, extra_meta,
                   stage: str = checkpoint.STAGE_DEFAULT) -> None:
        """Called after step `done` (1-based); `extra_meta` (JSON) is saved with the state.

        The loop passes `initial_eval`, the pipeline's `counters` and `train_s` there,
        as a function called only when a save is due (a dict is taken as is); this adds
        the data position, the training stage and the config. `state` is in its stored
        layout; the Checkpointer writes the canonical format from it.
        """
        if self.config.nonfinite_policy == "stop" and not bool(jax.device_get(metrics["finite"])):
            # One scalar sync per step, paid only under 'stop': the message names the step.
            self.ckpt.wait()  # let earlier, good saves finish; this state is not saved
            raise NonFiniteLoss(
                f"non-finite loss or gradients at step {done} (loss "
                f"{float(jax.device_get(metrics['loss']))}); stopping as nonfinite_policy="
                f"'stop' says. Last good checkpoint: step {self.ckpt.latest_step()} in "
                f"{self.ckpt.directory}. Use nonfinite_policy='skip' to pass over bad steps.")
        last = done == self.config.total_steps
        preempted = self.watch.should_stop(done)
        force = (last or preempted) and self.ckpt.latest_step() != done
        # Ask the policy once; the meta is built only when a save is due, and that save
        # is forced.
        if force or self.ckpt.should_save(done):
            extra = extra_meta() if callable(extra_meta) else extra_meta
            meta = dict(extra, data={"step": done}, stage=stage, config=self._config_json)
            self.ckpt.save(done, state, meta, force=True)
        if preempted:
            self.ckpt.wait()
            raise Preempted(f"preempted: saved the checkpoint of step {done} in "
                            f"{self.ckpt.directory}; rerun the same command to resume")

    def close(self):
        self.ckpt.wait()
        self.ckpt.close()
        self.watch.close()

