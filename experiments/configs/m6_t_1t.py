"""M6-T 1T: sparse experts with expert prototyping ("k top-1": the experts split into
k prototypes, each token routed top-1 inside every prototype). The paper trains over
1 trillion parameters on 480 NVIDIA V100-32GB in about 3 days.

Variants: `paper` (default), `mini` (every training
choice of `paper`, sizes shrunk: 8 CPU devices, 60 steps; experiments/configs/
paper_scale.py `mini` lists what is kept), `mini_reference` (its shape, the quickstart
recipe), and `tiny` (same router, k and every; 8 experts; runs here).
Shapes are ours (the paper's exact widths are not at hand): 2048 wide, 24 layers, every
layer MoE with 960 experts of mlp_dim 10624 in k=4 prototypes of 240: 1.003T
parameters. Mesh: the expert axis spans all 480 GPUs (2 experts per GPU).
Memory (ours; the paper does not say how it fit): float32 params and AdamW. Each GPU
holds 2.1B expert + 0.4B replicated parameters: params and gradients (19 GiB) stay on
the device, and every layer's AdamW moments (19 GiB) are offloaded to host memory
(`offload.optimizer_layers=all`) and streamed through the update one layer at a time.
Nodes: DGX-1-like, 8 V100-32GB and 512 GB of host memory each.
`python experiments/dry_run.py --config=experiments/configs/m6_t_1t.py` plans it.
Compute in float16 with dynamic loss scaling (`optimizer.loss_scale`): V100 has
fp16 tensor cores and no bf16 ones (ours: the paper names the GPU, not the precision).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paper_scale as ps  # noqa: E402

MOE = dict(router="prototype", k=4, every=1, capacity_factor=2.0, dispatch="gather",
           group_size=648, priority="score")


def get_config(arg: str = "paper"):
    arg = arg or "paper"
    if arg == "paper":
        c = ps.paper_base(
            arg, mesh=dict(data=1, fsdp=1, tensor=1, expert=480),
            model=dict(emb_dim=2048, num_heads=16, mlp_dim=10624, num_layers=24,
                       dtype="float16", remat_policy="full"),  # V100: fp16 tensor cores
            batch_size=960, hw=ps.hardware(480, "V100-32GB", 32, host_memory_gb_per_node=512,
                                           **ps.V100_NODE),
            moe=dict(MOE, num_experts=960))
        c.offload.optimizer_layers = "all"
        return c
    if arg == "mini":
        return ps.mini(get_config("paper"))
    if arg == "mini_reference":
        return ps.mini_reference(get_config("mini"))
    if arg == "tiny":
        return ps.tiny_base(arg, moe=dict(MOE, num_experts=8, group_size=0), remat_policy="full")
    raise ps.unknown_variant(arg, "m6_t_1t.py")
