"""Image-text retrieval on the held-out digits after caption fine-tuning.

  python experiments/finetune.py --config=experiments/configs/finetune_retrieval.py \
      --config.init_from=/work/runs/pretrained_tiny --workdir=/work/runs/ft_retrieval

Fine-tunes on the training digits' captions (the pretraining caption task alone), then
ranks by log p(caption | image): captions for each held-out image (image -> text) and
held-out images for each distinct caption (text -> image). A hit is a candidate of the
query's digit class (captions are templates shared by all images of a class).
`retrieval_r1`/`retrieval_r5` average the two directions; see m6jax/finetune/retrieval.py.
"""
from m6jax.finetune.config import base_config


def get_config(arg=None):
    del arg
    c = base_config("retrieval")
    c.eval_images = 0  # 0 = all held-out digits
    return c
