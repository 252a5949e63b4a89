"""M6 text-to-image pretraining: caption -> image codes of a trained VQ-VAE (m6jax/t2i).

  python experiments/train_vq.py --config=experiments/configs/vq.py:tiny --workdir=/tmp/vq
  python experiments/pretrain.py --config=experiments/configs/m6_t2i.py:tiny \
      --config.vq_from=/tmp/vq --workdir=/tmp/t2i
  python experiments/generate.py --workdir=/tmp/t2i --text=画一个数字七 --out=grid.png \
      --strategy=mask --num_samples=16

Variants: tiny (this 2-core CPU, a few minutes: the digits' 64 codes of 64),
small (one GPU), long (the paper's long setting: 4,096 positions with block-sparse
attention, narrow enough to lower for GPU/TPU here in a minute:
`experiments/dry_run.py --config=experiments/configs/m6_t2i.py:long --lower=tpu`). The codes are appended to the text vocabulary, so model.vocab_size =
data.vocab_size + t2i.codebook_size + 3 (m6jax/t2i/vocab.py says why); the config
checks refuse a t2i.codebook_size that differs from the checkpoint in vq_from.
"""
import importlib.util
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from m6jax import schema  # noqa: E402


def _base(arg):
    spec = importlib.util.spec_from_file_location(
        "m6_base_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "m6.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in ("tiny", "small", "long"):
        raise ValueError(f"unknown variant {arg!r} of experiments/configs/m6_t2i.py; "
                         "use tiny, small or long")
    c = _base("small" if variant == "long" else variant)
    c.variant = variant
    # The shared vocabulary reference of m6.py is rebuilt: the model's is larger here.
    vocab = ml_collections.FieldReference(int(c.data.vocab_size))
    c.data = ml_collections.ConfigDict(c.data.to_dict())
    c.model = ml_collections.ConfigDict(c.model.to_dict())
    c.data.vocab_size = vocab

    c.vq_from = ml_collections.FieldReference("")  # the image tokenizer's --workdir
    c.data.vq_from = c.get_ref("vq_from")  # the pipeline reads it from the data section

    # Text-to-image fields, defaults and meanings: m6jax/schema.py (T2I, model.sparse_*).
    c.t2i = schema.t2i_section()
    c.t2i.codebook_size = ml_collections.FieldReference(64)  # must equal vq_from's codebook
    c.model.vocab_size = vocab + c.t2i.get_ref("codebook_size") + 3
    c.data.task_weights = ml_collections.ConfigDict(
        dict(caption=0.1, text_to_image=0.45, text_to_image_mask=0.45))
    c.data.caption_dropout = 0.1
    c.model.update(sparse_stride=3, sparse_global_blocks=2)  # used when attention='sparse'

    if variant == "tiny":
        # [16 patches | 80 text slots] = 96 positions: prompt 16 + 64 codes.
        c.data.text_len = 80
        c.total_steps = 1200
        c.eval_every = 100_000  # only the final evaluation
        c.checkpoint_every = 400
    elif variant == "small":
        c.data.text_len = 2 + 16 + 256  # 16 x 16 codes (a 64 px tokenizer, f4)
        c.model.sparse_block_size = 64
    else:
        _long(c)
    return c


def _long(c):
    """4,096 positions: 16 patches + 4,080 text slots, block-sparse in 128-position
    blocks; widths cut so the dry run lowers it in seconds (its shape, not its size, is
    what the kernels see). Training it needs `--config.vq_from` of a 1,024-code tokenizer
    whose codes per image fit the text slots with a prompt (the config checks say how)."""
    c.data.update(image_size=8, patch_size=2, text_len=4080)
    c.t2i.codebook_size = 1024
    c.model.update(attention="sparse", sparse_block_size=128, sparse_window=1, sparse_stride=4,
                   sparse_global_blocks=1, emb_dim=256, num_heads=2, mlp_dim=512,
                   num_layers=2, dtype="bfloat16", remat_policy="full")
    c.batch_size = 1
    c.mesh.update(data=1, fsdp=1, tensor=1, expert=1, stage=1)
    c.hardware = schema.hardware_section(num_devices=1, device_kind="H100",
                                         device_memory_gb=80.0)
