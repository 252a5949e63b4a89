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
import copy
import os
import sys

import ml_collections

# A config file is loaded by path: make the repository's m6jax importable from a clone.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from m6jax.data.config import DEFAULTS as DATA_DEFAULTS  # noqa: E402


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.variant = arg or "tiny"
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 32
    c.log_every = 25
    c.eval_every = 500
    c.peak_tflops_per_device = 0.0  # 0 = measure (CPU) or look up (GPU/TPU)
    c.num_caption_samples = 4  # captions printed at the end
    c.profile_steps = ""  # "A,B": jax.profiler trace of steps A..B into WORKDIR/tensorboard

    # Checkpoints (WORKDIR/checkpoints): rerunning the same command resumes. A final
    # checkpoint is always written, and one when SIGTERM arrives.
    c.checkpoint_every = 200  # steps; 0 = only at the end and on preemption
    c.checkpoint_minutes = 0.0  # also save when this many minutes passed; 0 = off
    c.keep_checkpoints = 3  # keep the newest N ...
    c.keep_period = 0  # ... plus every K-th step (0 = none)
    c.init_from = ""  # a checkpoint to take params from (fine-tuning); '' = fresh init
    c.nonfinite_policy = "skip"  # non-finite loss/grads: skip (count, no update) | stop

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1, stage=1))

    # Pipeline parallelism over mesh.stage (m6jax/pipeline.py): the batch in microbatches
    # (a multiple of mesh.stage), the stack in stage x repeats chunks (repeats > 1: the
    # circular schedule); bubble = (stage - 1) / (repeats * microbatches + stage - 1).
    c.pipeline = ml_collections.ConfigDict(dict(microbatches=1, repeats=1, remat_stage=True))

    # The data fields and their defaults live in one place, m6jax/data/config.py (what
    # each means is documented there); this family changes only these three.
    vocab = ml_collections.FieldReference(2000)
    c.data = ml_collections.ConfigDict(copy.deepcopy(DATA_DEFAULTS))
    c.data.text_len = 48
    c.data.vocab_size = vocab
    c.data.task_weights = ml_collections.ConfigDict(
        dict(caption=0.6, caption_denoise=0.1, denoise=0.15, lm=0.15))

    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = vocab
    c.model.emb_dim = 128
    c.model.num_heads = 4
    c.model.mlp_dim = 512
    c.model.num_layers = 4
    c.model.mlp_activation = "gelu"  # gelu (exact) | gelu_tanh | relu | silu
    c.model.dropout_rate = 0.0
    c.model.dtype = "float32"  # compute dtype
    # Master weights: float32, or bfloat16 (halves what offload stores and streams; updates
    # by stochastic rounding; norms and the router stay float32). Optimizer state: float32.
    c.model.param_dtype = "float32"
    # none | full | dots | dots_no_batch | offload_dots_no_batch | offload_layer_input
    c.model.remat_policy = "none"
    c.model.tie_embeddings = True
    c.model.share_layers = False  # True: the Pseudo giant (one block's weights at every layer)
    c.model.image_encoder = "patches"  # patches (linear) | resnet (CNN grid, model/resnet.py)
    c.model.resnet_width = 32  # resnet: channels of the first stage, doubling per stage
    c.model.resnet_blocks = 1  # resnet: residual blocks per stage

    # Pseudo-to-Real (M6-10T): with model.share_layers=True, delink at switch_step.
    c.pseudo_to_real = ml_collections.ConfigDict()
    c.pseudo_to_real.switch_step = 0  # 0 = never (a share_layers run stays Pseudo)
    c.pseudo_to_real.optimizer = "scaled"  # scaled (moments / L, / L**2) | copy | reinit
    c.pseudo_to_real.switch_warmup_steps = 0  # linear lr re-warmup over steps after the switch
    c.pseudo_to_real.lr_schedule = "continue"  # continue | restart (warmup + cosine again)
    c.pseudo_to_real.restart_warmup_steps = 0

    # Host offload of chosen layers' states (pinned host memory, streamed through the step
    # one scanned unit at a time):
    # "none", "all" or comma-separated layer indices such as "0,1" (or a Python list).
    c.offload = ml_collections.ConfigDict()
    c.offload.optimizer_layers = "none"
    c.offload.param_layers = "none"

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # adamw | adafactor (factored second moments, no momentum)
    # Every optimizer: p <- p - lr_t * (u + weight_decay * p) (decay scaled by the schedule).
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.end_lr_fraction = 0.1  # cosine decays to this fraction of the peak
    c.optimizer.weight_decay = 0.01
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.98
    c.optimizer.decay_rate = 0.8  # adafactor: second-moment decay 1 - t**-decay_rate
    c.optimizer.min_dim_size_to_factor = 128  # adafactor: factor dims of at least this size
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.grad_accum_steps = 1  # microbatches per step (an in-step scan; same loss)
    # Loss scaling (m6jax/train/loss_scale.py): auto = dynamic iff model.dtype='float16'.
    c.optimizer.loss_scale = "auto"  # auto | dynamic | none
    c.optimizer.loss_scale_init = 2.0 ** 15  # dynamic: the scale at step 0
    c.optimizer.loss_scale_period = 2000  # dynamic: x2 after this many finite steps in a row

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
