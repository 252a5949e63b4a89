"""M6-100B (M6-MoE): experts on different GPUs, tokens exchanged by all-to-all; the
paper trains it on 128 A100s (1,440 samples/s).

Variants: `paper` (default), `mini` (every training
choice of `paper`, sizes shrunk: 8 CPU devices, 60 steps; experiments/configs/
paper_scale.py `mini` lists what is kept), `mini_reference` (its shape, the quickstart
recipe), and `tiny` (same structure, 8 experts; runs here).
Shapes are ours (the paper's exact widths and expert count are not at hand): 1024
wide, 24 layers, every layer MoE with 512 Switch top-1 experts of mlp_dim 3968:
100.0B parameters. Mesh: the expert axis spans all 128 GPUs (4 experts per GPU; the
batch is split over the same 128 ways), dense weights replicated (they are 0.1% of the
model). The A100 memory size is not stated; we plan for 40 GB (ours).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paper_scale as ps  # noqa: E402

MOE = dict(router="topk", k=1, every=1, capacity_factor=2.0, dispatch="gather",
           group_size=2592, priority="score")


def get_config(arg: str = "paper"):
    arg = arg or "paper"
    if arg == "paper":
        return ps.paper_base(
            arg, mesh=dict(data=1, fsdp=1, tensor=1, expert=128),
            model=dict(emb_dim=1024, num_heads=16, mlp_dim=3968, num_layers=24,
                       dtype="bfloat16", remat_policy="full"),
            batch_size=1024, hw=ps.hardware(128, "A100-40GB", 40),
            moe=dict(MOE, num_experts=512))
    if arg == "mini":
        return ps.mini(get_config("paper"))
    if arg == "mini_reference":
        return ps.mini_reference(get_config("mini"))
    if arg == "tiny":
        return ps.tiny_base(arg, moe=dict(MOE, num_experts=8, group_size=0), remat_policy="full")
    raise ps.unknown_variant(arg, "m6_100b.py")
