"""Tiny configs and synthetic batches shared by the tests (no tokenizer needed)."""
import numpy as np

from configs import m6 as m6_config

NUM_TASKS = 4
GRID, PATCH_DIM, TEXT_LEN = 4, 4, 12


def tiny_config(**mesh):
    c = m6_config.get_config("tiny")
    c.model.update(emb_dim=32, num_heads=4, mlp_dim=64, num_layers=2)
    c.data.vocab_size = 320  # >= data.MIN_VOCAB_SIZE; synthetic batches use ids < 64
    c.data.text_len = TEXT_LEN
    c.batch_size = 8
    c.total_steps = 10
    c.optimizer.warmup_steps = 0
    c.mesh.update({**dict(data=1, fsdp=1, tensor=1, expert=1), **mesh})
    return c


def synthetic_batch(batch_size=8, seed=0, vocab=64):
    """A batch in the pipeline's layout: random images on some rows, prefix of 3 tokens."""
    rng = np.random.default_rng(seed)
    b, p, t = batch_size, GRID * GRID, TEXT_LEN
    has_image = rng.random(b) < 0.6
    text_len = rng.integers(6, t + 1, size=b)
    pos = np.arange(t)[None, :]
    text_mask = pos < text_len[:, None]
    return dict(
        patches=(rng.random((b, p, PATCH_DIM)) * has_image[:, None, None]).astype(np.float32),
        image_mask=np.repeat(has_image[:, None], p, axis=1),
        text_tokens=np.where(text_mask, rng.integers(4, vocab, (b, t)), 0).astype(np.int32),
        text_mask=text_mask,
        text_is_prefix=(pos < 3) & text_mask,
        targets=np.where(text_mask, rng.integers(4, vocab, (b, t)), 0).astype(np.int32),
        loss_mask=((pos >= 2) & text_mask).astype(np.float32),
        task_id=rng.integers(0, NUM_TASKS, b).astype(np.int32))
