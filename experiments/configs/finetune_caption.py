"""Digit captioning: fine-tune from the pretrained checkpoint vs from random init.

  python experiments/finetune.py --config=experiments/configs/finetune_caption.py \
      --config.init_from=/work/runs/pretrained_tiny --workdir=/work/runs/ft_caption

Both runs use the same steps, batches, optimizer and seed (init_from still gives the
model shape and tokenizer to the scratch run); accuracy is the pretraining Evaluator's
greedy-decoding class-word match on the held-out digits. Pretraining already trained
this task on the training digits, so this measures what that head start is worth.
"""
from m6jax.finetune.config import base_config


def get_config(arg=None):
    del arg
    c = base_config("caption")
    c.total_steps = 200  # per run; the command trains two
    c.optimizer.learning_rate = 1e-3
    return c
