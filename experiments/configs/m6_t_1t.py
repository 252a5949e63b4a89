"""M6-T 1T: sparse experts with expert prototyping ("k top-1": the experts split into
k prototypes, each token routed top-1 inside every prototype). The paper trains over
1 trillion parameters on 480 NVIDIA V100-32GB in about 3 days.

Variants: `paper` (default) and `tiny` (same router, k and every; 8 experts; runs here).
Shapes are ours (the paper's exact widths are not at hand): 2048 wide, 24 layers, every
layer MoE with 960 experts of mlp_dim 10624 in k=4 prototypes of 240: 1.003T
parameters. Mesh: the expert axis spans all 480 GPUs (2 experts per GPU).
The dry run reports that this does not fit 32 GB with float32 AdamW state held on
the device: the paper's run needed memory tricks we do not have yet (host offload
arrives with the Pseudo-to-Real issue).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paper_scale as ps  # noqa: E402

MOE = dict(router="prototype", k=4, every=1, capacity_factor=1.25, dispatch="gather")


def get_config(arg: str = "paper"):
    arg = arg or "paper"
    if arg == "paper":
        return ps.paper_base(
            arg, mesh=dict(data=1, fsdp=1, tensor=1, expert=480),
            model=dict(emb_dim=2048, num_heads=16, mlp_dim=10624, num_layers=24,
                       dtype="bfloat16", remat_policy="full"),
            batch_size=960, hw=ps.hardware(480, "V100-32GB", 32),
            moe=dict(MOE, num_experts=960))
    if arg == "tiny":
        return ps.tiny_base(arg, moe=dict(MOE, num_experts=8), remat_policy="full")
    raise ps.unknown_variant(arg, "m6_t_1t.py")
