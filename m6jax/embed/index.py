"""Embeddings on disk with their ids, and a faiss index over them.

  DIR/embeddings.npy   f32 [N, D], unit rows (np.load)
  DIR/ids.jsonl        one {"id": ..., ...} per row, in row order (whatever the input had
                       besides the text or image: label, source)
  DIR/index.faiss      faiss IndexFlatIP: exact inner product = cosine on unit rows

faiss-cpu (Meta's similarity-search library) does the search; a flat index is exact,
and at tens of thousands of rows it answers in milliseconds; an IVF or HNSW index is a
one-line change in `build` when a corpus needs it.
"""
from __future__ import annotations

import json
import os

import numpy as np


def write(directory: str, records: list[dict], vectors: np.ndarray) -> None:
    os.makedirs(directory, exist_ok=True)
    np.save(os.path.join(directory, "embeddings.npy"), np.asarray(vectors, np.float32))
    with open(os.path.join(directory, "ids.jsonl"), "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read(directory: str) -> tuple[list[dict], np.ndarray]:
    with open(os.path.join(directory, "ids.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return records, np.load(os.path.join(directory, "embeddings.npy"))


def build(directory: str):
    """Builds and writes DIR/index.faiss over DIR/embeddings.npy; returns the index."""
    import faiss
    _, vectors = read(directory)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, np.float32))
    faiss.write_index(index, os.path.join(directory, "index.faiss"))
    return index


def search(directory: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores f32 [Q, k], row indices i64 [Q, k]) of the k nearest rows per query."""
    import faiss
    index = faiss.read_index(os.path.join(directory, "index.faiss"))
    return index.search(np.ascontiguousarray(queries, np.float32), k)
