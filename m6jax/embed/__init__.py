"""Embeddings from a pretrained M6: text, image and image+text vectors, and a vector index.

  pooling.py  the pooled vector of a sequence's hidden states (mean | first | last)
  rows.py     model input rows for texts, images and image+text pairs
  encoder.py  a jitted, mesh-sharded encoder: params + rows -> one vector per row
  index.py    writing vectors with their ids (.npy + jsonl) and a faiss index over them
"""
