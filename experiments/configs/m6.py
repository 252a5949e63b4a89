"""M6 (dense) pretraining on the shipped real data: digits + captions, Chinese text.

Variants (`--config=experiments/configs/m6.py:VARIANT`):
  tiny   the quickstart: learns digit captioning on this 2-core CPU in a few minutes.
  small  a wider/deeper model for a single GPU.
  base   M6-base-like shape (ours: the paper's exact width/depth are not at hand).
  cpu_hour  the largest model this 2-core CPU trains in about an hour on the shipped
         data: more text (lm and denoise) and longer texts, so continuations read as Chinese.
  photos 224x224 RGB: scikit-image's sample photographs with our captions, written once
         as webdataset shards, a ResNet patch grid, 2 loader workers, packed text.
"""
import os
import sys

import ml_collections

# A config file is loaded by path: make the repository's m6jax importable from a clone.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from m6jax import schema  # noqa: E402


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    # Every field, its default and its meaning: m6jax/schema.py. This family overrides:
    c = schema.defaults()
    c.variant = arg or "tiny"
    c.data.text_len = 48
    c.data.vocab_size = 2000  # model.vocab_size follows it
    c.data.task_weights = ml_collections.ConfigDict(
        dict(caption=0.6, caption_denoise=0.1, denoise=0.15, lm=0.15))

    if c.variant == "tiny":
        pass
    elif c.variant == "small":
        c.model.update(emb_dim=512, num_heads=8, mlp_dim=2048, num_layers=8, dtype="bfloat16")
        c.data.vocab_size = 8000
        c.data.text_len = 128
        c.batch_size = 64
        c.total_steps = 5000
        c.eval_every = 500
        c.checkpoint_every = 500
        c.optimizer.learning_rate = 6e-4
    elif c.variant == "base":
        c.model.update(emb_dim=768, num_heads=12, mlp_dim=3072, num_layers=12, dtype="bfloat16",
                       remat_policy="dots")
        c.data.vocab_size = 21128  # ours: a BERT-Chinese-sized vocabulary
        c.data.text_len = 256
        c.batch_size = 256
        c.total_steps = 100_000
        c.eval_every = 2000
        c.checkpoint_every = 2000
        c.keep_period = 20_000
        c.log_every = 100
        c.optimizer.learning_rate = 3e-4
        c.optimizer.warmup_steps = 2000
    elif c.variant == "cpu_hour":
        c.model.update(emb_dim=256, num_heads=4, mlp_dim=1024, num_layers=6)
        c.data.text_len = 64  # the tiny model's tokenizer (vocab 2000): losses per token compare
        c.data.task_weights = dict(caption=0.3, caption_denoise=0.05, denoise=0.25, lm=0.4)
        c.total_steps = 1600
        c.eval_every = 400
        c.checkpoint_every = 200
        c.log_every = 50
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 100
    elif c.variant == "photos":
        photos(c)
    else:
        raise ValueError(f"unknown variant {arg!r} of experiments/configs/m6.py; "
                         "use one of tiny, small, base, cpu_hour, photos")
    return c


def photos(c: ml_collections.ConfigDict) -> None:
    """The 224px RGB photo-caption config (real photographs that ship in scikit-image).

    The shards are written on first use under $M6JAX_CACHE (default ~/.cache/m6jax).
    """
    from m6jax.data import photos as photos_lib
    c.data.image_text_files = photos_lib.photo_shards()
    c.data.update(image_size=224, image_channels=3, patch_size=16, num_workers=2, pack=True)
    c.data.task_weights = ml_collections.ConfigDict(dict(caption=0.5, lm=0.5))
    c.model.update(image_encoder="resnet", resnet_width=16, num_layers=2)
    c.batch_size = 8
    c.total_steps = 60
    c.log_every = 10
    c.eval_every = 1000
    c.checkpoint_every = 0
    c.optimizer.warmup_steps = 10
