"""Model input rows (the pretraining batch layout's model keys) for embedding.

Every row's text is a bidirectional prefix that starts with a task token, as in
pretraining: [<lm>] + text for a text, [<caption>] for an image alone, [<caption>] +
caption for an image with its text. Rows without an image carry zero patches, masked out.
"""
from __future__ import annotations

import numpy as np


def text_rows(tokenizer, texts: list[str], length: int, num_patches: int, patch_dim: int,
              lead_id: int | None = None) -> dict[str, np.ndarray]:
    """[<lm>] + tokens (cut to `length`) for each text -> rows with text arrays [N, length]."""
    lead = tokenizer.lm_id if lead_id is None else lead_id
    ids = [[lead] + (tokenizer.encode(t)[:length - 1] or [tokenizer.unk_id]) for t in texts]
    rows = _text_arrays(ids, length)
    n = len(ids)
    rows.update(patches=np.zeros((n, num_patches, patch_dim), np.float32),
                image_mask=np.zeros((n, num_patches), bool))
    return rows


def image_rows(tokenizer, patches_npd: np.ndarray, texts: list[str] | None = None,
               length: int = 1) -> dict[str, np.ndarray]:
    """Images [N, P, patch_dim] with [<caption>] (+ each text, cut to `length`)."""
    n = len(patches_npd)
    if texts is None:
        ids, length = [[tokenizer.caption_id]] * n, 1
    else:
        ids = [[tokenizer.caption_id] + tokenizer.encode(t)[:length - 1] for t in texts]
    rows = _text_arrays(ids, length)
    rows.update(patches=np.asarray(patches_npd, np.float32),
                image_mask=np.ones(patches_npd.shape[:2], bool))
    return rows


def _text_arrays(ids: list[list[int]], length: int) -> dict[str, np.ndarray]:
    tokens = np.zeros((len(ids), length), np.int32)
    mask = np.zeros((len(ids), length), bool)
    for i, row in enumerate(ids):
        tokens[i, :len(row)] = row
        mask[i, :len(row)] = True
    return dict(text_tokens=tokens, text_mask=mask, text_is_prefix=mask.copy())
