"""Shared pieces of the paper-scale configs (m6_10b, m6_100b, m6_t_1t, m6_10t).

Each paper config is `m6.py` (same data, optimizer and fields) with the shapes, mesh and
hardware of one paper model, and a `tiny` variant of the same structure (same router,
k, every, remat policy) with small widths that trains on this machine's CPU.

The papers do not give the exact widths/depths we need (see ../shared PAPERS.md, "Ours"):
every paper-scale shape below is ours, chosen so the total parameter count is within 2%
of the published figure (`python experiments/dry_run.py --config=...` prints it).
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import m6  # noqa: E402
import m6_moe  # noqa: E402

VARIANTS = ("paper", "tiny")


def hardware(num_devices: int, device_kind: str, device_memory_gb: float, *,
             devices_per_node: int = 8, host_memory_gb_per_node: float | None = None,
             host_device_gb_per_s: float | None = None, device_tflops: float | None = None):
    """What the dry run plans for: `num_devices` of `device_kind` with this memory each,
    `devices_per_node` per node sharing `host_memory_gb_per_node` of host memory, a
    host<->device link of `host_device_gb_per_s` per device and a peak of `device_tflops`
    (the last three are optional: without them the plan leaves host fit and transfer
    time out, and takes the peak from `device_kind` and model.dtype if the table in
    m6jax/flops.py knows them)."""
    return ml_collections.ConfigDict(dict(
        num_devices=num_devices, device_kind=device_kind,
        device_memory_gb=float(device_memory_gb), devices_per_node=devices_per_node,
        host_memory_gb_per_node=host_memory_gb_per_node,
        host_device_gb_per_s=host_device_gb_per_s, device_tflops=device_tflops))


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


def unknown_variant(arg: str, file: str):
    return ValueError(f"unknown variant {arg!r} of experiments/configs/{file}; use one of "
                      f"{', '.join(VARIANTS)}")
