"""Downstream fine-tuning of a pretrained M6 checkpoint: sentiment, retrieval, captioning."""
