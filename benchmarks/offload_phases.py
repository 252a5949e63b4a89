r"""Device memory after each phase of an offloaded Pseudo-to-Real run, in one process.

  python benchmarks/offload_phases.py                    # CPU: runs every phase, no bytes
  bash benchmarks/gpu_offload_check.sh                   # one GPU: with peak_bytes_in_use

The phases of issue 26 in the order a run meets them, every layer's params and
optimizer state offloaded (`--param_layers`, `--optimizer_layers`): init (Pseudo), a
step, save, restore, the switch (delink into the Real stored layout), a Real step, eval,
generate (KV-cache greedy decoding). After each: `bytes_in_use` and `peak_bytes_in_use`
of device 0 (GPU/TPU; a peak cannot be reset, so a phase that raises it is the one whose
`peak_bytes_in_use` grows), beside the planned `phases` of `m6jax.plan`. Cap the device
with XLA_PYTHON_CLIENT_MEM_FRACTION to make the state larger than device memory.
"""
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("emb_dim", 256, "model width")
flags.DEFINE_integer("num_layers", 4, "layers")
flags.DEFINE_integer("num_heads", 4, "attention heads")
flags.DEFINE_integer("text_len", 48, "text tokens (plus 16 image patches)")
flags.DEFINE_integer("batch_size", 8, "global batch")
flags.DEFINE_integer("vocab_size", 1024, "vocabulary")
flags.DEFINE_string("dtype", "float32", "compute dtype")
flags.DEFINE_string("param_layers", "all", "offload.param_layers")
flags.DEFINE_string("optimizer_layers", "all", "offload.optimizer_layers")
flags.DEFINE_string("json", "", "write the results here")
FLAGS = flags.FLAGS


def main(_):
    import jax
    import numpy as np

    from configs import m6 as m6_config
    from m6jax import offload, plan, sharding
    from m6jax import pseudo_to_real as p2r
    from m6jax.checkpoint import Checkpointer
    from m6jax.generate import make_decoder
    from m6jax.model.build import build_model
    from m6jax.train import stages
    from m6jax.train.state import abstract_train_state, create_train_state, dummy_batch
    from m6jax.train.step import make_eval_step, make_train_step

    c = m6_config.get_config("tiny")
    c.model.update(emb_dim=FLAGS.emb_dim, num_heads=FLAGS.num_heads, mlp_dim=4 * FLAGS.emb_dim,
                   num_layers=FLAGS.num_layers, dtype=FLAGS.dtype, remat_policy="full",
                   vocab_size=FLAGS.vocab_size, share_layers=True)
    c.data.update(vocab_size=FLAGS.vocab_size, image_size=8, patch_size=2, image_channels=1,
                  text_len=FLAGS.text_len)
    c.batch_size, c.total_steps = FLAGS.batch_size, 100
    c.pseudo_to_real.update(switch_step=1, optimizer="scaled")
    c.offload.update(param_layers=FLAGS.param_layers, optimizer_layers=FLAGS.optimizer_layers)
    mesh = sharding.make_mesh(c.mesh)
    grid, patch_dim, b, t = 4, 4, FLAGS.batch_size, FLAGS.text_len
    example = dummy_batch(b, grid * grid, patch_dim, t)
    rng = np.random.default_rng(0)
    batch = {k: np.asarray(v) for k, v in example.items()}
    batch["text_tokens"] = rng.integers(4, FLAGS.vocab_size, (b, t)).astype(np.int32)
    batch["targets"] = rng.integers(4, FLAGS.vocab_size, (b, t)).astype(np.int32)
    batch["loss_mask"] = np.ones((b, t), np.float32)
    batch = sharding.global_batch(mesh, batch)
    planned = plan.plan(c, sharding.resolve_mesh_shape(c.mesh, len(jax.devices())))
    out = dict(device=str(jax.devices()[0].device_kind), phases=[],
               planned={k: v["device_peak"] for k, v in planned["phases"].items()})

    def after(name, t0, *trees):
        jax.block_until_ready([x for x in trees if x is not None])
        stats = jax.devices()[0].memory_stats() or {}
        row = dict(phase=name, s=round(time.time() - t0, 3),
                   bytes_in_use=stats.get("bytes_in_use"),
                   peak_bytes_in_use=stats.get("peak_bytes_in_use"))
        out["phases"].append(row)
        print(json.dumps(row), flush=True)

    def stage_parts(stage):
        model, tx = stages.model_and_optimizer(c, stage)
        abstract, sh = abstract_train_state(model, tx, example, mesh)
        off = offload.OffloadPlan(c, stage, sh, abstract)
        return model, tx, abstract, sh, off

    model, tx, abstract, sh, off = stage_parts(p2r.STAGE_PSEUDO)
    with jax.set_mesh(mesh):
        t0 = time.time()
        state, _ = create_train_state(model, tx, example, mesh, 0, make_offload=lambda *_: off)
        after("init", t0, state)
        step = make_train_step(model, tx, mesh, sh, 4, offload=off)
        t0 = time.time()
        state, m = step(state, batch)
        after("step (pseudo)", t0, state, m)
        workdir = tempfile.mkdtemp(prefix="offload_phases_")
        ckpt = Checkpointer(workdir, c)
        t0 = time.time()
        ckpt.save(1, state, {"data": {"step": 1}}, force=True)
        ckpt.wait()
        after("save", t0, state)
        del state
        t0 = time.time()
        state, _ = ckpt.restore_latest(off.restore_target(abstract))
        state = off.to_stored(state)
        after("restore", t0, state)
        ckpt.close()
        r_model, r_tx, r_abstract, r_sh, r_off = stage_parts(p2r.STAGE_REAL)
        t0 = time.time()
        state = p2r.delink_state(state, c, r_tx, r_abstract, r_sh, r_off)
        after("switch", t0, state)
        step = make_train_step(r_model, r_tx, mesh, r_sh, 4, offload=r_off)
        t0 = time.time()
        state, m = step(state, batch)
        after("step (real)", t0, state, m)
        eval_model = build_model(p2r.stage_config(c, p2r.STAGE_REAL))
        eval_step = make_eval_step(eval_model, mesh, r_sh.params, 4, r_off)
        t0 = time.time()
        aux = eval_step(state.params, batch)
        after("eval", t0, aux)
        decode = make_decoder(eval_model, mesh, r_off.decode_shardings(r_sh.params), 3, 8, 1)
        t0 = time.time()
        tokens = decode(state.params, batch["patches"], batch["image_mask"],
                        batch["text_tokens"][:, :3])
        after("generate", t0, tokens)
    out["loss"] = float(m["loss"])
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(out, f, indent=2)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    app.run(main)
