"""Fields shared by the fine-tune configs (experiments/configs/finetune_*.py).

A fine-tune config holds only what a fine-tune chooses: steps, batch, optimizer, mesh,
seed and the task's own fields. Model shape and data layout come from the pretrained
checkpoint (`pretrained.run_config`), so they cannot disagree with it.
"""
import ml_collections

TASKS = ("sentiment", "retrieval", "caption", "recall")
# Tasks whose rows leave room for prompt slots (retrieval/caption batches fill text_len).
PROMPT_TASKS = ("sentiment", "recall")


def base_config(task: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = task
    c.init_from = ""  # required: the pretraining workdir (or its checkpoints/[<step>])
    c.seed = 0
    c.total_steps = 300
    c.batch_size = 32
    c.log_every = 25
    # 0 = the pretraining run's value of that axis (pretrained.run_config): its layout.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=0, tensor=0, expert=0, stage=0))
    c.eval_before = True  # also score the pretrained params before fine-tuning
    c.score_batch = 256  # rows per likelihood-scoring forward pass

    # What is trained (m6jax/finetune/peft.py): full | lora | prompt.
    c.method = "full"
    c.lora = ml_collections.ConfigDict(dict(
        rank=4,  # 2.3% of m6.py:cpu_hour's parameters, 4.3% of :tiny's
        alpha=8.0,  # the update is scaled by alpha / rank
        # Attention and MLP kernels of every layer, and the (tied) token table: without
        # it sentiment on :tiny stopped at 59.6% (loss 0.88), with it 69.1% (loss 0.13).
        targets="query,key,value,out,wi,wo,token_emb"))
    c.prompt = ml_collections.ConfigDict(dict(length=8))  # learned slots before the text

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 5e-4  # a quarter of the tiny pretraining peak
    c.optimizer.warmup_steps = 20
    c.optimizer.end_lr_fraction = 0.1
    c.optimizer.weight_decay = 0.01
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.98
    c.optimizer.decay_rate = 0.8
    c.optimizer.min_dim_size_to_factor = 128
    c.optimizer.grad_clip_norm = 1.0
    # As in experiments/configs/m6.py: auto = dynamic loss scaling iff model.dtype='float16'.
    c.optimizer.loss_scale = "auto"  # auto | dynamic | none
    c.optimizer.loss_scale_init = 2.0 ** 15  # dynamic: the scale at step 0
    c.optimizer.loss_scale_period = 2000  # dynamic: x2 after this many finite steps in a row
    return c


def validate_finetune_config(c) -> None:
    """Errors name the field; the run fields are checked again by validate_config."""
    if c.task not in TASKS:
        raise ValueError(f"task={c.task!r} is not one of {', '.join(TASKS)}; use "
                         "experiments/configs/finetune_<task>.py")
    if int(c.score_batch) <= 0:
        raise ValueError(f"score_batch={c.score_batch} must be positive")
    from m6jax.finetune.peft import Adaptation
    Adaptation.from_config(c)
    if c.method == "prompt" and c.task not in PROMPT_TASKS:
        raise ValueError(f"method=prompt is for {', '.join(PROMPT_TASKS)}: the {c.task} batches "
                         "fill data.text_len, leaving no slots for a prompt; use method=lora")
    if c.task == "recall":
        if not 0 < c.temperature:
            raise ValueError(f"temperature={c.temperature} must be positive")
        from m6jax.embed.pooling import POOLINGS
        if c.pooling not in POOLINGS:
            raise ValueError(f"pooling={c.pooling!r} is not one of {', '.join(POOLINGS)}")
        if int(c.recall_candidates) < 10:
            raise ValueError(f"recall_candidates={c.recall_candidates} must be >= 10 (R@10)")
    for field in ("eval_reviews", "baseline_train_reviews", "eval_images"):
        if field in c and int(c[field]) < 0:
            raise ValueError(f"{field}={c[field]} must be >= 0 (0 = all)")
