"""Data for m6jax: shipped corpora, tokenizer, the four pretraining tasks, batches."""
from m6jax.data.captions import caption_class
from m6jax.data.config import DEFAULTS, TASK_NAMES, validate_data_config
from m6jax.data.pipeline import Pipeline
from m6jax.data.tokenizer import Tokenizer
