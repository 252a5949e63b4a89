"""M6 text-to-image pretraining: caption -> image codes of a trained VQ-VAE (m6jax/t2i).

  python experiments/train_vq.py --config=experiments/configs/vq.py:tiny --workdir=/tmp/vq
  python experiments/pretrain.py --config=experiments/configs/m6_t2i.py:tiny \
      --config.vq_from=/tmp/vq --workdir=/tmp/t2i
  python experiments/generate.py --workdir=/tmp/t2i --text=画一个数字七 --out=grid.png \
      --strategy=mask --num_samples=16

Variants: tiny (this 2-core CPU, a few minutes: the digits' 64 codes of 64),
small (one GPU). The codes are appended to the text vocabulary, so model.vocab_size =
data.vocab_size + t2i.codebook_size + 3 (m6jax/t2i/vocab.py says why); the config
checks refuse a t2i.codebook_size that differs from the checkpoint in vq_from.
"""
import importlib.util
import os

import ml_collections


def _base(arg):
    spec = importlib.util.spec_from_file_location(
        "m6_base_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "m6.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in ("tiny", "small"):
        raise ValueError(f"unknown variant {arg!r} of experiments/configs/m6_t2i.py; use tiny or small")
    c = _base(variant)
    c.variant = variant
    # The shared vocabulary reference of m6.py is rebuilt: the model's is larger here.
    vocab = ml_collections.FieldReference(int(c.data.vocab_size))
    c.data = ml_collections.ConfigDict(c.data.to_dict())
    c.model = ml_collections.ConfigDict(c.model.to_dict())
    c.data.vocab_size = vocab

    c.vq_from = ml_collections.FieldReference("")  # the image tokenizer's --workdir
    c.data.vq_from = c.get_ref("vq_from")  # the pipeline reads it from the data section

    c.t2i = ml_collections.ConfigDict()
    c.t2i.codebook_size = ml_collections.FieldReference(64)  # must equal vq_from's codebook
    c.model.vocab_size = vocab + c.t2i.get_ref("codebook_size") + 3
    # Evaluation at the end of pretraining (summary.json: t2i_accuracy, t2i_accuracy_mask).
    c.t2i.eval_samples_per_digit = 16
    c.t2i.temperature = 0.7  # autoregressive sampling
    c.t2i.top_k = 0
    c.t2i.top_p = 1.0
    c.t2i.guidance_scale = 3.0  # classifier-free guidance, both decoders (1 = off)
    c.t2i.mask_steps = 8  # MaskGIT parallel steps
    c.t2i.mask_temperature = 1.0  # code sampling in each parallel step
    c.t2i.choice_temperature = 4.5  # MaskGIT's noise on which codes to keep, annealed to 0

    c.data.task_weights = ml_collections.ConfigDict(
        dict(caption=0.1, text_to_image=0.45, text_to_image_mask=0.45))
    c.data.caption_dropout = 0.1
    c.model.attention = "dense"  # dense | sparse (m6jax/model/sparse.py)
    c.model.sparse_block_size = 16  # must divide num_patches + text_len
    c.model.sparse_window = 1  # neighbouring blocks seen on each side
    c.model.sparse_stride = 3  # every stride-th block is a summary column all queries see
    c.model.sparse_global_blocks = 2  # leading blocks (image + prompt) seen by and seeing all

    if variant == "tiny":
        # [16 patches | 80 text slots] = 96 positions: prompt 16 + 64 codes.
        c.data.text_len = 80
        c.total_steps = 1200
        c.eval_every = 100_000  # only the final evaluation
        c.checkpoint_every = 400
    else:
        c.data.text_len = 2 + 16 + 256  # 16 x 16 codes (a 64 px tokenizer, f4)
        c.model.sparse_block_size = 64
    return c
