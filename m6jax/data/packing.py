"""Sequence packing (`data.pack = True`): several short examples in one [image | text] row.

A row holds at most one image (its P patch slots belong to the example that brought it)
and as many examples as fit its `text_len` text slots, laid one after another. Extra
arrays keep them apart and make each example exactly what it is unpacked:

  segment_ids     int32 [B, P + T]  1, 2, ... per example over its image and text slots; 0 pad
  text_positions  int32 [B, T]      position of each text slot inside its own example
  token_task_id   int32 [B, T]      the task of each text slot's example (per-task losses)

The model lets a query see a key only in its own segment (`masks.prefix_lm_mask`), and
embeds text at `text_positions`; so each example's logits, and with them the summed loss
over its own targets, are those of the same example in a row of its own.
"""
import numpy as np

from m6jax.data import tasks
from m6jax.data.config import MIN_TEXT_LEN

MAX_EXAMPLES_PER_ROW = 16


def packed_rows(pipe, step: int) -> list[list[tuple]]:
    """This host's rows for `step`: each a list of (task, prefix, target, patches | None).

    Row r's draws come from a Generator seeded (seed, step, global r), like the unpacked
    batch: a pure function of the step. Examples are drawn until the text slots left are
    fewer than MIN_TEXT_LEN; an image task drawn when the row already has an image is
    dropped (the draw still happened, so the order stays a function of the step).
    """
    first = pipe.process_index * pipe.batch_size
    rows = []
    for row in range(first, first + pipe.batch_size):
        rng = np.random.default_rng([pipe.seed, step, row])
        examples, used, has_image = [], 0, False
        for _ in range(MAX_EXAMPLES_PER_ROW):
            room = pipe.text_len - used
            if room < MIN_TEXT_LEN:
                break
            task = int(rng.choice(len(pipe.task_probs), p=pipe.task_probs))
            if task in tasks.IMAGE_TASKS and has_image:
                continue
            prefix, target, patches = pipe.train_example(task, rng, text_len=room)
            examples.append((task, prefix, target, patches))
            used += len(prefix) + len(target)
            has_image |= patches is not None
        rows.append(examples)
    return rows


def pack_examples(rows, text_len: int, num_patches: int, patch_dim: int, eos_id: int):
    """Rows of (task, prefix, target, patches | None) -> one packed batch (module doc).

    `task_id` [B] is each row's first task (kept for readers of the unpacked layout).
    """
    b = len(rows)
    out = {
        "patches": np.zeros((b, num_patches, patch_dim), np.float32),
        "image_mask": np.zeros((b, num_patches), bool),
        "text_tokens": np.zeros((b, text_len), np.int32),
        "text_mask": np.zeros((b, text_len), bool),
        "text_is_prefix": np.zeros((b, text_len), bool),
        "targets": np.zeros((b, text_len), np.int32),
        "loss_mask": np.zeros((b, text_len), np.float32),
        "task_id": np.zeros((b,), np.int32),
        "segment_ids": np.zeros((b, num_patches + text_len), np.int32),
        "text_positions": np.zeros((b, text_len), np.int32),
        "token_task_id": np.zeros((b, text_len), np.int32),
    }
    for i, examples in enumerate(rows):
        used = 0
        out["task_id"][i] = examples[0][0]
        for seg, (task, prefix, target, patches) in enumerate(examples, 1):
            n = len(prefix) + len(target)
            one = tasks.pack(prefix, target, eos_id, n)
            sl = slice(used, used + n)
            for k in ("text_tokens", "targets", "text_mask", "text_is_prefix", "loss_mask"):
                out[k][i, sl] = one[k]
            out["text_positions"][i, sl] = np.arange(n)
            out["token_task_id"][i, sl] = task
            out["segment_ids"][i, num_patches + used:num_patches + used + n] = seg
            if patches is not None:
                out["patches"][i], out["image_mask"][i] = patches, True
                out["segment_ids"][i, :num_patches] = seg
            used += n
    return out


def pad_fraction(batch) -> float:
    """Share of the [image | text] slots that hold no real token."""
    real = batch["image_mask"].sum() + batch["text_mask"].sum()
    return 1.0 - float(real) / (batch["image_mask"].size + batch["text_mask"].size)


def real_token_scalars(m, step_s: float, step_tokens: int, step_flops: float, peak: float):
    """tokens_per_s and mfu of a logged step counting only its real (non-pad) slots, and
    its pad_fraction; `m` holds the step's `real_tokens` (losses.text_loss)."""
    real = float(m["real_tokens"])
    return dict(tokens_per_s=real / step_s, mfu=step_flops * real / step_tokens / step_s / peak,
                pad_fraction=1.0 - real / step_tokens)
