r"""Which stack weights the compiled pipelined train step all-gathers, and how many units
at once (issue 27): the HLO's all-gather result shapes that end in one unit's shape of
a leaf sharded inside a stage, on 8 fake CPU devices.

  python benchmarks/pipeline_layout.py --json=benchmarks/results/pipeline_layout_cpu.json

Meshes: (stage 2, expert 2, data 2) with a 4-layer MoE stack (4 experts, k 2) and
(stage 2, fsdp 2, data 2) with a 4-layer dense stack, 2 microbatches, the tests' tiny
model (D 32, M 64). `units` is the product of a gather's leading dims (vmapped stage,
units): 1 is one unit, 2 a stage's whole chunk.
"""
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments"), os.path.join(ROOT, "tests")]

from absl import app, flags  # noqa: E402

import report  # noqa: E402  (benchmarks/report.py)

flags.DEFINE_string("json", None, "write the result here")
FLAGS = flags.FLAGS


def main(_):
    import jax
    import numpy as np
    from configs.m6_moe import moe_section
    from helpers import GRID, NUM_TASKS, PATCH_DIM, TEXT_LEN, synthetic_batch, tiny_config
    from m6jax import pseudo_to_real as p2r
    from m6jax import sharding
    from m6jax.config_checks import validate_config
    from m6jax.train import stages
    from m6jax.train.state import create_train_state, dummy_batch
    from m6jax.train.step import make_train_step
    result = {}
    for name, mesh, moe in (("stage2_expert2_data2", dict(stage=2, expert=2, data=2),
                             dict(num_experts=4, k=2, every=1, capacity_factor=1.0)),
                            ("stage2_fsdp2_data2", dict(stage=2, fsdp=2, data=2), None)):
        c = tiny_config(**mesh)
        c.model.num_layers = 4
        if moe:
            c.model.moe = moe_section(**moe)
        c.pipeline.microbatches = 2
        validate_config(c, 8)
        m = sharding.make_mesh(c.mesh, jax.devices()[:8])
        model, tx = stages.model_and_optimizer(c, p2r.STAGE_REAL)
        state, sh = create_train_state(model, tx, dummy_batch(8, GRID * GRID, PATCH_DIM, TEXT_LEN),
                                       m, seed=0)
        step = make_train_step(model, tx, m, sh, NUM_TASKS)
        with jax.set_mesh(m):
            hlo = step.lower(state, sharding.global_batch(m, synthetic_batch(8))).compile().as_text()
        shapes = [[int(d) for d in s.split(",") if d]
                  for s in re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo)]
        rows = {}
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params["stack"]["layers"]):
            if all(a is None for a in tuple(leaf.sharding.spec)[1:]):
                continue
            unit = list(leaf.shape[1:])
            rows[jax.tree_util.keystr(path)] = dict(
                spec=str(leaf.sharding.spec),
                gathers=[dict(shape=d, units=int(np.prod(d[:len(d) - len(unit)])))
                         for d in shapes if len(d) >= len(unit) and d[len(d) - len(unit):] == unit])
        result[name] = dict(per_device_param_bytes=sharding.per_device_bytes(state.params),
                            leaves=rows)
        for p, r in rows.items():
            print(name, p, r["spec"], [(g["shape"], g["units"]) for g in r["gathers"]], flush=True)
    if FLAGS.json:
        report.write_json(FLAGS.json, result)


if __name__ == "__main__":
    app.run(main)
