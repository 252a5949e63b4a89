r"""Input-pipeline throughput at 224x224 RGB per format, start-up with 1,000 shards, and
the data stall of a short training run.

  python benchmarks/input_pipeline.py --json=/tmp/input_pipeline.json

In one process: scikit-image's photos (re-encoded as JPEG, --copies of each) written as
webdataset and parquet shards (JPEG bytes) and as the preprocessed format (decoded
224 px uint8 pixels, `make_shards.py --format=preprocessed`); `images_per_s` of the
loader for each format with 0 and 2 worker processes (caption rows only, so one image
per row; timed after each worker's first batch, which pays its start, and after the
batches its queues filled meanwhile; the loader's closing is not timed), also as the list
`formats` ({"format", "workers", "images_per_s"}). Then `startup_s_1000_shards`: a
Pipeline over 1,000 small webdataset shards (sized from their shards.json) built and
its first batch made, beside the same without shards.json (every shard opened). Then
the `m6.py:photos` config (224 px, ResNet patch grid, packed text) trained for --steps
steps, with `step_s` (median step after compilation) and `stall_fraction` = time the
loop waited for data / (wait + step time), for 0 and 2 workers, from preprocessed and
webdataset shards (`stall_fraction` is the preprocessed format's at the config's worker
count). Last, `planned_gpu_images_per_s`: the images/s a GPU step of the planned size
(m6.py:base at 224 px, patch 16) would need, from its FLOPs at an assumed MFU of a
stated peak (no GPU is measured here).
"""
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

from absl import app, flags  # noqa: E402

import report  # noqa: E402  (benchmarks/report.py)

flags.DEFINE_string("json", "", "write the results here")
flags.DEFINE_string("data_dir", "", "where to write shards and the tokenizer ('' = a temp dir)")
flags.DEFINE_integer("copies", 5, "copies of each of the 20 photos (records = 20 x copies)")
flags.DEFINE_integer("batch_size", 16, "rows per batch in the throughput part")
flags.DEFINE_integer("batches", 16, "timed batches per JPEG format and worker count (after "
                     "one per worker, which pay the workers' start)")
flags.DEFINE_integer("fast_batches", 64, "timed batches of the preprocessed format")
flags.DEFINE_integer("startup_shards", 1000, "shards of the start-up measurement")
flags.DEFINE_integer("steps", 14, "training steps per stall measurement (2 warm-up)")
flags.DEFINE_list("workers", ["0", "2"], "worker counts")
flags.DEFINE_float("gpu_peak_tflops", 989.0, "peak of the planned GPU (H100/H200 dense bf16)")
flags.DEFINE_float("gpu_mfu", 0.4, "assumed MFU of the planned GPU step")
FLAGS = flags.FLAGS


def _throughput(config, data_dir, num_workers, batches):
    from m6jax.data import Pipeline
    from m6jax.data.loader import DEVICE_PREFETCH, Loader
    c = config.data
    pipe = Pipeline(c, seed=0, batch_size=FLAGS.batch_size, workdir=data_dir)
    # Untimed: every worker's start-up and first batch, then the batches its queues
    # filled meanwhile (timing those would count work done during the start-up).
    warm = 1 + num_workers
    if num_workers:
        warm += num_workers * c.prefetch + DEVICE_PREFETCH
    # One batch more than is read: the loader ends its workers on the last (seconds).
    loader = Loader(pipe, 0, batches + warm + 1, num_workers=num_workers)
    t_start = time.perf_counter()
    for _ in range(warm):
        next(loader)
    first_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    dt = time.perf_counter() - t0
    loader.close()
    return dict(images_per_s=batches * FLAGS.batch_size / dt, batches_per_s=batches / dt,
                first_batch_s=first_s)


def _startup(data_dir, config):
    """Seconds to build a Pipeline over --startup_shards small tar shards and its first
    batch: (with shards.json, without it)."""
    import io

    import numpy as np
    from PIL import Image

    from m6jax.data import Pipeline, shard_index, shards
    out = os.path.join(data_dir, "startup")
    if not os.path.isdir(out):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(
            buf, format="PNG")
        records = [dict(image=buf.getvalue(), ext=".png", caption=[f"a small square {i}"], lang="en")
                   for i in range(4 * FLAGS.startup_shards)]
        shards.write_shards(records, out, "webdataset", per_shard=4)
    config.data.image_text_files = os.path.join(out, "shard-*.tar")
    times = []
    for indexed in (True, False):
        index = os.path.join(out, shard_index.NAME)
        if not indexed:
            os.rename(index, index + ".off")
        shard_index.forget()
        t0 = time.perf_counter()
        pipe = Pipeline(config.data, seed=0, batch_size=FLAGS.batch_size, workdir=data_dir)
        pipe.batch(0)
        times.append(time.perf_counter() - t0)
        if not indexed:
            os.rename(index + ".off", index)
    return times


def _training_stall(config, data_dir, num_workers):
    """(median step_s, stall_fraction, pad_fraction) of --steps steps of `config`."""
    import jax
    import numpy as np

    from m6jax import sharding
    from m6jax.data import Pipeline
    from m6jax.train import stages
    from m6jax.train.state import create_train_state, dummy_batch
    from m6jax.train.step import make_train_step
    config.data.num_workers = num_workers
    mesh = sharding.make_mesh(config.mesh)
    pipe = Pipeline(config.data, seed=0, batch_size=config.batch_size, workdir=data_dir)
    model, tx = stages.model_and_optimizer(config, "real")
    example = dummy_batch(config.batch_size, pipe.num_patches, pipe.patch_dim, pipe.text_len)
    state, sh = create_train_state(model, tx, example, mesh, 0)
    step = make_train_step(model, tx, mesh, sh, len(pipe.task_names))
    loader = pipe.loader(0, FLAGS.steps, lambda s, b: sharding.global_batch(mesh, b))
    waits, steps, pads = [], [], []
    with jax.set_mesh(mesh):
        for i in range(FLAGS.steps):
            w0 = loader.wait_s
            batch = next(loader)
            t1 = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready(m)
            if i >= 2:  # after compilation and the workers' start
                waits.append(loader.wait_s - w0)
                steps.append(time.perf_counter() - t1)
                slots = config.batch_size * (pipe.num_patches + pipe.text_len)
                pads.append(1.0 - float(m["real_tokens"]) / slots)
    return (float(np.median(steps)), sum(waits) / (sum(waits) + sum(steps)),
            float(np.mean(pads)))


def main(_):
    import jax
    import ml_collections

    from configs import m6 as m6_config
    from m6jax import flops
    from m6jax.data import photos, shards

    data_dir = FLAGS.data_dir or tempfile.mkdtemp(prefix="m6_input_")
    captions = photos.photo_folder(os.path.join(data_dir, "jpg"), copies=FLAGS.copies, ext=".jpg")
    records = shards.read_captions(captions, os.path.dirname(captions))
    globs = {}
    for fmt in ("preprocessed", "webdataset", "parquet"):
        out = os.path.join(data_dir, fmt)
        if not os.path.isdir(out):
            shards.write_shards(records, out, fmt, per_shard=20, image_size=224, channels=3)
        globs[fmt] = os.path.join(out, f"shard-*.{shards.EXTS[fmt]}")

    def photos_config(fmt):
        c = m6_config.get_config("photos")
        c.data.image_text_files = globs[fmt]
        return c

    load = os.getloadavg()
    result = dict(image_size=224, channels=3, records=len(records), batch_size=FLAGS.batch_size,
                  load_avg_1min_at_start=load[0], images_per_s={}, batches_per_s={}, formats=[])
    for fmt in globs:
        for w in map(int, FLAGS.workers):
            c = photos_config(fmt)
            c.data.task_weights = ml_collections.ConfigDict(dict(caption=1.0))
            c.data.pack = False
            batches = FLAGS.fast_batches if fmt == "preprocessed" else FLAGS.batches
            r = _throughput(c, data_dir, w, batches)
            key = f"{fmt}_{w}_workers"
            result["images_per_s"][key] = r["images_per_s"]
            result["batches_per_s"][key] = r["batches_per_s"]
            result["formats"].append(dict(format=fmt, workers=w, images_per_s=r["images_per_s"]))
            print(f"{key}: {r['images_per_s']:.1f} images/s, {r['batches_per_s']:.2f} batches/s "
                  f"(first batch {r['first_batch_s']:.1f} s)", flush=True)

    indexed_s, unindexed_s = _startup(data_dir, photos_config("webdataset"))
    result.update(startup_s_1000_shards=indexed_s, startup_s_1000_shards_no_index=unindexed_s,
                  startup_shards=FLAGS.startup_shards)
    print(f"start-up with {FLAGS.startup_shards} shards (Pipeline + first batch): "
          f"{indexed_s:.2f} s with shards.json, {unindexed_s:.2f} s without", flush=True)

    c = photos_config("preprocessed")
    default_workers = c.data.num_workers
    stall = {}
    for fmt in ("preprocessed", "webdataset"):
        stall[fmt] = {}
        for w in map(int, FLAGS.workers):
            step_s, stall[fmt][w], pad = _training_stall(photos_config(fmt), data_dir, w)
            result[f"step_s_{fmt}_{w}_workers"] = step_s
            print(f"m6.py:photos from {fmt}, {w} workers: step {step_s:.3f} s, stall "
                  f"{stall[fmt][w]:.1%}, pad fraction {pad:.1%}", flush=True)
    step_s = result[f"step_s_preprocessed_{default_workers}_workers"]
    result.update(config="m6.py:photos", config_batch_size=c.batch_size,
                  config_num_workers=default_workers, step_s=step_s,
                  stall_fraction=stall["preprocessed"][default_workers],
                  stall_fraction_format="preprocessed",
                  stall_fraction_by_workers={str(k): v for k, v in stall["preprocessed"].items()},
                  stall_fraction_by_format={f: {str(k): v for k, v in d.items()}
                                            for f, d in stall.items()},
                  train_images_per_s_needed_here=c.batch_size / step_s)

    # What a GPU step of the planned size would ask of the input pipeline.
    base = m6_config.get_config("base")
    patches, patch_dim = (224 // 16) ** 2, 16 * 16 * 3
    step_flops = flops.train_flops_per_sequence(base.model, patches, patch_dim,
                                                base.data.text_len) * base.batch_size
    gpu_step_s = step_flops / (FLAGS.gpu_peak_tflops * 1e12 * FLAGS.gpu_mfu)
    result["gpu_planned"] = dict(
        config="m6.py:base at 224 px, patch 16", batch_size=base.batch_size,
        step_tflop=step_flops / 1e12, assumed_peak_tflops=FLAGS.gpu_peak_tflops,
        assumed_mfu=FLAGS.gpu_mfu, step_s=gpu_step_s,
        images_per_s_needed=base.batch_size / gpu_step_s)
    result["planned_gpu_images_per_s"] = base.batch_size / gpu_step_s
    print(f"a GPU step of m6.py:base at 224 px ({step_flops / 1e12:.1f} TFLOP, batch "
          f"{base.batch_size}) at {FLAGS.gpu_mfu:.0%} of {FLAGS.gpu_peak_tflops:.0f} TFLOP/s takes "
          f"{gpu_step_s * 1e3:.0f} ms and needs {base.batch_size / gpu_step_s:,.0f} images/s",
          flush=True)
    result["device"] = jax.devices()[0].device_kind
    result["load_avg_1min_at_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))
    if FLAGS.json:
        report.write_json(FLAGS.json, result, indent=2)


if __name__ == "__main__":
    app.run(main)
