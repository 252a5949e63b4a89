"""Images for the tokenizer: the image-text files' images at the tokenizer's size.

The same `ImageTextSource` as pretraining (and so the same fixed train / held-out split
of records), loaded at `vq.image_size`: the 8 x 8 digits are upsampled (bilinear) to 32
x 32 for the tiny tokenizer, user photos resized to 224 for the photo variant.
"""
from __future__ import annotations

import numpy as np

from m6jax.data import corpora, sources
from m6jax.data.config import IMAGE_TEXT_SUFFIXES, expand_globs
from m6jax.data.corpora import default_cache_dir
from m6jax.errors import InputError

_PRELOAD_BYTES = 256 * 2 ** 20  # hold every image in memory below this (the digits: 7 MB)


class TokenizerImages:
    """`batch(rows)` -> f32 [N, S, S, C]; `train` / `heldout` row indices; `labels`."""

    def __init__(self, image_text_files, image_size: int, channels: int,
                 cache_dir: str | None = None):
        """image_text_files: comma-separated globs ('' = the shipped digits) or a file list."""
        cache_dir = cache_dir or default_cache_dir()
        files = image_text_files
        if isinstance(files, str):
            files = (expand_globs(files, "data.image_text_files", IMAGE_TEXT_SUFFIXES)
                     if files else corpora.shipped_corpora(cache_dir)[1])
        self.source = sources.ImageTextSource(files, cache_dir, image_size, channels)
        self.train, self.heldout = self.source.train, self.source.heldout
        self.shape = (image_size, image_size, channels)
        self._all = None
        if len(self.source) * 4 * int(np.prod(self.shape)) <= _PRELOAD_BYTES:
            self._all = self._load(np.arange(len(self.source)))

    def _load(self, rows) -> np.ndarray:
        out = np.zeros((len(rows),) + self.shape, np.float32)
        bad = 0
        for i, r in enumerate(rows):
            try:
                out[i] = self.source.record(int(r))[0]
            except sources.BadRecord:
                bad += 1  # a black image: counted, the tokenizer barely notices
        if bad == len(rows) and len(rows):
            raise InputError(f"data.image_text_files: none of {len(rows)} images could be read")
        return out

    def batch(self, rows) -> np.ndarray:
        rows = np.asarray(rows)
        return self._all[rows] if self._all is not None else self._load(rows)

    def labels(self, rows) -> np.ndarray:
        """Labels i32 (-1 where a record has none or cannot be read)."""
        out = []
        for r in rows:
            try:
                out.append(self.source.record(int(r))[3])
            except sources.BadRecord:
                out.append(-1)
        return np.asarray(out, np.int32)
