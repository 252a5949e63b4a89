r"""The tiny M6-MoE train step (experiments/configs/m6_moe.py:tiny) under several
`model.moe.dispatch` values, timed step by step in alternation.

  python benchmarks/moe_step.py --dispatches=gather,grouped --json=/tmp/moe_step.json

Every dispatch's step is compiled first; then each round runs one step of each, so all
see the same background load. Writes {dispatch: median step ms}.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))

from absl import app, flags  # noqa: E402

import cpu_profile  # noqa: E402  (benchmarks/cpu_profile.py: the step builder; its --json)
import report  # noqa: E402

flags.DEFINE_list("dispatches", ["gather", "grouped"], "model.moe.dispatch values")
flags.DEFINE_integer("rounds", 10, "timed rounds (after 2 warm-up steps each)")
FLAGS = flags.FLAGS


def main(_):
    import jax

    runs = {}
    for dispatch in FLAGS.dispatches:
        FLAGS.moe_dispatch = dispatch
        mesh, step, state, batch, _ = cpu_profile._build("moe_tiny")
        with jax.set_mesh(mesh):
            for _ in range(2):
                state, m = step(state, batch)
            jax.block_until_ready(m)
        runs[dispatch] = [mesh, step, state, batch]
    times = {d: [] for d in runs}
    for _ in range(FLAGS.rounds):
        for d, run in runs.items():
            mesh, step, state, batch = run
            with jax.set_mesh(mesh):
                t = time.perf_counter()
                run[2], m = step(state, batch)
                jax.block_until_ready(m)
            times[d].append(time.perf_counter() - t)
    result = {d: round(1000 * sorted(t)[len(t) // 2], 1) for d, t in times.items()}
    print(f"median step ms, load {os.getloadavg()[0]:.2f}: {result}")
    if FLAGS.json:
        report.write_json(FLAGS.json, result, indent=1)


if __name__ == "__main__":
    app.run(main)
