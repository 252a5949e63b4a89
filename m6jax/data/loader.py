"""Batches for the train loop: built in worker processes, prefetched onto the devices.

Grain (google/grain) runs the workers: a `MapDataset` over step numbers whose map is
`Pipeline.batch`, so each worker process decodes images and tokenizes captions for
whole host batches, `per_worker_buffer_size` (= data.prefetch) batches ahead of the
loop; that is the host prefetch queue. We chose Grain over Hugging Face `datasets`'
workers because its iterators are built for JAX (numpy leaves through shared memory,
per-host sharding, checkpointable state), and because a map over *steps* keeps the data
order a pure function of (seed, step): a batch is the same whichever worker builds it,
so the iterator's whole state is the next step (what the checkpoint's `data.step`
already stores; Grain's own state for this dataset, {'next_index': k}, says no more).
Resume rebuilds the dataset from that step and is bitwise exact.

A thread then turns each host batch into global `jax.Array`s and keeps two of them in
flight (`DEVICE_PREFETCH`), so the transfer overlaps the running step. `wait_s` is the
time the loop spent blocked in `next`: the data stall.

With data.num_workers = 0 nothing runs in the background (the quickstart default):
`next` builds the batch on the calling thread, as before workers existed.
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np
from absl import flags, logging

DEVICE_PREFETCH = 2  # global batches on the devices ahead of the step that uses them
_BAD = "_bad_records"  # worker -> loop: bad rows the worker found, with their messages
_SKIPPED = "_skipped"


class _BuildBatch:
    """step -> host batch, plus the bad records found since the last call (picklable:
    Grain sends it to each worker)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, step):
        pipe = self.pipe
        before, skipped = set(pipe.bad_image_rows), pipe.num_skipped
        batch = dict(pipe.batch(int(step)))
        new = sorted(pipe.bad_image_rows - before)
        batch[_BAD] = [(int(r), pipe.bad_messages.get(r, "")) for r in new]
        batch[_SKIPPED] = np.int64(pipe.num_skipped - skipped)
        return batch


def _grain_iterator(pipe, start: int, stop: int, num_workers: int, prefetch: int):
    import grain
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; a library caller has none
        flags.FLAGS.mark_as_parsed()
    # No read threads inside a worker: Grain's default ReadOptions (16 threads, a buffer
    # of 500 elements per worker) would hold up to 500 host batches per worker (~5 GB at
    # 224 px) and fight the workers for the cores; per_worker_buffer_size is the bound.
    read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    ds = grain.MapDataset.range(start, stop).map(_BuildBatch(pipe)).to_iter_dataset(read)
    options = grain.MultiprocessingOptions(num_workers=num_workers,
                                           per_worker_buffer_size=prefetch)
    return iter(ds.mp_prefetch(options))


class Loader:
    """Iterator over the global batches of steps start, start + 1, ... < stop.

    `place(step, host_batch) -> device batch` puts one batch on the devices (the loop
    passes its test hooks + `sharding.global_batch`); None keeps numpy batches.
    """

    def __init__(self, pipe, start: int, stop: int, place=None, num_workers: int | None = None,
                 prefetch: int | None = None):
        self.pipe, self.step, self.stop = pipe, start, stop
        self.place = place or (lambda step, batch: batch)
        self.num_workers = pipe.settings["num_workers"] if num_workers is None else num_workers
        prefetch = pipe.settings["prefetch"] if prefetch is None else prefetch
        self.wait_s = 0.0
        self._error = None
        if self.num_workers and start < stop:
            self._host = _grain_iterator(pipe, start, stop, self.num_workers, prefetch)
            self._queue: queue.Queue = queue.Queue(maxsize=DEVICE_PREFETCH)
            self._stopping = threading.Event()
            self._thread = threading.Thread(target=self._fill, name="device_prefetch",
                                            daemon=True)
            self._thread.start()
        else:
            self._host = None

    def _fill(self):
        try:
            for step in range(self.step, self.stop):
                batch = next(self._host)
                self._merge_counters(batch)
                item = (step, self.place(step + 1, batch))
                while not self._stopping.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stopping.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 (re-raised on the loop's thread)
            self._error = e
            self._queue.put(None)

    def _merge_counters(self, batch):
        for row, message in batch.pop(_BAD):
            if row not in self.pipe.bad_image_rows:
                logging.warning("skipping bad image-text record: %s", message)
                self.pipe.bad_image_rows.add(row)
        self.pipe.num_skipped += int(batch.pop(_SKIPPED))

    def __iter__(self):
        return self

    def __next__(self):
        """The device batch of the next step (StopIteration after `stop`)."""
        if self.step >= self.stop:
            raise StopIteration
        t0 = time.perf_counter()
        if self._host is None:
            batch = self.place(self.step + 1, self.pipe.batch(self.step))
        else:
            item = self._queue.get()
            if item is None:
                raise self._error
            step, batch = item
            assert step == self.step, (step, self.step)
        self.wait_s += time.perf_counter() - t0
        self.step += 1
        if self.step >= self.stop:
            self.close()  # the workers are done: end their processes now
        return batch

    def close(self):
        if self._host is not None:
            self._stopping.set()
            self._thread.join(timeout=30)
            close = getattr(self._host, "close", None)
            if close is not None:
                close()
            self._host = None
