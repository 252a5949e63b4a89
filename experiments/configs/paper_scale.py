"""Shared pieces of the paper-scale configs (m6_10b, m6_100b, m6_t_1t, m6_10t).

Each paper config is `m6.py` (same data, optimizer and fields) with the shapes, mesh and
hardware of one paper model, a `mini` twin (`mini`, below: every training choice of the
paper variant, only the sizes shrunk, on 8 CPU devices; tests/test_mini_twins.py trains
each one), and a `tiny` variant of the same structure (same router, k, every, remat
policy) with small widths and the quickstart's training recipe.

The papers do not give the exact widths/depths we need (see ../shared PAPERS.md, "Ours"):
every paper-scale shape below is ours, chosen so the total parameter count is within 2%
of the published figure (`python experiments/dry_run.py --config=...` prints it).
"""
import copy
import math
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import m6  # noqa: E402
from m6jax import schema  # noqa: E402
import m6_moe  # noqa: E402

VARIANTS = ("paper", "mini", "mini_reference", "tiny")
BATCH_AXES = ("data", "fsdp", "expert")  # the mesh axes the batch is split over
MINI_DEVICES = 8  # the fake CPU devices tests and the mini commands of docs/scale.md use


def hardware(num_devices: int, device_kind: str, device_memory_gb: float, **fields):
    """What the dry run plans for: `num_devices` of `device_kind` with this memory each;
    the other fields (per node, link, peak) and their defaults: m6jax/schema.py HARDWARE."""
    return schema.hardware_section(num_devices=num_devices, device_kind=device_kind,
                                   device_memory_gb=float(device_memory_gb), **fields)


# V100-era 8-GPU servers (ours: the papers name the GPU, not the server): PCIe gen3 x16
# moves ~12 GB/s per GPU in practice. The peak comes from device_kind and model.dtype
# (m6jax/flops.py: V100 fp16 tensor cores 125 TFLOP/s; bf16 has none, ~15.7);
# `device_tflops=` overrides it.
V100_NODE = dict(devices_per_node=8, host_device_gb_per_s=12.0)


def paper_base(arg: str, *, mesh: dict, model: dict, batch_size: int,
               hw: ml_collections.ConfigDict, moe: dict | None = None):
    """m6.py:base with a paper model's shapes, mesh and hardware.

    Sequences are ours too: a 224x224 RGB image in 16x16 patches (196 patch slots, as
    a ViT/ResNet-grid feature map would give) followed by 128 text tokens.
    """
    c = m6.get_config("base")
    c.variant = arg
    c.model.update(model)
    c.mesh.update(mesh)
    c.batch_size = batch_size
    c.data.update(image_size=224, patch_size=16, image_channels=3, text_len=128)
    c.hardware = hw
    if moe is not None:
        c.model.moe = m6_moe.moe_section(**moe)
    return c


def tiny_base(arg: str, moe: dict | None = None, remat_policy: str = "none"):
    """m6.py:tiny (runs here) with the paper model's structure at small widths."""
    c = m6.get_config("tiny")
    c.variant = arg
    c.model.remat_policy = remat_policy
    # This machine: 8 fake CPU devices in tests; the dry run plans for them.
    c.hardware = hardware(8, "cpu", 4.0)
    if moe is not None:
        c.model.moe = m6_moe.moe_section(**moe)
    return c


def mini(paper: ml_collections.ConfigDict, num_layers: int = 4,
         total_steps: int = 60) -> ml_collections.ConfigDict:
    """The `mini` twin of a paper variant: the same training choices at a size that
    trains on the shipped data here in a few minutes.

    Kept from `paper`, untouched: the optimizer and its hyperparameters but the peak
    learning rate, the compute and master dtypes and loss scaling, the remat policy, the
    offload lists, every MoE field but the expert count and group size, the Pseudo-to-
    Real fields, and which mesh axes are split. Shrunk: width, depth and vocabulary (the
    quickstart's model and its data: the shipped digits and texts), experts (the paper's
    experts per device times 8 devices), the routing group (the same number of examples
    per group), batch (the paper's examples per device, at least the quickstart's 32 in
    all), steps (warmup and the Pseudo-to-Real switch at the same fraction
    of the steps), the mesh (each split axis to 8 devices) and the hardware.

    The peak learning rate is the quickstart's (2e-3) rather than the paper variant's
    3e-4: the papers give none, 3e-4 is ours for widths of thousands, and the rate that
    trains a width-128 model in 60 steps is a size-dependent choice like the width.
    """
    tiny = m6.get_config("tiny")
    c = copy.deepcopy(paper)
    c.variant = "mini"
    frac = total_steps / paper.total_steps
    c.total_steps = total_steps
    per_device_batch = paper.batch_size // math.prod(paper.mesh[a] for a in BATCH_AXES)
    c.batch_size = max(tiny.batch_size, per_device_batch * MINI_DEVICES)
    c.eval_every, c.log_every = total_steps, tiny.log_every
    c.checkpoint_every, c.keep_period = 0, 0
    c.data = copy.deepcopy(tiny.data)
    c.model.update(vocab_size=tiny.model.vocab_size, num_layers=num_layers,
                   **{f: tiny.model[f] for f in ("emb_dim", "num_heads", "mlp_dim")})
    c.optimizer.learning_rate = tiny.optimizer.learning_rate
    c.optimizer.warmup_steps = max(1, round(paper.optimizer.warmup_steps * frac))
    split = [a for a in ("data", "fsdp", "tensor", "expert", "stage") if c.mesh[a] > 1]
    if len(split) != 1:
        raise ValueError(f"mini: paper mesh {dict(c.mesh)} splits {split}; give the mini mesh")
    per_device = None
    if c.model.get("moe"):
        moe = c.model.moe
        per_device = moe.num_experts // paper.mesh.expert
        seq = lambda d: (d.image_size // d.patch_size) ** 2 + d.text_len
        moe.num_experts = per_device * (MINI_DEVICES if split == ["expert"] else 1)
        if moe.group_size:
            moe.group_size = moe.group_size // seq(paper.data) * seq(c.data)
    c.mesh.update({split[0]: MINI_DEVICES})
    if paper.pseudo_to_real.switch_step:
        c.pseudo_to_real.switch_step = max(1, round(paper.pseudo_to_real.switch_step * frac))
    c.hardware = hardware(MINI_DEVICES, "cpu", 4.0)
    return c


def mini_reference(mini_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `mini` twin's shape (the Real model, its MoE and mesh) trained with the
    quickstart's recipe (m6.py:tiny's optimizer: AdamW, warmup as the same fraction of
    the steps; float32; nothing offloaded; no Pseudo-to-Real): what the twin's recipe is
    measured against."""
    tiny = m6.get_config("tiny")
    c = copy.deepcopy(mini_config)
    c.variant = "mini_reference"
    c.optimizer = copy.deepcopy(tiny.optimizer)
    c.optimizer.warmup_steps = round(tiny.optimizer.warmup_steps * c.total_steps /
                                     tiny.total_steps)
    c.model.update(dtype="float32", param_dtype="float32", share_layers=False)
    c.offload.update(param_layers="none", optimizer_layers="none")
    c.pseudo_to_real.switch_step = 0
    return c


def unknown_variant(arg: str, file: str):
    return ValueError(f"unknown variant {arg!r} of experiments/configs/{file}; use one of "
                      f"{', '.join(VARIANTS)}")
