"""The image tokenizer (VQ-VAE) for text-to-image (`experiments/train_vq.py`).

Variants (`--config=experiments/configs/vq.py:VARIANT`):
  tiny      the shipped 8 x 8 digits upsampled to 32 x 32 -> 8 x 8 = 64 codes of 64;
            about a minute on this 2-core CPU
  photo224  user photos (--config.data.image_text_files=...jsonl, records with an image
            path and a caption) at 224 x 224 RGB -> 14 x 14 = 196 codes of 1024, the
            grid M6's 224 px images have; sized for one GPU
"""
import ml_collections


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.variant = arg or "tiny"
    c.seed = 0
    c.total_steps = 400
    c.batch_size = 64
    c.log_every = 100
    # Checkpoints (WORKDIR/checkpoints), the fields m6jax/checkpoint.py reads.
    c.checkpoint_every = 500
    c.checkpoint_minutes = 0.0
    c.keep_checkpoints = 2
    c.keep_period = 0

    c.data = ml_collections.ConfigDict()
    c.data.image_text_files = ""  # '' = the shipped digits; else comma-separated globs

    c.vq = ml_collections.ConfigDict()
    c.vq.image_size = 32
    c.vq.image_channels = 1
    c.vq.channels = 16  # first conv's width; x2 per downsampling, at most x4
    c.vq.num_downsamples = 2  # stride-2 convs: codes per side = image_size / 2**this
    c.vq.code_dim = 32
    c.vq.codebook_size = 64
    c.vq.commitment = 0.25  # beta of the commitment loss
    c.vq.ema_decay = 0.95  # codebook EMA; low because tiny runs are short

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 50

    if c.variant == "tiny":
        pass
    elif c.variant == "photo224":
        c.vq.update(image_size=224, image_channels=3, channels=64, num_downsamples=4,
                    code_dim=64, codebook_size=1024, ema_decay=0.99)
        c.batch_size = 32
        c.total_steps = 50_000
        c.log_every = 500
        c.checkpoint_every = 2000
        c.optimizer.learning_rate = 4e-4
        c.optimizer.warmup_steps = 1000
    else:
        raise ValueError(f"unknown variant {arg!r} of experiments/configs/vq.py; use tiny or photo224")
    return c
