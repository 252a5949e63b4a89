"""What the loop builds for one training stage: model, optimizer, shardings, jitted steps.

A plain run has one stage ("real"). A Pseudo-to-Real run (`m6jax.pseudo_to_real`) has
two, and the loop swaps one `Stage` for the next at the switch step: the state is
delinked and re-sharded, and the steps are re-jitted for the Real model.
"""
from __future__ import annotations

import jax
from absl import logging

from m6jax import offload as offload_lib
from m6jax import pseudo_to_real as p2r
from m6jax.model.build import build_model
from m6jax.train import evaluation
from m6jax.train import loss_scale
from m6jax.train.state import abstract_train_state, dummy_batch
from m6jax.train.step import make_eval_step, make_train_step


def model_and_optimizer(config, stage: str):
    """(training-mode model, optax transform) of `stage`: what the TrainState is made of."""
    c = p2r.stage_config(config, stage)
    return build_model(c, deterministic=c.model.dropout_rate == 0.0), p2r.stage_optimizer(config, stage)[0]


class Stage:
    """The jitted train/eval steps and the evaluator of one stage, for `state_shardings`.

    The loop holds the state in the stage's *stored* layout (`offload`: offloaded
    layers in host memory) in every phase: the eval step and the caption decoder read
    the stored params (`scan_units`), the switch delinks into the next stage's stored
    layout.
    """

    def __init__(self, config, stage: str, mesh, state_shardings, pipe, tasks):
        self.name, self.config, self.mesh = stage, config, mesh
        self.stage_config = p2r.stage_config(config, stage)
        self.model = build_model(self.stage_config)
        self.train_model = build_model(
            self.stage_config, deterministic=self.stage_config.model.dropout_rate == 0.0)
        self.tx = p2r.stage_optimizer(config, stage)[0]
        self.state_shardings = state_shardings
        shapes = None
        if offload_lib.requested(config):  # the stored layout splits leaves by their shapes
            example = dummy_batch(config.batch_size, pipe.num_patches, pipe.patch_dim,
                                  pipe.text_len)
            shapes = abstract_train_state(self.train_model, self.tx, example, mesh,
                                          config.seed)[0]
        self.offload = offload_lib.OffloadPlan(config, stage, state_shardings, shapes)
        self.train_step = make_train_step(
            self.train_model, self.tx, mesh, state_shardings, len(tasks), self.offload,
            int(config.optimizer.grad_accum_steps), loss_scale.from_config(config))
        eval_step = make_eval_step(self.model, mesh, state_shardings.params, len(tasks),
                                   self.offload)
        self.evaluator = evaluation.Evaluator(
            pipe, self.model, mesh, self.offload.decode_shardings(state_shardings.params),
            eval_step, tasks,
            decode_params=lambda p: self.offload.decode_params(p, state_shardings.params))

    def next_stage(self, state, example_batch, pipe, tasks):
        """(Real state, Real Stage) continuing this Pseudo stage's stored `state`."""
        real_model, real_tx = model_and_optimizer(self.config, p2r.STAGE_REAL)
        abstract, shardings = abstract_train_state(real_model, real_tx, example_batch,
                                                   self.mesh, self.config.seed)
        real = Stage(self.config, p2r.STAGE_REAL, self.mesh, shardings, pipe, tasks)
        with jax.set_mesh(self.mesh):  # straight into the Real stored layout
            real_state = p2r.delink_state(state, self.config, real_tx, abstract, shardings,
                                          real.offload)
        logging.info("pseudo-to-real: delinked at step %d (optimizer %s, lr schedule %s, "
                     "switch warmup %d steps); %s -> %s parameters",
                     int(jax.device_get(state.step)), p2r.section(self.config).optimizer,
                     p2r.section(self.config).lr_schedule, p2r.switch_warmup_steps(self.config),
                     f"{_count(state.params):,}", f"{_count(real_state.params):,}")
        return real_state, real


def _count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))  # Segments: the sum of their parts
