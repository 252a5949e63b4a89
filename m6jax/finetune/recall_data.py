"""The shipped text recall task: the first half of a People's Daily paragraph is the
query, its second half the one relevant document among `recall_candidates`.

Paragraphs (People's Daily, January 1998, one a line; `m6jax.data.corpora`) are
de-duplicated, then cut in two at the middle character. Evaluation: a seeded sample of
`recall_candidates` paragraphs of `min_chars`..`max_chars` characters (so both halves
fit the model's text and no candidate is cut); every query ranks all their second
halves, every second half ranks all the queries. Training: the in-batch pairs of every
other paragraph of at least `train_min_chars` characters (halves cut to the row).
Pretraining's LM and denoise tasks read ~98% of these paragraphs' text (it holds out
crc32(text) % 50 == 0), but never the pairing of a half with the other.
"""
from __future__ import annotations

import json
import os

import numpy as np

from m6jax.data import corpora
from m6jax.data.corpora import default_cache_dir


def load_paragraphs(cache_dir: str | None = None) -> list[str]:
    """The shipped People's Daily paragraphs, de-duplicated, in file order."""
    text_files, _ = corpora.shipped_corpora(cache_dir or default_cache_dir())
    path = next(f for f in text_files if os.path.basename(f) == "peoples_daily.jsonl")
    seen, out = set(), []
    with open(path, encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)["text"]
            if t not in seen:
                seen.add(t)
                out.append(t)
    return out


def halves(text: str) -> tuple[str, str]:
    mid = len(text) // 2
    return text[:mid], text[mid:]


def split_pairs(paragraphs: list[str], candidates: int, min_chars: int, max_chars: int,
                train_min_chars: int, seed: int = 0):
    """(train pairs, eval pairs), each a list of (query, document); disjoint, and no
    query or document text of one side appears on the other."""
    eligible = [i for i, t in enumerate(paragraphs) if min_chars <= len(t) <= max_chars]
    if len(eligible) < candidates:
        raise ValueError(f"recall_candidates={candidates}: only {len(eligible)} paragraphs "
                         f"have {min_chars}..{max_chars} characters")
    picked = np.sort(np.random.default_rng(seed).permutation(eligible)[:candidates])
    eval_pairs = [halves(paragraphs[i]) for i in picked]
    taken = {s for pair in eval_pairs for s in pair}
    chosen = set(picked.tolist())
    train_pairs = [halves(t) for i, t in enumerate(paragraphs)
                   if i not in chosen and len(t) >= train_min_chars]
    train_pairs = [p for p in train_pairs if p[0] not in taken and p[1] not in taken]
    return train_pairs, eval_pairs


def tfidf_scores(queries: list[str], docs: list[str], ngram_max: int) -> np.ndarray:
    """Cosine of TF-IDF vectors over character 1..ngram_max-grams -> scores [Q, C].

    Characters, as in the sentiment baseline: Chinese has no spaces, and a word
    segmenter would be a second model to trust. Fitted on the queries and candidates.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, ngram_max), sublinear_tf=True)
    vec.fit(list(queries) + list(docs))
    return (vec.transform(queries) @ vec.transform(docs).T).toarray().astype(np.float32)


def train_picks(num_pairs: int, seed: int, step: int, rows) -> list[int]:
    """Pair indices of batch rows `rows` at `step`: a pure function of (seed, step, row)."""
    return [int(np.random.default_rng([seed, step, r]).integers(num_pairs)) for r in rows]
