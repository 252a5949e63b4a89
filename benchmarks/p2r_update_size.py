r"""How far each Real layer moves per step after the Pseudo-to-Real switch, per handoff.

  python benchmarks/p2r_update_size.py --json=benchmarks/results/p2r_update_size.json

The setup of tests/test_pseudo_to_real.py's update-size test: a 16-layer, width-32 M6
(b2 = 0.999), 10 Pseudo steps on one synthetic batch, then 30 Real steps after each
handoff. Reports |delta W_l| of the stack's MLP input kernel, averaged over the layers,
over the Pseudo weight's last |delta W|: a handoff that keeps the update size stays near
1; `copy` (moments ~L and ~L**2 too large) shrinks it.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments"), os.path.join(ROOT, "tests")]

from absl import app, flags  # noqa: E402

import report  # noqa: E402  (benchmarks/report.py)

flags.DEFINE_integer("num_layers", 16, "layers sharing the Pseudo weights (L)")
flags.DEFINE_float("b2", 0.999, "AdamW b2")
flags.DEFINE_integer("pseudo_steps", 10, "Pseudo steps before the switch")
flags.DEFINE_integer("real_steps", 30, "Real steps after it")
flags.DEFINE_string("json", "", "write the result here")
FLAGS = flags.FLAGS


def _wi(params):
    import numpy as np
    return np.asarray(params["stack"]["layers"]["mlp"]["wi"]["kernel"])


def main(argv):
    del argv
    import jax
    import numpy as np

    from helpers import GRID, NUM_TASKS, PATCH_DIM, TEXT_LEN, synthetic_batch, tiny_config
    from m6jax import pseudo_to_real as p2r
    from m6jax import sharding
    from m6jax.train import stages
    from m6jax.train.state import abstract_train_state, create_train_state, dummy_batch
    from m6jax.train.step import make_train_step

    def cfg(mode):
        c = tiny_config()
        c.model.update(num_layers=FLAGS.num_layers, share_layers=True)
        c.total_steps, c.optimizer.b2 = 200, FLAGS.b2
        c.pseudo_to_real.update(switch_step=FLAGS.pseudo_steps, optimizer=mode)
        return c

    example = dummy_batch(8, GRID * GRID, PATCH_DIM, TEXT_LEN)
    mesh = sharding.make_mesh(cfg("scaled").mesh, jax.devices()[:1])
    model, tx = stages.model_and_optimizer(cfg("scaled"), p2r.STAGE_PSEUDO)
    state, sh = create_train_state(model, tx, example, mesh, seed=0)
    batch = sharding.global_batch(mesh, synthetic_batch(8))
    step = make_train_step(model, tx, mesh, sh, NUM_TASKS)
    with jax.set_mesh(mesh):
        for _ in range(FLAGS.pseudo_steps):
            before = _wi(state.params)
            state, _ = step(state, batch)
    pseudo_update = float(np.linalg.norm(_wi(state.params) - before))
    result, real_step = dict(config=dict(num_layers=FLAGS.num_layers, b2=FLAGS.b2),
                             pseudo_last_update=pseudo_update, ratios={}), None
    for mode in p2r.OPTIMIZER_MODES:
        real_model, real_tx = stages.model_and_optimizer(cfg(mode), p2r.STAGE_REAL)
        abstract, real_sh = abstract_train_state(real_model, real_tx, example, mesh)
        with jax.set_mesh(mesh):
            real = p2r.delink_state(state, cfg(mode), real_tx, abstract, real_sh)
        real_step = real_step or make_train_step(real_model, real_tx, mesh, real_sh, NUM_TASKS)
        ratios = []
        with jax.set_mesh(mesh):
            for _ in range(FLAGS.real_steps):
                before = _wi(real.params)
                real, _ = real_step(real, batch)
                per_layer = np.linalg.norm(_wi(real.params) - before, axis=(1, 2))
                ratios.append(float(per_layer.mean()) / pseudo_update)
        result["ratios"][mode] = [round(r, 4) for r in ratios]
        late = ratios[15:]
        print(f"{mode:7s} first Real step {ratios[0]:.2f}x, steps 15-{FLAGS.real_steps - 1}: "
              f"{min(late):.2f}-{max(late):.2f}x the Pseudo's last update", flush=True)
    if FLAGS.json:
        report.write_json(FLAGS.json, result, indent=1)


if __name__ == "__main__":
    app.run(main)
