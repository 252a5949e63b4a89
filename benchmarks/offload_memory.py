r"""Device memory and step time with streamed host offload on and off, in one run.

  python benchmarks/offload_memory.py                                  # CPU: bytes only
  bash benchmarks/gpu_offload_check.sh                                 # one GPU: all checks

For each setting (`--settings`, "optimizer_layers/param_layers") the train state is
created straight into its stored layout, then --steps steps run. Reported per setting:
the state's bytes in device and in host memory, the device's peak bytes in use during
the steps (`memory_stats()["peak_bytes_in_use"]`, GPU/TPU only; a peak cannot be reset,
so each setting runs in its own process when --isolate is on, the default), step time,
the planned device peak and host<->device bytes per step (`m6jax.plan`), and "OOM" if
the setting does not fit. `host_device_gb_per_s` is a separate measurement of the link
(a 256 MiB array copied to the device and back). Pick a model that does not fit with
"none/none" (or cap the device with XLA_PYTHON_CLIENT_MEM_FRACTION) to see offload make
it fit.
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("emb_dim", 512, "model width")
flags.DEFINE_integer("num_layers", 8, "layers")
flags.DEFINE_integer("num_heads", 8, "attention heads")
flags.DEFINE_integer("text_len", 112, "text tokens (plus 16 image patches)")
flags.DEFINE_integer("batch_size", 8, "global batch")
flags.DEFINE_integer("vocab_size", 8192, "vocabulary")
flags.DEFINE_integer("steps", 5, "timed steps (after 1 warm-up step)")
flags.DEFINE_string("dtype", "float32", "compute dtype")
flags.DEFINE_string("remat_policy", "full", "remat policy (offload_* policies offload activations)")
flags.DEFINE_string("param_dtype", "float32", "master weights dtype")
flags.DEFINE_string("optimizer", "adamw", "adamw | adafactor")
flags.DEFINE_string("settings", "none/none;all/none;0,1,2,3/none;all/all",
                    "';'-separated offload settings, each optimizer_layers/param_layers")
flags.DEFINE_bool("isolate", True, "run each setting in its own process (clean peak memory)")
flags.DEFINE_string("json", "", "write the results here")
flags.DEFINE_string("only", "", "internal: run this one setting and print its JSON")
FLAGS = flags.FLAGS


def measure(setting: str) -> dict:
    import jax
    import numpy as np

    from configs import m6 as m6_config
    from m6jax import offload, plan, sharding
    from m6jax.model import M6
    from m6jax.train import optim
    from m6jax.train.state import create_train_state, dummy_batch
    from m6jax.train.step import make_train_step

    opt_layers, param_layers = setting.split("/")
    c = m6_config.get_config("tiny")
    c.model.update(emb_dim=FLAGS.emb_dim, num_heads=FLAGS.num_heads, mlp_dim=4 * FLAGS.emb_dim,
                   num_layers=FLAGS.num_layers, dtype=FLAGS.dtype, remat_policy=FLAGS.remat_policy,
                   param_dtype=FLAGS.param_dtype, vocab_size=FLAGS.vocab_size)
    c.optimizer.name = FLAGS.optimizer
    c.data.vocab_size = FLAGS.vocab_size
    c.offload.update(optimizer_layers=opt_layers, param_layers=param_layers)
    grid, patch_dim, b, t = 4, 4, FLAGS.batch_size, FLAGS.text_len
    mesh = sharding.make_mesh(c.mesh)
    model = M6(c.model, grid, t)
    tx = optim.make_optimizer(c.optimizer, 1000)
    example = dummy_batch(b, grid * grid, patch_dim, t)
    out = dict(setting=setting, device=str(jax.devices()[0].device_kind))
    c.batch_size = b
    c.data.update(image_size=grid * 2, patch_size=2, image_channels=1, text_len=t)
    planned = plan.plan(c, sharding.resolve_mesh_shape(c.mesh, len(jax.devices())))
    out.update(planned_device_peak_mb=planned["per_device_bytes"]["device_peak"] / 2**20,
               planned_transfer_mb_per_step=planned["transfer_bytes_per_step"] / 2**20)
    try:
        plan_box = []
        state, sh = create_train_state(
            model, tx, example, mesh, 0,
            make_offload=lambda s, shapes: plan_box.append(
                offload.OffloadPlan(c, "real", s, shapes)) or plan_box[0])
        step = make_train_step(model, tx, mesh, sh, num_tasks=4, offload=plan_box[0])
        rng = np.random.default_rng(0)
        batch = {k: np.asarray(v) for k, v in example.items()}
        batch["text_tokens"] = rng.integers(4, FLAGS.vocab_size, (b, t)).astype(np.int32)
        batch["targets"] = rng.integers(4, FLAGS.vocab_size, (b, t)).astype(np.int32)
        batch["loss_mask"] = np.ones((b, t), np.float32)
        batch = sharding.global_batch(mesh, batch)
        with jax.set_mesh(mesh):
            state, m = step(state, batch)
            jax.block_until_ready(m)
            t0 = time.time()
            for _ in range(FLAGS.steps):
                state, m = step(state, batch)
            jax.block_until_ready(m)
        out.update(step_ms=1000 * (time.time() - t0) / FLAGS.steps, loss=float(m["loss"]),
                   state_device_mb=sharding.per_device_bytes(state, "device") / 2**20,
                   state_host_mb=sharding.per_device_bytes(state, offload.HOST) / 2**20)
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20
    except Exception as e:  # noqa: BLE001 (an out-of-memory is a result here)
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        out["error"] = "OOM"
    return out


def link_gb_per_s(mib: int = 256, repeats: int = 3) -> float | None:
    """Host -> device -> host copy rate of one array (GB/s each way), or None on CPU."""
    import jax
    import numpy as np
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    sh = jax.sharding.SingleDeviceSharding(dev)
    x = jax.device_put(np.ones((mib * 2**18,), np.float32), sh.with_memory_kind("pinned_host"))
    jax.block_until_ready(x)
    t0 = time.time()
    for _ in range(repeats):
        y = jax.block_until_ready(jax.device_put(x, sh.with_memory_kind("device")))
        x = jax.block_until_ready(jax.device_put(y, sh.with_memory_kind("pinned_host")))
    return 2 * repeats * mib * 2**20 / (time.time() - t0) / 1e9


def main(_):
    if FLAGS.only == "link":
        print("RESULT " + json.dumps(dict(host_device_gb_per_s=link_gb_per_s())), flush=True)
        return
    if FLAGS.only:
        print("RESULT " + json.dumps(measure(FLAGS.only)), flush=True)
        return
    results = []
    for setting in ["link", *FLAGS.settings.split(";")]:
        if FLAGS.isolate:
            args = [a for a in sys.argv[1:] if not a.startswith(("--json", "--settings"))]
            proc = subprocess.run([sys.executable, __file__, *args, f"--only={setting}"],
                                  capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                raise SystemExit(f"setting {setting} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(line[0][len("RESULT "):]))
        else:
            results.append(dict(host_device_gb_per_s=link_gb_per_s()) if setting == "link"
                           else measure(setting))
        print(json.dumps(results[-1]), flush=True)
    if FLAGS.json:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
        with open(FLAGS.json, "w", encoding="utf-8") as f:
            json.dump(dict(flags={k: FLAGS[k].value for k in ("emb_dim", "num_layers", "text_len",
                                                            "batch_size", "dtype", "remat_policy")},
                           results=results), f, indent=2)


if __name__ == "__main__":
    app.run(main)
