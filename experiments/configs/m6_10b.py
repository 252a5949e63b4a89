"""M6-10B (dense): the paper trains it on one machine of 8 GPUs with recomputation,
optimizer-state sharding and gradient sharding on top of data parallelism.

Variants: `paper` (default), `mini` (every training
choice of `paper`, sizes shrunk: 8 CPU devices, 60 steps; experiments/configs/
paper_scale.py `mini` lists what is kept), `mini_reference` (its shape, the quickstart
recipe), and `tiny` (same structure, 128 wide; runs here).
Shapes are ours (the paper's exact width/depth are not at hand): 4096 wide, 49 layers,
32 heads, 4x MLP, BERT-Chinese vocabulary: 9.95B parameters (within 2% of 10B).
Mesh: `fsdp=8` is ZeRO-3 over the 8 GPUs (parameters, gradients and AdamW state
sharded), full rematerialisation per layer, as the paper describes. The GPU type is not
stated; we plan for V100-32GB (ours).
Compute in float16 with dynamic loss scaling (`optimizer.loss_scale`): V100 has
fp16 tensor cores and no bf16 ones (ours: the paper names the GPU, not the precision).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paper_scale as ps  # noqa: E402


def get_config(arg: str = "paper"):
    arg = arg or "paper"
    if arg == "paper":
        return ps.paper_base(
            arg, mesh=dict(data=1, fsdp=8, tensor=1, expert=1),
            model=dict(emb_dim=4096, num_heads=32, mlp_dim=16384, num_layers=49,
                       dtype="float16", remat_policy="full"),  # V100: fp16 tensor cores
            batch_size=64, hw=ps.hardware(8, "V100-32GB", 32))
    if arg == "mini":
        return ps.mini(get_config("paper"))
    if arg == "mini_reference":
        return ps.mini_reference(get_config("mini"))
    if arg == "tiny":
        return ps.tiny_base(arg, remat_policy="full")
    raise ps.unknown_variant(arg, "m6_10b.py")
