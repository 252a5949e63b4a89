"""Two-tower text recall on People's Daily: contrastive fine-tuning vs TF-IDF.

  python experiments/finetune.py --config=experiments/configs/finetune_recall.py \\
      --config.init_from=/work/runs/cpu_hour --workdir=/work/runs/ft_recall

Query = the first half of a paragraph, its one relevant document = the second half,
among `recall_candidates` second halves (chance R@1 = 1 / recall_candidates). Writes
recall_r1/5/10 (fine-tuned), recall_pretrained_r1 (before), recall_baseline_r1 (TF-IDF),
each the mean of query->document and document->query; see m6jax/finetune/recall.py.
"""
from m6jax.finetune.config import base_config


def get_config(arg=None):
    del arg
    c = base_config("recall")
    c.batch_size = 32  # pairs per step: 64 rows, each pair's negatives are the other 31
    c.total_steps = 300
    c.optimizer.learning_rate = 1e-3  # 5e-4 x 200 steps (mean pooling) reached half the R@1
    c.recall_candidates = 2000
    c.min_chars, c.max_chars = 40, 100  # eval paragraphs: both halves fit a 64-token row
    c.train_min_chars = 20
    c.temperature = 0.05
    # Before fine-tuning every pooling is near chance on m6.py:tiny (0.35-0.47% R@1);
    # lexical is the best fine-tuned one measured (docs/finetuning.md).
    c.pooling = "lexical"
    return c
