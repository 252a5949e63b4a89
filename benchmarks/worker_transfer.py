r"""What a host batch costs to cross from a Grain worker to the loop, nothing else.

  python benchmarks/worker_transfer.py --json=/tmp/worker_transfer.json

The loader (m6jax/data/loader.py) with 2 workers over a stub pipeline whose batch is an
array of the `m6.py:photos` patch batch's shape ([16, 196, 768]: 16 rows of 224 px RGB)
filled with the step, as float32 (what the pipeline sends) and as uint8 (what the
pixels are before normalising): batches/s after 10 untimed, over --batches. The
preprocessed format builds a batch faster than this on one core, so this is its
ceiling with workers.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import report  # noqa: E402  (benchmarks/report.py)

flags.DEFINE_string("json", "", "write the results here")
flags.DEFINE_integer("batches", 100, "timed batches per dtype")
flags.DEFINE_integer("workers", 2, "worker processes")
FLAGS = flags.FLAGS
SHAPE = (16, 196, 768)


class StubPipe:
    """Batches of one array, built in microseconds (picklable: the workers get it)."""

    def __init__(self, dtype, workers):
        self.dtype, self.settings = dtype, {"num_workers": workers, "prefetch": 2}
        self.bad_image_rows, self.num_skipped, self.bad_messages = set(), 0, {}

    def batch(self, step):
        return {"patches": np.full(SHAPE, step % 200, self.dtype)}


def main(_):
    from m6jax.data.loader import Loader
    result = dict(shape=list(SHAPE), workers=FLAGS.workers, load_avg_1min_at_start=os.getloadavg()[0])
    for dtype in ("float32", "uint8"):
        loader = Loader(StubPipe(dtype, FLAGS.workers), 0, FLAGS.batches + 11)
        for _ in range(10):
            next(loader)
        t0 = time.perf_counter()
        for _ in range(FLAGS.batches):
            next(loader)
        dt = time.perf_counter() - t0
        loader.close()
        mb = FLAGS.batches * np.prod(SHAPE) * np.dtype(dtype).itemsize / dt / 1e6
        result[dtype] = dict(batches_per_s=FLAGS.batches / dt, mb_per_s=mb,
                             images_per_s=FLAGS.batches * SHAPE[0] / dt)
        print(f"{dtype}: {FLAGS.batches / dt:.1f} batches/s, {mb:.0f} MB/s, "
              f"{FLAGS.batches * SHAPE[0] / dt:.0f} images/s", flush=True)
    result["load_avg_1min_at_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))
    if FLAGS.json:
        report.write_json(FLAGS.json, result, indent=1)


if __name__ == "__main__":
    app.run(main)
