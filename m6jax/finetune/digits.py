"""Digit image-caption data for the retrieval and caption fine-tunes, via the pretraining Pipeline.

Training batches are the pretraining `caption` task alone (a random zh/en caption
template of a random *training* digit): the same examples pretraining mixed with three
other tasks. Evaluation uses the held-out digits (pretraining's fixed 20% image split),
which neither pretraining nor fine-tuning ever trains on.
"""
from __future__ import annotations

import jax
import ml_collections
import numpy as np

from m6jax.data import images, sources, tasks
from m6jax.data.config import TASK_NAMES
from m6jax.data.pipeline import Pipeline


def caption_pipeline(config, workdir: str) -> Pipeline:
    """A Pipeline over the run's data fields that samples only the caption task."""
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.task_weights = {t: float(t == "caption") for t in TASK_NAMES}
    return Pipeline(data, seed=config.seed, batch_size=config.batch_size, workdir=workdir,
                    process_index=jax.process_index(), process_count=jax.process_count())


def heldout_pairs(pipe: Pipeline, max_images: int = 0):
    """Held-out images and the distinct captions among them.

    Returns (patches f32 [N, P, D], image_labels i32 [N], captions list of (text, lang),
    caption_labels i32 [C]). `max_images` > 0 keeps the first that many held-out images.
    """
    patches, image_labels, seen = [], [], {}
    for row in pipe.images.heldout:
        if max_images and len(patches) >= max_images:
            break
        try:
            image, caps, langs, label = pipe.images.record(row)
        except sources.BadRecord:
            continue  # the pipeline counts these; a retrieval pool just skips them
        patches.append(images.patchify(image, pipe.patch_size))
        image_labels.append(label)
        for cap, lang in zip(caps, langs):
            seen.setdefault((cap, lang), label)
    if not patches:
        raise ValueError("no usable held-out image in data.image_text_files")
    return (np.stack(patches), np.asarray(image_labels, np.int32), list(seen),
            np.asarray(list(seen.values()), np.int32))


def caption_text_rows(pipe: Pipeline, captions) -> dict[str, np.ndarray]:
    """Packed [<caption>, lang] -> caption rows [C, L], L = the longest row (<= text_len).

    Scoring with L < text_len is exact (the model slices its position table) and cheaper.
    """
    budget = tasks.target_budget(tasks.CAPTION, pipe.text_len)
    pairs = [(pipe.caption_prompt(lang), pipe.tokenizer.encode(text)[:budget] or [pipe.tokenizer.unk_id])
             for text, lang in captions]
    length = max(len(p) + len(t) for p, t in pairs)
    packed = [tasks.pack(p, t, pipe.tokenizer.eos_id, length) for p, t in pairs]
    return {k: np.stack([r[k] for r in packed]) for k in packed[0]}


def pair_rows(patches: np.ndarray, text_rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every (image i, caption j) as row i * C + j: N * C rows for one score matrix."""
    n, c = len(patches), len(text_rows["targets"])
    rows = {k: np.tile(v, (n,) + (1,) * (v.ndim - 1)) for k, v in text_rows.items()}
    rows["patches"] = np.repeat(patches, c, axis=0)
    rows["image_mask"] = np.ones(rows["patches"].shape[:2], bool)
    return rows
